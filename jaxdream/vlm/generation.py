"""Jitted autoregressive generation with a KV cache: greedy, sampling and beam search, token for token
as transformers' `generate`, for any model that implements `GenerativeModel`.

The loops own only what every decoder shares: the fixed-length cache's slot bookkeeping (`kv_valid`, which
slots hold real tokens: the prompt's non-padding ones, then each generated token), stopping at EOS, padding
finished rows, and the search itself. Everything model-specific (positions, attention masks, image or other
conditioning, the cache's layout) is the model's, behind the protocol below. Kosmos-2
(`jaxdream.models.kosmos2.Kosmos2ForConditionalGeneration`) is one implementation.

Compiled functions live in the model's own `compile_cache` (a `jaxdream.runtime.CompileCache`), keyed by the
function, its static settings and the model's graph structure, so that two models never share or evict each
other's, and a model whose structure changes in place (int8 quantization) gets new ones.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxdream.runtime import CompileCache, compiled  # noqa: F401 (jaxdream.vlm.generation.compiled before runtime had it)


class GenerativeModel(Protocol):
  """What `generate` needs from a model (an `nnx.Module`; its parameters are passed to the jitted loops).

  Shapes: B rows, a prompt of L tokens in cache slots 0..L-1 (left-padded when the rows are unequal), T = L +
  max_new_tokens cache slots, V vocabulary entries.
  """

  eos_token_id: int | tuple[int, ...]  # the default EOS id(s)
  pad_token_id: int | None  # the default id of finished rows (None: the first EOS id)
  compile_cache: CompileCache  # this model's compiled generation functions

  def generation_inputs(self, *args, **kwargs) -> dict[str, Any]:
    """On the host, before compiling: the model's inputs as `generate` got them, checked and converted to
    arrays. Must hold 'input_ids' (B, L) int32 and may hold 'attention_mask' (B, L): 1 for prompt tokens, 0
    for left padding (default: all ones). The whole dict goes to `prefill`."""
    ...

  def init_cache(self, batch: int, length: int) -> Any:
    """An empty cache of `length` slots: any pytree whose leaves all have the batch as their first axis
    (beam search reorders rows with `leaf[rows]`)."""
    ...

  def prefill(self, inputs: dict, cache, kv_valid) -> tuple[jax.Array, Any, Any]:
    """Run the prompt into cache slots 0..L-1; kv_valid (B, T) bool marks the slots that may be attended to.
    Returns (float32 logits (B, V) of the last prompt token, the cache, decode_state): decode_state is any
    pytree of per-row arrays (batch first) that decoding needs and that stays fixed (e.g. where each row's
    prompt starts); beam search repeats it per beam."""
    ...

  def decode_step(self, tokens, index, cache, kv_valid, decode_state) -> tuple[jax.Array, Any]:
    """Feed `tokens` (B,) int32 into cache slot `index` (a traced scalar); kv_valid already marks that slot.
    Finished rows feed the pad id. Returns (float32 logits (B, V), the updated cache)."""
    ...


def check_sampling(temperature, top_k, top_p):
  """Raise ValueError for settings transformers refuses: they would sample from NaN or empty distributions."""
  if not (np.ndim(temperature) == 0 and float(temperature) > 0 and math.isfinite(float(temperature))):
    raise ValueError(f'temperature must be a positive number to sample, got {temperature}')
  if not (np.ndim(top_k) == 0 and float(top_k) == int(top_k) and int(top_k) >= 0):
    raise ValueError(f'top_k must be a whole number >= 0 (0: off), got {top_k}')
  if not (np.ndim(top_p) == 0 and 0 < float(top_p) <= 1):
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')


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


def _prefill(model, inputs, total: int):
  b, n = inputs['input_ids'].shape
  kv_valid = jnp.zeros((b, total), bool).at[:, :n].set(inputs['attention_mask'].astype(bool))
  logits, cache, decode_state = model.prefill(inputs, model.init_cache(b, total), kv_valid)
  return logits, cache, kv_valid, decode_state


def _step(model, tokens, index, cache, kv_valid, decode_state):
  """One decoding step: `tokens` (B,) go into cache slot `index`, which becomes attendable."""
  kv_valid = kv_valid.at[:, index].set(True)
  logits, cache = model.decode_step(tokens, index, cache, kv_valid, decode_state)
  return logits, cache, kv_valid


def penalize_repetition(logits, seen, penalty):
  """transformers' RepetitionPenaltyLogitsProcessor: the logits of tokens already in the sequence (`seen`, (B, V)
  bool) divided by `penalty` where positive, multiplied where negative."""
  return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def _sample(model, inputs, eos, key, temperature, top_p, penalty, *, max_new_tokens, do_sample, top_k, pad, repeat):
  b, n = inputs['input_ids'].shape
  rows = jnp.arange(b)

  def pick(logits, seen, key):
    if repeat:  # a logits processor: before sampling's warpers, as in transformers
      logits = penalize_repetition(logits, seen, penalty)
    if not do_sample:
      return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, warp_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)

  logits, cache, kv_valid, decode_state = _prefill(model, inputs, n + max_new_tokens)
  seen = _prompt_seen(inputs, logits.shape[-1]) if repeat else jnp.zeros((b, 1), bool)
  key, sub = jax.random.split(key)
  token = pick(logits, seen, sub)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(token)
  done = jnp.isin(token, eos)

  def cond(s):
    return (s[0] < max_new_tokens) & ~jnp.all(s[4])

  def body(s):
    i, token, cache, kv_valid, done, out, key, seen = s
    seen = seen.at[rows, token].set(True) if repeat else seen
    logits, cache, kv_valid = _step(model, token, n + i - 1, cache, kv_valid, decode_state)
    key, sub = jax.random.split(key)
    token = jnp.where(done, pad, pick(logits, seen, sub))  # finished rows are padded, as transformers does
    return i + 1, token, cache, kv_valid, done | jnp.isin(token, eos), out.at[:, i].set(token), key, seen

  steps, *_, out, _, _ = jax.lax.while_loop(cond, body, (1, token, cache, kv_valid, done, out, key, seen))
  return out, steps


def _prompt_seen(inputs, vocab: int):
  """(B, vocab) bool: the tokens of each row's prompt, its left padding not counted (a row's tokens are those it
  has alone, as everywhere here), for the repetition penalty."""
  ids = inputs['input_ids']
  rows = jnp.arange(ids.shape[0])[:, None]
  return jnp.zeros((ids.shape[0], vocab), bool).at[rows, ids].max(inputs['attention_mask'].astype(bool))


def _beam_search(
  model,
  inputs,
  eos,
  penalty,
  *,
  max_new_tokens,
  num_beams,
  num_return_sequences,
  length_penalty,
  early_stopping,
  pad,
  repeat=False,
):
  """transformers' vectorised beam search (same candidates, scores, length penalty, stopping heuristics, and its
  repetition penalty on each beam's log-probabilities)."""
  b, n = inputs['input_ids'].shape
  k, steps = num_beams, max_new_tokens
  keep = max(2, 1 + eos.shape[0]) * k  # candidates per step: enough to continue k beams when some end
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)

  logits, cache, kv_valid, decode_state = _prefill(model, inputs, n + steps)
  # Every beam starts from the same prefill.
  cache, kv_valid, decode_state = jax.tree.map(lambda x: jnp.repeat(x, k, 0), (cache, kv_valid, decode_state))
  logits = jnp.repeat(logits, k, 0)
  prompt_seen = _prompt_seen(inputs, logits.shape[-1])[:, None] if repeat else None
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
    if repeat:  # each beam's prompt and tokens so far
      made = jnp.arange(steps)[None, None] < t
      seen = jnp.broadcast_to(prompt_seen, (b, k, vocab))
      seen = seen.at[jnp.arange(b)[:, None, None], jnp.arange(k)[None, :, None], s['running']].max(made)
      log_probs = penalize_repetition(log_probs, seen, penalty)
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
    # Reorder the cache to the live beams' parents (decode_state is the same for a prompt's beams), then feed
    # their new tokens.
    rows = (live_parent + jnp.arange(b)[:, None] * k).reshape(-1)
    cache, kv_valid = jax.tree.map(lambda x: x[rows], (s['cache'], s['kv_valid']))
    logits, cache, kv_valid = jax.lax.cond(
      go,
      lambda: _step(model, running[:, :, t].reshape(-1), n + t, cache, kv_valid, decode_state),
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


def check_repetition_penalty(penalty):
  if isinstance(penalty, bool) or not (np.ndim(penalty) == 0 and math.isfinite(float(penalty)) and float(penalty) > 0):
    raise ValueError(f'repetition_penalty must be a positive number (1.0: off), got {penalty!r}')


def _special_ids(model, eos_token_id, pad_token_id) -> tuple[tuple[int, ...], int]:
  """(EOS ids, pad id): the arguments, else the model's."""
  eos = eos_token_id if eos_token_id is not None else model.eos_token_id
  eos = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
  if pad_token_id is None:
    pad_token_id = model.pad_token_id if model.pad_token_id is not None else eos[0]
  return eos, int(pad_token_id)


def _check_count(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} must be a whole number of at least 1; got {value!r}')


def _prepared(inputs: dict, max_new_tokens: int, vocab_size: int | None = None) -> dict:
  """`generation_inputs`' dict, checked, with the attention mask filled in, as device arrays. Token ids outside
  the vocabulary are an error (a lookup out of range gives NaN embeddings, not an exception, under jit)."""
  _check_count('max_new_tokens', max_new_tokens)
  inputs = dict(inputs)
  ids = np.asarray(inputs['input_ids'])
  if ids.ndim != 2:
    raise ValueError(f'input_ids must be (batch, length); got shape {ids.shape}')
  mask = inputs.get('attention_mask')
  mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask)
  if mask.shape != ids.shape:
    raise ValueError(f'attention_mask has shape {mask.shape}, input_ids {ids.shape}')
  valid = ids[mask > 0]
  if vocab_size is not None and valid.size and (valid.min() < 0 or valid.max() >= vocab_size):
    bad = int(valid.min()) if valid.min() < 0 else int(valid.max())
    raise ValueError(f'input_ids hold token id {bad}, outside the vocabulary of {vocab_size} tokens')
  inputs['input_ids'], inputs['attention_mask'] = ids.astype(np.int32), mask.astype(np.int32)
  return {k: jnp.asarray(v) for k, v in inputs.items()}


