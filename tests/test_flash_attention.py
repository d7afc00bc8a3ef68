"""The memory-efficient attention (nn.attention: the pure-JAX FlashAttention-2 kernel with its own
backward, 'flash' and 'tiled') equals XLA's attention, forward and gradients, and each backend gets the
kernel it should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from jaxdream.nn.attention import _flash_attention, _resolve, dot_product_attention, training_implementation

B, H, D = 2, 3, 16
# Tiles smaller than the lengths, neither dividing them: several query and key tiles, both padded.
BLOCKS = dict(block_q=64, block_k=48)


def _padding_mask(lk):
  """Per-example key padding, (B, 1, 1, Lk): the second example attends to fewer keys."""
  lengths = jnp.array([lk - 17, lk - 50])
  return (jnp.arange(lk)[None, :] < lengths[:, None])[:, None, None, :]


# name: (query length, key length, dtype, padding mask, causal, scale, tolerance). Rounding to bfloat16
# errs by 2**-9 per element; the bfloat16 case's products of probabilities and score gradients are
# rounded too, as in every flash kernel: its reference is float32 from the same bfloat16 inputs.
CASES = {
  'self-attention, odd length': (173, 173, jnp.float32, False, False, None, 1e-5),
  'cross-attention, 77 keys': (150, 77, jnp.float32, False, False, None, 1e-5),
  'padding mask': (130, 130, jnp.float32, True, False, None, 1e-5),
  'causal': (200, 200, jnp.float32, False, True, None, 1e-5),
  'bfloat16, cross-attention, scale': (150, 77, jnp.bfloat16, False, False, 0.3, 2e-2),
}


def _inputs(lq, lk, dtype=jnp.float32):
  """q, k, v and the output's cotangent, made with numpy: no random-number program to compile."""
  rng = np.random.default_rng(lq + lk)
  return [jnp.asarray(rng.standard_normal((B, n, H, D)), dtype) for n in (lq, lk, lk, lq)]


def _out_and_grads(attention, q, k, v, cotangent):
  out, vjp = jax.vjp(attention, q, k, v)
  return (out, *vjp(cotangent))


def _all_cases(kernel, inputs, masks):
  """{case: (out, dq, dk, dv)} of `kernel(q, k, v, mask, causal, scale)`, every case in one program (one
  compile instead of one per case)."""
  results = {}
  for name, (*_, causal, scale, _) in CASES.items():
    attention = lambda q, k, v: kernel(q, k, v, masks[name], causal, scale)
    results[name] = _out_and_grads(attention, *inputs[name])
  return results


def test_flash_forward_and_gradients_equal_xla_attention():
  flash = lambda q, k, v, mask, causal, scale: _flash_attention(
    q, k, v, mask=mask, causal=causal, scale=scale, **BLOCKS
  )
  xla = lambda q, k, v, mask, causal, scale: jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=causal, scale=scale, implementation='xla'
  )
  inputs = {name: _inputs(lq, lk, dtype) for name, (lq, lk, dtype, *_) in CASES.items()}
  masks = {name: _padding_mask(lk) if padded else None for name, (_, lk, _, padded, *_) in CASES.items()}
  got = jax.jit(lambda inputs: _all_cases(flash, inputs, masks))(inputs)
  inputs32 = jax.tree.map(lambda x: x.astype(jnp.float32), inputs)
  want = jax.jit(lambda inputs: _all_cases(xla, inputs, masks))(inputs32)
  for name, (*_, dtype, _, _, _, tolerance) in CASES.items():
    for part, a, b in zip(('out', 'dq', 'dk', 'dv'), got[name], want[name]):
      assert a.dtype == dtype, (name, part)
      assert rel_err(np.asarray(a, np.float32), b) <= tolerance, (name, part)


@pytest.mark.parametrize('implementation', ['tiled', 'flash'])
def test_backward_keeps_no_score_matrix(implementation):
  """What the forward pass keeps for the backward: inputs, output, one log-sum-exp per row; nothing of
  Lq x Lk. 300 x 300 scores per head is past the size where 'flash' hands small matrices to XLA."""
  q, k, v, _ = _inputs(300, 300)
  _, vjp = jax.vjp(lambda q, k, v: dot_product_attention(q, k, v, implementation=implementation), q, k, v)
  sizes = sorted(x.size for x in jax.tree.leaves(vjp))
  assert sizes[-1] == B * 300 * H * D  # q, k, v, out
  assert B * H * 300 in sizes  # the log-sum-exp


def _resolved(implementation, backend, lq=4096, lk=4096, dtype=jnp.bfloat16, head_dim=64, **kw):
  q = jax.ShapeDtypeStruct((1, lq, 8, head_dim), dtype)
  k = jax.ShapeDtypeStruct((1, lk, 8, head_dim), dtype)
  return _resolve(implementation, q, k, k, backend=backend, **kw)


