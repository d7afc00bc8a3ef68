"""Adapters as parameter types, and module surgery that swaps layers for adapted ones.

- Int8 weight-only quantization: `Quantized` variables are neither trainable `Param`s nor torch
  state-dict entries, so filtered splits (`nnx.split(model, nnx.Param, ...)`) leave them out of training and
  weight files.
- LoRA: `LoRALinear` / `LoRAConv2d` are the base layers plus `LoRAParam` factors; the base weights keep
  their names (weight files load and save as before) and the adapters are found by parameter type or by
  their `lora_a` / `lora_b` paths.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.nn.layers import Conv2d, Embed, Linear, LinearOutIn, matmul


class Quantized(nnx.Variable):
  """An int8 weight-only quantized tensor or its scales: not a trainable Param, not in torch files."""


def _quantize(w, axis: int):
  """Symmetric int8 with one float32 scale per slice along `axis` (max |w| maps to 127)."""
  w = np.asarray(jax.device_get(w), np.float32)
  scale = np.abs(w).max(axis=axis, keepdims=True) / 127
  scale = np.where(scale == 0, 1.0, scale)
  q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
  return Quantized(jnp.asarray(q)), Quantized(jnp.asarray(np.squeeze(scale, axis)))


def _dequantized(q, x, dtype):
  """The int8 weights `q` in `dtype`, converted after `x` exists. XLA:CPU has no int8 product: it multiplies a
  converted copy, and a conversion that depends on the weights alone was hoisted out of the decoding loop, a
  full-precision copy of every weight made before the loop and held through it (more memory than the float32
  model). Adding a zero that XLA cannot prove is zero (the minimum of an unsigned view of x's first element
  and 0) ties each copy to its layer's input: made when the layer runs, freed after. CPU only, where it was
  measured (docs/performance.md)."""
  if jax.default_backend() != 'cpu':
    return q.astype(dtype)
  bits = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.uint32)
  return (q + jnp.minimum(bits, jnp.uint32(0)).astype(q.dtype)).astype(dtype)  # the zero before the conversion


class Int8Linear(nnx.Module):
  """A Linear with an int8 kernel and one scale per output channel; computes in the layer's dtype."""

  def __init__(self, linear: Linear):
    self.out_in = isinstance(linear, LinearOutIn)  # the kernel keeps its layer's layout
    self.kernel, self.scale = _quantize(linear.kernel[...], 1 if self.out_in else 0)
    self.bias = linear.bias
    self.dtype = linear.dtype

  def __call__(self, x):
    kernel = _dequantized(self.kernel[...], x, self.dtype)
    y = matmul(x, kernel, self.dtype, out_in=self.out_in) * self.scale[...].astype(self.dtype)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Int8Embed(nnx.Module):
  """Token embeddings stored as int8 with one scale per token (so the tied LM head is int8 too)."""

  def __init__(self, embed: Embed):
    self.embedding, self.scale = _quantize(embed.embedding[...], 1)
    self.dtype = embed.dtype

  def __call__(self, ids):
    rows = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
    return rows * jnp.take(self.scale[...], ids, axis=0)[..., None].astype(self.dtype)

  def attend(self, x):
    logits = matmul(x, _dequantized(self.embedding[...], x, self.dtype), self.dtype, out_in=True)  # as Embed.attend
    return logits * self.scale[...].astype(self.dtype)


def swap_modules(module: nnx.Module, convert):
  """Replace, in place and recursively, every submodule for which `convert` returns a new one."""
  children = [(module, k, v) for k, v in vars(module).items() if isinstance(v, (nnx.Module, nnx.List))]
  for parent, key, child in children:
    items = list(enumerate(child)) if isinstance(child, nnx.List) else [(None, child)]
    for i, sub in items:
      new = convert(sub)
      if new is None:
        swap_modules(sub, convert)
      elif i is None:
        setattr(parent, key, new)
      else:
        child[i] = new


