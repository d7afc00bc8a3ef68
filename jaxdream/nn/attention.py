"""The one attention function every model calls.

`implementation` picks the kernel:
  'xla'    jax.nn.dot_product_attention's XLA lowering (any backend, masks, causal);
  'cudnn'  cuDNN flash attention on NVIDIA GPUs (bf16/fp16 only);
  'tiled'  per-(batch, head) query tiles small enough to stay in cache, no mask: on CPU this beats torch's
           fused SDPA kernel, where the plain XLA lowering is ~6x slower (docs/performance.md);
  'auto'   (default) cuDNN on GPU for half precision, tiled on CPU for long unmasked sequences, else XLA.

A model built with `attention_impl=...` passes it to every attention call through `kernel_for`, which
runs masked calls (causal text) on XLA under 'tiled'.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'tiled')

# Score tiles of at most this many float32 elements (8 MB) stay in a CPU core's cache hierarchy.
_TILE_ELEMENTS = 2 * 1024 * 1024
# Below this many scores per head the whole matrix is small and tiling only adds loop overhead.
_TILED_MIN_SCORES = 256 * 256


def check_implementation(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}')
  return name


def split_heads(x, heads: int):
  """(B, L, heads * D) projections -> (B, L, heads, D), the layout dot_product_attention takes."""
  return x.reshape(x.shape[0], x.shape[1], heads, -1)


def kernel_for(implementation: str, *, masked: bool) -> str:
  """The implementation one attention call of a model built with `implementation` uses. 'tiled' takes no
  mask, so a masked call (CLIP's causal text, the Kosmos-2 decoder: short sequences where tiling gains
  nothing) runs on XLA; every other choice is passed on as it is."""
  return 'xla' if masked and implementation == 'tiled' else implementation


def _resolve(implementation, q, k, masked):
  if implementation != 'auto':
    return implementation
  backend = jax.default_backend()
  if backend == 'gpu':
    return 'cudnn' if q.dtype in (jnp.bfloat16, jnp.float16) and not masked else 'xla'
  if backend == 'cpu' and not masked and q.shape[1] * k.shape[1] >= _TILED_MIN_SCORES:
    return 'tiled'
  return 'xla'


def _tiled_attention(q, k, v, scale):
  """Exact softmax attention computed head by head, query tile by query tile (no mask)."""
  b, lq, h, d = q.shape
  lk, dv = k.shape[1], v.shape[-1]
  chunk = max(16, min(lq, 2 ** int(math.log2(max(1, _TILE_ELEMENTS // lk)))))
  nq = -(-lq // chunk)
  heads = lambda x: jnp.swapaxes(x, 1, 2).reshape(b * h, x.shape[1], x.shape[-1])
  qh, kh, vh = heads(q), heads(k), heads(v)
  if nq * chunk != lq:
    qh = jnp.pad(qh, ((0, 0), (0, nq * chunk - lq), (0, 0)))
  qh = qh.reshape(b * h, nq, chunk, d)

  def one_head(args):
    q_tiles, kk, vv = args

    def one_tile(qt):
      s = jnp.dot(qt, kk.T, preferred_element_type=jnp.float32) * scale
      p = jax.nn.softmax(s, axis=-1)
      return jnp.dot(p.astype(vv.dtype), vv)

    return jax.lax.map(one_tile, q_tiles)

  out = jax.lax.map(one_head, (qh, kh, vh))  # (b*h, nq, chunk, dv)
  out = out.reshape(b, h, nq * chunk, dv)[:, :, :lq]
  return jnp.swapaxes(out, 1, 2)


def dot_product_attention(
  q,
  k,
  v,
  *,
  mask=None,
  causal: bool = False,
  scale: float | None = None,
  implementation: str = 'auto',
  upcast: bool = False,
):
  """Softmax attention. q: (B, Lq, H, D); k, v: (B, Lk, H, D). Returns (B, Lq, H, Dv).

  mask: boolean, broadcastable to (B, H, Lq, Lk), True where attending is allowed.
  upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`).
  """
  out_dtype = q.dtype
  if upcast:
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  impl = _resolve(check_implementation(implementation), q, k, mask is not None or causal)
  if impl == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(
      f"attention implementation 'cudnn' needs an NVIDIA GPU; JAX runs on {jax.default_backend()!r} here "
      "(use 'auto', which picks cuDNN where it can)"
    )
  if impl == 'tiled':
    if mask is not None or causal:
      raise ValueError("attention implementation 'tiled' takes no mask; use 'xla' or 'auto'")
    out = _tiled_attention(q, k, v, scale)
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=scale, implementation=impl)
  return out.astype(out_dtype)
