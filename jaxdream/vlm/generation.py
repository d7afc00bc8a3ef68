"""Jitted autoregressive generation with a KV cache: greedy, sampling and beam search, token for token
as transformers' `generate`."""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.models.kosmos2 import Kosmos2ForConditionalGeneration, prompt_position_ids


def warp_logits(logits, temperature, top_k: int, top_p):
  """transformers' sampling warpers in their order: temperature, top-k, top-p (each keeps >= 1 token)."""
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  order = jnp.argsort(logits, axis=-1)  # ascending, as transformers sorts
  sorted_logits = jnp.take_along_axis(logits, order, -1)
  cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
  remove_sorted = (cumulative <= 1 - top_p).at[..., -1].set(False)
  remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
  return jnp.where(remove & (top_p < 1.0), -jnp.inf, logits)


_COMPILED = weakref.WeakKeyDictionary()  # model -> its jitted generation functions


def _compiled(model, fn, **static):
  """`fn(model, *arrays, **static)` jitted for this model, taking its parameters as an argument (not baked
  in as constants); cached per model and static settings."""
  cache = _COMPILED.setdefault(model, {})
  key = (fn.__name__, tuple(sorted(static.items())))
  graphdef = nnx.graphdef(model)
  if key not in cache or cache[key][0] != graphdef:  # compiled for another structure (e.g. before int8)
    cache[key] = graphdef, jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args, **static))
  return cache[key][1]


def _prefill(model, pixel_values, input_ids, attention_mask, image_mask, total: int):
  b, n = input_ids.shape
  kv_valid = jnp.zeros((b, total), bool).at[:, :n].set(attention_mask.astype(bool))
  positions = prompt_position_ids(input_ids, model.pad_token_id)
  logits, cache = model.decode(
    input_ids,
    positions,
    kv_valid,
    cache=model.init_cache(b, total),
    index=0,
    image_embeds=model.image_embeds(pixel_values),
    image_mask=image_mask,
    last_only=True,
  )
  first_real = jnp.argmax(attention_mask, 1)  # left padding before it
  return logits[:, 0], cache, kv_valid, first_real


def _step(model, tokens, index, cache, kv_valid, first_real):
  """One decoding step: `tokens` (B,) go into cache slot `index`. Positions continue from the prompt (as
  transformers counts them for a single prompt), and a padding token gets the padding position."""
  kv_valid = kv_valid.at[:, index].set(True)
  pad = model.pad_token_id
  positions = jnp.where(tokens == pad, pad, index + 1 - first_real + pad)
  logits, cache = model.decode(tokens[:, None], positions[:, None], kv_valid, cache=cache, index=index)
  return logits[:, 0], cache, kv_valid


def _sample(
  model,
  pixel_values,
  input_ids,
  attention_mask,
  image_mask,
  eos,
  key,
  temperature,
  top_p,
  *,
  max_new_tokens,
  do_sample,
  top_k,
  pad,
):
  b, n = input_ids.shape

  def pick(logits, key):
    if not do_sample:
      return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, warp_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)

  logits, cache, kv_valid, first_real = _prefill(
    model, pixel_values, input_ids, attention_mask, image_mask, n + max_new_tokens
  )
  key, sub = jax.random.split(key)
  token = pick(logits, sub)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)

  def cond(s):
    return (s[0] < max_new_tokens) & ~jnp.all(s[4])

  def body(s):
    i, token, cache, kv_valid, done, out, key = s
    logits, cache, kv_valid = _step(model, token, n + i - 1, cache, kv_valid, first_real)
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad, pick(logits, sub))  # finished rows are padded, as transformers does
    return i + 1, token, cache, kv_valid, done | jnp.isin(token, eos), out.at[:, i].set(token), key

  steps, *_, out, _ = jax.lax.while_loop(cond, body, (1, token, cache, kv_valid, done, out, key))
  return out, steps


