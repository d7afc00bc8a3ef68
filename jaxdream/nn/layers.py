"""Basic layers shared by every model: NHWC, float32 parameters, configurable compute dtype.

Parameters are stored in JAX layout (`kernel` (in, out) / HWIO, `scale`, `embedding`). Each layer
declares in `TORCH_PARAMS` how its parameters map to the PyTorch state-dict names and layouts, which
is all `jaxdream.io.weights` needs to load and save diffusers/transformers weight files.

Each layer instance also names the logical axes of its parameters (`axes`, MaxText style): 'embed' (model
width), 'heads' (attention projections' head dimension), 'mlp' (feed-forward hidden), 'vocab', 'conv_in' /
'conv_out' / 'conv_mid' (conv channels), 'norm'... The models pick the names, so that the config's rules
(`jaxdream.distributed.sharding`) can shard column- and row-parallel layers as pairs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

# The name of Linear and Conv2d outputs: what remat='blocks' keeps (nn.remat).
WEIGHT_PRODUCT = 'weight_product'


def _linear_weight(w):
  """torch's (out, in) Linear weight; legacy 1x1 conv weights used where a Linear is expected (old VAE
  attention) lose their two unit axes (a larger kernel is left as it is, for the loader's shape check)."""
  w = np.asarray(w)
  return w[:, :, 0, 0] if w.ndim == 4 and w.shape[2:] == (1, 1) else w


def _linear_to_jax(w):
  w = _linear_weight(w)
  return w.T if w.ndim == 2 else w


def _conv_to_jax(w):
  w = np.asarray(w)
  return np.transpose(w, (2, 3, 1, 0)) if w.ndim == 4 else w  # OIHW -> HWIO; another rank fails the shape check


def _identity(w):
  return np.asarray(w)


def matmul(x, w, dtype, *, out_in: bool = False):
  """x @ w (w (in, out); with `out_in`, w (out, in) as torch stores it and x @ w.T) with both cast to `dtype`,
  accumulated in float32, the result in `dtype`. Asking for the float32 result keeps bfloat16 operands as they
  are: otherwise XLA's CPU backend converts both to float32 first and holds a float32 copy of every weight at
  once (a 3B model in bfloat16: 7.5 GB of weights, +15 GB of copies, and 3x slower). GPUs and TPUs accumulate
  bfloat16 dots in float32 anyway: the numbers are the same."""
  x, w = x.astype(dtype), w.astype(dtype)
  one_row = x.size == x.shape[-1] and jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == 'cpu'
  if one_row and out_in:
    return _row_product(x.reshape(-1).astype(jnp.float32), w).astype(dtype).reshape(x.shape[:-1] + w.shape[:1])
  if one_row:
    # One row (batch-1 decoding): XLA:CPU runs a single-row half-precision product in its generic loop, ~10x
    # slower than the YNNPACK kernel it uses from two rows on (docs/performance.md); a zero row costs nothing.
    rows = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), dtype)])
    y = _dot(rows, w, out_in)[0]
    return y.astype(dtype).reshape(x.shape[:-1] + y.shape)
  return _dot(x, w, out_in).astype(dtype)


# XLA:CPU computes a float32 vector-matrix product inside the loop that produces its matrix (here: the weight's
# conversion to float32, read element by element, never copied) only while the vector is under 16 KiB
# (cpu_instruction_fusion.cc): 4,095 floats. Longer inputs go in parts.
_FUSED_ROW_MAX = 4095


