"""Qwen2.5-VL and Qwen3-VL inputs as transformers' Qwen2_5_VLProcessor / Qwen3VLProcessor make them, without
torch: the image processor (Qwen2VLImageProcessor's PIL backend, the one transformers picks without
torchvision) in numpy and PIL, the folder's tokenizer and chat template through transformers' tokenizer.

Each image is resized so both sides are multiples of patch_size * merge_size and its area lies within the
folder's pixel budget (`smart_resize`), normalised, repeated over the temporal patch, and cut into patches
in the order the vision tower reads them: merge blocks row-major, the patches of a block row-major, each
patch flattened as (channel, frame, row, column). The prompt's `<|image_pad|>` becomes one token per merged
patch.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from jaxdream.io.weights import WeightsError
from jaxdream.vlm.processor import load_image, to_rgb

# Qwen2VLImageProcessor's defaults (Qwen2.5-VL's published preprocessor_config.json spells the same out).
IMAGE_DEFAULTS = dict(
  do_resize=True,
  resample=3,  # PIL bicubic
  do_rescale=True,
  rescale_factor=1 / 255,
  do_normalize=True,
  image_mean=[0.48145466, 0.4578275, 0.40821073],
  image_std=[0.26862954, 0.26130258, 0.27577711],
  do_convert_rgb=True,
  patch_size=14,
  temporal_patch_size=2,
  merge_size=2,
)
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
IMAGE_TOKEN = '<|image_pad|>'
VISION_START_TOKEN = '<|vision_start|>'
VISION_END_TOKEN = '<|vision_end|>'
PAD_FALLBACK_TOKEN = '<|endoftext|>'


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
  """(height, width) rounded to multiples of `factor`, scaled (keeping the aspect ratio as closely as that
  allows) into [min_pixels, max_pixels] when the rounding falls outside; transformers' smart_resize."""
  if min(height, width) < 1:
    raise ValueError(f'image of {width}x{height}: an image needs at least one pixel each way')
  if max(height, width) / min(height, width) > 200:
    raise ValueError(f'image of {width}x{height}: the aspect ratio must be below 200 (Qwen-VL image processor)')
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def read_qwen_image_config(folder: str) -> dict:
  """The image processor settings of a Qwen-VL folder (preprocessor_config.json, or the `image_processor`
  entry of processor_config.json), defaults filled in, the pixel budget as `min_pixels` / `max_pixels`:
  `size` {'shortest_edge', 'longest_edge'} (Qwen3-VL's files) with `min_pixels` / `max_pixels` (Qwen2.5-VL's)
  taking precedence, as transformers reads them."""
  for name, key in (('preprocessor_config.json', None), ('processor_config.json', 'image_processor')):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      continue
    with open(path) as f:
      try:
        cfg = json.load(f)
      except json.JSONDecodeError as e:
        raise WeightsError(f'{path}: not valid JSON ({e})') from None
    cfg = (cfg.get(key) or {}) if key else cfg
    if not cfg:
      continue
    kind = cfg.get('image_processor_type', 'Qwen2VLImageProcessor')
    if not kind.startswith('Qwen2VLImageProcessor'):
      raise WeightsError(f'{path}: image processor {kind!r} is not a Qwen-VL one (Qwen2VLImageProcessor)')
    out = {k: cfg.get(k, v) for k, v in IMAGE_DEFAULTS.items()}
    size = cfg.get('size') or {}
    if not isinstance(size, dict) or (size and set(size) != {'shortest_edge', 'longest_edge'}):
      # transformers refuses these (an older {'min_pixels', 'max_pixels'} size, one edge alone): not a budget to guess
      raise WeightsError(f"{path}: size {size!r}: expected {{'shortest_edge': ..., 'longest_edge': ...}}")
    for name, edge, default in (
      ('min_pixels', 'shortest_edge', DEFAULT_MIN_PIXELS),
      ('max_pixels', 'longest_edge', DEFAULT_MAX_PIXELS),
    ):
      value = cfg.get(name)
      value = size.get(edge, default) if value is None else value
      whole = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
      if not whole or value < 1 or value != int(value):
        raise WeightsError(f'{path}: {name} {value!r} must be a whole number of pixels, at least 1')
      out[name] = int(value)
    if out['min_pixels'] > out['max_pixels']:
      raise WeightsError(f'{path}: min_pixels {out["min_pixels"]} exceeds max_pixels {out["max_pixels"]}')
    return out
  raise WeightsError(
    f'{folder}: no preprocessor_config.json (or processor_config.json with an image_processor entry): '
    'a Qwen-VL folder needs its image processor settings'
  )