def test_each_backend_gets_its_memory_efficient_kernel():
  mask = jnp.ones((1, 1, 1, 4096), bool)
  # GPU: cuDNN for half precision unmasked; float32 or masked runs the pure-JAX kernel (never XLA's full scores).
  assert _resolved('flash', 'gpu') == 'cudnn'
  assert _resolved('flash', 'gpu', dtype=jnp.float32) == 'flash'
  assert _resolved('flash', 'gpu', mask=mask) == 'flash'
  # Head dims cuDNN refuses (the VAE's one 512-wide head; not a multiple of 8) go to the next kernel.
  assert _resolved('flash', 'gpu', head_dim=512) == 'flash'
  assert _resolved('auto', 'gpu', head_dim=512) == 'xla'
  assert _resolved('auto', 'gpu', head_dim=20) == 'xla'
  # cuDNN's backward refuses odd lengths (77 text tokens as keys); so few keys keep their scores on GPU.
  assert _resolved('auto', 'gpu', lk=77) == 'xla'
  assert _resolved('flash', 'gpu', lk=77) == 'xla'
  assert _resolved('flash', 'gpu', lk=1001) == 'flash'
  # TPU: the Pallas kernel where its 128-blocks divide the lengths (causal included), else the pure-JAX one.
  assert _resolved('flash', 'tpu') == 'pallas'
  assert _resolved('flash', 'tpu', causal=True) == 'pallas'
  assert _resolved('flash', 'tpu', lk=77) == 'flash'
  assert _resolved('flash', 'tpu', mask=mask) == 'flash'
  assert _resolved('flash', 'cpu') == 'flash'
  # Small score matrices are cheap to keep: XLA on every backend but a GPU's cuDNN.
  assert _resolved('flash', 'cpu', lq=77, lk=77) == 'xla'
  assert _resolved('flash', 'tpu', lq=128, lk=128) == 'xla'
  # Inference's 'auto' is unchanged on CPU and GPU, and takes the Pallas kernel on TPU.
  assert _resolved('auto', 'cpu') == 'tiled'
  assert _resolved('auto', 'cpu', causal=True) == 'xla'
  assert _resolved('auto', 'gpu') == 'cudnn'
  assert _resolved('auto', 'gpu', dtype=jnp.float32) == 'xla'
  assert _resolved('auto', 'tpu') == 'pallas'
  assert _resolved('auto', 'tpu', lk=77) == 'xla'
  # A run config's 'auto' trains with 'flash'; an explicit choice is kept.
  assert training_implementation('auto') == 'flash'
  assert training_implementation('xla') == 'xla'
  with pytest.raises(ValueError, match='flash'):
    training_implementation('flash2')


def test_upcast_half_precision_attention_stays_half_only_for_cudnn(monkeypatch):
  """SD 2.x upcasts attention to float32; cuDNN computes scores and softmax in float32 from bfloat16
  inputs, so on GPU those go to cuDNN as they are, where XLA would have had them in float32."""
  seen = []

  def spy(q, k, v, *, implementation, **kw):
    seen.append((implementation, q.dtype))
    return q

  monkeypatch.setattr(jax.nn, 'dot_product_attention', spy)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  q = jnp.zeros((1, 300, 2, 16), jnp.bfloat16)
  for implementation in ('auto', 'flash'):
    dot_product_attention(q, q, q, upcast=True, implementation=implementation)
  dot_product_attention(q, q, q, upcast=True, implementation='xla')
  assert seen == [('cudnn', jnp.bfloat16), ('cudnn', jnp.bfloat16), ('xla', jnp.float32)]


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN flash attention runs on NVIDIA GPUs only')
def test_gpu_attention_equals_xla_float32_on_sd_shapes():
  """On a GPU, 'auto' and 'flash' (cuDNN where it fits) give XLA's float32 attention of the same bfloat16
  inputs, forward and gradients, within bfloat16 rounding, on SD 1.5's shapes: self-attention with head
  dims 40/80/160, cross-attention to 77 keys, and the VAE's 512-wide head that cuDNN refuses."""
  shapes = {
    'self, 4096 tokens, d 40': (4096, 4096, 8, 40),
    'cross, 77 keys, d 80': (1024, 77, 8, 80),
    'self, 64 tokens, d 160': (64, 64, 8, 160),
    'VAE, one 512-wide head': (4096, 4096, 1, 512),
  }
  rng = np.random.default_rng(0)
  for name, (lq, lk, h, d) in shapes.items():
    q, k, v, g = (jnp.asarray(rng.standard_normal((2, n, h, d)), jnp.bfloat16) for n in (lq, lk, lk, lq))
    want = jax.jit(lambda *a: _out_and_grads(lambda q, k, v: jax.nn.dot_product_attention(q, k, v), *a))(
      *(x.astype(jnp.float32) for x in (q, k, v, g))
    )
    for implementation in ('auto', 'flash'):
      attention = lambda q, k, v: dot_product_attention(q, k, v, implementation=implementation)
      got = jax.jit(lambda *a: _out_and_grads(attention, *a))(q, k, v, g)
      for part, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
        assert a.dtype == jnp.bfloat16, (name, implementation, part)
        assert rel_err(np.asarray(a, np.float32), b) <= 2e-2, (name, implementation, part)
