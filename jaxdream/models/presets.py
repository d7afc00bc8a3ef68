"""Configs of the published Stable Diffusion models, as diffusers writes them, for building models
without their weight files (parameter counts, memory planning, benchmarks with random weights)."""

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