def preprocess_qwen_image(image, cfg: dict) -> tuple[np.ndarray, tuple[int, int, int], tuple[int, int]]:
  """One image -> (patches (grid_h * grid_w, C * T * P * P) float32, (1, grid_h, grid_w), resized (width,
  height)); as Qwen2VLImageProcessor's PIL backend: RGB, resize with PIL on uint8, rescale in float64 then
  float32, normalise, repeat over the temporal patch."""
  from PIL import Image

  image = load_image(image)
  if cfg['do_convert_rgb']:
    image = to_rgb(image)
  x = np.asarray(image)
  x = x[..., None] if x.ndim == 2 else x
  p, merge, t = cfg['patch_size'], cfg['merge_size'], cfg['temporal_patch_size']
  if cfg['do_resize']:
    h, w = smart_resize(x.shape[0], x.shape[1], p * merge, cfg['min_pixels'], cfg['max_pixels'])
    pil = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
    x = np.asarray(pil.resize((w, h), resample=cfg['resample']))
    x = x[..., None] if x.ndim == 2 else x
  h, w, c = x.shape
  if h % (p * merge) or w % (p * merge):
    raise ValueError(f'image of {w}x{h} is not a multiple of {p * merge} pixels a side (do_resize is off)')
  x = x.astype(np.float32)
  if cfg['do_rescale']:
    x = (x.astype(np.float64) * cfg['rescale_factor']).astype(np.float32)
  if cfg['do_normalize']:
    x = (x - np.asarray(cfg['image_mean'], np.float32)) / np.asarray(cfg['image_std'], np.float32)
  gh, gw = h // p, w // p
  x = x.reshape(gh // merge, merge, p, gw // merge, merge, p, c).transpose(0, 3, 1, 4, 6, 2, 5)  # blocks, C, P, P
  x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])  # one frame, repeated
  return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p), (1, gh, gw), (w, h)


def find_chat_template(folder: str, tokenizer) -> str:
  """The chat template where transformers' processor finds it: processor_config.json's `chat_template`, then
  chat_template.json, then chat_template.jinja, then the tokenizer's own."""
  path = os.path.join(folder, 'processor_config.json')
  if os.path.exists(path):
    with open(path) as f:
      template = json.load(f).get('chat_template')
    if template:
      return template
  path = os.path.join(folder, 'chat_template.json')
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)['chat_template']
  path = os.path.join(folder, 'chat_template.jinja')
  if os.path.exists(path):
    with open(path) as f:
      return f.read()
  if isinstance(getattr(tokenizer, 'chat_template', None), str):
    return tokenizer.chat_template
  raise WeightsError(f'{folder}: no chat template (chat_template.json, chat_template.jinja or the tokenizer config)')


def _read_json(folder: str, name: str) -> dict:
  path = os.path.join(folder, name)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise WeightsError(f'{path}: not valid JSON ({e})') from None


