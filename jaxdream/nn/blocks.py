"""Blocks shared by the UNet and the VAE, named as diffusers names them (resnet.py, attention_processor.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.nn.attention import dot_product_attention, split_heads
from jaxdream.nn.layers import Conv2d, GroupNorm, Linear, activation
from jaxdream.nn.remat import remat_attention, remat_block


class Attention(nnx.Module):
  """diffusers' `Attention`: to_q/to_k/to_v, to_out.0, optional group norm and residual (VAE mid block)."""

  def __init__(
    self,
    query_dim: int,
    *,
    heads: int,
    dim_head: int,
    cross_attention_dim: int | None = None,
    bias: bool = False,
    upcast: bool = False,
    norm_num_groups: int | None = None,
    eps: float = 1e-5,
    residual: bool = False,
    attention_impl: str = 'auto',
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    # Column-parallel q/k/v and row-parallel out projection over the heads. A single head (the VAE's)
    # names its features 'kv' instead: splitting them would split every score's dot product.
    col, row = (('embed', 'heads'), ('heads', 'embed')) if heads > 1 else (('embed', 'kv'), ('kv', 'embed'))
    self.group_norm = GroupNorm(norm_num_groups, query_dim, eps=eps, dtype=dtype) if norm_num_groups else None
    self.to_q = Linear(query_dim, inner, use_bias=bias, axes=col, dtype=dtype, rngs=rngs)
    self.to_k = Linear(kv_dim, inner, use_bias=bias, axes=col, dtype=dtype, rngs=rngs)
    self.to_v = Linear(kv_dim, inner, use_bias=bias, axes=col, dtype=dtype, rngs=rngs)
    self.to_out = nnx.List([Linear(inner, query_dim, axes=row, dtype=dtype, rngs=rngs)])
    self.heads, self.upcast, self.residual, self.attention_impl = heads, upcast, residual, attention_impl
    self.remat = 'none'  # set for training (nn.remat)

  def __call__(self, x, context=None):
    """x: (B, L, C) tokens, or (B, H, W, C) for the VAE's spatial attention."""
    shape = x.shape
    residual = x
    if self.group_norm is not None:
      x = self.group_norm(x)
    x = x.reshape(shape[0], -1, shape[-1])
    context = x if context is None else context
    attend = remat_attention(
      self.remat,
      lambda q, k, v: dot_product_attention(q, k, v, implementation=self.attention_impl, upcast=self.upcast),
    )
    out = attend(
      split_heads(self.to_q(x), self.heads),
      split_heads(self.to_k(context), self.heads),
      split_heads(self.to_v(context), self.heads),
    )
    out = self.to_out[0](out.reshape(out.shape[0], out.shape[1], -1)).reshape(shape)
    return out + residual if self.residual else out


class ResnetBlock2D(nnx.Module):
  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    temb_channels: int | None,
    groups: int,
    eps: float,
    act_fn: str = 'silu',
    output_scale_factor: float = 1.0,
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    # conv1 (with the time embedding added to its output) is column-parallel over the block's inner
    # channels ('conv_mid'), conv2 row-parallel: the block's input and output channels stay whole.
    self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
    self.conv1 = Conv2d(in_channels, out_channels, 3, axes=('conv_in', 'conv_mid'), dtype=dtype, rngs=rngs)
    self.time_emb_proj = (
      Linear(temb_channels, out_channels, axes=('embed', 'conv_mid'), dtype=dtype, rngs=rngs) if temb_channels else None
    )
    self.norm2 = GroupNorm(groups, out_channels, eps=eps, axes=('conv_mid',), dtype=dtype)
    self.conv2 = Conv2d(out_channels, out_channels, 3, axes=('conv_mid', 'conv_out'), dtype=dtype, rngs=rngs)
    self.conv_shortcut = (
      Conv2d(in_channels, out_channels, 1, padding=0, dtype=dtype, rngs=rngs) if in_channels != out_channels else None
    )
    self.act_fn, self.output_scale_factor = act_fn, output_scale_factor
    self.remat = 'none'  # set for training (nn.remat)

  def __call__(self, x, temb=None):
    return remat_block(self, ResnetBlock2D._forward, x, temb)

  def _forward(self, x, temb):
    act = activation(self.act_fn)
    h = self.conv1(act(self.norm1(x)))
    if self.time_emb_proj is not None and temb is not None:
      h = h + self.time_emb_proj(act(temb))[:, None, None, :]
    h = self.conv2(act(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x + h
    return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nnx.Module):
  def __init__(self, channels: int, out_channels: int, *, padding: int, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, out_channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)
    self.padding = padding

  def __call__(self, x):
    if self.padding == 0:  # diffusers pads right and bottom only, then convolves without padding
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


def upsample_nearest(x, size):
  """Nearest-neighbour resize of NHWC `x` to `size` (H, W), index rule of torch's mode='nearest'."""
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.floor(np.arange(size[0]) * (h / size[0])).astype(np.int32)
  cols = np.floor(np.arange(size[1]) * (w / size[1])).astype(np.int32)
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv = Conv2d(channels, channels, 3, dtype=dtype, rngs=rngs)

  def __call__(self, x, size=None):
    size = tuple(size) if size is not None else (2 * x.shape[1], 2 * x.shape[2])
    return self.conv(upsample_nearest(x, size))
