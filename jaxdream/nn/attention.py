"""The one attention function every model calls.

`implementation` picks the kernel:
  'xla'    jax.nn.dot_product_attention's XLA lowering (any backend, masks, causal);
  'cudnn'  cuDNN flash attention on NVIDIA GPUs (bf16/fp16 only);
  'tiled'  per-(batch, head) query tiles small enough to stay in cache, against all keys, no mask: on CPU
           this beats torch's fused SDPA kernel, where the plain XLA lowering is ~6x slower
           (docs/performance.md). It is the flash kernel below with one key tile, so its gradient is
           memory-efficient too;
  'flash'  memory-efficient attention with its own backward pass, the best per backend: cuDNN on GPU for
           half precision, the Pallas TPU flash-attention kernel on TPU where its block sizes divide the
           lengths, elsewhere a pure-JAX FlashAttention-2 kernel (a jax.custom_vjp whose forward keeps only
           the output and each row's log-sum-exp, and whose backward recomputes the scores tile by tile).
           Score matrices below 256x256 per head go to XLA: they are small enough to keep. Training uses
           it when the config says 'auto';
  'auto'   (default) cuDNN on GPU for half precision, tiled on CPU for long unmasked sequences, the Pallas
           kernel on TPU where it fits, else XLA; on CPU short self-attention (ViT's 197 tokens, CLIP's 50 or
           77) runs XLA with the heads moved next to the batch first (`_heads_first_attention`), 1.5-1.8x
           faster there than jax's lowering, which contracts over the (B, L, H, D) layout as it is.

A model built with `attention_impl=...` passes it to every attention call through `kernel_for`, which
runs masked calls (causal text) on XLA under 'tiled'.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'tiled', 'flash')

# Score tiles of at most this many float32 elements (8 MB) stay in a CPU core's cache hierarchy.
_TILE_ELEMENTS = 2 * 1024 * 1024
# Below this many scores per head the whole matrix is small and tiling only adds loop overhead.
_TILED_MIN_SCORES = 256 * 256
# Tiles of the pure-JAX kernel off CPU, where all heads are computed at once.
_ACCELERATOR_BLOCK = 512
# The Pallas TPU kernel's default block size: both lengths must be multiples of it.
_PALLAS_BLOCK = 128
# A masked-out score: finite, as jax's, so that a row with every key masked averages them all.
_MASKED = -0.7 * float(np.finfo(np.float32).max)


def check_implementation(name: str) -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention implementation {name!r}; choose one of {IMPLEMENTATIONS}')
  return name


def split_heads(x, heads: int):
  """(B, L, heads * D) projections -> (B, L, heads, D), the layout dot_product_attention takes."""
  return x.reshape(x.shape[0], x.shape[1], heads, -1)


def decoder_mask(query_index, kv_valid):
  """Boolean (B, 1, Lq, T) mask of a decoder over a KV cache: causal over cache slots, only valid slots (not
  padding), and always the query's own slot, so that rows of left padding never see an empty softmax.
  query_index: (Lq,) the queries' cache slots; kv_valid: (B, T)."""
  slots = jnp.arange(kv_valid.shape[1])
  causal = slots[None, :] <= query_index[:, None]
  own = slots[None, :] == query_index[:, None]
  return ((causal[None] & kv_valid.astype(bool)[:, None, :]) | own[None])[:, None]


def write_cache(cache, k, v, index):
  """(keys, values) of a fixed-shape (B, T, H, D) KV cache with k, v (B, L, H, D) written at slots
  index..index+L-1 (index: int or traced scalar). Returns the new cache, which is also what to attend to."""
  k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
  v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
  return k, v


def kernel_for(implementation: str, *, masked: bool) -> str:
  """The implementation one attention call of a model built with `implementation` uses. 'tiled' takes no
  mask, so a masked call (CLIP's causal text, the Kosmos-2 decoder: short sequences where tiling gains
  nothing) runs on XLA; every other choice is passed on as it is."""
  return 'xla' if masked and implementation == 'tiled' else implementation


