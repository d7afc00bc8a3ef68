"""Image captioning and grounding with Kosmos-2: processor, jitted generation and the `caption` API.

    from jaxdream import vlm
    bundle = vlm.load('path/to/kosmos-2-patch14-224')  # a transformers-format folder
    out = vlm.caption(bundle, ['dog.jpg'])              # or the folder itself; PIL images, uint8 arrays
    out[0]['text']      # 'An image of a dog on a sofa.'
    out[0]['entities']  # [('a dog', (12, 17), [(x1, y1, x2, y2)]), ...], boxes normalised to [0, 1]

Everything matches transformers' Kosmos2Processor and `generate`: the prompt ids and image placeholder
mask, CLIP image preprocessing (PIL resize, crop, normalise), greedy and beam search token for token,
sampling with the same temperature/top-k/top-p filtering, and `post_process_generation`'s parsing.

Generation runs as one jitted function per shape: the vision tower, a prefill of the prompt into a
fixed-size KV cache, then a `lax.while_loop` of single-token steps that stops when every row has emitted
EOS. Prompts of unequal length are left-padded; positions are counted from each row's first real token, so
a batch gives what each prompt gives alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.models.kosmos2 import Kosmos2ForConditionalGeneration, load_kosmos2, prompt_position_ids
from jaxdream.models.weights import WeightsError

DEFAULT_PROMPT = '<grounding>An image of'
TAG_TOKENS = ('</doc>', '<image>', '</image>', '</chunk>', '</line>', '<phrase>', '</phrase>', '<object>',
              '</object>', '</delimiter_of_multi_objects/>', '<grounding>')
NUM_PATCH_INDEX_TOKENS = 1024  # a 32x32 grid of box corners
_PROMPT_BUCKET = 8  # prompts are left-padded to a multiple of this, so similar lengths share a compile


# ----------------------------------------------------------------------------------------------- processor

class Kosmos2Processor:
  """Prompt ids and pixel values as transformers' Kosmos2Processor makes them (numpy, PIL, no torch)."""

  def __init__(self, folder: str, num_image_tokens: int = 64):
    from transformers import AddedToken, AutoTokenizer
    self.tokenizer = AutoTokenizer.from_pretrained(folder)
    # A folder saved by the processor already has these; a bare XLM-R tokenizer gets them as the processor
    # adds them (add_tokens skips those present).
    patch_tokens = [f'<patch_index_{i:04d}>' for i in range(NUM_PATCH_INDEX_TOKENS)]
    self.tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False)
                               for t in TAG_TOKENS + tuple(patch_tokens)])
    self.image_config = read_image_processor_config(folder)
    self.num_image_tokens = num_image_tokens
    self.first_image_token_id = self.tokenizer.unk_token_id + 1

  def encode_prompt(self, text: str) -> list[int]:
    """`<s><image> (num_image_tokens fake image tokens) </image> text`, the fake tokens replaced by ids
    first_image_token_id... (their embeddings are overwritten by the image features anyway)."""
    placeholder = ' '.join(['<image>'] * (self.num_image_tokens + 1) + ['</image>'])
    ids = self.tokenizer(f'{self.tokenizer.bos_token}{placeholder} {text.strip()}',
                         add_special_tokens=False)['input_ids']
    n = self.num_image_tokens
    return ids[:2] + list(range(self.first_image_token_id, self.first_image_token_id + n)) + ids[2 + n:]

  def prompts(self, texts: list[str], bucket: int = 1):
    """Left-padded (input_ids, attention_mask, image_embeds_position_mask), int32 (B, L); L is rounded up
    to a multiple of `bucket`."""
    rows = [self.encode_prompt(t) for t in texts]
    n = max(map(len, rows))
    n = -(-n // bucket) * bucket
    ids = np.full((len(rows), n), self.tokenizer.pad_token_id, np.int32)
    attention = np.zeros((len(rows), n), np.int32)
    image_mask = np.zeros((len(rows), n), np.int32)
    for i, row in enumerate(rows):
      start = n - len(row)
      ids[i, start:] = row
      attention[i, start:] = 1
      image_mask[i, start + 2:start + 2 + self.num_image_tokens] = 1  # after <s><image>
    return ids, attention, image_mask

  def images(self, images) -> np.ndarray:
    """(B, H, W, 3) float32 pixel values (NHWC) from paths, PIL images or uint8 arrays."""
    return np.stack([preprocess_image(load_image(im), self.image_config) for im in images])

  def decode(self, ids) -> list[str]:
    """As processor.batch_decode(ids, skip_special_tokens=True)."""
    return self.tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def read_image_processor_config(folder: str) -> dict:
  """The CLIP image processor settings of a model folder: preprocessor_config.json, or the
  `image_processor` entry of processor_config.json (what transformers 5 writes)."""
  for name, key in (('preprocessor_config.json', None), ('processor_config.json', 'image_processor')):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with open(path) as f:
        cfg = json.load(f)
      cfg = cfg.get(key, cfg) if key else cfg
      kind = cfg.get('image_processor_type', 'CLIPImageProcessor')
      if not kind.startswith('CLIPImageProcessor'):
        raise WeightsError(f'{path}: image processor {kind!r} is not supported (only CLIPImageProcessor)')
      return cfg
  raise WeightsError(f'{folder}: no preprocessor_config.json or processor_config.json (image preprocessing)')


def load_image(image):
  """A PIL image from a path (turned upright by its EXIF orientation, as transformers' load_image does),
  a PIL image, or a uint8 array."""
  from PIL import Image, ImageOps
  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as im:
      return ImageOps.exif_transpose(im)  # a loaded copy, also without EXIF rotation
  if isinstance(image, Image.Image):
    return image
  a = np.asarray(image)
  if a.dtype != np.uint8 or a.ndim not in (2, 3):
    raise ValueError(f'images must be paths, PIL images or uint8 (H, W[, C]) arrays; got {a.dtype} {a.shape}')
  return Image.fromarray(a)


def preprocess_image(image, cfg: dict) -> np.ndarray:
  """CLIPImageProcessor (the PIL backend): RGB, resize with PIL on uint8, center crop, rescale, normalise."""
  from PIL import Image
  if cfg.get('do_convert_rgb', True):
    if 'A' in image.getbands() or image.info.get('transparency') is not None:  # transparency goes white
      image = Image.alpha_composite(Image.new('RGBA', image.size, (255,) * 4), image.convert('RGBA'))
    image = image.convert('RGB')
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if cfg.get('do_resize', True):
    size = dict(cfg.get('size') or {'shortest_edge': 224})
    if cfg.get('use_square_size') and 'shortest_edge' in size:  # Kosmos-2's legacy flag: a square resize
      size = {'height': size['shortest_edge'], 'width': size['shortest_edge']}
    h, w = x.shape[:2]
    if 'shortest_edge' in size:
      s = size['shortest_edge']
      short, long = min(h, w), max(h, w)
      new_long = int(s * long / short)
      h, w = (new_long, s) if w <= h else (s, new_long)
    else:
      h, w = size['height'], size['width']
    pil = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
    x = np.asarray(pil.resize((w, h), resample=cfg.get('resample', 3)))
    x = x[..., None] if x.ndim == 2 else x
  if cfg.get('do_center_crop', True):
    x = center_crop(x, cfg.get('crop_size') or {'height': 224, 'width': 224})
  x = x.astype(np.float32)
  if cfg.get('do_rescale', True):
    x = (x.astype(np.float64) * cfg.get('rescale_factor', 1 / 255)).astype(np.float32)
  if cfg.get('do_normalize', True):
    mean = np.asarray(cfg.get('image_mean', [0.48145466, 0.4578275, 0.40821073]), np.float32)
    std = np.asarray(cfg.get('image_std', [0.26862954, 0.26130258, 0.27577711]), np.float32)
    x = (x - mean) / std
  return x


def center_crop(x: np.ndarray, size: dict) -> np.ndarray:
  ch, cw = int(size['height']), int(size['width'])
  h, w = x.shape[:2]
  if ch > h or cw > w:  # too small: centre it on a zero canvas first, as transformers does
    ph, pw = max(ch, h), max(cw, w)
    canvas = np.zeros((ph, pw) + x.shape[2:], x.dtype)
    top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
    canvas[top:top + h, left:left + w] = x
    x, h, w = canvas, ph, pw
  top, left = (h - ch) // 2, (w - cw) // 2
  return x[top:top + ch, left:left + cw]


# ----------------------------------------------------------------------------------------------- generation

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
  logits, cache = model.decode(input_ids, positions, kv_valid, cache=model.init_cache(b, total), index=0,
                               image_embeds=model.image_embeds(pixel_values), image_mask=image_mask,
                               last_only=True)
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


def _sample(model, pixel_values, input_ids, attention_mask, image_mask, eos, key, temperature, top_p, *,
            max_new_tokens, do_sample, top_k, pad):
  b, n = input_ids.shape

  def pick(logits, key):
    if not do_sample:
      return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, warp_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)

  logits, cache, kv_valid, first_real = _prefill(model, pixel_values, input_ids, attention_mask, image_mask,
                                                 n + max_new_tokens)
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