def beam_search(
  model: GenerativeModel,
  inputs: dict,
  *,
  max_new_tokens: int = 64,
  num_beams: int = 4,
  num_return_sequences: int = 1,
  length_penalty: float = 1.0,
  early_stopping=False,
  eos_token_id=None,
  pad_token_id=None,
  repetition_penalty: float = 1.0,
) -> np.ndarray:
  """Beam search from `inputs` (what `model.generation_inputs` returns): token ids
  (B * num_return_sequences, L + generated), prompt included, best beams first. One beam is greedy search."""
  if not 1 <= num_return_sequences <= num_beams:
    raise ValueError('num_return_sequences must be between 1 and num_beams')
  check_repetition_penalty(repetition_penalty)
  eos, pad = _special_ids(model, eos_token_id, pad_token_id)
  inputs = _prepared(inputs, max_new_tokens, getattr(model, 'vocab_size', None))
  fn = compiled(
    model,
    _beam_search,
    max_new_tokens=max_new_tokens,
    num_beams=num_beams,
    num_return_sequences=num_return_sequences,
    length_penalty=float(length_penalty),
    early_stopping=early_stopping,
    pad=pad,
    repeat=float(repetition_penalty) != 1.0,
  )
  seqs, _, lengths = fn(inputs, jnp.asarray(eos, jnp.int32), jnp.float32(repetition_penalty))
  ids = np.repeat(np.asarray(inputs['input_ids']), num_return_sequences, 0)
  seqs = np.asarray(seqs).reshape(len(ids), -1)
  return np.concatenate([ids, seqs[:, : int(np.max(lengths))]], 1)


