"""Grounded captions: parsing Kosmos-2's `<phrase>`/`<object>` tags and Qwen-VL's JSON boxes into one entity
format, drawing them, finding a subject."""

from __future__ import annotations

import json
import math
import re

import numpy as np

from jaxdream.vlm.processor import load_image

_TAGS = re.compile('<.*?>')


# One grounded entity: an optional <phrase>...</phrase>, then <object> with one or more box corner pairs.
_ENTITY = re.compile(
  r'(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_\d+><patch_index_\d+>'
  r'</delimiter_of_multi_objects/>)*<patch_index_\d+><patch_index_\d+>)</object>'
)


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


# A fenced block (```json ... ```), the closing fence optional: a truncated answer ends inside it.
_FENCE = re.compile(r'```(?:json)?(.*?)(?:```|$)', re.DOTALL)
_FLAT_OBJECT = re.compile(r'\{[^{}]*\}')


def _json_objects(text: str) -> list:
  """The JSON objects of a Qwen-VL answer: each fenced block's (or, without fences, the whole text's) list or
  single object; a block that does not parse (truncated, or prose around it) gives its complete flat
  `{...}` objects one by one, so the boxes before the damage survive."""
  blocks = [m.group(1) for m in _FENCE.finditer(text)] if '```' in text else [text]
  found = []
  for block in blocks:
    try:
      value = json.loads(block)
      found += value if isinstance(value, list) else [value]
    except (ValueError, RecursionError):  # RecursionError: nesting too deep for the parser, as any model may write
      for m in _FLAT_OBJECT.finditer(block):
        try:
          found.append(json.loads(m.group(0)))
        except (ValueError, RecursionError):
          continue
  return [obj for obj in found if isinstance(obj, dict)]


def _qwen_box(obj: dict, scale: tuple[float, float]):
  """One object's box normalised to [0, 1] (a point_2d as a zero-area box), or None when it is not a box:
  not 4 (or 2) finite numbers, inverted (x2 < x1 or y2 < y1), or wholly outside the image."""
  value = obj.get('bbox_2d', obj.get('point_2d'))
  n = 4 if 'bbox_2d' in obj else 2
  if not isinstance(value, list) or len(value) != n:
    return None
  numbers = [_number(v) for v in value]
  if None in numbers:
    return None
  x1, y1, x2, y2 = numbers if n == 4 else numbers * 2
  x1, x2, y1, y2 = x1 / scale[0], x2 / scale[0], y1 / scale[1], y2 / scale[1]
  if x2 < x1 or y2 < y1 or x1 > 1 or y1 > 1 or x2 < 0 or y2 < 0:
    return None
  clip = lambda v: min(max(v, 0.0), 1.0)
  return clip(x1), clip(y1), clip(x2), clip(y2)


def _number(v) -> float | None:
  """A JSON number as a finite float; None for anything else (strings, booleans, NaN, infinities)."""
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  try:
    v = float(v)
  except OverflowError:  # an integer literal too large for a float
    return None
  return v if math.isfinite(v) else None


def parse_qwen_grounding(text: str, model_type: str, input_size=None) -> list:
  """Entities, in `parse_grounding`'s format, from a Qwen-VL grounding answer such as
  ```json [{"bbox_2d": [x1, y1, x2, y2], "label": "dog"}] ```.

  model_type 'qwen2_5_vl': coordinates are pixels of the resized model input, `input_size` (width, height);
  'qwen3_vl': relative coordinates in 0..1000 (input_size unused). Boxes come out normalised to [0, 1],
  clipped to the image; a `point_2d` [x, y] is the zero-area box (x, y, x, y). A single object is taken
  as a list of one; boxes with the same label form one entity, in order of first appearance. An object's
  missing label is ''. The span (start, end) is the label's first occurrence in `text`, (0, 0) when it
  does not occur there verbatim. Malformed output never raises: unparseable JSON gives only its complete
  objects, and an object whose label is not a string or whose box is not finite numbers, is inverted or lies
  wholly outside the image is dropped.
  """
  if model_type == 'qwen2_5_vl':
    w, h = input_size or (0, 0)
    if not (w > 0 and h > 0):
      raise ValueError(
        f'Qwen2.5-VL boxes are in pixels of the model input: input_size (width, height), not {input_size!r}'
      )
    scale = (float(w), float(h))
  elif model_type == 'qwen3_vl':
    scale = (1000.0, 1000.0)
  else:
    raise ValueError(f"model_type must be 'qwen2_5_vl' or 'qwen3_vl', not {model_type!r}")
  grouped = {}
  for obj in _json_objects(text):
    label, box = obj.get('label', ''), _qwen_box(obj, scale)
    if isinstance(label, str) and box is not None:
      grouped.setdefault(label.strip(), []).append(box)
  entities = []
  for label, boxes in grouped.items():
    start = text.find(label) if label else -1
    entities.append((label, (start, start + len(label)) if start >= 0 else (0, 0), boxes))
  return entities


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


def subject_boxes(entities, phrase: str) -> list:
  """The boxes of the entities whose phrase names `phrase` as whole words (case-insensitive, plural
  allowed): 'dog' matches 'a dog' and 'two dogs', not 'a hotdog'."""
  pattern = re.compile(rf'\b{re.escape(phrase.strip().lower())}(s|es)?\b')
  return [box for name, _, boxes in entities if pattern.search(name.lower()) for box in boxes]
