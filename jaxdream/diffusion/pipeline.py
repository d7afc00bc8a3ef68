"""A Stable Diffusion model folder in diffusers format: loading all its parts, and writing them back."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp

from jaxdream import models
from jaxdream.io.tokenizer import load_tokenizer, tokenize
from jaxdream.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel, WeightsError

COMPONENTS = ('unet', 'text_encoder', 'vae', 'tokenizer', 'scheduler')
_MODEL_INDEX = {
  '_class_name': 'StableDiffusionPipeline',
  '_diffusers_version': '0.35.0',
  'feature_extractor': [None, None],
  'safety_checker': [None, None],
  'requires_safety_checker': False,
  'image_encoder': [None, None],
  'text_encoder': ['transformers', 'CLIPTextModel'],
  'tokenizer': ['transformers', 'CLIPTokenizer'],
  'unet': ['diffusers', 'UNet2DConditionModel'],
  'vae': ['diffusers', 'AutoencoderKL'],
}


@dataclasses.dataclass
class Pipeline:
  unet: UNet2DConditionModel
  text_encoder: CLIPTextModel
  vae: AutoencoderKL
  tokenizer: object
  scheduler_config: dict
  path: str | None = None
  cache: dict = dataclasses.field(default_factory=dict, repr=False)  # compiled samplers of this pipeline

  @property
  def vae_scale_factor(self) -> int:
    return self.vae.downsampling_factor

  @property
  def default_size(self) -> tuple[int, int]:
    """Default image (height, width): the UNet's sample size times the VAE factor."""
    s = self.unet.config.get('sample_size') or 64
    h, w = (s, s) if isinstance(s, int) else s
    return h * self.vae_scale_factor, w * self.vae_scale_factor

  def tokenize(self, prompts):
    return tokenize(self.tokenizer, [prompts] if isinstance(prompts, str) else prompts)


def load_pipeline(
  path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', allow_pickle: bool = False
) -> Pipeline:
  """Load a local diffusers-format Stable Diffusion folder. All configs are checked before any
  weights are read, so a broken folder fails at once with the file to fix."""
  if not os.path.isdir(path):
    raise WeightsError(f'{path}: no such model folder')
  models.read_config(
    path,
    'model_index.json',
    'a diffusers model folder has model_index.json with unet/, text_encoder/, vae/, tokenizer/, scheduler/ beside it',
  )
  missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
  if missing:
    raise WeightsError(f'{path}: missing component folder(s) {", ".join(missing)}')
  for cls, name in ((UNet2DConditionModel, 'unet'), (CLIPTextModel, 'text_encoder'), (AutoencoderKL, 'vae')):
    cls.resolve_config(models.read_config(os.path.join(path, name)))
  scheduler_config = models.read_config(
    os.path.join(path, 'scheduler'), 'scheduler_config.json', 'the scheduler folder needs scheduler_config.json'
  )
  kw = dict(dtype=dtype, attention_impl=attention_impl, allow_pickle=allow_pickle)
  return Pipeline(
    unet=models.load_unet(os.path.join(path, 'unet'), **kw),
    text_encoder=models.load_text_encoder(os.path.join(path, 'text_encoder'), **kw),
    vae=models.load_vae(os.path.join(path, 'vae'), **kw),
    tokenizer=load_tokenizer(os.path.join(path, 'tokenizer')),
    scheduler_config=scheduler_config,
    path=path,
  )


def save_pipeline(pipeline: Pipeline, path: str):
  """Write a diffusers-format folder that diffusers/torch and jaxdream both load.

  Each part is written to a temporary folder first and moved in place, so an interrupted save never
  leaves a half-written model behind a complete-looking model_index.json (which is written last).
  """
  os.makedirs(path, exist_ok=True)
  for name, model in (('unet', pipeline.unet), ('text_encoder', pipeline.text_encoder), ('vae', pipeline.vae)):
    tmp = os.path.join(path, f'.{name}.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    models.save_component(model, tmp)
    _replace_dir(tmp, os.path.join(path, name))
  tmp = os.path.join(path, '.tokenizer.tmp')
  shutil.rmtree(tmp, ignore_errors=True)
  pipeline.tokenizer.save_pretrained(tmp)
  _replace_dir(tmp, os.path.join(path, 'tokenizer'))
  os.makedirs(os.path.join(path, 'scheduler'), exist_ok=True)
  with open(os.path.join(path, 'scheduler', 'scheduler_config.json'), 'w') as f:
    json.dump(pipeline.scheduler_config, f, indent=2)
  index = dict(_MODEL_INDEX, scheduler=['diffusers', pipeline.scheduler_config.get('_class_name', 'PNDMScheduler')])
  with open(os.path.join(path, 'model_index.json.tmp'), 'w') as f:
    json.dump(index, f, indent=2)
  os.replace(os.path.join(path, 'model_index.json.tmp'), os.path.join(path, 'model_index.json'))


def _replace_dir(src: str, dst: str):
  old = dst + '.old'
  if os.path.exists(dst):
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dst, old)
  os.rename(src, dst)
  shutil.rmtree(old, ignore_errors=True)
