"""ViT (transformers' ViTModel), for the DINO checkpoints (facebook/dino-vits16 and alike): DreamBench's DINO
score embeds an image as `last_hidden_state[:, 0]`, the class token after the final layer norm.

The module tree is named as the weight files name it (transformers still writes ViT's original names,
`encoder.layer.N.attention.attention.query`, ...). The pooler (dense + tanh on the class token) exists only
when the file has its weights, as `ViTModel(add_pooling_layer=...)` saved it. `jaxdream.models.load_vit` loads
a folder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.models.config import ConfigError, resolve_config, square_size
from jaxdream.nn.attention import check_implementation, dot_product_attention, split_heads
from jaxdream.nn.layers import ACTIVATIONS, Conv2d, LayerNorm, Linear, activation

DEFAULTS = dict(
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
  hidden_act='gelu',
  layer_norm_eps=1e-12,
  image_size=224,
  patch_size=16,
  num_channels=3,
  qkv_bias=True,
  pooler_output_size=None,
  pooler_act='tanh',
)
SUPPORTED = dict(hidden_act=tuple(ACTIVATIONS), pooler_act=tuple(ACTIVATIONS))

_raw = (np.asarray, np.asarray)  # bare nn.Parameter tensors: same layout in both frameworks


class ViTDense(nnx.Module):
  """One `dense` Linear: the weights' ViTSelfOutput, ViTIntermediate, ViTOutput and ViTPooler are each this."""

  def __init__(self, n_in: int, n_out: int, *, axes, dtype, rngs):
    self.dense = Linear(n_in, n_out, axes=axes, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.dense(x)


class ViTPatchEmbeddings(nnx.Module):
  def __init__(self, cfg: dict, *, dtype, rngs):
    p = cfg['patch_size']
    self.projection = Conv2d(
      cfg['num_channels'], cfg['hidden_size'], p, stride=p, padding=0, axes=('conv_in', 'embed'), dtype=dtype, rngs=rngs
    )

  def __call__(self, pixel_values):
    x = self.projection(pixel_values)  # a size that is not a multiple of the patch floors, as torch's conv
    return x.reshape(x.shape[0], -1, x.shape[-1])  # row-major patches, as torch's flatten(2)


class ViTEmbeddings(nnx.Module):
  TORCH_PARAMS = {'cls_token': ('cls_token', *_raw), 'position_embeddings': ('position_embeddings', *_raw)}

  def param_axes(self) -> dict:
    return {'cls_token': (None, None, 'embed'), 'position_embeddings': (None, 'position', 'embed')}

  def __init__(self, cfg: dict, *, dtype, rngs):
    d, n = cfg['hidden_size'], (cfg['image_size'] // cfg['patch_size']) ** 2
    self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, d)) * 0.02)
    self.position_embeddings = nnx.Param(jax.random.normal(rngs.params(), (1, n + 1, d)) * 0.02)
    self.patch_embeddings = ViTPatchEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.image_size = cfg['image_size']

  def __call__(self, pixel_values):
    b, h, w, _ = pixel_values.shape
    # transformers' default (interpolate_pos_encoding=False) refuses other sizes; preprocessing crops to this one
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f'ViT expects {self.image_size}x{self.image_size} images, got {h}x{w}')
    x = self.patch_embeddings(pixel_values)
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
    return jnp.concatenate([cls, x], 1) + self.position_embeddings[...].astype(x.dtype)


