"""Grounded captions: parsing `<phrase>`/`<object>` tags into boxes, drawing them, finding a subject."""

from __future__ import annotations

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