def training_implementation(implementation: str) -> str:
  """The attention a training step uses when the run config asks for `implementation`: 'auto' becomes
  'flash', whose backward keeps no score matrix; an explicit choice is kept."""
  return 'flash' if implementation == 'auto' else check_implementation(implementation)


def describe(implementation: str, backend: str | None = None) -> str:
  """One line for a run log: what `implementation` runs on `backend` (default: JAX's)."""
  backend = backend or jax.default_backend()
  if implementation == 'flash':
    kernel = {
      'gpu': 'cuDNN flash attention for bfloat16/float16, the pure-JAX flash kernel for float32',
      'tpu': 'the Pallas TPU flash-attention kernel where lengths are multiples of 128, else the pure-JAX one',
    }.get(backend, 'the pure-JAX flash-attention kernel (custom backward, query tiles against all keys)')
    return f"attention 'flash' on {backend}: {kernel}; XLA below 256x256 scores per head"
  if implementation == 'auto':
    kernel = {
      'gpu': 'cuDNN for bfloat16/float16',
      'tpu': 'the Pallas TPU flash-attention kernel where lengths are multiples of 128',
      'cpu': 'tiled for long unmasked sequences, XLA with heads first for short self-attention',
    }.get(backend)
    return f"attention 'auto' on {backend}: {kernel}, else XLA" if kernel else f"attention 'auto' on {backend}: XLA"
  return f'attention {implementation!r} on {backend}'


def _pallas_fits(q, k, v, masked_beyond_causal):
  return (
    not masked_beyond_causal
    and q.shape[1] % _PALLAS_BLOCK == 0
    and k.shape[1] % _PALLAS_BLOCK == 0
    and q.shape[-1] == v.shape[-1]
  )


def _cudnn_max_head_dim() -> int:
  """cuDNN's flash attention takes head dims up to 256 on Hopper and later (compute capability 9.0), up to
  128 before (jax's own check, which raises rather than falls back)."""
  try:
    capability = jax.devices('gpu')[0].compute_capability
    return 256 if tuple(int(x) for x in str(capability).split('.')) >= (9, 0) else 128
  except (RuntimeError, ValueError, AttributeError, IndexError):
    return 128


def _cudnn_fits(q, k, v):
  """What jax's cuDNN path takes without raising: SD's VAE attends with one 512-wide head, too wide; its
  backward refuses odd lengths (the text encoder's 77 tokens as cross-attention keys), and whether a call
  is differentiated is unknown here, so odd lengths never go to cuDNN."""
  d = q.shape[-1]
  even = q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0
  return even and d == v.shape[-1] and d % 8 == 0 and d <= _cudnn_max_head_dim()


def _resolve(implementation, q, k, v, *, mask=None, causal=False, backend=None):
  """The kernel one call runs: 'xla', 'cudnn', 'tiled', 'flash' (the pure-JAX kernel), 'pallas' or
  'heads_first'."""
  backend = backend or jax.default_backend()
  masked = mask is not None or causal
  cudnn = backend == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16) and not masked and _cudnn_fits(q, k, v)
  long = q.shape[1] * k.shape[1] >= _TILED_MIN_SCORES
  if implementation == 'auto':
    if backend == 'gpu':
      return 'cudnn' if cudnn else 'xla'
    if backend == 'tpu' and long and _pallas_fits(q, k, v, mask is not None):
      return 'pallas'
    if backend == 'cpu' and long:
      return 'xla' if masked else 'tiled'
    if backend == 'cpu' and q.shape[1:3] == k.shape[1:3]:  # self-attention; a decoder's KV cache stays as it is
      return 'heads_first'
    return 'xla'
  if implementation == 'flash':
    if cudnn:
      return 'cudnn'
    if not long or (backend == 'gpu' and k.shape[1] <= _ACCELERATOR_BLOCK):
      # Few keys (cross-attention to text): the scores are no larger than the activations around them.
      return 'xla'
    if backend == 'tpu' and _pallas_fits(q, k, v, mask is not None):
      return 'pallas'
    return 'flash'
  return implementation