def _beam_search(model, pixel_values, input_ids, attention_mask, image_mask, eos, *, max_new_tokens, num_beams,
                 num_return_sequences, length_penalty, early_stopping, pad):
  """transformers' vectorised beam search (same candidates, scores, length penalty, stopping heuristics)."""
  b, n = input_ids.shape
  k, steps = num_beams, max_new_tokens
  keep = max(2, 1 + eos.shape[0]) * k  # candidates per step: enough to continue k beams when some end
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)

  logits, cache, kv_valid, first_real = _prefill(model, pixel_values, input_ids, attention_mask, image_mask,
                                                 n + steps)
  # Every beam starts from the same prefill.
  cache, kv_valid, first_real = jax.tree.map(lambda x: jnp.repeat(x, k, 0), (cache, kv_valid, first_real))
  logits = jnp.repeat(logits, k, 0)
  state = dict(
      t=0, logits=logits, cache=cache, kv_valid=kv_valid,
      running=jnp.full((b, k, steps), pad, jnp.int32),
      running_scores=jnp.zeros((b, k)).at[:, 1:].set(-1e9),  # only beam 0 is live at first
      sequences=jnp.full((b, k, steps), pad, jnp.int32), scores=jnp.full((b, k), -1e9),
      lengths=jnp.zeros((b, k), jnp.int32), finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool), go=jnp.array(True))

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
    go = (jnp.any(improvable) & ~(jnp.all(finished) & (early_stopping is True)) & ~jnp.all(hits)
          & (t + 1 < steps))
    # Reorder the cache to the live beams' parents, then feed their new tokens.
    rows = (live_parent + jnp.arange(b)[:, None] * k).reshape(-1)
    cache, kv_valid = jax.tree.map(lambda x: x[rows], (s['cache'], s['kv_valid']))
    logits, cache, kv_valid = jax.lax.cond(
        go, lambda: _step(model, running[:, :, t].reshape(-1), n + t, cache, kv_valid, first_real),
        lambda: (s['logits'], cache, kv_valid))
    return dict(t=t + 1, logits=logits, cache=cache, kv_valid=kv_valid, running=running,
                running_scores=running_scores, sequences=sequences, scores=scores, lengths=lengths,
                finished=finished, improvable=improvable, go=go)

  s = jax.lax.while_loop(lambda s: s['go'], body, state)
  r = num_return_sequences
  return s['sequences'][:, :r], s['scores'][:, :r], s['lengths'][:, :r]