def _beam_search(
  model,
  pixel_values,
  input_ids,
  attention_mask,
  image_mask,
  eos,
  *,
  max_new_tokens,
  num_beams,
  num_return_sequences,
  length_penalty,
  early_stopping,
  pad,
):
  """transformers' vectorised beam search (same candidates, scores, length penalty, stopping heuristics)."""
  b, n = input_ids.shape
  k, steps = num_beams, max_new_tokens
  keep = max(2, 1 + eos.shape[0]) * k  # candidates per step: enough to continue k beams when some end
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)

  logits, cache, kv_valid, first_real = _prefill(model, pixel_values, input_ids, attention_mask, image_mask, n + steps)
  # Every beam starts from the same prefill.
  cache, kv_valid, first_real = jax.tree.map(lambda x: jnp.repeat(x, k, 0), (cache, kv_valid, first_real))
  logits = jnp.repeat(logits, k, 0)
  state = dict(
    t=0,
    logits=logits,
    cache=cache,
    kv_valid=kv_valid,
    running=jnp.full((b, k, steps), pad, jnp.int32),
    running_scores=jnp.zeros((b, k)).at[:, 1:].set(-1e9),  # only beam 0 is live at first
    sequences=jnp.full((b, k, steps), pad, jnp.int32),
    scores=jnp.full((b, k), -1e9),
    lengths=jnp.zeros((b, k), jnp.int32),
    finished=jnp.zeros((b, k), bool),
    improvable=jnp.ones((b, 1), bool),
    go=jnp.array(True),
  )

  def body(s):
    t = s['t']
    log_probs = jax.nn.log_softmax(s['logits'].astype(jnp.float32), -1).reshape(b, k, -1)
    vocab = log_probs.shape[-1]
    log_probs = (log_probs + s['running_scores'][..., None]).reshape(b, k * vocab)
    top_scores, top_idx = jax.lax.top_k(log_probs, keep)
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    cand = gather(s['running'], parent).at[:, :, t].set(token)
    hits = jnp.isin(token, eos) | (t + 1 >= steps)
    # Live beams: the best k candidates that did not just finish.
    live_scores = top_scores + hits * -1e9
    live = jax.lax.top_k(live_scores, k)[1]
    running, running_scores, live_parent = gather(cand, live), gather(live_scores, live), gather(parent, live)
    # Finished hypotheses: only the top k candidates may enter, scored with the length penalty.
    just_finished = hits & (jnp.arange(keep) < k)[None]
    fin_scores = top_scores / (t + 1.0) ** length_penalty
    full = jnp.all(s['finished'], -1, keepdims=True) & (early_stopping is True)
    fin_scores = fin_scores + full * -1e9 + (~s['improvable']) * -1e9 + (~just_finished) * -1e9
    merged_scores = jnp.concatenate([s['scores'], fin_scores], 1)
    best = jax.lax.top_k(merged_scores, k)[1]
    cat = lambda old, new: gather(jnp.concatenate([old, new], 1), best)
    sequences = cat(s['sequences'], cand)
    lengths = cat(s['lengths'], jnp.full((b, keep), t + 1, jnp.int32))
    finished = cat(s['finished'], just_finished)
    scores = gather(merged_scores, best)
    # Could a live beam still beat the worst finished one?
    best_len = (steps if early_stopping == 'never' and length_penalty > 0 else t + 1) ** length_penalty
    worst = jnp.where(finished, jnp.min(scores, 1, keepdims=True), -1e9)
    improvable = s['improvable'] & jnp.any(running_scores[:, :1] / best_len > worst, -1, keepdims=True)
    go = jnp.any(improvable) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits) & (t + 1 < steps)
    # Reorder the cache to the live beams' parents, then feed their new tokens.
    rows = (live_parent + jnp.arange(b)[:, None] * k).reshape(-1)
    cache, kv_valid = jax.tree.map(lambda x: x[rows], (s['cache'], s['kv_valid']))
    logits, cache, kv_valid = jax.lax.cond(
      go,
      lambda: _step(model, running[:, :, t].reshape(-1), n + t, cache, kv_valid, first_real),
      lambda: (s['logits'], cache, kv_valid),
    )
    return dict(
      t=t + 1,
      logits=logits,
      cache=cache,
      kv_valid=kv_valid,
      running=running,
      running_scores=running_scores,
      sequences=sequences,
      scores=scores,
      lengths=lengths,
      finished=finished,
      improvable=improvable,
      go=go,
    )

  s = jax.lax.while_loop(lambda s: s['go'], body, state)
  r = num_return_sequences
  return s['sequences'][:, :r], s['scores'][:, :r], s['lengths'][:, :r]


