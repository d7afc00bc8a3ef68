"""Adapters as parameter types, and module surgery that swaps layers for adapted ones.

Int8 weight-only quantization today: `Quantized` variables are neither trainable `Param`s nor torch
state-dict entries, so filtered splits (`nnx.split(model, nnx.Param, ...)`) leave them out of training and
weight files.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.nn.layers import Embed, Linear


class Quantized(nnx.Variable):
  """An int8 weight-only quantized tensor or its scales: not a trainable Param, not in torch files."""


def _quantize(w, axis: int):
  """Symmetric int8 with one float32 scale per slice along `axis` (max |w| maps to 127)."""
  w = np.asarray(jax.device_get(w), np.float32)
  scale = np.abs(w).max(axis=axis, keepdims=True) / 127
  scale = np.where(scale == 0, 1.0, scale)
  q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
  return Quantized(jnp.asarray(q)), Quantized(jnp.asarray(np.squeeze(scale, axis)))


class Int8Linear(nnx.Module):
  """A Linear with an int8 kernel and one scale per output channel; computes in the layer's dtype."""

  def __init__(self, linear: Linear):
    self.kernel, self.scale = _quantize(linear.kernel[...], 0)
    self.bias = linear.bias
    self.dtype = linear.dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype)) * self.scale[...].astype(self.dtype)
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
    logits = jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
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


def state_bytes(model: nnx.Module) -> int:
  """Bytes held by the model's arrays (parameters and quantized weights)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
