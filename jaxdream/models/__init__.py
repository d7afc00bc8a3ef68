"""Flax NNX ports of the Stable Diffusion models, loading diffusers/transformers weight folders."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdream.io.weights import (
  WeightsError,
  abstract_model,
  count_params,
  init_model,
  load_state_dict,
  read_config,
  read_weights,
  save_folder,
  state_dict,
)
from jaxdream.models.autoencoder_kl import AutoencoderKL, DiagonalGaussian
from jaxdream.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from jaxdream.models.clip_vision import CLIPModel
from jaxdream.models.config import ConfigError
from jaxdream.models.unet_2d_condition import UNet2DConditionModel
from jaxdream.models.vit import ViTModel


def check_component(cls, path: str) -> dict:
  """The folder's config, checked to be one of `cls` (reads config.json alone: nothing is built or compiled)."""
  config = read_config(path, cls.CONFIG_NAME)
  try:
    cls.resolve_config(config)
  except ConfigError as e:  # name the folder: a wrong one (e.g. another model type) is the usual cause
    raise ConfigError(f'{path}: {e}') from None
  return config


def load_component(cls, path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', allow_pickle: bool = False):
  """Load a model class from its component folder (config.json + weights).

  The config is validated first and the model built shape-only, so a bad folder fails in seconds
  without allocating or compiling anything. A class whose structure depends on the file (ViT's optional
  pooler) says how in `options_from_weights(weights) -> constructor kwargs`.
  """
  config = check_component(cls, path)
  weights = read_weights(path, cls.WEIGHTS_NAME, allow_pickle=allow_pickle)
  options = cls.options_from_weights(weights) if hasattr(cls, 'options_from_weights') else {}
  model = abstract_model(lambda rngs: cls(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs, **options))
  load_state_dict(
    model, weights, source=path, renames=getattr(cls, 'LEGACY_RENAMES', ()), ignore=getattr(cls, 'IGNORED_KEYS', ())
  )
  return model


def save_component(model, path: str, *, weights_dtype=None):
  """Write `model` as a diffusers/transformers component folder (config + safetensors); `weights_dtype`
  (e.g. 'float16', as SD's half-precision checkpoints) stores the floating-point tensors in that type."""
  config = dict(model.config)
  config.setdefault('_class_name', model.CLASS_NAME)
  tensors = state_dict(model)
  if weights_dtype is not None:
    tensors = {k: v.astype(weights_dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}
  save_folder(
    path,
    model.export_config() if hasattr(model, 'export_config') else config,
    tensors,
    model.WEIGHTS_NAME,
    model.CONFIG_NAME,
  )


def load_unet(path: str, **kwargs) -> UNet2DConditionModel:
  return load_component(UNet2DConditionModel, path, **kwargs)


def load_text_encoder(path: str, **kwargs) -> CLIPTextModel:
  return load_component(CLIPTextModel, path, **kwargs)


def load_vae(path: str, **kwargs) -> AutoencoderKL:
  return load_component(AutoencoderKL, path, **kwargs)


def load_clip_model(path: str, **kwargs) -> CLIPModel:
  """A transformers CLIPModel folder: both towers and their projections (DreamBench's CLIP-I and CLIP-T)."""
  return load_component(CLIPModel, path, **kwargs)


def load_vit(path: str, **kwargs) -> ViTModel:
  """A transformers ViTModel folder (DINO's facebook/dino-vits16 layout), with its pooler when the file has one."""
  return load_component(ViTModel, path, **kwargs)
