"""CLIP tokenizers: loading a model folder's tokenizer, and writing one from the real CLIP BPE vocabulary.

The tokenizer runs in Python (transformers / tokenizers, no torch), outside jitted code.
"""

from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np

from jaxdream.io.weights import WeightsError

BPE_FILE = 'bpe_simple_vocab_16e6.txt.gz'


def clip_bpe_path() -> str:
  """The CLIP BPE merges file shipped with jaxdream (from open_clip, MIT: assets/clip/LICENSE-open_clip)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets', 'clip', BPE_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path}: the CLIP BPE vocabulary is missing from this jaxdream installation; reinstall jaxdream'
    )
  return path


def _bytes_to_unicode() -> dict[int, str]:
  """The byte -> printable character table of byte-level BPE (GPT-2 and CLIP), in their order: the printable
  bytes first, then the others (the vocabulary's first 256 ids follow this order)."""
  printable = (
    list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  )
  table = {b: chr(b) for b in printable}
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + len(table) - len(printable))
  return table


def write_clip_tokenizer(
  folder: str, bpe_path: str | None = None, *, model_max_length: int = 77, pad_token: str = '<|endoftext|>'
):
  """Write a CLIP tokenizer folder (vocab.json, merges.txt, configs) from the 49,408-token BPE file."""
  bpe_path = bpe_path or clip_bpe_path()
  with gzip.open(bpe_path, 'rt', encoding='utf-8') as f:
    lines = f.read().split('\n')
  merges = lines[1 : 49152 - 256 - 2 + 1]  # the first line is a header; CLIP uses 48,894 merges
  base = list(_bytes_to_unicode().values())
  tokens = base + [t + '</w>' for t in base] + [''.join(m.split()) for m in merges]
  tokens += ['<|startoftext|>', '<|endoftext|>']
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
  with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
  special = dict(bos_token='<|startoftext|>', eos_token='<|endoftext|>', unk_token='<|endoftext|>', pad_token=pad_token)
  with open(os.path.join(folder, 'special_tokens_map.json'), 'w') as f:
    json.dump(special, f, indent=2)
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump(
      dict(
        special,
        tokenizer_class='CLIPTokenizer',
        model_max_length=model_max_length,
        do_lower_case=True,
        clean_up_tokenization_spaces=True,
      ),
      f,
      indent=2,
    )


def load_tokenizer(folder: str):
  """A model folder's CLIP tokenizer: vocab.json + merges.txt, or tokenizer.json alone."""
  if not os.path.isdir(folder):
    raise WeightsError(f'{folder}: no tokenizer folder')
  names = set(os.listdir(folder))
  if not ({'vocab.json', 'merges.txt'} <= names or 'tokenizer.json' in names):
    raise WeightsError(
      f'{folder}: no tokenizer files (expected vocab.json + merges.txt, or tokenizer.json); found {sorted(names)}'
    )
  from transformers import CLIPTokenizer, CLIPTokenizerFast  # pylint: disable=import-outside-toplevel

  # transformers 5 ignores files passed as vocab_file=...; from_pretrained(folder) reads either form.
  try:
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
  except Exception:  # noqa: BLE001 (transformers 4's slow CLIPTokenizer needs vocab.json; the fast one reads tokenizer.json)
    try:
      return CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 (transformers raises bare Exceptions for broken files)
      raise WeightsError(f'{folder}: cannot read the tokenizer files ({type(e).__name__}: {e})') from None


# A tokenizer attribute: {embedding name, lower-cased: its token}, for embeddings named as words (A1111's).
EMBEDDING_WORDS = 'jaxdream_embedding_words'


def _name_ids(tokenizer, words: dict) -> list[tuple[tuple, str]]:
  """(token ids of each embedding name, its token), longest first; kept on the tokenizer for its words."""
  cached = getattr(tokenizer, '_jaxdream_name_ids', None)
  if cached is None or cached[0] is not words:
    ids = [(tuple(tokenizer(name, add_special_tokens=False).input_ids), token) for name, token in words.items()]
    cached = (words, sorted((x for x in ids if x[0]), key=lambda x: -len(x[0])))
    tokenizer._jaxdream_name_ids = cached
  return cached[1]


def _replace_names(tokenizer, prompt: str, words: dict) -> str:
  """The prompt with each embedding name replaced by its token wherever the prompt's token ids hold the name's, as
  A1111 finds embeddings (EmbeddingDatabase.find_embedding_at_position: left to right, the longest name first), so
  in any case and with any spaces between the name's pieces ('Bad - Hands - 5' for bad-hands-5)."""
  if not getattr(tokenizer, 'is_fast', True):  # transformers 4's slow tokenizer has no offsets: whole words only
    pattern = '|'.join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.sub(rf'(?<!\w)(?:{pattern})(?!\w)', lambda m: words[m.group(0).lower()], prompt, flags=re.IGNORECASE)
  names = _name_ids(tokenizer, words)
  encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
  ids, spans = encoded.input_ids, encoded.offset_mapping
  out, done, i = [], 0, 0
  while i < len(ids):
    for name, token in names:
      if tuple(ids[i : i + len(name)]) == name:
        out += [prompt[done : spans[i][0]], f' {token} ']
        done, i = spans[i + len(name) - 1][1], i + len(name)
        break
    else:
      i += 1
  return ''.join(out) + prompt[done:]


def expand_vector_tokens(tokenizer, prompt: str) -> str:
  """A prompt with each multi-vector textual inversion token T written out as `T T_1 ... T_{n-1}` (the tokens
  that hold its other vectors), as diffusers' `maybe_convert_prompt` does (a plain text replacement). Embeddings
  named as words (A1111's) are first replaced by their tokens wherever the prompt holds the name's tokens, as A1111
  matches them (any case, any spaces between the name's pieces; the longest name first)."""
  added = tokenizer.added_tokens_encoder
  if len(added) <= 2:  # only CLIP's own start and end tokens: nothing to expand
    return prompt
  words = getattr(tokenizer, EMBEDDING_WORDS, None)
  if words:
    prompt = _replace_names(tokenizer, prompt, words)
  for token in set(tokenizer.tokenize(prompt)):
    if token in added and f'{token}_1' in added:
      i, replacement = 1, token
      while f'{token}_{i}' in added:
        replacement += f' {token}_{i}'
        i += 1
      prompt = prompt.replace(token, replacement)
  return prompt


def tokenize(tokenizer, prompts: list[str], max_length: int | None = None) -> np.ndarray:
  """Token ids (B, max_length) int32, padded and truncated as Stable Diffusion pipelines do."""
  max_length = max_length or tokenizer.model_max_length
  prompts = [expand_vector_tokens(tokenizer, p) for p in prompts]
  ids = tokenizer(prompts, padding='max_length', max_length=max_length, truncation=True, return_tensors='np').input_ids
  return np.asarray(ids, np.int32)
