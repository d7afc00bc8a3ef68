"""Textual inversion embeddings: learned token vectors added to a pipeline's tokenizers and text encoders, as
diffusers' `load_textual_inversion` adds them (and A1111 loads the files of its embeddings folder).

A file holds one embedding of n vectors: diffusers' `{token: (n, dim)}` (learned_embeds.safetensors), A1111's
`emb_params` (.safetensors) or `{'string_to_param': {'*': ...}, 'name': ...}` (.pt, a pickle: refused unless
allow_pickle), or SDXL's `{'clip_l': ..., 'clip_g': ...}`, one table per text encoder. The token T (and T_1 ...
T_{n-1} for the other vectors) is added to each tokenizer and its vectors as new rows of each text encoder's
token table; prompts naming T get all n tokens (io.tokenizer.expand_vector_tokens). The pipeline itself is not
changed: `load_textual_inversion` returns a new one (its sampler compiles once for the longer tables).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.io.tokenizer import EMBEDDING_WORDS
from jaxdream.io.weights import PICKLE_SUFFIXES, WeightsError, read_safetensors

# SDXL files name their tables by the OpenCLIP model each encoder comes from.
SDXL_KEYS = {'clip_l': 'text_encoder', 'clip_g': 'text_encoder_2'}
SDXL_KEYS_BY_ENCODER = {v: k for k, v in SDXL_KEYS.items()}


def read_embedding(path: str, *, allow_pickle: bool = False) -> tuple[str | None, dict[str, np.ndarray]]:
  """(the token the file names, or None; {'': (n, dim)} for a one-encoder file, or {'clip_l': ..., 'clip_g': ...}).
  Vectors are float32 and always 2-D."""
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: no such file')
  if path.endswith('.safetensors'):
    tensors, name = read_safetensors(path), None
  elif path.endswith(PICKLE_SUFFIXES):
    tensors, name = _read_pickle_embedding(path, allow_pickle)
  else:
    raise WeightsError(f'{path}: expected a .safetensors embedding (or, with allow_pickle, a .pt/.bin one)')
  if SDXL_KEYS.keys() <= tensors.keys():
    vectors = {k: tensors[k] for k in SDXL_KEYS}
  elif 'emb_params' in tensors and len(tensors) == 1:  # A1111's safetensors: the file name is the token
    vectors = {'': tensors['emb_params']}
  elif len(tensors) == 1:  # diffusers: {token: vectors}
    ((key, value),) = tensors.items()
    vectors, name = {'': value}, name or key
  else:
    raise WeightsError(
      f'{path}: not a textual inversion embedding (expected one tensor, emb_params, string_to_param or '
      f'clip_l + clip_g); found {sorted(tensors)[:8]}'
    )
  out = {}
  for key, v in vectors.items():
    v = np.asarray(v, np.float32)
    v = v[None] if v.ndim == 1 else v
    if v.ndim != 2 or not v.shape[0] or not np.isfinite(v).all():
      raise WeightsError(f'{path}: embedding {key or "vectors"} of shape {v.shape} is not (n, dim) finite vectors')
    out[key] = v
  if len({v.shape[0] for v in out.values()}) > 1:  # SDXL's two encoders' outputs are joined token by token
    raise WeightsError(
      f'{path}: clip_l and clip_g hold different numbers of vectors ({out["clip_l"].shape[0]} and '
      f'{out["clip_g"].shape[0]}); the two text encoders need the same'
    )
  return name, out


def _read_pickle_embedding(path: str, allow_pickle: bool) -> tuple[dict[str, np.ndarray], str | None]:
  from jaxdream.io.weights import _pickle_refusal

  if not allow_pickle:
    raise _pickle_refusal(path)
  import torch

  try:
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # noqa: BLE001 (torch raises several kinds for files that are not plain tensors)
    raise WeightsError(f'{path}: not a readable embedding file ({type(e).__name__}: {e})') from None
  name = None
  if isinstance(sd, torch.Tensor):
    sd = {'emb_params': sd}
  elif isinstance(sd, dict) and isinstance(sd.get('string_to_param'), dict):  # A1111's .pt
    name = sd.get('name') if isinstance(sd.get('name'), str) else None
    params = sd['string_to_param']
    if len(params) != 1:  # A1111 takes its one entry, whatever its key ('*' as A1111 writes it)
      raise WeightsError(f'{path}: string_to_param holds {sorted(params)}, expected one entry')
    sd = {'emb_params': next(iter(params.values()))}
  if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
    raise WeightsError(f'{path}: not a textual inversion embedding')
  return {k: v.detach().float().numpy() for k, v in sd.items()}, name


def load_textual_inversion(
  pipeline, path: str, token: str | None = None, *, allow_pickle: bool = False, as_word: bool = False
):
  """A copy of `pipeline` that knows the embedding in `path` as `token` (default: the token the file names; A1111
  files name none: pass their file name's stem, as A1111 does). Its tokenizers and text encoders are new; the
  other components and the original pipeline are shared and unchanged. as_word: the token is a name read only
  as a whole word, in any case, as A1111 finds embedding names in prompts (diffusers: as written, anywhere); it
  may be a word of the vocabulary (the embedding then replaces that word, as in A1111)."""
  name, vectors = read_embedding(path, allow_pickle=allow_pickle)
  token = token or name
  if not token or not token.strip() or token != token.strip():
    raise ValueError(f'{path}: the file names no token; pass token= (A1111 uses the file name)')
  encoders = list(pipeline.tokenizers)
  if '' in vectors:
    if len(encoders) != 1:
      raise ValueError(
        f'{path}: one table of vectors, but the model has {len(encoders)} text encoders ({", ".join(encoders)}); '
        'an SDXL embedding holds clip_l and clip_g'
      )
    tables = {encoders[0]: vectors['']}
  else:  # SDXL: each encoder its own table (the refiner has only the second)
    if 'text_encoder_2' not in encoders or not set(encoders) <= set(SDXL_KEYS_BY_ENCODER):
      raise ValueError(f'{path}: clip_l/clip_g tables, but the model has text encoders {", ".join(encoders)}')
    tables = {e: vectors[SDXL_KEYS_BY_ENCODER[e]] for e in encoders}
  components, tokenizers = dict(pipeline.components), dict(pipeline.tokenizers)
  for encoder, table in tables.items():
    tokenizers[encoder], components[encoder] = _extend(
      tokenizers[encoder], components[encoder], token, table, path, encoder, as_word
    )
  return dataclasses.replace(pipeline, components=components, tokenizers=tokenizers)


def _extend(tokenizer, model, name: str, vectors: np.ndarray, path: str, encoder: str, as_word: bool):
  """(tokenizer with the token(s) added, text encoder whose token table has their rows), as diffusers adds them:
  ids len(tokenizer), len(tokenizer) + 1, ... ; the table resized to len(tokenizer) rows first."""
  from transformers import AddedToken

  words = dict(getattr(tokenizer, EMBEDDING_WORDS, None) or {})
  if as_word:  # the name becomes a token of its own, which prompts get in place of the name as a word
    if name.lower() in words:
      raise ValueError(f'{path}: an embedding named {name!r} is already loaded ({encoder})')
    token = f'<embedding:{name.lower()}>'
  else:
    token = name
  names = [token] + [f'{token}_{i}' for i in range(1, len(vectors))]
  vocab = tokenizer.get_vocab()
  taken = [t for t in names if t in vocab]
  if taken:
    raise ValueError(f'{path}: token {taken[0]!r} is already in the {encoder} tokenizer; pass another token')
  graphdef, state = nnx.split(nnx.clone(model))  # the original keeps its variables (arrays are shared)
  table = state['text_model']['embeddings']['token_embedding']['embedding']
  old = np.asarray(table[...])
  if vectors.shape[1] != old.shape[1]:
    raise ValueError(
      f'{path}: vectors of size {vectors.shape[1]}, but {encoder} embeds tokens in {old.shape[1]} dimensions '
      '(an embedding trained for another model)'
    )
  n = len(tokenizer)
  if len(vectors) > tokenizer.model_max_length - 2:
    raise ValueError(
      f'{path}: {len(vectors)} vectors do not fit a prompt of {tokenizer.model_max_length - 2} tokens ({encoder})'
    )
  if old.shape[0] < n:
    raise ValueError(f'{encoder}: {old.shape[0]} token rows for a tokenizer of {n} tokens')
  tokenizer = copy.deepcopy(tokenizer)
  # diffusers adds plain strings: AddedToken(t, normalized=True), matched anywhere
  tokenizer.add_tokens([AddedToken(t, normalized=True) for t in names])
  if as_word:
    setattr(tokenizer, EMBEDDING_WORDS, {**words, name.lower(): token})
  ids = tokenizer.convert_tokens_to_ids(names)
  if ids != list(range(n, n + len(names))):
    raise ValueError(f'{encoder}: the tokenizer gave the new tokens ids {ids}, expected {n}..{n + len(names) - 1}')
  table.value = jnp.asarray(np.concatenate([old[:n], vectors.astype(old.dtype)]))
  model = nnx.merge(graphdef, state)
  model.config = dict(model.config, vocab_size=n + len(names))
  # the ids below are the tokenizer's own (A1111 pools SDXL's prompt embedding with the others read as 0)
  model.tokenizer_vocab = getattr(model, 'tokenizer_vocab', n)
  return tokenizer, model
