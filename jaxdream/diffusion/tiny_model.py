"""The built-in models: a tiny random Stable Diffusion model folder, made locally (no download, no torch;
SD 1.5's architecture in miniature with the real CLIP tokenizer), and the same architecture trained by
jaxdream itself and shipped in the package (assets/tiny_base, made by scripts/make_tiny_base.sh)."""

from __future__ import annotations

import os

from jaxdream.diffusion.pipeline import Pipeline, save_pipeline
from jaxdream.io.tokenizer import load_tokenizer, write_clip_tokenizer
from jaxdream.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, init_model
from jaxdream.models.presets import SD_SCHEDULER

TINY_UNET = dict(
  _class_name='UNet2DConditionModel',
  _diffusers_version='0.35.0',
  sample_size=16,
  in_channels=4,
  out_channels=4,
  block_out_channels=[32, 64],
  layers_per_block=1,
  attention_head_dim=4,
  cross_attention_dim=64,
  norm_num_groups=8,
  down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
  up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'],
)
TINY_VAE = dict(
  _class_name='AutoencoderKL',
  _diffusers_version='0.35.0',
  block_out_channels=[32, 64, 64],
  down_block_types=['DownEncoderBlock2D'] * 3,
  up_block_types=['UpDecoderBlock2D'] * 3,
  latent_channels=4,
  layers_per_block=1,
  norm_num_groups=8,
  sample_size=64,
  scaling_factor=0.18215,
)
TINY_TEXT_ENCODER = dict(
  architectures=['CLIPTextModel'],
  model_type='clip_text_model',
  hidden_act='quick_gelu',
  hidden_size=64,
  intermediate_size=128,
  num_attention_heads=4,
  num_hidden_layers=2,
  max_position_embeddings=77,
  vocab_size=49408,
  layer_norm_eps=1e-5,
  bos_token_id=49406,
  eos_token_id=49407,
  pad_token_id=49407,
  projection_dim=64,
)
SD15_SCHEDULER = dict(SD_SCHEDULER, _diffusers_version='0.35.0')


def create_tiny_pipeline(path: str, *, seed: int = 0) -> str:
  """Write a tiny random diffusers-format model folder at `path` (skipped if one is there)."""
  if os.path.exists(os.path.join(path, 'model_index.json')):
    return path
  tok_dir = os.path.join(path, 'tokenizer')
  write_clip_tokenizer(tok_dir)
  pipe = Pipeline(
    components={
      'unet': init_model(lambda rngs: UNet2DConditionModel(TINY_UNET, rngs=rngs), seed),
      'text_encoder': init_model(lambda rngs: CLIPTextModel(TINY_TEXT_ENCODER, rngs=rngs), seed + 1),
      'vae': init_model(lambda rngs: AutoencoderKL(TINY_VAE, rngs=rngs), seed + 2),
    },
    tokenizers={'text_encoder': load_tokenizer(tok_dir)},
    scheduler_config=dict(SD15_SCHEDULER),
  )
  save_pipeline(pipe, path)
  return path


BUILTIN_TINY = 'builtin:tiny'
BUILTIN_TINY_BASE = 'builtin:tiny-base'
BUILTIN_MODELS = {
  BUILTIN_TINY: 'a tiny random model, created in the workdir (tests)',
  BUILTIN_TINY_BASE: 'the tiny base model jaxdream trained and ships (64 px; the quickstart)',
}
TINY_BASE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets', 'tiny_base')


def builtin_model_folder(model: str, workdir: str | None = None) -> str:
  """The diffusers folder of a built-in model name (builtin:tiny is created once, in `workdir`/base_model or
  without a workdir in the user's cache folder); any other name (a model folder) is returned unchanged."""
  if model == BUILTIN_TINY:
    if workdir is None:
      cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
      return create_tiny_pipeline(os.path.join(cache, 'jaxdream', 'builtin-tiny'))
    return create_tiny_pipeline(os.path.join(workdir, 'base_model'))
  if model == BUILTIN_TINY_BASE:
    if not os.path.isfile(os.path.join(TINY_BASE_DIR, 'model_index.json')):
      raise FileNotFoundError(
        f'{BUILTIN_TINY_BASE}: {TINY_BASE_DIR} has no model (a package installed without its assets?); '
        'scripts/make_tiny_base.sh makes it'
      )
    return TINY_BASE_DIR
  if model.startswith('builtin:'):
    raise ValueError(f'{model}: no such built-in model; built-in models: {", ".join(BUILTIN_MODELS)}')
  return model