def quantize_int8(model: nnx.Module, embeddings=()) -> nnx.Module:
  """Weight-only int8 inference, in place: every Linear, and the `embeddings` (token embeddings, which a tied
  LM head reads too), keep int8 weights with float32 per-channel scales; activations stay in the compute
  dtype. Parameter memory drops about 4x from float32. Returns the model."""
  embeddings = [id(e) for e in embeddings]

  def convert(m):
    if isinstance(m, Linear):
      return Int8Linear(m)
    if isinstance(m, Embed) and id(m) in embeddings:
      return Int8Embed(m)
    return None

  swap_modules(model, convert)
  # What is left (norms, biases) may be views of the weight file that loading mapped (jax's CPU arrays can
  # alias host memory), and one small view keeps the whole file mapped: the full-precision weights' pages,
  # touched by quantizing, stay resident. Copies cut that tie.
  nnx.update(model, jax.tree.map(jnp.copy, nnx.state(model)))
  return model


def state_bytes(model: nnx.Module) -> int:
  """Bytes held by the model's arrays (parameters and quantized weights)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


# --- LoRA ------------------------------------------------------------------------------------------------


class LoRAParam(nnx.Param):
  """A low-rank adapter factor: trainable like any Param, but not a base-model weight (it is in no
  diffusers/transformers state dict; LoRA files hold it), so `nnx.split(model, LoRAParam, ...)` and the
  trainer's path filters tell adapters from the base."""


def lora_scale(rank: int, alpha: float | None = None, rslora: bool = False) -> float:
  """alpha / rank as peft and kohya scale the update (alpha / sqrt(rank) with rsLoRA); alpha defaults to
  the rank (scale 1)."""
  alpha = rank if alpha is None else alpha
  return alpha / (math.sqrt(rank) if rslora else rank)


def _lora_down_init(key, shape, fan_in: int, rank: int, init: str):
  if init == 'kaiming_uniform':  # torch's kaiming_uniform_(a=sqrt(5)), peft's and kohya's: U(+-1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  if init == 'gaussian':  # diffusers' DreamBooth-LoRA script (peft init_lora_weights='gaussian')
    return jax.random.normal(key, shape, jnp.float32) / rank
  raise ValueError(f"lora init {init!r}: use 'kaiming_uniform' or 'gaussian'")


class LoRALinear(Linear):
  """A Linear plus a low-rank update: y = x W + b + scale * (x A) B, with A (in, rank), B (rank, out)
  (peft's lora_A / lora_B, kohya's lora_down / lora_up, transposed). B starts at zero, so an adapter
  begins as the identity change. The base kernel and bias keep their names and torch layout.

  Factors with a leading batch axis, A (batch, in, rank) and B (batch, rank, out), give each example its
  own adapter (the batched sampler sets them, jaxdream.diffusion.adapters); the base matmul stays shared."""

  def __init__(self, linear: Linear, rank: int, *, scale: float, key, init: str = 'kaiming_uniform'):
    vars(self).update({k: v for k, v in vars(linear).items() if not k.startswith('_')})
    d_in, d_out = linear.kernel.shape
    self.lora_a = LoRAParam(_lora_down_init(key, (d_in, rank), d_in, rank, init))
    self.lora_b = LoRAParam(jnp.zeros((rank, d_out), jnp.float32))
    self.lora_scale = scale

  def param_axes(self) -> dict:
    return dict(super().param_axes(), lora_a=(self.axes[0], None), lora_b=(None, self.axes[1]))

  def delta(self) -> jax.Array:
    """The update as a kernel: scale * A B, (in, out)."""
    return self.lora_scale * (self.lora_a[...] @ self.lora_b[...])

  # B (rank, out) is laid out as the base kernel (in, out) is, and converts to torch's up factor (out, rank)
  # as the kernel does to its weight: a base type with its own output order (GEGLU's interleaved projection)
  # keeps B's features in that order.
  def torch_factors(self) -> tuple[np.ndarray, np.ndarray]:
    """(down (rank, in), up (out, rank)) in torch layout, float32."""
    to_torch = type(self).TORCH_PARAMS['kernel'][2]
    return np.asarray(self.lora_a[...], np.float32).T, np.asarray(to_torch(np.asarray(self.lora_b[...], np.float32)))

  def set_torch_factors(self, down, up):
    """Set A and B from torch-layout factors (see torch_factors)."""
    to_jax = type(self).TORCH_PARAMS['kernel'][1]
    self.lora_a.set_value(jnp.asarray(np.asarray(down).T, jnp.float32))
    self.lora_b.set_value(jnp.asarray(to_jax(np.asarray(up)), jnp.float32))

  def __call__(self, x):
    a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
    if a.ndim == 2:
      up = jnp.dot(jnp.dot(x.astype(self.dtype), a), b)
    else:  # per-example factors (batch, in, rank), (batch, rank, out): each example its own adapter
      _check_per_example(x, a)
      up = jnp.einsum('b...r,bro->b...o', jnp.einsum('b...i,bir->b...r', x.astype(self.dtype), a), b)
    return super().__call__(x) + up * jnp.asarray(self.lora_scale, self.dtype)