def generate(model: Kosmos2ForConditionalGeneration, pixel_values, input_ids, attention_mask=None,
             image_embeds_position_mask=None, *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 50, top_p: float = 1.0, num_beams: int = 1,
             num_return_sequences: int = 1, length_penalty: float = 1.0, early_stopping=False, seed: int = 0,
             eos_token_id=None, pad_token_id=None) -> np.ndarray:
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
    raise ValueError(f'every row of image_embeds_position_mask must mark {model.latent_query_num} image '
                     f'positions; got {counts.tolist()}')
  if max_new_tokens < 1:
    raise ValueError('max_new_tokens must be at least 1')
  eos = eos_token_id if eos_token_id is not None else model.eos_token_id
  eos = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
  pad = int(pad_token_id if pad_token_id is not None else model.pad_token_id if model.pad_token_id is not None
            else eos[0])
  args = (nnx.state(model), jnp.asarray(pixel_values, model.dtype), jnp.asarray(input_ids),
          jnp.asarray(attention_mask), jnp.asarray(image_mask), jnp.asarray(eos, jnp.int32))
  if num_beams > 1:
    if do_sample:
      raise ValueError('beam search with sampling is not supported; use num_beams=1 or do_sample=False')
    if not 1 <= num_return_sequences <= num_beams:
      raise ValueError('num_return_sequences must be between 1 and num_beams')
    seqs, _, lengths = _compiled(
        model, _beam_search, max_new_tokens=max_new_tokens, num_beams=num_beams,
        num_return_sequences=num_return_sequences, length_penalty=float(length_penalty),
        early_stopping=early_stopping, pad=pad)(*args)
    seqs, steps = np.asarray(seqs).reshape(b * num_return_sequences, -1), int(np.max(lengths))
    input_ids = np.repeat(input_ids, num_return_sequences, 0)
  else:
    if num_return_sequences != 1:
      raise ValueError('num_return_sequences > 1 needs beam search (num_beams > 1)')
    fn = _compiled(model, _sample, max_new_tokens=max_new_tokens, do_sample=bool(do_sample),
                   top_k=int(top_k) if do_sample else 0, pad=pad)
    seqs, steps = fn(*args, jax.random.key(seed), jnp.float32(temperature), jnp.float32(top_p))
    seqs, steps = np.asarray(seqs), int(steps)
  return np.concatenate([input_ids, seqs[:, :steps]], 1)