def sample(
  model: GenerativeModel,
  inputs: dict,
  *,
  max_new_tokens: int = 64,
  do_sample: bool = False,
  temperature: float = 1.0,
  top_k: int = 50,
  top_p: float = 1.0,
  seed: int = 0,
  eos_token_id=None,
  pad_token_id=None,
  repetition_penalty: float = 1.0,
) -> np.ndarray:
  """Greedy search (or, with do_sample, sampling) from `inputs` (what `model.generation_inputs` returns):
  token ids (B, L + generated), prompt included. repetition_penalty: transformers' (1.0: off)."""
  if do_sample:
    check_sampling(temperature, top_k, top_p)
  check_repetition_penalty(repetition_penalty)
  eos, pad = _special_ids(model, eos_token_id, pad_token_id)
  inputs = _prepared(inputs, max_new_tokens, getattr(model, 'vocab_size', None))
  fn = compiled(
    model,
    _sample,
    max_new_tokens=max_new_tokens,
    do_sample=bool(do_sample),
    top_k=int(top_k) if do_sample else 0,
    pad=pad,
    repeat=float(repetition_penalty) != 1.0,
  )
  seqs, steps = fn(
    inputs,
    jnp.asarray(eos, jnp.int32),
    jax.random.key(seed),
    jnp.float32(temperature),
    jnp.float32(top_p),
    jnp.float32(repetition_penalty),
  )
  return np.concatenate([np.asarray(inputs['input_ids']), np.asarray(seqs)[:, : int(steps)]], 1)


def generate(
  model: GenerativeModel,
  *args,
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
  repetition_penalty: float = 1.0,
  **kwargs,
) -> np.ndarray:
  """Token ids (B * num_return_sequences, L + generated), prompt included, as transformers' generate
  returns them: rows that stopped early are filled with the pad id, and the length is that of the longest row.

  *args, **kwargs: the model's inputs, as its `generation_inputs` takes them (Kosmos-2: pixel_values (B, H, W,
  3) NHWC, input_ids, attention_mask, image_embeds_position_mask, as the processor makes them, left-padded for
  batches). Greedy by default; do_sample=True samples (temperature, top_k (0 = off), top_p); num_beams > 1 is
  beam search. repetition_penalty: transformers' RepetitionPenaltyLogitsProcessor over the prompt's and the
  generated tokens (1.0: off; greedy and sampling).
  """
  check_repetition_penalty(repetition_penalty)
  _check_count('num_beams', num_beams)
  _check_count('max_new_tokens', max_new_tokens)
  inputs = model.generation_inputs(*args, **kwargs)
  common = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  if num_beams > 1:
    if do_sample:
      raise ValueError('beam search with sampling is not supported; use num_beams=1 or do_sample=False')
    return beam_search(
      model,
      inputs,
      num_beams=num_beams,
      num_return_sequences=num_return_sequences,
      length_penalty=length_penalty,
      early_stopping=early_stopping,
      repetition_penalty=repetition_penalty,
      **common,
    )
  if num_return_sequences != 1:
    raise ValueError('num_return_sequences > 1 needs beam search (num_beams > 1)')
  return sample(
    model,
    inputs,
    do_sample=do_sample,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    repetition_penalty=repetition_penalty,
    **common,
  )
