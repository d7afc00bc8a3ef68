"""jaxdream.vlm.generation's loops know nothing of Kosmos-2: a toy decoder-only model with its own positions,
masks and cache layout generates through the same `generate`; compiled functions live in each model's cache."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdream.runtime import CompileCache
from jaxdream.vlm import generation
from jaxdream.vlm.generation import beam_search, generate

VOCAB, DIM, NEW = 29, 16, 7


class ToyDecoder(nnx.Module):
  """A one-layer decoder-only LM: learned positions counted from each row's first real token, single-head
  causal attention, an MLP, an LM head. Its cache is a dict {'k', 'v'} of (B, T, D) arrays."""

  def __init__(self, *, rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.positions = nnx.Embed(32, DIM, rngs=rngs)
    self.qkv = nnx.Linear(DIM, 3 * DIM, rngs=rngs)
    self.mlp = nnx.Linear(DIM, DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, VOCAB, rngs=rngs)
    self.eos_token_id, self.pad_token_id = 1, 0
    self.compile_cache = CompileCache()

  def layer(self, ids, positions, keys, values, query_slots, kv_valid):
    """Logits (B, L, V) of `ids` at cache slots `query_slots`, with keys/values (B, T, D) already updated."""
    x = self.embed(ids) + self.positions(positions)
    q = self.qkv(x)[..., :DIM]
    scores = jnp.einsum('bqd,bkd->bqk', q, keys) / np.sqrt(DIM)
    visible = kv_valid[:, None, :] & (jnp.arange(keys.shape[1])[None, None, :] <= query_slots[None, :, None])
    x = x + jnp.einsum('bqk,bkd->bqd', jax.nn.softmax(jnp.where(visible, scores, -1e30), -1), values)
    return self.head(x + jax.nn.gelu(self.mlp(x)))

  def __call__(self, ids):
    """Logits (B, L, V) of unpadded prompts, computed from scratch (no cache)."""
    n = ids.shape[1]
    _, k, v = jnp.split(self.qkv(self.embed(ids) + self.positions(jnp.arange(n)[None])), 3, -1)
    return self.layer(ids, jnp.arange(n)[None], k, v, jnp.arange(n), jnp.ones(ids.shape, bool))

  # The generation protocol.
  def generation_inputs(self, input_ids, attention_mask=None):
    return dict(input_ids=input_ids, attention_mask=attention_mask)

  def init_cache(self, batch, length):
    return dict(k=jnp.zeros((batch, length, DIM)), v=jnp.zeros((batch, length, DIM)))

  def _write(self, ids, positions, index, cache):
    _, k, v = jnp.split(self.qkv(self.embed(ids) + self.positions(positions)), 3, -1)
    update = lambda c, new: jax.lax.dynamic_update_slice(c, new, (0, index, 0))
    return dict(k=update(cache['k'], k), v=update(cache['v'], v))

  def prefill(self, inputs, cache, kv_valid):
    ids, mask = inputs['input_ids'], inputs['attention_mask']
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    cache = self._write(ids, positions, 0, cache)
    logits = self.layer(ids, positions, cache['k'], cache['v'], jnp.arange(ids.shape[1]), kv_valid)
    return logits[:, -1], cache, jnp.sum(mask == 0, 1)  # decode_state: each row's left padding

  def decode_step(self, tokens, index, cache, kv_valid, padding):
    positions = (index - padding)[:, None]
    cache = self._write(tokens[:, None], positions, index, cache)
    return self.layer(tokens[:, None], positions, cache['k'], cache['v'], index[None], kv_valid)[:, 0], cache


PROMPTS = [[3, 9, 4, 17, 5], [8, 2, 12]]


@pytest.fixture(scope='module')
def toy():
  return ToyDecoder(rngs=nnx.Rngs(0))


def _left_padded(prompts, pad=0):
  n = max(map(len, prompts))
  ids, mask = np.full((len(prompts), n), pad, np.int32), np.zeros((len(prompts), n), np.int32)
  for i, p in enumerate(prompts):
    ids[i, n - len(p) :], mask[i, n - len(p) :] = p, 1
  return ids, mask


def _naive_greedy(model, prompt, steps):
  """Argmax, one token at a time, recomputing the whole sequence each step without a cache."""
  seq = list(prompt)
  for _ in range(steps):
    seq.append(int(jnp.argmax(model(jnp.asarray([seq]))[0, -1])))
  return seq


def test_toy_decoder_generates_through_the_same_loop_as_a_naive_uncached_argmax(toy):
  ids, mask = _left_padded(PROMPTS)
  out = generate(toy, ids, mask, max_new_tokens=NEW, eos_token_id=-1)  # no EOS: every row runs NEW steps
  assert out.shape == (2, ids.shape[1] + NEW)
  for row, pads, prompt in zip(out, (mask == 0).sum(1), PROMPTS):
    expected = _naive_greedy(toy, prompt, NEW)
    np.testing.assert_array_equal(row[pads:], expected)
  assert len(set(out[0, -NEW:].tolist())) > 1  # not one repeated token


def test_toy_decoder_beam_search_with_one_beam_is_greedy(toy):
  ids, mask = _left_padded(PROMPTS)
  greedy = generate(toy, ids, mask, max_new_tokens=NEW, eos_token_id=-1)
  beams = beam_search(toy, toy.generation_inputs(ids, mask), max_new_tokens=NEW, num_beams=1, eos_token_id=-1)
  np.testing.assert_array_equal(beams, greedy)
  wider = generate(toy, ids, mask, max_new_tokens=NEW, num_beams=3, num_return_sequences=3, eos_token_id=-1)
  assert wider.shape == (6, greedy.shape[1]) and len({tuple(r) for r in wider[:3]}) == 3


def test_toy_decoder_stops_at_eos_and_pads_finished_rows(toy):
  ids, mask = _left_padded(PROMPTS)
  greedy = generate(toy, ids, mask, max_new_tokens=NEW, eos_token_id=-1)
  eos = int(greedy[1, ids.shape[1] + 2])  # row 1's third new token
  out = generate(toy, ids, mask, max_new_tokens=NEW, eos_token_id=eos)
  n = ids.shape[1]
  stop = n + 1 + int(np.flatnonzero(greedy[1, n:] == eos)[0])
  np.testing.assert_array_equal(out[1, :stop], greedy[1, :stop])
  assert out.shape[1] > stop and np.all(out[1, stop:] == toy.pad_token_id)  # row 0 runs on


def test_compiled_functions_are_cached_per_model_and_static_settings(toy):
  other = ToyDecoder(rngs=nnx.Rngs(1))
  ids, mask = _left_padded(PROMPTS)
  toy_entries = len(toy.compile_cache)
  generate(other, ids, mask, max_new_tokens=3)
  assert len(other.compile_cache) == 1
  generate(other, ids[:1], mask[:1], max_new_tokens=3, seed=5)  # other shapes and traced values: same entry
  assert len(other.compile_cache) == 1
  generate(other, ids, mask, max_new_tokens=4)  # another static setting
  assert len(other.compile_cache) == 2
  assert len(toy.compile_cache) == toy_entries  # each model keeps its own


class ReluLinear(nnx.Linear):
  """The same parameters as nnx.Linear (the same state tree), another computation."""

  def __call__(self, x):
    return jax.nn.relu(super().__call__(x))


def test_changing_a_models_structure_in_place_compiles_anew():
  """As int8 quantization does. A function compiled for the old graph would run the old computation on the
  new parameters."""
  model = ToyDecoder(rngs=nnx.Rngs(2))
  ids, mask = _left_padded(PROMPTS)
  generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=-1)
  relu = ReluLinear(DIM, DIM, rngs=nnx.Rngs(0))
  relu.kernel, relu.bias = model.mlp.kernel, model.mlp.bias
  model.mlp = relu
  after = generate(model, ids, mask, max_new_tokens=NEW, eos_token_id=-1)
  assert len(model.compile_cache) == 2
  for row, pads, prompt in zip(after, (mask == 0).sum(1), PROMPTS):
    np.testing.assert_array_equal(row[pads:], _naive_greedy(model, prompt, NEW))


def test_a_deep_copy_of_a_model_starts_with_an_empty_compile_cache(toy):
  ids, mask = _left_padded(PROMPTS)
  generate(toy, ids, mask, max_new_tokens=3)
  clone = copy.deepcopy(toy)
  assert len(toy.compile_cache) >= 1 and len(clone.compile_cache) == 0


def test_generation_loops_do_not_import_models():
  import ast
  import inspect

  tree = ast.parse(inspect.getsource(generation))
  imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  assert not any(m.startswith('jaxdream.models') for m in imported)
