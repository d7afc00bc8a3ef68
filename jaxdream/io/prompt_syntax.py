"""A1111's prompt syntax: emphasis weights, prompt editing and prompts longer than the text encoder's 77 tokens.

stable-diffusion-webui (and SD.Next's 'a1111' parser) read a prompt as
- `(words)` weighted 1.1, `[words]` 1/1.1, `(words:1.3)` 1.3; nested brackets multiply; an unclosed bracket runs to
  the end; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal characters;
- `BREAK` (upper case, a word of its own) ends the current chunk;
- any length: the tokens are cut into chunks of 75 (the tokenizer's length less BOS and EOS), each encoded on its
  own and the encodings concatenated; a chunk that fills up moves the words after its last comma to the next chunk
  when that comma is within 20 tokens of the end;
- prompt editing: `[from:to:when]` reads `from` up to step `when` and `to` after it (`when` with a point: a
  fraction of the steps; without: a step), `[to:when]` and `[from::when]` add or remove words; alternation `[a|b]`
  switches every step. A prompt becomes a schedule of texts (`prompt_schedule`), each encoded as above. The
  schedule comes from a parser of jaxdream's own, linear in the prompt's length (the webui's grammar takes minutes
  on some long prompts and recurses without bound): it gives the webui's schedules for prompts whose brackets pair
  up (compared on 20,000 generated prompts); where stray brackets sit next to a group, the webui's grammar has
  several readings and may pick another.

This module turns prompts into chunked token ids and per-token weights, in plain numpy (no jax). The weights are
applied by `diffusion.conditioning.emphasize` on the encoder output, as A1111's default 'Original' emphasis.
Textual-inversion embeddings and `AND` (composable diffusion) are not supported: their text is read as written.
"""

from __future__ import annotations

import re

import numpy as np

from jaxdream.io.tokenizer import expand_vector_tokens

SYNTAXES = ('plain', 'a1111')
ROUND, SQUARE = 1.1, 1 / 1.1
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

_BREAK = re.compile(r'\s*\bBREAK\b\s*', re.S)
_WEIGHT = re.compile(r':\s*([+-]?[.\d]+)\s*\)')  # ':1.3)' closing a weighted group
_LITERAL = '()[]\\'  # what a backslash makes literal
_SPECIAL = '\\()[]:'


def check_syntax(syntax: str) -> str:
  if syntax not in SYNTAXES:
    raise ValueError(f'prompt syntax must be one of {", ".join(SYNTAXES)}, got {syntax!r}')
  return syntax


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
  """(text, weight) pieces of an A1111 prompt, adjacent pieces of equal weight merged; a BREAK is ('BREAK', -1).

  >>> parse_prompt_attention('an (important) word')
  [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
  """
  pieces: list[list] = []  # [text, weight]; a group's brackets scale the pieces written since it opened
  opened = {'(': [], '[': []}

  def close(kind: str, factor: float):
    for piece in pieces[opened[kind].pop() :]:
      piece[1] *= factor

  def add_text(run: str):
    for k, part in enumerate(_BREAK.split(run)):
      if k:
        pieces.append(['BREAK', -1])
      pieces.append([part, 1.0])

  i = 0
  while i < len(text):
    c = text[i]
    if c == '\\':  # an escaped bracket or backslash is that character; a lone backslash is dropped
      literal = i + 1 < len(text) and text[i + 1] in _LITERAL
      pieces.append([text[i + 1] if literal else '', 1.0])
      i += 2 if literal else 1
    elif c in '([':
      opened[c].append(len(pieces))
      i += 1
    elif c == ':' and (m := _WEIGHT.match(text, i)):
      if opened['(']:
        try:
          factor = float(m.group(1))
        except ValueError:  # '1.2.3' and '.' match the pattern but are no number: the text stays as written
          factor = None
        if factor is not None:
          close('(', factor)
          i = m.end()
          continue
      add_text(m.group(0))
      i = m.end()
    elif c == ')' and opened['(']:
      close('(', ROUND)
      i += 1
    elif c == ']' and opened['[']:
      close('[', SQUARE)
      i += 1
    elif c in _SPECIAL:  # an unmatched closing bracket or a lone colon
      add_text(c)
      i += 1
    else:
      end = i
      while end < len(text) and text[end] not in _SPECIAL:
        end += 1
      add_text(text[i:end])
      i = end
  for kind, factor in (('(', ROUND), ('[', SQUARE)):  # groups left open run to the end
    while opened[kind]:
      close(kind, factor)
  merged: list[list] = []
  for piece in pieces or [['', 1.0]]:
    if merged and merged[-1][1] == piece[1]:
      merged[-1][0] += piece[0]
    else:
      merged.append(piece)
  return [(t, w) for t, w in merged]


