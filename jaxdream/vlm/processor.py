"""Kosmos-2 inputs as transformers' Kosmos2Processor makes them: prompt ids, image placeholder mask,
CLIP image preprocessing (PIL resize, crop, normalise)."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxdream.io.weights import WeightsError

DEFAULT_PROMPT = '<grounding>An image of'


TAG_TOKENS = (
  '</doc>',
  '<image>',
  '</image>',
  '</chunk>',
  '</line>',
  '<phrase>',
  '</phrase>',
  '<object>',
  '</object>',
  '</delimiter_of_multi_objects/>',
  '<grounding>',
)


NUM_PATCH_INDEX_TOKENS = 1024  # a 32x32 grid of box corners


_PROMPT_BUCKET = 8  # prompts are left-padded to a multiple of this, so similar lengths share a compile


class Kosmos2Processor:
  """Prompt ids and pixel values as transformers' Kosmos2Processor makes them (numpy, PIL, no torch)."""

  def __init__(self, folder: str, num_image_tokens: int = 64):
    from transformers import AddedToken, AutoTokenizer

    if not any(os.path.exists(os.path.join(folder, n)) for n in ('tokenizer.json', 'sentencepiece.bpe.model')):
      raise WeightsError(f'{folder}: no tokenizer (tokenizer.json, or sentencepiece.bpe.model)')
    self.tokenizer = AutoTokenizer.from_pretrained(folder)
    # A folder saved by the processor already has these; a bare XLM-R tokenizer gets them as the processor
    # adds them (add_tokens skips those present).
    patch_tokens = [f'<patch_index_{i:04d}>' for i in range(NUM_PATCH_INDEX_TOKENS)]
    self.tokenizer.add_tokens(
      [AddedToken(t, lstrip=True, rstrip=False, normalized=False) for t in TAG_TOKENS + tuple(patch_tokens)]
    )
    self.image_config = read_image_processor_config(folder)
    self.num_image_tokens = num_image_tokens
    self.first_image_token_id = self.tokenizer.unk_token_id + 1

  def encode_prompt(self, text: str) -> list[int]:
    """`<s><image> (num_image_tokens fake image tokens) </image> text`, the fake tokens replaced by ids
    first_image_token_id... (their embeddings are overwritten by the image features anyway)."""
    placeholder = ' '.join(['<image>'] * (self.num_image_tokens + 1) + ['</image>'])
    ids = self.tokenizer(f'{self.tokenizer.bos_token}{placeholder} {text.strip()}', add_special_tokens=False)[
      'input_ids'
    ]
    n = self.num_image_tokens
    return ids[:2] + list(range(self.first_image_token_id, self.first_image_token_id + n)) + ids[2 + n :]

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
      image_mask[i, start + 2 : start + 2 + self.num_image_tokens] = 1  # after <s><image>
    return ids, attention, image_mask

  def images(self, images) -> np.ndarray:
    """(B, H, W, 3) float32 pixel values (NHWC) from paths, PIL images or uint8 arrays."""
    return np.stack([preprocess_image(load_image(im), self.image_config) for im in images])

  def decode(self, ids) -> list[str]:
    """As processor.batch_decode(ids, skip_special_tokens=True)."""
    return self.tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)


def read_image_processor_config(folder: str, default: dict | None = None) -> dict:
  """The CLIP image processor settings of a model folder: preprocessor_config.json, or the
  `image_processor` entry of processor_config.json (what transformers 5 writes); `default` when the folder
  has neither (an error if it is None)."""
  for name, key in (('preprocessor_config.json', None), ('processor_config.json', 'image_processor')):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      try:
        with open(path, encoding='utf-8') as f:
          cfg = json.load(f)
      except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f'{path}: not a readable JSON file ({e})') from None
      if not isinstance(cfg, dict) or (key and not isinstance(cfg.get(key, cfg), dict)):
        raise WeightsError(f'{path}: not an image processor config (a JSON object)')
      cfg = cfg.get(key, cfg) if key else cfg
      kind = cfg.get('image_processor_type', 'CLIPImageProcessor')
      if not kind.startswith('CLIPImageProcessor'):
        raise WeightsError(f'{path}: image processor {kind!r} is not supported (only CLIPImageProcessor)')
      # Older files (openai/clip-vit-base-patch32) give plain ints: CLIP's size is the shortest edge, the crop square.
      if isinstance(cfg.get('size'), int):
        cfg['size'] = {'shortest_edge': cfg['size']}
      if isinstance(cfg.get('crop_size'), int):
        cfg['crop_size'] = {'height': cfg['crop_size'], 'width': cfg['crop_size']}
      return cfg
  if default is not None:
    return default
  raise WeightsError(f'{folder}: no preprocessor_config.json or processor_config.json (image preprocessing)')