class _Tiling(NamedTuple):
  causal: bool
  scale: float
  block_q: int
  block_k: int
  head_batch: int  # heads computed at once: 1 keeps a CPU core's tiles in cache, all of them fill an accelerator


def _to_tiles(x, block):
  """(B, L, H, D) -> (B*H, n, block, D), L zero-padded to n * block."""
  b, n_tok, h, d = x.shape
  n = -(-n_tok // block)
  x = jnp.swapaxes(x, 1, 2).reshape(b * h, n_tok, d)
  return jnp.pad(x, ((0, 0), (0, n * block - n_tok), (0, 0))).reshape(b * h, n, block, d)


def _from_tiles(x, b, n_tok):
  """Inverse of `_to_tiles`."""
  bh, n, block, d = x.shape
  return jnp.swapaxes(x.reshape(b, bh // b, n * block, d)[:, :, :n_tok], 1, 2)


def _mask_4d(mask, lq_pad, lk_pad):
  """A boolean mask broadcastable to (B, H, Lq, Lk) as 4 dims, its query and key dims (those not 1)
  padded to the tiled lengths; broadcast dims stay 1, so nothing of size Lq x Lk is made per head."""
  if mask is None:
    return None
  mask = jnp.asarray(mask, bool)
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  pad = [(0, 0), (0, 0)] + [(0, n - s) if s > 1 else (0, 0) for s, n in zip(mask.shape[2:], (lq_pad, lk_pad))]
  return jnp.pad(mask, pad)


def _head_mask(mask, i, heads):
  """Head i's (Mq, Mk) mask out of the (Mb, Mh, Mq, Mk) one."""
  if mask is None:
    return None
  return mask[i // heads if mask.shape[0] > 1 else 0, i % heads if mask.shape[1] > 1 else 0]


def _scores(qt, kt, qs, ks, mask, lk, t: _Tiling):
  """Scaled float32 scores of a (query tile, key tile) pair, starting at queries qs and keys ks, with
  the user's mask and causality applied (`allowed`, None when there is neither) and padded keys at -inf."""
  bq, bk = qt.shape[0], kt.shape[0]
  s = jnp.dot(qt, kt.T, preferred_element_type=jnp.float32) * t.scale
  allowed = None
  if mask is not None:
    allowed = mask if mask.shape[0] == 1 else jax.lax.dynamic_slice_in_dim(mask, qs, bq, 0)
    allowed = allowed if allowed.shape[1] == 1 else jax.lax.dynamic_slice_in_dim(allowed, ks, bk, 1)
  if t.causal:
    below = (ks + jnp.arange(bk))[None, :] <= (qs + jnp.arange(bq))[:, None]
    allowed = below if allowed is None else allowed & below
  if allowed is not None:
    s = jnp.where(allowed, s, _MASKED)
  if lk % bk:
    s = jnp.where((ks + jnp.arange(bk) < lk)[None, :], s, -jnp.inf)
  return s, allowed


def _forward_head(qh, kh, vh, mask, lk, t: _Tiling):
  """One head: (out (nq, bq, Dv), lse (nq, bq)), online softmax over key tiles (FlashAttention-2)."""
  bq, bk, dv = qh.shape[1], kh.shape[1], vh.shape[-1]

  def q_tile(args):
    qt, qi = args

    def k_tile(carry, kargs):
      m, l, acc = carry
      kt, vt, ki = kargs
      s, _ = _scores(qt, kt, qi * bq, ki * bk, mask, lk, t)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[:, None])
      corr = jnp.exp(m - m_new)
      acc = acc * corr[:, None] + jnp.dot(p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
      return (m_new, l * corr + p.sum(-1), acc), None

    if kh.shape[0] == 1:  # one key tile ('tiled'): a plain softmax, no loop and no rescaling
      s, _ = _scores(qt, kh[0], qi * bq, 0, mask, lk, t)
      m = s.max(-1)
      p = jnp.exp(s - m[:, None])
      l, acc = p.sum(-1), jnp.dot(p.astype(vh.dtype), vh[0], preferred_element_type=jnp.float32)
    else:
      init = (jnp.full((bq,), -jnp.inf), jnp.zeros((bq,)), jnp.zeros((bq, dv)))
      (m, l, acc), _ = jax.lax.scan(k_tile, init, (kh, vh, jnp.arange(kh.shape[0])))
    return (acc / l[:, None]).astype(vh.dtype), m + jnp.log(l)

  return jax.lax.map(q_tile, (qh, jnp.arange(qh.shape[0])))


def _backward_head(qh, kh, vh, mask, oh, lse, doh, lk, t: _Tiling):
  """One head's (dq, dk, dv), float32: the scores are recomputed tile by tile from q, k and the lse."""
  bq, bk = qh.shape[1], kh.shape[1]
  rows = jnp.sum(doh.astype(jnp.float32) * oh.astype(jnp.float32), -1)  # (nq, bq): rowsum(dO * O)

  def q_tile(carry, xs):
    dk, dv = carry
    qt, do, lse_t, row, qi = xs

    def k_tile(dq, kargs):
      kt, vt, ki = kargs
      s, allowed = _scores(qt, kt, qi * bq, ki * bk, mask, lk, t)
      p = jnp.exp(s - lse_t[:, None])
      ds = p * (jnp.dot(do, vt.T, preferred_element_type=jnp.float32) - row[:, None])
      if allowed is not None:  # a masked score is a constant: no gradient flows through it
        ds = jnp.where(allowed, ds, 0.0)
      dq = dq + jnp.dot(ds.astype(kt.dtype), kt, preferred_element_type=jnp.float32)
      dk_t = jnp.dot(ds.T.astype(qt.dtype), qt, preferred_element_type=jnp.float32)
      dv_t = jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
      return dq, (dk_t, dv_t)

    dq, (dk_t, dv_t) = jax.lax.scan(k_tile, jnp.zeros(qt.shape), (kh, vh, jnp.arange(kh.shape[0])))
    return (dk + dk_t, dv + dv_t), dq

  init = (jnp.zeros(kh.shape), jnp.zeros(vh.shape))
  (dk, dv), dq = jax.lax.scan(q_tile, init, (qh, doh, lse, rows, jnp.arange(qh.shape[0])))
  return dq * t.scale, dk * t.scale, dv


def _per_head(f, xs, head_batch):
  return jax.lax.map(f, xs) if head_batch == 1 else jax.lax.map(f, xs, batch_size=head_batch)


def _flash_forward(q, k, v, mask, t: _Tiling):
  b, lq, h, _ = q.shape
  qt, kt, vt = _to_tiles(q, t.block_q), _to_tiles(k, t.block_k), _to_tiles(v, t.block_k)
  mask = _mask_4d(mask, qt.shape[1] * t.block_q, kt.shape[1] * t.block_k)
  head = lambda a: _forward_head(a[1], a[2], a[3], _head_mask(mask, a[0], h), k.shape[1], t)
  out, lse = _per_head(head, (jnp.arange(b * h), qt, kt, vt), t.head_batch)
  return _from_tiles(out, b, lq), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, mask, t: _Tiling):
  return _flash_forward(q, k, v, mask, t)[0]


def _flash_fwd(q, k, v, mask, t):
  out, lse = _flash_forward(q, k, v, mask, t)
  return out, (q, k, v, mask, out, lse)


def _flash_bwd(t, res, g):
  q, k, v, mask, out, lse = res
  b, lq, h, _ = q.shape
  qt, kt, vt = _to_tiles(q, t.block_q), _to_tiles(k, t.block_k), _to_tiles(v, t.block_k)
  ot, gt = _to_tiles(out, t.block_q), _to_tiles(g, t.block_q)
  mask4 = _mask_4d(mask, qt.shape[1] * t.block_q, kt.shape[1] * t.block_k)
  head = lambda a: _backward_head(*a[1:4], _head_mask(mask4, a[0], h), *a[4:], k.shape[1], t)
  dq, dk, dv = _per_head(head, (jnp.arange(b * h), qt, kt, vt, ot, lse, gt), t.head_batch)
  return (
    _from_tiles(dq, b, lq).astype(q.dtype),
    _from_tiles(dk, b, k.shape[1]).astype(k.dtype),
    _from_tiles(dv, b, k.shape[1]).astype(v.dtype),
    None,
  )


_flash.defvjp(_flash_fwd, _flash_bwd)


def _flash_attention(q, k, v, *, mask=None, causal=False, scale=None, block_q=None, block_k=None, head_batch=None):
  """Exact softmax attention, tiled, with a backward pass that keeps no score matrix (FlashAttention-2).

  q: (B, Lq, H, D); k, v: (B, Lk, H, D). Scores and softmax are float32 whatever the input dtype.
  Defaults: on CPU the 'tiled' layout (all keys in one tile, query tiles of at most 2M scores, one head
  at a time, which stays in cache); elsewhere 512x512 tiles over all heads at once."""
  lq, lk = q.shape[1], k.shape[1]
  cpu = jax.default_backend() == 'cpu'
  if block_k is None:
    block_k = lk if cpu else _ACCELERATOR_BLOCK
  if block_q is None:
    block_q = max(16, 2 ** int(math.log2(max(1, _TILE_ELEMENTS // min(block_k, lk))))) if cpu else _ACCELERATOR_BLOCK
  if head_batch is None:
    head_batch = 1 if cpu else q.shape[0] * q.shape[2]
  t = _Tiling(
    causal=bool(causal),
    scale=float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale),
    block_q=min(block_q, lq),
    block_k=min(block_k, lk),
    head_batch=head_batch,
  )
  return _flash(q, k, v, mask, t)


def _heads_first_attention(q, k, v, mask, causal, scale):
  """jax.nn.dot_product_attention's XLA computation (float32 scores and softmax, masked scores at _MASKED)
  with q, k, v transposed to (B, H, L, D) before the products: XLA:CPU then runs two plain batched matmuls
  instead of contractions over the middle of (B, L, H, D), 1.5-1.8x faster for 50-200 tokens
  (docs/performance.md, the scoring models)."""
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  s = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, _MASKED)
  if mask is not None:
    s = jnp.where(mask, s, _MASKED)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', p, v, preferred_element_type=jnp.float32), 1, 2)


def _pallas_attention(q, k, v, causal, scale):
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas

  heads_first = lambda x: jnp.swapaxes(x, 1, 2)
  out = pallas.flash_attention(heads_first(q), heads_first(k), heads_first(v), causal=causal, sm_scale=scale)
  return heads_first(out)


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
  upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`). cuDNN takes half
  precision only and already computes scores and softmax in float32, so on GPU an upcast model's
  bfloat16/float16 attention runs on cuDNN as it is instead of on XLA in float32.
  """
  out_dtype = q.dtype
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  impl = _resolve(check_implementation(implementation), q, k, v, mask=mask, causal=causal)
  if upcast and impl != 'cudnn':
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    impl = _resolve(implementation, q, k, v, mask=mask, causal=causal)
  if impl == 'cudnn' and jax.default_backend() != 'gpu':
    raise ValueError(
      f"attention implementation 'cudnn' needs an NVIDIA GPU; JAX runs on {jax.default_backend()!r} here "
      "(use 'auto', which picks cuDNN where it can)"
    )
  if impl == 'tiled':
    if mask is not None or causal:
      raise ValueError("attention implementation 'tiled' takes no mask; use 'xla', 'flash' or 'auto'")
    out = _flash_attention(q, k, v, scale=scale, block_k=k.shape[1], head_batch=1)
  elif impl == 'flash':
    out = _flash_attention(q, k, v, mask=mask, causal=causal, scale=scale)
  elif impl == 'pallas':
    out = _pallas_attention(q, k, v, causal, scale)
  elif impl == 'heads_first':
    out = _heads_first_attention(q, k, v, mask, causal, scale)
  else:
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, scale=scale, implementation=impl)
  return out.astype(out_dtype)