def _row_product(x, w):
  """x (in,) float32 against an (out, in) half-precision weight: float32 (out,). For batch-1 decoding on CPU:
  the conversion fuses into XLA's loop product, which reads a bfloat16 (out, in) weight 1.6-2.5x faster than
  YNNPACK's two-row kernel (docs/performance.md). Exact products, float32 sums (other order than a kernel's)."""
  k = x.shape[0]
  n = -(-k // _FUSED_ROW_MAX)
  c = -(-k // n)
  parts = [jnp.dot(x[i : i + c], w[:, i : i + c].astype(jnp.float32).T) for i in range(0, k, c)]
  return parts[0] if n == 1 else jnp.concatenate(parts).reshape(n, -1).sum(0)


def _dot(x, w, out_in: bool):
  """x (..., in) against w (in, out), or (out, in) with `out_in`; float32 accumulation and result."""
  if not out_in:
    return jnp.dot(x, w, preferred_element_type=jnp.float32)
  # Rows flattened first: a 3-D x against an (out, in) weight inside a loop (decoding) made XLA:CPU hoist a
  # transposed copy of every weight out of the loop, each call (docs/performance.md).
  y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return y.reshape(x.shape[:-1] + (w.shape[0],))


def _uniform_init(key, shape, bound):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _check_axes(layer: str, axes, n: int) -> tuple:
  axes = tuple(axes)
  if len(axes) != n:
    raise ValueError(f'{layer}: axes={axes!r} must name {n} logical axes')
  return axes


class Linear(nnx.Module):
  """`axes`: logical names of the (input, output) features. The default, ('embed', 'embed'), is a layer
  within the model width that tensor rules leave whole; ('embed', 'heads'|'mlp') makes it column-parallel,
  ('heads'|'mlp', 'embed') row-parallel."""

  TORCH_PARAMS = {
    'kernel': ('weight', _linear_to_jax, lambda k: np.asarray(k).T),
    'bias': ('bias', _identity, _identity),
  }

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    axes=('embed', 'embed'),
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.axes = _check_axes('Linear', axes, 2)
    bound = 1.0 / math.sqrt(in_features)  # torch's default init, so random models look alike
    self.kernel = nnx.Param(_uniform_init(rngs.params(), (in_features, out_features), bound))
    self.bias = nnx.Param(_uniform_init(rngs.params(), (out_features,), bound)) if use_bias else None
    self.dtype = dtype

  def param_axes(self) -> dict:
    return {'kernel': self.axes, 'bias': self.axes[1:]}

  def __call__(self, x):
    y = matmul(x, self.kernel[...], self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return checkpoint_name(y, WEIGHT_PRODUCT)


class LinearOutIn(Linear):
  """A Linear whose kernel is stored (out, in), as torch's Linear stores its weight. For half-precision
  inference on CPU: XLA:CPU's bfloat16 products with few rows (decoding) read an (out, in) weight 1.3-2.3x
  faster than an (in, out) one, and prefill-sized ones 1.05-1.2x faster (docs/performance.md); in float32 the
  (in, out) layout is the faster one. `axes` still name (input, output) features."""

  TORCH_PARAMS = {
    'kernel': ('weight', _linear_weight, _identity),
    'bias': ('bias', _identity, _identity),
  }

  def __init__(self, in_features: int, out_features: int, **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self.kernel = nnx.Param(self.kernel[...].T)  # the same draws as Linear's, transposed

  def param_axes(self) -> dict:
    return {'kernel': self.axes[::-1], 'bias': self.axes[1:]}

  def __call__(self, x):
    y = matmul(x, self.kernel[...], self.dtype, out_in=True)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return checkpoint_name(y, WEIGHT_PRODUCT)


def linear_class(dtype) -> type[Linear]:
  """The Linear layer for inference models (vision-language decoders and towers) computing in `dtype`:
  LinearOutIn for half precision, Linear for float32: each layout is the faster one there on CPU (measured
  there only; on GPUs and TPUs XLA picks the product's operand layouts itself)."""
  return Linear if jnp.dtype(dtype) == jnp.float32 else LinearOutIn


def _patches(x, p: int):
  """(B, H, W, C) -> (B, H // p, W // p, p * p * C): the non-overlapping p x p patches, each flattened in the
  (row, column, channel) order of an HWIO kernel, so that a stride-p p x p convolution is one matmul (ViT
  patch embeddings: 1.2-1.8x faster than XLA:CPU's convolution, docs/performance.md). A remainder that the patch
  does not divide is dropped, as the strided convolution drops it."""
  b, h, w, c = x.shape
  x = x[:, : h - h % p, : w - w % p]
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


class Conv2d(nnx.Module):
  """NHWC convolution with an HWIO kernel; `padding` is symmetric, as in torch. `axes`: logical names of
  the (input, output) channels."""

  TORCH_PARAMS = {
    'kernel': ('weight', _conv_to_jax, lambda k: np.transpose(np.asarray(k), (3, 2, 0, 1))),
    'bias': ('bias', _identity, _identity),
  }

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    padding: int | None = None,
    use_bias: bool = True,
    axes=('conv_in', 'conv_out'),
    dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.axes = _check_axes('Conv2d', axes, 2)
    bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
    self.kernel = nnx.Param(_uniform_init(rngs.params(), (kernel_size, kernel_size, in_channels, out_channels), bound))
    self.bias = nnx.Param(_uniform_init(rngs.params(), (out_channels,), bound)) if use_bias else None
    self.stride = stride
    self.padding = kernel_size // 2 if padding is None else padding
    self.dtype = dtype

  def param_axes(self) -> dict:
    return {'kernel': (None, None) + self.axes, 'bias': self.axes[1:]}

  def __call__(self, x):
    kernel = self.kernel[...]
    if kernel.shape[0] == 1 and kernel.shape[1] == 1 and self.stride == 1 and self.padding == 0:
      y = matmul(x, kernel[0, 0], self.dtype)  # 1x1 conv is a matmul
    elif kernel.shape[0] == kernel.shape[1] == self.stride and self.padding == 0:
      y = matmul(_patches(x, self.stride), kernel.reshape(-1, kernel.shape[-1]), self.dtype)
    else:
      p = self.padding
      y = jax.lax.conv_general_dilated(
        x.astype(self.dtype),
        kernel.astype(self.dtype),
        (self.stride, self.stride),
        ((p, p), (p, p)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        preferred_element_type=jnp.float32,  # as `matmul`: no float32 copy of the kernel on CPU
      ).astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return checkpoint_name(y, WEIGHT_PRODUCT)


class _Norm(nnx.Module):
  """Per-feature `scale` and `bias`, named by one logical axis (`axes`, default ('norm',))."""

  TORCH_PARAMS = {'scale': ('weight', _identity, _identity), 'bias': ('bias', _identity, _identity)}

  def __init__(self, num_features: int, axes):
    self.axes = _check_axes(type(self).__name__, axes, 1)
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

  def param_axes(self) -> dict:
    return {'scale': self.axes, 'bias': self.axes}


class GroupNorm(_Norm):
  """GroupNorm over the channel (last) axis, statistics in float32.

  One pass over the data (per-channel sum and sum of squares, then combined per group): on CPU this is
  twice as fast as mean-then-variance (docs/performance.md) and lets the affine fold into one FMA.
  """

  def __init__(
    self,
    num_groups: int,
    num_channels: int,
    *,
    eps: float = 1e-5,
    axes=('norm',),
    dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    if num_channels % num_groups:
      raise ValueError(f'GroupNorm: {num_channels} channels do not split into {num_groups} groups')
    super().__init__(num_channels, axes)
    self.num_groups = num_groups
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    c, g = x.shape[-1], self.num_groups
    xf = x.astype(jnp.float32)
    axes = tuple(range(1, x.ndim - 1))
    n = math.prod(x.shape[1:-1]) * (c // g)
    s1 = jnp.sum(xf, axes).reshape(-1, g, c // g).sum(-1)
    s2 = jnp.sum(xf * xf, axes).reshape(-1, g, c // g).sum(-1)
    mean = s1 / n
    var = jnp.maximum(s2 / n - mean * mean, 0.0)
    inv = jax.lax.rsqrt(var + self.eps)
    mean = jnp.repeat(mean, c // g, axis=-1)  # (B, C)
    inv = jnp.repeat(inv, c // g, axis=-1)
    a = inv * self.scale[...]
    b = self.bias[...] - mean * a
    bshape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
    return (xf * a.reshape(bshape) + b.reshape(bshape)).astype(self.dtype)


class LayerNorm(_Norm):
  def __init__(
    self, num_features: int, *, eps: float = 1e-5, axes=('norm',), dtype=jnp.float32, rngs: nnx.Rngs | None = None
  ):
    super().__init__(num_features, axes)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a `scale` (T5, Llama, Qwen): statistics in float32, normalised values cast
  to the compute dtype before the scale, as transformers' Qwen2/Qwen3 RMSNorm does."""

  TORCH_PARAMS = {'scale': ('weight', _identity, _identity)}

  def __init__(
    self, num_features: int, *, eps: float = 1e-6, axes=('norm',), dtype=jnp.float32, rngs: nnx.Rngs | None = None
  ):
    self.axes = _check_axes('RMSNorm', axes, 1)
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def param_axes(self) -> dict:
    return {'scale': self.axes}

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class Embed(nnx.Module):
  """`axes`: logical names of the (rows, features) of the table; ('vocab', 'embed') for tokens."""

  TORCH_PARAMS = {'embedding': ('weight', _identity, _identity)}

  def __init__(self, num_embeddings: int, features: int, *, axes=('vocab', 'embed'), dtype=jnp.float32, rngs: nnx.Rngs):
    self.axes = _check_axes('Embed', axes, 2)
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num_embeddings, features)) * 0.02)
    self.dtype = dtype

  def param_axes(self) -> dict:
    return {'embedding': self.axes}

  def __call__(self, ids):
    table = self.embedding[...]
    if table.dtype != jnp.float32 and jax.default_backend() == 'cpu':
      # XLA:CPU gathers half-precision rows from a float32 copy of the table; inside a decoding loop it hoisted
      # that copy out of the loop (1.24 GB each call for Qwen2.5-VL-3B). Tied to the ids, the conversion stays
      # in the gather, row by row (docs/performance.md).
      table, ids = jax.lax.optimization_barrier((table, ids))
    return jnp.take(table, ids, axis=0).astype(self.dtype)

  def attend(self, x):
    """Logits against the embedding matrix (tied LM heads): the table is the head's (out, in) weight. Read in
    place (not as `table.T`: XLA:CPU computed that bfloat16 product on a float32 copy of the table)."""
    return matmul(x, self.embedding[...], self.dtype, out_in=True)


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
  'silu': jax.nn.silu,
  'swish': jax.nn.silu,
  'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # torch's default GELU is the exact one
  'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
  'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),  # Qwen3-VL's vision tower
  'quick_gelu': quick_gelu,
  'relu': jax.nn.relu,
  'tanh': jnp.tanh,  # ViT's pooler
}


def activation(name: str):
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f'unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}') from None