def generate(
  model: Kosmos2ForConditionalGeneration,
  pixel_values,
  input_ids,
  attention_mask=None,
  image_embeds_position_mask=None,
  *,
  max_new_tokens: int = 64,
  do_sample: bool = False,
  temperature: float = 1.0,
  top_k: int = 50,
  top_p: float = 1.0,
  num_beams: int = 1,
  num_return_sequences: int = 1,
  length_penalty: float = 1.0,
  early_stopping=False,
  seed: int = 0,
  eos_token_id=None,
  pad_token_id=None,
) -> np.ndarray:
  """Token ids (B * num_return_sequences, L + generated), prompt included, as transformers' generate
  returns them: rows that stopped early are filled with the pad id, and the length is that of the longest row.

  pixel_values: (B, H, W, 3) NHWC; input_ids etc. as the processor makes them (left-padded for batches).
  Greedy by default; do_sample=True samples (temperature, top_k (0 = off), top_p); num_beams > 1 is beam search.
  """
  input_ids = np.asarray(input_ids, np.int32)
  b, n = input_ids.shape
  attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
  image_mask = np.asarray(image_embeds_position_mask, np.int32)
  counts = image_mask.sum(1)
  if not np.all(counts == model.latent_query_num):
    raise ValueError(
      f'every row of image_embeds_position_mask must mark {model.latent_query_num} image '
      f'positions; got {counts.tolist()}'
    )
  if max_new_tokens < 1:
    raise ValueError('max_new_tokens must be at least 1')
  eos = eos_token_id if eos_token_id is not None else model.eos_token_id
  eos = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
  pad = int(
    pad_token_id if pad_token_id is not None else model.pad_token_id if model.pad_token_id is not None else eos[0]
  )
  args = (
    nnx.state(model),
    jnp.asarray(pixel_values, model.dtype),
    jnp.asarray(input_ids),
    jnp.asarray(attention_mask),
    jnp.asarray(image_mask),
    jnp.asarray(eos, jnp.int32),
  )
  if num_beams > 1:
    if do_sample:
      raise ValueError('beam search with sampling is not supported; use num_beams=1 or do_sample=False')
    if not 1 <= num_return_sequences <= num_beams:
      raise ValueError('num_return_sequences must be between 1 and num_beams')
    seqs, _, lengths = _compiled(
      model,
      _beam_search,
      max_new_tokens=max_new_tokens,
      num_beams=num_beams,
      num_return_sequences=num_return_sequences,
      length_penalty=float(length_penalty),
      early_stopping=early_stopping,
      pad=pad,
    )(*args)
    seqs, steps = np.asarray(seqs).reshape(b * num_return_sequences, -1), int(np.max(lengths))
    input_ids = np.repeat(input_ids, num_return_sequences, 0)
  else:
    if num_return_sequences != 1:
      raise ValueError('num_return_sequences > 1 needs beam search (num_beams > 1)')
    fn = _compiled(
      model,
      _sample,
      max_new_tokens=max_new_tokens,
      do_sample=bool(do_sample),
      top_k=int(top_k) if do_sample else 0,
      pad=pad,
    )
    seqs, steps = fn(*args, jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p))
    seqs, steps = np.asarray(seqs), int(steps)
  return np.concatenate([input_ids, seqs[:, :steps]], 1)
