"""Configs of published models (Stable Diffusion as diffusers writes them, Qwen-VL as transformers does), for
building models without their weight files (parameter counts, memory planning, benchmarks with random
weights)."""

SD15_UNET = dict(
  _class_name='UNet2DConditionModel',
  act_fn='silu',
  attention_head_dim=8,
  block_out_channels=[320, 640, 1280, 1280],
  center_input_sample=False,
  cross_attention_dim=768,
  down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  downsample_padding=1,
  flip_sin_to_cos=True,
  freq_shift=0,
  in_channels=4,
  layers_per_block=2,
  mid_block_scale_factor=1,
  norm_eps=1e-5,
  norm_num_groups=32,
  out_channels=4,
  sample_size=64,
  up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'],
)

SD21_UNET = dict(
  SD15_UNET,
  attention_head_dim=[5, 10, 20, 20],
  cross_attention_dim=1024,
  use_linear_projection=True,
  upcast_attention=True,
  sample_size=96,
)

SD_VAE = dict(
  _class_name='AutoencoderKL',
  act_fn='silu',
  block_out_channels=[128, 256, 512, 512],
  down_block_types=['DownEncoderBlock2D'] * 4,
  in_channels=3,
  latent_channels=4,
  layers_per_block=2,
  norm_num_groups=32,
  out_channels=3,
  sample_size=512,
  scaling_factor=0.18215,
  up_block_types=['UpDecoderBlock2D'] * 4,
)

SD15_TEXT_ENCODER = dict(
  architectures=['CLIPTextModel'],
  model_type='clip_text_model',
  hidden_act='quick_gelu',
  hidden_size=768,
  intermediate_size=3072,
  num_attention_heads=12,
  num_hidden_layers=12,
  max_position_embeddings=77,
  vocab_size=49408,
  layer_norm_eps=1e-5,
  bos_token_id=0,
  eos_token_id=2,
  pad_token_id=1,
  projection_dim=768,
)

SD21_TEXT_ENCODER = dict(
  SD15_TEXT_ENCODER,
  hidden_act='gelu',
  hidden_size=1024,
  intermediate_size=4096,
  num_attention_heads=16,
  num_hidden_layers=23,
  projection_dim=512,
)

# stabilityai/stable-diffusion-xl-base-1.0: a first level without attention, 1/2/10 transformer layers per level,
# both text encoders' features (768 + 1280) as context, the pooled embedding and 6 time ids as added conditioning.
SDXL_UNET = dict(
  SD15_UNET,
  addition_embed_type='text_time',
  addition_embed_type_num_heads=64,
  addition_time_embed_dim=256,
  attention_head_dim=[5, 10, 20],
  block_out_channels=[320, 640, 1280],
  cross_attention_dim=2048,
  down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
  projection_class_embeddings_input_dim=2816,  # 1280 (pooled) + 6 time ids * 256
  sample_size=128,
  transformer_layers_per_block=[1, 2, 10],
  up_block_types=['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
  upcast_attention=None,
  use_linear_projection=True,
)

# stabilityai/stable-diffusion-xl-refiner-1.0: text_encoder_2 alone (1280) as context; 5 time ids (the sizes, the
# crop and the aesthetic score).
SDXL_REFINER_UNET = dict(
  SDXL_UNET,
  attention_head_dim=[6, 12, 24, 24],
  block_out_channels=[384, 768, 1536, 1536],
  cross_attention_dim=1280,
  down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
  projection_class_embeddings_input_dim=2560,  # 1280 (pooled) + 5 time ids * 256
  transformer_layers_per_block=4,
  up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
)

SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# SDXL's text_encoder: CLIP ViT-L/14, as SD 1.5's.
SDXL_TEXT_ENCODER = SD15_TEXT_ENCODER

# SDXL's text_encoder_2: OpenCLIP ViT-bigG/14 with its text projection.
SDXL_TEXT_ENCODER_2 = dict(
  SD15_TEXT_ENCODER,
  architectures=['CLIPTextModelWithProjection'],
  hidden_act='gelu',
  hidden_size=1280,
  intermediate_size=5120,
  num_attention_heads=20,
  num_hidden_layers=32,
  projection_dim=1280,
)

# Scheduler configs of the published models (scheduler/scheduler_config.json): SD 1.5's (SD 2.x's differs only in
# its prediction type), and SDXL base's.
SD_SCHEDULER = dict(
  _class_name='PNDMScheduler',
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule='scaled_linear',
  num_train_timesteps=1000,
  set_alpha_to_one=False,
  skip_prk_steps=True,
  steps_offset=1,
  clip_sample=False,
  prediction_type='epsilon',
  timestep_spacing='leading',
  trained_betas=None,
)
SDXL_SCHEDULER = dict(
  _class_name='EulerDiscreteScheduler',
  beta_start=0.00085,
  beta_end=0.012,
  beta_schedule='scaled_linear',
  interpolation_type='linear',
  num_train_timesteps=1000,
  prediction_type='epsilon',
  steps_offset=1,
  timestep_spacing='leading',
  use_karras_sigmas=False,
)


# Qwen/Qwen2.5-VL-3B-Instruct's config.json (3,754,622,976 parameters; tied embeddings), as transformers 5 reads it.
_QWEN_TOKENS = dict(
  image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653
)
QWEN2_5_VL_3B = dict(
  model_type='qwen2_5_vl',
  tie_word_embeddings=True,
  **_QWEN_TOKENS,
  text_config=dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=11008,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters=dict(rope_type='default', rope_theta=1000000.0, mrope_section=[16, 24, 24]),
  ),
  vision_config=dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=2048,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    in_chans=3,
    tokens_per_second=2,
  ),
)
# Qwen/Qwen3-VL-4B-Instruct's architecture (tied embeddings, DeepStack at vision blocks 5, 11, 17).
QWEN3_VL_4B = dict(
  model_type='qwen3_vl',
  tie_word_embeddings=True,
  **_QWEN_TOKENS,
  text_config=dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters=dict(rope_type='default', rope_theta=5000000.0, mrope_section=[24, 20, 20], mrope_interleaved=True),
  ),
  vision_config=dict(
    depth=24,
    hidden_size=1024,
    intermediate_size=4096,
    num_heads=16,
    out_hidden_size=2560,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[5, 11, 17],
  ),
)