def load_image(image, *, upright: bool = True):
  """A PIL image from a path (as transformers' load_image reads one: turned upright by its EXIF orientation,
  then RGB, any alpha dropped; `upright=False`: as stored, as torchvision's ImageFolder loader reads one), a PIL
  image, or a uint8 array."""
  from PIL import Image, ImageOps

  if isinstance(image, (str, os.PathLike)):
    with Image.open(image) as im:
      return (ImageOps.exif_transpose(im) if upright else im).convert('RGB')
  if isinstance(image, Image.Image):
    return image
  a = np.asarray(image)
  if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
    raise ValueError(
      f'images must be paths, PIL images or uint8 (H, W[, C]) arrays, channels last (C 1, 3 or 4); got {a.dtype} '
      f'{a.shape}'
    )
  return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)  # (H, W, 1): grayscale


def to_rgb(image):
  """A PIL image as RGB, as transformers' convert_to_rgb: transparency goes white."""
  from PIL import Image

  if 'A' in image.getbands() or image.info.get('transparency') is not None:
    image = Image.alpha_composite(Image.new('RGBA', image.size, (255,) * 4), image.convert('RGBA'))
  return image.convert('RGB')


def preprocess_image(image, cfg: dict) -> np.ndarray:
  """CLIPImageProcessor (the PIL backend): RGB, resize with PIL on uint8, center crop, rescale, normalise."""
  from PIL import Image

  if cfg.get('do_convert_rgb', True):
    image = to_rgb(image)
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if cfg.get('do_resize', True):
    size = dict(cfg.get('size') or {'shortest_edge': 224})
    if cfg.get('use_square_size') and 'shortest_edge' in size:  # Kosmos-2's legacy flag: a square resize
      size = {'height': size['shortest_edge'], 'width': size['shortest_edge']}
    h, w = x.shape[:2]
    if size.get('shortest_edge') and size.get('longest_edge'):
      h, w = _size_with_aspect_ratio(h, w, size['shortest_edge'], size['longest_edge'])
    elif size.get('shortest_edge'):
      s = size['shortest_edge']
      short, long = min(h, w), max(h, w)
      new_long = int(s * long / short)
      h, w = (new_long, s) if w <= h else (s, new_long)
    elif size.get('height') and size.get('width'):
      h, w = size['height'], size['width']
    else:
      raise ValueError(f'preprocessor size {size}: expected shortest_edge (and longest_edge), or height and width')
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


def _size_with_aspect_ratio(h: int, w: int, size: int, max_size: int) -> tuple[int, int]:
  """transformers' get_size_with_aspect_ratio: the shorter side to `size`, unless the longer would pass
  `max_size` (then the longer side to `max_size`)."""
  raw = None
  if max(h, w) / min(h, w) * size > max_size:
    raw = max_size * min(h, w) / max(h, w)
    size = int(round(raw))
  if (h <= w and h == size) or (w <= h and w == size):
    return h, w
  if w < h:
    return int((size if raw is None else raw) * h / w), size
  return size, int((size if raw is None else raw) * w / h)


def center_crop(x: np.ndarray, size: dict) -> np.ndarray:
  ch, cw = int(size['height']), int(size['width'])
  h, w = x.shape[:2]
  if ch > h or cw > w:  # too small: centre it on a zero canvas first, as transformers does
    ph, pw = max(ch, h), max(cw, w)
    canvas = np.zeros((ph, pw) + x.shape[2:], x.dtype)
    top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
    canvas[top : top + h, left : left + w] = x
    x, h, w = canvas, ph, pw
  top, left = (h - ch) // 2, (w - cw) // 2
  return x[top : top + ch, left : left + cw]
