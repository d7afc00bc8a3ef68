"""Every attention implementation computes the same softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from jaxdream.nn.attention import dot_product_attention


def _reference(q, k, v, scale=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum('bqhd,bkhd->bhqk', q, k) * (scale or q.shape[-1] ** -0.5)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', p, v)


@pytest.mark.parametrize('impl', ['tiled', 'xla', 'auto'])
@pytest.mark.parametrize('lq,lk', [(300, 300), (1000, 77), (4096, 4096)])
def test_implementations_match_exact_attention(impl, lq, lk):
  keys = jax.random.split(jax.random.key(lq + lk), 3)
  q = jax.random.normal(keys[0], (1, lq, 2, 16))
  k = jax.random.normal(keys[1], (1, lk, 2, 16))
  v = jax.random.normal(keys[2], (1, lk, 2, 16))
  out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation=impl))(q, k, v)
  assert rel_err(out, _reference(q, k, v)) <= 1e-5


def test_tiled_attention_gradients_match_xla():
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (2, 600, 2, 8)) for kk in keys)
  grads = {
    impl: jax.grad(lambda q, k, v: dot_product_attention(q, k, v, implementation=impl).sum() ** 2, argnums=(0, 1, 2))(
      q, k, v
    )
    for impl in ('tiled', 'xla')
  }
  for a, b in zip(grads['tiled'], grads['xla']):
    assert rel_err(a, b) <= 1e-5


def test_upcast_computes_in_float32_and_returns_input_dtype():
  q = jax.random.normal(jax.random.key(0), (1, 64, 2, 16), jnp.bfloat16)
  out = dot_product_attention(q, q, q, upcast=True, implementation='xla')
  assert out.dtype == jnp.bfloat16
  assert rel_err(np.asarray(out, np.float32), _reference(q, q, q)) <= 1e-2


def test_unknown_implementation_is_an_error_listing_the_choices():
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match='tiled'):
    dot_product_attention(q, q, q, implementation='flash3')


def test_tiled_refuses_masks():
  q = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match='mask'):
    dot_product_attention(q, q, q, causal=True, implementation='tiled')


def _cancelling_bf16_inputs():
  """Near-uniform attention (tiny logits) over values that come in +w/-w pairs: each output is a small
  difference of large terms, so rounding the probabilities to bfloat16 before the value product is
  visible (~10%) while a float32 product loses nothing."""
  keys = jax.random.split(jax.random.key(0), 3)
  q = (0.02 * jax.random.normal(keys[0], (1, 256, 2, 16))).astype(jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, 64, 2, 16)).astype(jnp.bfloat16)
  w = jax.random.normal(keys[2], (1, 32, 2, 16)).astype(jnp.bfloat16)
  return q, k, jnp.concatenate([w, -w], axis=1)


# Rounding a float32 result to bfloat16 (8 significant bits, to nearest) errs by at most 2**-9 relatively,
# element by element, hence also in norm; 1% on top covers float32's own error.
_BF16_ROUNDING = 2**-9 * 1.01


@pytest.mark.parametrize('impl', ['xla', 'tiled'])
def test_upcast_attention_errs_only_by_the_final_bfloat16_rounding(impl):
  q, k, v = _cancelling_bf16_inputs()
  ref = _reference(q, k, v)
  errs = {}
  for upcast in (True, False):
    f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, upcast=upcast, implementation=impl))
    errs[upcast] = rel_err(np.asarray(f(q, k, v), np.float32), ref)
  assert errs[True] <= _BF16_ROUNDING
  assert errs[False] > 10 * _BF16_ROUNDING  # the inputs do tell bfloat16 from float32 arithmetic


@pytest.mark.parametrize('impl', ['xla', 'tiled'])
def test_upcast_attention_program_multiplies_and_reduces_only_float32(impl):
  q, k, v = _cancelling_bf16_inputs()
  f = lambda q, k, v: dot_product_attention(q, k, v, upcast=True, implementation=impl)
  lines = [
    line for line in jax.jit(f).lower(q, k, v).as_text().splitlines() if 'dot_general' in line or 'reduce(' in line
  ]
  assert len(lines) >= 4  # q.k, softmax's max and sum, p.v
  assert not [line for line in lines if 'bf16' in line]


def test_auto_runs_short_cpu_self_attention_heads_first_equal_to_xla_with_masks():
  """'auto' on CPU sends short self-attention (ViT's 197 tokens, CLIP's 50 and 77) to the heads-first
  kernel; a KV cache (other key length) and long sequences keep their kernels. It equals jax's XLA attention,
  also causal, with a padding mask, and with every key of a row masked (a uniform average, as jax's)."""
  from jaxdream.nn.attention import _resolve

  keys = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(kk, (2, 50, 3, 16)) for kk in keys)
  assert _resolve('auto', q, k, v, backend='cpu') == 'heads_first'
  assert _resolve('auto', q, k, v, causal=True, backend='cpu') == 'heads_first'
  assert _resolve('auto', q[:, :1], k, v, backend='cpu') == 'xla'
  assert _resolve('auto', q, k, v, backend='gpu') == 'xla'
  pad = jnp.arange(50)[None, None, None, :] < jnp.array([50, 0])[:, None, None, None]  # image 1: all masked
  for kw in ({}, {'causal': True}, {'mask': pad}, {'mask': pad, 'causal': True}):
    want = jax.nn.dot_product_attention(q, k, v, is_causal=kw.get('causal', False), mask=kw.get('mask'))
    assert rel_err(dot_product_attention(q, k, v, implementation='auto', **kw), want) <= 1e-6, kw