# ----------------------------------------------------------------------------------------------- grounding

_TAGS = re.compile('<.*?>')
# One grounded entity: an optional <phrase>...</phrase>, then <object> with one or more box corner pairs.
_ENTITY = re.compile(r'(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_\d+><patch_index_\d+>'
                     r'</delimiter_of_multi_objects/>)*<patch_index_\d+><patch_index_\d+>)</object>')
_PATCH = re.compile(r'<patch_index_(\d+)>')


def patch_box(ul: int, lr: int, per_side: int = 32) -> tuple[float, float, float, float]:
  """Normalised (x1, y1, x2, y2) of the box whose upper-left / lower-right cells are `ul` / `lr`: cell edges
  when the box is one row or column thick, cell centres otherwise (Kosmos-2's decoding convention)."""
  cell = 1.0 / per_side
  (uy, ux), (ly, lx) = divmod(ul, per_side), divmod(lr, per_side)
  thin = ul == lr or ux == lx or uy == ly
  lo, hi = (0.0, cell) if thin else (cell / 2, cell / 2)
  return ux * cell + lo, uy * cell + lo, lx * cell + hi, ly * cell + hi


def parse_grounding(text: str, per_side: int = 32):
  """(clean caption, entities) from generated text, as processor.post_process_generation(text).

  Entities are (phrase, (start, end) in the clean caption, [(x1, y1, x2, y2), ...] normalised). An <object>
  without a phrase gives one entity per box, named by its patch tokens, with an empty span.
  """
  text = text.split('</image>')[-1]
  clean_len = lambda i: len(_TAGS.sub('', text[:i]))
  raw = []
  for m in _ENTITY.finditer(text):
    pairs = [tuple(int(i) for i in _PATCH.findall(p)) for p in m.group(3).split('</delimiter_of_multi_objects/>')]
    if m.group(1):
      raw.append((m.group(2), m.span(2), pairs))
    else:
      raw += [(f'<patch_index_{ul}><patch_index_{lr}>', (m.start(), m.start()), [(ul, lr)]) for ul, lr in pairs]
  clean = _TAGS.sub('', text)
  lead = len(clean) - len(clean.lstrip())
  entities = []
  for name, (start, end), pairs in raw:
    # spans move with the caption's stripped leading spaces, and shrink to the stripped phrase
    start = clean_len(start) - lead + len(name) - len(name.lstrip())
    end = clean_len(end) - lead - (len(name) - len(name.rstrip()))
    entities.append((name.strip(), (start, end), [patch_box(ul, lr, per_side) for ul, lr in pairs]))
  return clean.strip(), entities


# ----------------------------------------------------------------------------------------------- API

@dataclasses.dataclass
class Kosmos2Bundle:
  """A loaded Kosmos-2 folder: the model, its processor, and the EOS / pad ids generation uses."""
  model: Kosmos2ForConditionalGeneration
  processor: Kosmos2Processor
  eos_token_id: tuple
  pad_token_id: int
  path: str | None = None


