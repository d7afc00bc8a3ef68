"""CLIP's vision tower (transformers' CLIPVisionModel, also Kosmos-2's image encoder) and `CLIPModel`: both
towers with their projections, computing what transformers' `get_image_features` / `get_text_features` compute
(in transformers 5 the `pooler_output` of the object they return).

A CLIPModel folder (config.json with `text_config` and `vision_config`, model.safetensors) loads with
`jaxdream.models.load_clip_model`; the module tree is named as the weights name it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.models.clip_text import CLIPEncoder, CLIPTextModel, CLIPTextTransformer
from jaxdream.models.config import ConfigError, resolve_config, square_size
from jaxdream.nn.attention import check_implementation
from jaxdream.nn.layers import Conv2d, Embed, LayerNorm, Linear

VISION_DEFAULTS = dict(
  hidden_size=768,
  intermediate_size=3072,
  num_hidden_layers=12,
  num_attention_heads=12,
  num_channels=3,
  image_size=224,
  patch_size=32,
  hidden_act='quick_gelu',
  layer_norm_eps=1e-5,
)
VISION_SUPPORTED = dict(hidden_act=('quick_gelu', 'gelu'))

_raw = (np.asarray, np.asarray)  # bare nn.Parameter tensors: same layout in both frameworks


def resolve_vision_config(config: dict, defaults: dict = VISION_DEFAULTS, *, model: str = 'CLIP vision') -> dict:
  """The checked vision config; square image and patch sizes as ints, heads dividing the width."""
  cfg = resolve_config(config, defaults, model=model, supported=VISION_SUPPORTED, strict=False)
  cfg['image_size'] = square_size(cfg['image_size'], 'image_size', model)
  cfg['patch_size'] = square_size(cfg['patch_size'], 'patch_size', model)
  if cfg['num_channels'] != 3:  # the processors (and DreamBench's photos) give RGB
    raise ConfigError(f'{model} config: num_channels={cfg["num_channels"]}; jaxdream takes RGB images (3)')
  if cfg['hidden_size'] % cfg['num_attention_heads']:
    raise ConfigError(
      f'{model} config: hidden_size={cfg["hidden_size"]} is not divisible by '
      f'num_attention_heads={cfg["num_attention_heads"]}'
    )
  return cfg


class CLIPVisionEmbeddings(nnx.Module):
  TORCH_PARAMS = {'class_embedding': ('class_embedding', *_raw)}

  def param_axes(self) -> dict:
    return {'class_embedding': ('embed',)}

  def __init__(self, cfg: dict, *, dtype, rngs):
    d, p = cfg['hidden_size'], cfg['patch_size']
    self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)) * d**-0.5)
    self.patch_embedding = Conv2d(
      cfg['num_channels'], d, p, stride=p, padding=0, use_bias=False, axes=('conv_in', 'embed'), dtype=dtype, rngs=rngs
    )
    # A size that is not a multiple of the patch drops the remainder, as torch's strided conv does.
    self.position_embedding = Embed(
      (cfg['image_size'] // p) ** 2 + 1, d, axes=('position', 'embed'), dtype=dtype, rngs=rngs
    )
    self.image_size = cfg['image_size']

  def __call__(self, pixel_values):
    b, h, w, _ = pixel_values.shape
    if (h, w) != (self.image_size, self.image_size):  # transformers' default (interpolate_pos_encoding=False)
      raise ValueError(f'the vision tower expects {self.image_size}x{self.image_size} images, got {h}x{w}')
    x = self.patch_embedding(pixel_values)
    x = x.reshape(b, -1, x.shape[-1])  # row-major patches, as torch's flatten(2)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
    return jnp.concatenate([cls, x], 1) + self.position_embedding.embedding[...].astype(x.dtype)


class CLIPVisionTransformer(nnx.Module):
  """`tower(pixel_values)` (NHWC, normalised) -> the last hidden state (B, 1 + patches, D), before
  post_layernorm; `pooled` is transformers' pooler_output (the class token through post_layernorm)."""

  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    d, eps = cfg['hidden_size'], cfg['layer_norm_eps']
    self.embeddings = CLIPVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.pre_layrnorm = LayerNorm(d, eps=eps, dtype=dtype)  # sic: the weights spell it so
    # The encoder is the text tower's (pre-LN layers, q/k/v/out projections, fc1/fc2), names included.
    self.encoder = CLIPEncoder(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.post_layernorm = LayerNorm(d, eps=eps, dtype=dtype)

  def __call__(self, pixel_values):
    x = self.pre_layrnorm(self.embeddings(pixel_values))
    for layer in self.encoder.layers:
      x = layer(x, None)
    return x

  def pooled(self, pixel_values):
    x = self.pre_layrnorm(self.embeddings(pixel_values))
    layers = list(self.encoder.layers)
    for layer in layers[:-1]:
      x = layer(x, None)
    x = layers[-1].first_token(x) if layers else x  # the last layer for the class token only
    return self.post_layernorm(x[:, 0])


class CLIPModel(nnx.Module):
  """`get_image_features(pixel_values)` (NHWC, as CLIPImageProcessor normalises them) -> (B, projection_dim);
  `get_text_features(input_ids, attention_mask=None)` -> (B, projection_dim). Neither is normalised."""

  CONFIG_NAME = 'config.json'
  WEIGHTS_NAME = 'model'
  CLASS_NAME = 'CLIPModel'
  TORCH_PARAMS = {'logit_scale': ('logit_scale', *_raw)}
  IGNORED_KEYS = (r'.*\.position_ids',)  # buffers older files carry

  @staticmethod
  def resolve_config(config: dict) -> dict:
    """{'text': ..., 'vision': ..., 'projection_dim': ...}; a folder of another model type is an error."""
    kind = config.get('model_type', 'clip')
    if kind != 'clip' or 'vision_config' not in config or 'text_config' not in config:
      raise ConfigError(
        f'not a CLIPModel config (model_type={kind!r}, keys {sorted(config)[:8]}...): '
        'expected model_type "clip" with text_config and vision_config'
      )
    return dict(
      text=CLIPTextModel.resolve_config(config['text_config']),
      vision=resolve_vision_config(config['vision_config']),
      projection_dim=int(config.get('projection_dim', 512)),
      logit_scale_init_value=float(config.get('logit_scale_init_value', 2.6592)),
    )

  def param_axes(self) -> dict:
    return {'logit_scale': ()}

  def __init__(self, config: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    cfg = self.resolve_config(config)
    self.config = dict(config)
    impl = check_implementation(attention_impl)
    text, vision, p = cfg['text'], cfg['vision'], cfg['projection_dim']
    self.text_model = CLIPTextTransformer(text, attention_impl=impl, dtype=dtype, rngs=rngs)
    self.vision_model = CLIPVisionTransformer(vision, attention_impl=impl, dtype=dtype, rngs=rngs)
    self.visual_projection = Linear(vision['hidden_size'], p, use_bias=False, dtype=dtype, rngs=rngs)
    self.text_projection = Linear(text['hidden_size'], p, use_bias=False, dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(cfg['logit_scale_init_value'], jnp.float32))
    self.eos_token_id = text['eos_token_id']
    self.max_position_embeddings = text['max_position_embeddings']
    self.image_size = vision['image_size']

  def get_image_features(self, pixel_values):
    return self.visual_projection(self.vision_model.pooled(pixel_values))

  def get_text_features(self, input_ids, attention_mask=None):
    pooled = self.text_model.forward(input_ids, attention_mask, self.eos_token_id)['pooler_output']
    return self.text_projection(pooled)