def _check_per_example(x, a):
  if x.shape[0] != a.shape[0]:
    raise ValueError(f'per-example LoRA factors for {a.shape[0]} examples, but the input has {x.shape[0]}')


class LoRAConv2d(Conv2d):
  """A Conv2d plus a low-rank update (LoCon): the down convolution has the base's kernel size, stride and
  padding, A (kh, kw, in, rank); the up one is 1x1, B (rank, out). Per-example factors have a leading
  batch axis, as in LoRALinear."""

  def __init__(self, conv: Conv2d, rank: int, *, scale: float, key, init: str = 'kaiming_uniform'):
    vars(self).update({k: v for k, v in vars(conv).items() if not k.startswith('_')})
    kh, kw, c_in, c_out = conv.kernel.shape
    self.lora_a = LoRAParam(_lora_down_init(key, (kh, kw, c_in, rank), kh * kw * c_in, rank, init))
    self.lora_b = LoRAParam(jnp.zeros((rank, c_out), jnp.float32))
    self.lora_scale = scale

  def param_axes(self) -> dict:
    return dict(super().param_axes(), lora_a=(None, None, self.axes[0], None), lora_b=(None, self.axes[1]))

  def delta(self) -> jax.Array:
    """The update as a kernel of the base's shape: scale * A B, (kh, kw, in, out)."""
    return self.lora_scale * jnp.einsum('hwir,ro->hwio', self.lora_a[...], self.lora_b[...])

  def torch_factors(self) -> tuple[np.ndarray, np.ndarray]:
    """(down (rank, in, kh, kw), up (out, rank, 1, 1)) in torch layout, float32."""
    a, b = (np.asarray(x[...], np.float32) for x in (self.lora_a, self.lora_b))
    return a.transpose(3, 2, 0, 1), b.T[:, :, None, None]

  def set_torch_factors(self, down, up):
    """Set A and B from torch-layout factors (see torch_factors)."""
    self.lora_a.set_value(jnp.asarray(np.asarray(down).transpose(2, 3, 1, 0), jnp.float32))
    self.lora_b.set_value(jnp.asarray(np.asarray(up)[:, :, 0, 0].T, jnp.float32))

  def _down(self, x, a):
    p = self.padding
    if a.shape[:2] == (1, 1) and self.stride == 1 and p == 0:  # as Conv2d: a 1x1 conv (tokens too) is a matmul
      return jnp.dot(x, a[0, 0])
    return jax.lax.conv_general_dilated(
      x, a, (self.stride, self.stride), ((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  def __call__(self, x):
    a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
    x_ = x.astype(self.dtype)
    if a.ndim == 4:
      up = jnp.dot(self._down(x_, a), b)
    else:  # per-example factors (batch, kh, kw, in, rank), (batch, rank, out): a grouped convolution
      _check_per_example(x, a)
      h = jax.vmap(lambda xi, ai: self._down(xi[None], ai)[0])(x_, a)
      up = jnp.einsum('b...r,bro->b...o', h, b)
    return super().__call__(x) + up * jnp.asarray(self.lora_scale, self.dtype)


# The LoRA class of each layer type that takes an adapter. A Linear subclass with its own parameter layout (GEGLU's
# projection, in jaxdream.models) registers its LoRA class, so that files, merging and plain_layer keep its
# layout; any other subclass is refused rather than adapted with the wrong layout.
_LORA_CLASSES: dict[type, type] = {Linear: LoRALinear, Conv2d: LoRAConv2d}


def register_lora_class(base: type, lora: type):
  """Let `base` layers (a Linear or Conv2d subclass) take adapters as `lora` (a subclass of base and of
  LoRALinear / LoRAConv2d)."""
  if not (issubclass(lora, base) and issubclass(lora, (LoRALinear, LoRAConv2d))):
    raise TypeError(f'{lora.__name__} must subclass {base.__name__} and LoRALinear or LoRAConv2d')
  _LORA_CLASSES[base] = lora


def lora_class(layer) -> type | None:
  """The LoRA class that adapts `layer` (None: no adapter fits it, e.g. an already adapted layer)."""
  return _LORA_CLASSES.get(type(layer))


def module_paths(model: nnx.Module) -> dict[str, nnx.Module]:
  """{'down_blocks.0.attentions.0....attn1.to_q': module} for every submodule, named as torch names it."""
  return {'.'.join(str(p) for p in path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}


def matches_target(name: str, targets) -> bool:
  """peft's rule: a target names a module by its full dotted name or by a suffix of whole parts."""
  return any(name == t or name.endswith('.' + t) for t in targets)


def _replace(model: nnx.Module, name: str, new: nnx.Module):
  *parents, last = name.split('.')
  parent = model
  for p in parents:
    parent = parent[int(p)] if isinstance(parent, nnx.List) else getattr(parent, p)
  if isinstance(parent, nnx.List):
    parent[int(last)] = new
  else:
    setattr(parent, last, new)


def add_lora(
  model: nnx.Module,
  *,
  targets=(),
  rank: int,
  alpha: float | None = None,
  rslora: bool = False,
  init: str = 'kaiming_uniform',
  conv_targets=(),
  conv_rank: int = 0,
  conv_alpha: float | None = None,
  key,
) -> list[str]:
  """Swap, in place, the Linear layers named by `targets` (and, with conv_rank > 0, the Conv2d layers named
  by `conv_targets`) for LoRA ones. Each adapter's A gets its own key, folded from `key` by the layer's
  name, so adding targets elsewhere never changes an adapter's init. Returns the adapted names; no match at
  all is an error (a typo would otherwise train nothing)."""
  done = []
  for name, node in module_paths(model).items():
    cls = lora_class(node)
    if cls is None:
      continue
    if issubclass(cls, LoRALinear) and rank and matches_target(name, targets):
      new = cls(node, rank, scale=lora_scale(rank, alpha, rslora), key=_name_key(key, name), init=init)
    elif issubclass(cls, LoRAConv2d) and conv_rank and matches_target(name, conv_targets):
      s = lora_scale(conv_rank, conv_alpha if conv_alpha is not None else alpha, rslora)
      new = cls(node, conv_rank, scale=s, key=_name_key(key, name), init=init)
    else:
      continue
    _replace(model, name, new)
    done.append(name)
  if not done and (targets or conv_targets):
    raise ValueError(f'LoRA targets {list(targets) + list(conv_targets)} match no layer of {type(model).__name__}')
  return done


def _name_key(key, name: str):
  return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def lora_layers(model: nnx.Module) -> dict[str, LoRALinear | LoRAConv2d]:
  """The model's LoRA layers by torch-style dotted name."""
  return {n: m for n, m in module_paths(model).items() if isinstance(m, (LoRALinear, LoRAConv2d))}


def _plain_layer(layer: LoRALinear | LoRAConv2d) -> Linear | Conv2d:
  """The base layer of a LoRA one (same parameter objects, no adapter), of the type it adapted."""
  base = next(b for b, lora in _LORA_CLASSES.items() if lora is type(layer))
  kw = dict(use_bias=layer.bias is not None, axes=layer.axes, dtype=layer.dtype)
  if isinstance(layer, LoRALinear):
    build = lambda: base(*layer.kernel.shape, rngs=nnx.Rngs(0), **kw)
  else:
    kh, _, c_in, c_out = layer.kernel.shape
    build = lambda: base(c_in, c_out, kh, stride=layer.stride, padding=layer.padding, rngs=nnx.Rngs(0), **kw)
  plain = nnx.eval_shape(build)  # structure only: no random init of a kernel about to be replaced
  plain.kernel, plain.bias = layer.kernel, layer.bias
  return plain


def merge_lora_layers(model: nnx.Module, weight: float = 1.0):
  """Fold every adapter into its base kernel (kernel += weight * scale * A B) and swap the LoRA layers back
  for plain ones, in place: a merged model computes with no adapter cost."""
  for name, layer in lora_layers(model).items():
    plain = _plain_layer(layer)
    plain.kernel = nnx.Param(layer.kernel[...] + weight * layer.delta())
    _replace(model, name, plain)