class ViTSelfAttention(nnx.Module):
  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    d = cfg['hidden_size']
    col = dict(use_bias=cfg['qkv_bias'], axes=('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.query = Linear(d, d, **col)
    self.key = Linear(d, d, **col)
    self.value = Linear(d, d, **col)
    self.heads, self.attention_impl = cfg['num_attention_heads'], attention_impl

  def __call__(self, x, queries=None):
    """Self-attention of `x`; with `queries`, only those rows' outputs (against every key of `x`)."""
    queries = x if queries is None else queries
    out = dot_product_attention(
      split_heads(self.query(queries), self.heads),
      split_heads(self.key(x), self.heads),
      split_heads(self.value(x), self.heads),
      implementation=self.attention_impl,
    )
    return out.reshape(queries.shape)


class ViTAttention(nnx.Module):
  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    d = cfg['hidden_size']
    self.attention = ViTSelfAttention(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.output = ViTDense(d, d, axes=('heads', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x, queries=None):
    return self.output(self.attention(x, queries))


class ViTLayer(nnx.Module):
  """Pre-LN: x + attention(layernorm_before(x)), then + output(act(intermediate(layernorm_after(x))))."""

  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    d, h, eps = cfg['hidden_size'], cfg['intermediate_size'], cfg['layer_norm_eps']
    self.attention = ViTAttention(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.layernorm_before = LayerNorm(d, eps=eps, dtype=dtype)
    self.intermediate = ViTDense(d, h, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.output = ViTDense(h, d, axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.layernorm_after = LayerNorm(d, eps=eps, dtype=dtype)
    self.act = cfg['hidden_act']

  def __call__(self, x):
    x = x + self.attention(self.layernorm_before(x))
    return x + self.output(activation(self.act)(self.intermediate(self.layernorm_after(x))))

  def first_token(self, x):
    """`self(x)[:, :1]` computed for that token alone (the class token, all a DINO embedding reads)."""
    h = self.layernorm_before(x)
    y = x[:, :1] + self.attention(h, h[:, :1])
    return y + self.output(activation(self.act)(self.intermediate(self.layernorm_after(y))))


class ViTEncoder(nnx.Module):
  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    self.layer = nnx.List(
      [ViTLayer(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs) for _ in range(cfg['num_hidden_layers'])]
    )


class ViTModel(nnx.Module):
  """`vit(pixel_values)` (NHWC, normalised) -> {'last_hidden_state' (B, 1 + patches, D) after the final layer
  norm, 'pooler_output' (B, pooler_output_size) or None without a pooler}; `cls_embedding` is DINO's image
  embedding, last_hidden_state[:, 0]."""

  CONFIG_NAME = 'config.json'
  WEIGHTS_NAME = 'model'
  CLASS_NAME = 'ViTModel'
  IGNORED_KEYS = (r'embeddings\.mask_token',)  # masked image modelling only

  @staticmethod
  def resolve_config(config: dict) -> dict:
    kind = config.get('model_type', 'vit')
    if kind != 'vit':
      raise ConfigError(f'not a ViTModel config: model_type={kind!r}, expected "vit" (e.g. facebook/dino-vits16)')
    cfg = resolve_config(config, DEFAULTS, model='ViTModel', supported=SUPPORTED, strict=False)
    cfg['image_size'] = square_size(cfg['image_size'], 'image_size', 'ViTModel')
    cfg['patch_size'] = square_size(cfg['patch_size'], 'patch_size', 'ViTModel')
    if cfg['num_channels'] != 3:  # the processors (and DreamBench's photos) give RGB
      raise ConfigError(f'ViTModel config: num_channels={cfg["num_channels"]}; jaxdream takes RGB images (3)')
    if cfg['hidden_size'] % cfg['num_attention_heads']:
      raise ConfigError(
        f'ViTModel config: hidden_size={cfg["hidden_size"]} is not divisible by '
        f'num_attention_heads={cfg["num_attention_heads"]}'
      )
    cfg['pooler_output_size'] = cfg['pooler_output_size'] or cfg['hidden_size']
    return cfg

  @staticmethod
  def options_from_weights(weights: dict) -> dict:
    """Constructor options the weight file decides: a pooler only when it has one."""
    return dict(add_pooling_layer='pooler.dense.weight' in weights)

  def __init__(
    self,
    config: dict,
    *,
    add_pooling_layer: bool = True,
    dtype=jnp.float32,
    attention_impl: str = 'auto',
    rngs: nnx.Rngs,
  ):
    cfg = self.resolve_config(config)
    self.config = dict(config)
    impl = check_implementation(attention_impl)
    d = cfg['hidden_size']
    self.embeddings = ViTEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.encoder = ViTEncoder(cfg, attention_impl=impl, dtype=dtype, rngs=rngs)
    self.layernorm = LayerNorm(d, eps=cfg['layer_norm_eps'], dtype=dtype)
    self.pooler = (
      ViTDense(d, cfg['pooler_output_size'], axes=('embed', 'embed'), dtype=dtype, rngs=rngs)
      if add_pooling_layer
      else None
    )
    self.pooler_act = cfg['pooler_act']
    self.image_size = cfg['image_size']

  def hidden(self, pixel_values):
    """The last encoder layer's output, before the final layer norm."""
    x = self.embeddings(pixel_values)
    for layer in self.encoder.layer:
      x = layer(x)
    return x

  def __call__(self, pixel_values) -> dict:
    last = self.layernorm(self.hidden(pixel_values))
    pooled = None if self.pooler is None else activation(self.pooler_act)(self.pooler(last[:, 0]))
    return dict(last_hidden_state=last, pooler_output=pooled)

  def cls_embedding(self, pixel_values):
    x = self.embeddings(pixel_values)
    layers = list(self.encoder.layer)
    for layer in layers[:-1]:
      x = layer(x)
    x = layers[-1].first_token(x) if layers else x  # the last layer and the (per-token) norm: class token only
    return self.layernorm(x[:, 0])