def load(path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', allow_pickle: bool = False) -> Kosmos2Bundle:
  """Load a transformers Kosmos-2 folder: config.json, model.safetensors, tokenizer files and the
  (pre)processor config. EOS and pad ids come from the text config: transformers' Kosmos-2 generates with
  its text model's own generation settings, so generation_config.json does not apply there either."""
  model = load_kosmos2(path, dtype=dtype, attention_impl=attention_impl, allow_pickle=allow_pickle)
  eos = model.eos_token_id if isinstance(model.eos_token_id, (list, tuple)) else [model.eos_token_id]
  return Kosmos2Bundle(model, Kosmos2Processor(path, num_image_tokens=model.latent_query_num), tuple(eos),
                       eos[0] if model.pad_token_id is None else model.pad_token_id, path)


def caption(model, images, *, prompt: str | list[str] = DEFAULT_PROMPT, max_new_tokens: int = 64,
            batch_size: int = 8, heatmaps: bool = False, **generate_kwargs) -> list[dict]:
  """Caption (and ground) images with Kosmos-2.

  model: a folder or a `load`ed bundle; images: paths, PIL images or uint8 arrays; prompt: one string or
  one per image. generate_kwargs: do_sample, temperature, top_k, top_p, num_beams, seed, ...
  Returns per image {'generated_text', 'text', 'entities'}: the decoded sequence (prompt included, as
  processor.batch_decode(..., skip_special_tokens=True)) and its post_process_generation parse.
  heatmaps=True adds 'heatmaps': [(phrase, (grid, grid) array in [0, 1])], where each `<phrase>`'s tokens
  looked in the image (see `phrase_heatmaps`).
  """
  if generate_kwargs.get('num_return_sequences', 1) != 1:
    raise ValueError('caption returns one result per image; call generate for num_return_sequences > 1')
  bundle = model if isinstance(model, Kosmos2Bundle) else load(model)
  images = list(images)
  prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
  if len(prompts) != len(images):
    raise ValueError(f'{len(prompts)} prompts for {len(images)} images')
  proc, results = bundle.processor, []
  for lo in range(0, len(images), batch_size):
    ids, attention, image_mask = proc.prompts(prompts[lo:lo + batch_size], bucket=_PROMPT_BUCKET)
    pixels = proc.images(images[lo:lo + batch_size])
    out = generate(bundle.model, pixels, ids, attention, image_mask, max_new_tokens=max_new_tokens,
                   eos_token_id=bundle.eos_token_id, pad_token_id=bundle.pad_token_id, **generate_kwargs)
    maps = phrase_heatmaps(bundle, pixels, out, attention, image_mask) if heatmaps else None
    for i, generated_text in enumerate(proc.decode(out)):
      text, entities = parse_grounding(generated_text)
      results.append(dict(generated_text=generated_text, text=text, entities=entities))
      if heatmaps:
        results[-1]['heatmaps'] = maps[i]
  return results


def _attention_summary(model, pixel_values, ids, image_mask, attention):
  maps = model.attention_maps(pixel_values, ids, image_mask, attention)
  text = jnp.mean(jnp.stack([m.mean(1) for m in maps['text']]), 0)  # (B, L, L): layers and heads averaged
  return text, maps['projection'].mean(1)  # (B, Q, 1 + patches + Q)


def phrase_heatmaps(bundle: Kosmos2Bundle, pixel_values, ids, prompt_attention, prompt_image_mask) -> list:
  """Per row of generated `ids` (prompt included): [(phrase, heatmap)] for each <phrase>...</phrase>.

  The phrase tokens' attention to the 64 image tokens (averaged over decoder layers, heads and the phrase's
  tokens) is carried back to the image patches through the resampler's attention from its latent queries to
  the patch features: a (grid, grid) map of where the phrase looked, scaled to a maximum of 1.
  """
  model, tok = bundle.model, bundle.processor.tokenizer
  ids = np.asarray(ids)
  grow = lambda m, fill: np.concatenate([m, np.full((len(m), ids.shape[1] - m.shape[1]), fill, m.dtype)], 1)
  image_mask, attention = grow(np.asarray(prompt_image_mask), 0), grow(np.asarray(prompt_attention), 1)
  text, proj = _compiled(model, _attention_summary)(nnx.state(model), jnp.asarray(pixel_values, model.dtype),
                                                    jnp.asarray(ids), jnp.asarray(image_mask),
                                                    jnp.asarray(attention))
  text, proj = np.asarray(text), np.asarray(proj)
  grid = model.image_size // model.vision_model.model.embeddings.patch_embedding.kernel.shape[0]
  bop, eop = tok.convert_tokens_to_ids(['<phrase>', '</phrase>'])
  out = []
  for row, t, p, m in zip(ids, text, proj, image_mask):
    to_patches = p[:, 1:1 + grid * grid]  # latent query -> patch (the class token and latents dropped)
    maps = []
    for start in np.flatnonzero(row == bop):
      ends = np.flatnonzero(row[start + 1:] == eop)
      if not len(ends) or ends[0] == 0:
        continue
      tokens = np.arange(start + 1, start + 1 + ends[0])
      heat = (t[tokens][:, m.astype(bool)].mean(0) @ to_patches).reshape(grid, grid)
      maps.append((tok.decode(row[tokens]).strip(), heat / max(heat.max(), 1e-12)))
    out.append(maps)
  return out


def draw_heatmap(image, heatmap, *, alpha: float = 0.6):
  """`image` (PIL or uint8 array) with `heatmap` (any grid, values in [0, 1]) blended over it in red."""
  from PIL import Image
  im = load_image(image).convert('RGB')
  h = Image.fromarray(np.uint8(np.clip(heatmap, 0, 1) * 255)).resize(im.size, Image.BILINEAR)
  a = np.asarray(h, np.float32)[..., None] / 255 * alpha
  blended = np.asarray(im, np.float32) * (1 - a) + np.array([255, 0, 0], np.float32) * a
  return Image.fromarray(np.uint8(np.rint(blended)))


def draw_entities(image, entities, *, width: int = 3):
  """A copy of `image` (PIL or uint8 array) with each entity's boxes and phrase drawn on it."""
  from PIL import ImageDraw
  im = load_image(image).convert('RGB').copy()
  draw = ImageDraw.Draw(im)
  w, h = im.size
  palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
  for i, (phrase, _, boxes) in enumerate(entities):
    color = palette[i % len(palette)]
    for x1, y1, x2, y2 in boxes:
      box = [x1 * w, y1 * h, max(x1 * w, x2 * w - 1), max(y1 * h, y2 * h - 1)]
      draw.rectangle(box, outline=color, width=width)
      tx, ty = box[0] + width, box[1] + width
      tb = draw.textbbox((tx, ty), phrase)
      draw.rectangle(tb, fill=color)
      draw.text((tx, ty), phrase, fill=(255, 255, 255))
  return im


IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def list_images(paths) -> list[str]:
  """Image files from a list of files and folders (a folder's images sorted by name)."""
  out = []
  for path in paths:
    if os.path.isdir(path):
      out += sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
    elif os.path.exists(path):
      out.append(path)
    else:
      raise FileNotFoundError(f'{path}: no such image or folder')
  return out


def subject_boxes(entities, phrase: str) -> list:
  """The boxes of the entities whose phrase names `phrase` as whole words (case-insensitive, plural
  allowed): 'dog' matches 'a dog' and 'two dogs', not 'a hotdog'."""
  pattern = re.compile(rf'\b{re.escape(phrase.strip().lower())}(s|es)?\b')
  return [box for name, _, boxes in entities if pattern.search(name.lower()) for box in boxes]


def check_subject(model, images, phrase: str, *, mode: str = 'caption', **caption_kwargs) -> dict:
  """Whether each image shows `phrase`, grounded with boxes: a DreamBooth training-set check.

  mode 'caption': the phrase must be among the grounded entities of a free caption (conservative);
  mode 'refer': the model is asked where `<phrase>phrase</phrase>` is (it nearly always answers a box).
  Returns {'phrase', 'mode', 'grounded_fraction', 'images': [{'image', 'grounded', 'boxes', 'text'}]}.
  """
  if mode not in ('caption', 'refer'):
    raise ValueError(f"mode must be 'caption' or 'refer', not {mode!r}")
  images = list(images)
  if mode == 'refer':
    caption_kwargs['prompt'] = f'<grounding><phrase> {phrase.strip()}</phrase>'
  results = caption(model, images, **caption_kwargs)
  rows = []
  for i, (image, r) in enumerate(zip(images, results)):
    boxes = subject_boxes(r['entities'], phrase)
    rows.append(dict(image=str(image) if isinstance(image, (str, os.PathLike)) else i, grounded=bool(boxes),
                     boxes=[list(b) for b in boxes], text=r['text']))
  fraction = sum(r['grounded'] for r in rows) / max(1, len(rows))
  return dict(phrase=phrase, mode=mode, grounded_fraction=fraction, images=rows)