def _special_ids(tokenizer) -> tuple[int, int, int]:
  bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
  if bos is None or eos is None:
    raise ValueError('the tokenizer has no BOS or EOS token: not a CLIP tokenizer')
  return bos, eos, pad


def chunk_prompt(tokenizer, text: str, *, comma_backtrack: int = COMMA_BACKTRACK) -> tuple[np.ndarray, np.ndarray]:
  """(ids (K, L) int32, weights (K, L) float32) of one A1111 prompt, L the tokenizer's model_max_length, as
  stable-diffusion-webui's tokenize_line and process_tokens build them: each chunk BOS, up to L - 2 tokens, EOS,
  padded (with EOS, then everything after the first EOS replaced by the pad token: SD 2.x and SDXL's second
  tokenizer pad with '!'); weight 1 on BOS, EOS and padding."""
  length = tokenizer.model_max_length
  if not 3 <= length <= 4096:
    raise ValueError(f"the tokenizer's model_max_length {length} is not a CLIP text length")
  per_chunk = length - 2
  bos, eos, pad = _special_ids(tokenizer)
  comma = tokenizer.get_vocab().get(',</w>')
  parsed = parse_prompt_attention(text)
  texts = [expand_vector_tokens(tokenizer, t) for t, _ in parsed]  # multi-vector textual inversion tokens
  pieces = tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)['input_ids']
  chunks: list[tuple[list[int], list[float]]] = []
  tokens: list[int] = []
  weights: list[float] = []
  last_comma = -1
  vectors = _embedding_lengths(tokenizer)

  def next_chunk():
    nonlocal tokens, weights, last_comma
    fill = per_chunk - len(tokens)
    chunks.append(([bos] + tokens + [eos] * fill + [eos], [1.0] + weights + [1.0] * fill + [1.0]))
    tokens, weights, last_comma = [], [], -1

  for ids, (piece, weight) in zip(pieces, parsed):
    if piece == 'BREAK' and weight == -1:
      next_chunk()
      continue
    k = 0
    while k < len(ids):
      token = ids[k]
      if token == comma:
        last_comma = len(tokens)
      elif (
        comma_backtrack and len(tokens) == per_chunk and last_comma != -1 and per_chunk - last_comma <= comma_backtrack
      ):
        cut = last_comma + 1
        moved = tokens[cut:], weights[cut:]
        tokens, weights = tokens[:cut], weights[:cut]
        next_chunk()
        tokens, weights = list(moved[0]), list(moved[1])
      if len(tokens) == per_chunk:
        next_chunk()
      # A multi-vector textual inversion embedding's tokens stay in one chunk, as A1111 keeps an embedding whole.
      n = vectors.get(token, 1)
      if n > 1 and ids[k + 1 : k + n] != _rest(tokenizer, token):
        n = 1  # T_1 ... written out of order: tokens as any others
      if n > 1 and len(tokens) + n > per_chunk:
        next_chunk()
      tokens += ids[k : k + n]
      weights += [weight] * n
      k += n
  if tokens or not chunks:
    next_chunk()
  ids = np.asarray([c[0] for c in chunks], np.int32)
  weights = np.asarray([c[1] for c in chunks], np.float32)
  if not np.isfinite(weights).all():  # nested brackets or a huge weight past float32: NaN conditioning, black images
    raise ValueError(
      f'the emphasis weights of the prompt overflow (brackets nested too deep or a weight too large): {text[:80]!r}'
    )
  if pad != eos:  # everything after a chunk's first EOS is padding
    after = np.cumsum(ids == eos, axis=1) - (ids == eos) > 0
    ids = np.where(after, pad, ids)
  return ids, weights