class QwenVLProcessor:
  """`processor(images, texts)` -> the model inputs for one image and one question per row (left-padded);
  `decode(ids)` -> strings. Attributes the model needs: image_token_id, vision_start_token_id,
  vision_end_token_id, eos_token_ids (generation_config.json's, else config.json's), pad_token_id,
  repetition_penalty (generation_config.json's, else 1.0), merge_size, patch_size."""

  def __init__(self, folder: str):
    if not os.path.isdir(folder):
      raise WeightsError(f'{folder}: not a folder')
    self.image_config = read_qwen_image_config(folder)
    if not any(os.path.exists(os.path.join(folder, n)) for n in ('tokenizer.json', 'vocab.json')):
      raise WeightsError(f'{folder}: no tokenizer (tokenizer.json, or vocab.json with merges.txt)')
    from transformers import AutoTokenizer

    self.tokenizer = AutoTokenizer.from_pretrained(folder)
    self.chat_template = find_chat_template(folder, self.tokenizer)
    vocab = self.tokenizer.get_vocab()
    missing = [t for t in (IMAGE_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN) if t not in vocab]
    if missing:
      raise WeightsError(f'{folder}: the tokenizer has no {", ".join(missing)}: not a Qwen-VL tokenizer')
    self.image_token_id = vocab[IMAGE_TOKEN]
    self.vision_start_token_id = vocab[VISION_START_TOKEN]
    self.vision_end_token_id = vocab[VISION_END_TOKEN]
    config = _read_json(folder, 'config.json')
    for key in ('image_token_id', 'vision_start_token_id'):
      if key in config and config[key] != getattr(self, key):
        raise WeightsError(f'{folder}: config.json {key}={config[key]} but the tokenizer gives {getattr(self, key)}')
    generation = _read_json(folder, 'generation_config.json')
    eos = generation.get('eos_token_id')
    # transformers' generate applies the file's repetition penalty by default (Qwen2.5-VL Instruct: 1.05)
    self.repetition_penalty = float(generation.get('repetition_penalty') or 1.0)
    if eos is None:
      eos = (config.get('text_config') or {}).get('eos_token_id', config.get('eos_token_id'))
    if eos is None:
      eos = self.tokenizer.eos_token_id
    self.eos_token_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    pad = self.tokenizer.pad_token_id
    self.pad_token_id = int(pad if pad is not None else vocab.get(PAD_FALLBACK_TOKEN, self.eos_token_ids[0]))
    self.merge_size = int(self.image_config['merge_size'])
    self.patch_size = int(self.image_config['patch_size'])

  def images(self, images) -> dict:
    """{'pixel_values' (N_total, C*T*P*P) float32, 'image_grid_thw' (n, 3) int64, 'input_sizes' [(width,
    height) resized], 'image_sizes' [(width, height) as given]}; images: paths, PIL images or uint8 arrays."""
    patches, grids, sizes, originals = [], [], [], []
    for image in images:
      image = load_image(image)
      originals.append(image.size)
      x, grid, size = preprocess_qwen_image(image, self.image_config)
      patches.append(x)
      grids.append(grid)
      sizes.append(size)
    return dict(
      pixel_values=np.concatenate(patches),
      image_grid_thw=np.asarray(grids, np.int64).reshape(-1, 3),
      input_sizes=sizes,
      image_sizes=originals,
    )

  def render(self, messages: list[dict]) -> str:
    """The chat template applied to `messages` (transformers' message format), with the generation prompt."""
    return self.tokenizer.apply_chat_template(
      messages, chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
    )

  def prompt(self, question: str) -> str:
    """One user turn: the image, then the question."""
    return self.render([{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': question}]}])

  def encode(self, images, prompts: list[str], *, pad_to_multiple_of: int = 1) -> dict:
    """Rendered prompts (one `<|image_pad|>` each, as the chat template writes it) with their images, one per
    row: input_ids and attention_mask int32 (B, L) left-padded to a multiple of `pad_to_multiple_of`, and
    what `images` returns."""
    if len(images) != len(prompts):
      raise ValueError(f'{len(images)} images for {len(prompts)} prompts: give one image per prompt')
    out = self.images(images)
    rows = []
    for prompt, (t, h, w) in zip(prompts, out['image_grid_thw'].tolist()):
      if prompt.count(IMAGE_TOKEN) != 1:
        raise ValueError(f'a prompt must hold exactly one {IMAGE_TOKEN}, this one has {prompt.count(IMAGE_TOKEN)}')
      expanded = prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * (t * h * w // self.merge_size**2))
      rows.append(self.tokenizer(expanded)['input_ids'])
    n = max(map(len, rows))
    n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(rows), n), self.pad_token_id, np.int32)
    attention = np.zeros((len(rows), n), np.int32)
    for i, row in enumerate(rows):
      ids[i, n - len(row) :] = row
      attention[i, n - len(row) :] = 1
    return dict(input_ids=ids, attention_mask=attention, **out)

  def __call__(self, images, texts: list[str], *, pad_to_multiple_of: int = 1) -> dict:
    """One image and one question per row (caption, ask): see `encode`."""
    if isinstance(texts, str):
      raise TypeError('texts must be a list of strings, one per image')
    return self.encode(images, [self.prompt(t) for t in texts], pad_to_multiple_of=pad_to_multiple_of)

  def decode(self, ids) -> list[str]:
    """As processor.batch_decode(ids, skip_special_tokens=True)."""
    return self.tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)