def _embedding_lengths(tokenizer) -> dict[int, int]:
  """{id of T: n} for each multi-vector textual inversion token T (added with T_1 ... T_{n-1})."""
  added = tokenizer.added_tokens_encoder
  out = {}
  for token, i in added.items():
    n = 1
    while f'{token}_{n}' in added:
      n += 1
    if n > 1:
      out[i] = n
  return out


def _rest(tokenizer, token_id: int) -> list[int]:
  """The ids of T_1 ... T_{n-1} following a multi-vector token T."""
  name, added = tokenizer.convert_ids_to_tokens(token_id), tokenizer.added_tokens_encoder
  out, n = [], 1
  while f'{name}_{n}' in added:
    out.append(added[f'{name}_{n}'])
    n += 1
  return out


def empty_chunk(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """A1111's empty chunk (BOS, then EOS and padding), weight 1: what pads a prompt of fewer chunks."""
  return chunk_prompt(tokenizer, '')


def tokenize_chunks(tokenizer, prompts: list[str], num_chunks: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ids (B, K, L) int32, weights (B, K, L) float32, chunk counts (B,) int32) of A1111 prompts. K is the most
  chunks any prompt needs (at least `num_chunks`); a prompt of fewer chunks is padded with empty ones, whose
  encodings `diffusion.conditioning.encode_chunks` replaces by the prompt's last token vector, as A1111 stacks
  conditionings of different lengths."""
  per_prompt = [chunk_prompt(tokenizer, p) for p in prompts]
  counts = np.asarray([len(ids) for ids, _ in per_prompt], np.int32)
  k = max(int(counts.max(initial=0)), num_chunks, 1)
  empty_ids, empty_w = empty_chunk(tokenizer)
  pad = lambda a, e: np.concatenate([a] + [e] * (k - len(a)))
  return (
    np.stack([pad(ids, empty_ids) for ids, _ in per_prompt]),
    np.stack([pad(w, empty_w) for _, w in per_prompt]),
    counts,
  )


# Prompt editing. A prompt is read as text, '(...)' and '[...]' groups (kept as written), scheduled groups
# '[from:to:when]' / '[to:when]' and alternations '[a|b|...]'; a bracket that opens no complete group is text at the
# top level, but makes the group around it fail; a '|' outside an alternation, or a backslash ending the prompt,
# leaves the whole prompt as written (as stable-diffusion-webui's grammar does).
_NUMBER = re.compile(r'\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]')
_MAX_DEPTH = 200  # nested groups; deeper prompts are left as written (the webui's parser fails on them)


class _Unparsed(Exception):
  """The prompt has no prompt-editing reading: it is used as written."""


class _Scheduled:
  def __init__(self, before, after, when: str):
    self.before, self.after, self.when, self.step = before, after, when, 0


class _Alternation:
  def __init__(self, options):
    self.options = options


class _EditingParser:
  """Recursive descent over one prompt, each position parsed once (memoized): linear in the prompt's length."""

  def __init__(self, text: str):
    self.text, self.groups, self.prompts = text, {}, {}

  def top(self) -> list:
    items, i, text = [], 0, self.text
    while i < len(text):
      if text[i] in '([':
        parsed = self.group(i, 0)
        if parsed is None:  # not a group: the bracket is text
          items.append(text[i])
          i += 1
        else:
          items.extend(parsed[0])
          i = parsed[1]
      elif text[i] in ')]:':
        items.append(text[i])
        i += 1
      elif text[i] == '|':
        raise _Unparsed
      else:
        run, i = self.plain(i)
        items.append(run)
    return items

  def plain(self, i: int) -> tuple[str, int]:
    start, text = i, self.text
    while i < len(text) and text[i] not in '()[]:|':
      if text[i] == '\\':
        if i + 1 >= len(text) or text[i + 1] == '\n':
          raise _Unparsed
        i += 1
      i += 1
    return text[start:i], i

  def prompt(self, i: int, depth: int):
    """(items, end) of text and groups from i up to one of ')', ']', ':', '|' or the end; None if a group fails."""
    if i not in self.prompts:
      items, j, text = [], i, self.text
      while j < len(text) and text[j] not in ')]:|':
        if text[j] in '([':
          parsed = self.group(j, depth)
          if parsed is None:
            self.prompts[i] = None
            return None
          items.extend(parsed[0])
          j = parsed[1]
        else:
          run, j = self.plain(j)
          items.append(run)
      self.prompts[i] = (items, j)
    return self.prompts[i]

  def group(self, i: int, depth: int):
    """(items, end) of the group opening at i, or None."""
    if depth >= _MAX_DEPTH:
      raise _Unparsed
    if i not in self.groups:
      self.groups[i] = self._group(i, depth + 1)
    return self.groups[i]

  def _group(self, i: int, depth: int):
    text, bracket = self.text, self.text[i]
    first = self.prompt(i + 1, depth)
    if first is None:
      return None
    items, j = first
    at = text[j] if j < len(text) else ''
    if bracket == '(':
      if at == ')':
        return ['('] + items + [')'], j + 1
      if at == ':' and (second := self.prompt(j + 1, depth)) is not None and second[1] < len(text):
        if text[second[1]] == ')':
          return ['('] + items + [':'] + second[0] + [')'], second[1] + 1
      return None
    if at == ']':
      return ['['] + items + [']'], j + 1
    if at == '|':
      options = [items]
      while j < len(text) and text[j] == '|':
        option = self.prompt(j + 1, depth)
        if option is None:
          return None
        options.append(option[0])
        j = option[1]
      return ([_Alternation(options)], j + 1) if j < len(text) and text[j] == ']' else None
    if at == ':':
      if m := _NUMBER.match(text, j + 1):  # [to:when]
        return [_Scheduled(None, items, m.group(1))], m.end()
      second = self.prompt(j + 1, depth)
      if second is not None and second[1] < len(text) and text[second[1]] == ':':
        if m := _NUMBER.match(text, second[1] + 1):  # [from:to:when]
          return [_Scheduled(items, second[0], m.group(1))], m.end()
    return None


def _walk(items):
  for item in items:
    if isinstance(item, _Scheduled):
      yield item
      yield from _walk(item.before or [])
      yield from _walk(item.after)
    elif isinstance(item, _Alternation):
      yield item
      for option in item.options:
        yield from _walk(option)


def _render(items, step: int) -> str:
  out = []
  for item in items:
    if isinstance(item, _Scheduled):
      out.append(_render(item.before or [], step) if step <= item.step else _render(item.after, step))
    elif isinstance(item, _Alternation):
      out.append(_render(item.options[(step - 1) % len(item.options)], step))
    else:
      out.append(item)
  return ''.join(out)


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
  """[(last step, text), ...] of an A1111 prompt over `steps` sampling steps, as stable-diffusion-webui's
  get_learned_conditioning_prompt_schedules (without hires fix): step i (0-based) reads the first text whose last
  step is >= i; `when` with a point is a fraction of the steps, without one a step count; a prompt without editing
  or alternation (or one that has no such reading) is [(steps, prompt)].

  >>> prompt_schedule('a [b:c:0.5] d', 10)
  [(5, 'a b d'), (10, 'a c d')]
  """
  if '[' not in prompt and '|' not in prompt:  # nothing to schedule
    return [(steps, prompt)]
  try:
    items = _EditingParser(prompt).top()
  except _Unparsed:
    return [(steps, prompt)]
  ends = {steps}
  for node in _walk(items):
    if isinstance(node, _Alternation):
      ends.update(range(1, steps + 1))
      continue
    value = float(node.when)
    value = value * steps if '.' in node.when else value
    node.step = int(min(float(steps), max(-1.0, value)))  # '1e999' is infinite: past the last step
    if node.step >= 1:
      ends.add(node.step)
  return [(end, _render(items, end)) for end in sorted(ends)]
