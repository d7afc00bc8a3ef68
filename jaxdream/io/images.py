"""Writing generated images: PNGs that carry their generation parameters, plain and labelled grids.

The parameters text is the "infotext" AUTOMATIC1111's web UI and SD.Next write into a PNG `parameters`
text chunk and read back (PNG Info, drag-and-drop onto the prompt box)::

  a photo of sks dog
  Negative prompt: blurry
  Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x512, Model: my-model

The prompt may span lines; the negative prompt line is left out when there is none; a value holding
',', ':' or a newline is written as a JSON string, as A1111 quotes it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re

import numpy as np

from jaxdream.io.files import atomic_open

# Our scheduler names -> A1111's sampler names (A1111 >= 1.9 also reads "DPM++ 2M Karras" as sampler
# "DPM++ 2M" with schedule type "Karras").
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')


def list_images(paths) -> list[str]:
  """Image files of a folder, or of a list of files and folders: a folder's images sorted by name, hidden
  files skipped; a file is taken as it is."""
  out = []
  for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
    path = os.fspath(path)
    if os.path.isdir(path):
      out += sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTS) and not f.startswith('.')
      )
    elif os.path.exists(path):
      out.append(path)
    else:
      raise FileNotFoundError(f'{path}: no such image or folder')
  return out


SAMPLER_NAMES = {
  'ddpm': 'DDPM',
  'ddim': 'DDIM',
  'pndm': 'PLMS',
  'lms': 'LMS',
  'euler': 'Euler',
  'euler_a': 'Euler a',
  'heun': 'Heun',
  'euler_karras': 'Euler Karras',
  'lms_karras': 'LMS Karras',
  'heun_karras': 'Heun Karras',
  'unipc': 'UniPC',
  'unipc_karras': 'UniPC Karras',
  'dpmpp_2m': 'DPM++ 2M',
  'dpmpp_2m_karras': 'DPM++ 2M Karras',
  'dpmpp_2m_sde': 'DPM++ 2M SDE',
  'dpmpp_2m_sde_karras': 'DPM++ 2M SDE Karras',
}
NEGATIVE = 'Negative prompt:'
# One "Key: value" field of the last line, as A1111's infotext parser matches them.
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def format_number(x) -> str:
  """7.0 -> '7', 7.5 -> '7.5': whole floats without the '.0', as A1111 shows slider values."""
  return str(int(x)) if float(x).is_integer() else repr(float(x))


def _quote(value) -> str:
  text = str(value)
  return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n') else text


def format_parameters(
  prompt: str,
  negative_prompt: str = '',
  *,
  steps: int,
  scheduler: str,
  guidance: float,
  seed: int,
  width: int,
  height: int,
  model: str,
  strength: float | None = None,
  refiner: str | None = None,
  refiner_start: float | None = None,
  clip_skip: int = 0,
  extra: dict | None = None,
) -> str:
  """The A1111 infotext of one image (`extra`: more fields, after these, such as hires fix's); `scheduler` is our name (SAMPLER_NAMES), `strength` the
  img2img/inpaint denoising strength (None for txt2img), `refiner` the SDXL refiner's name and `refiner_start` the
  fraction of the schedule at which it took over (A1111's 'Refiner switch at'); a `clip_skip` (diffusers') is A1111's
  'Clip skip' (CLIP_stop_at_last_layers: one more)."""
  fields = {
    'Steps': steps,
    'Sampler': SAMPLER_NAMES[scheduler],
    'CFG scale': format_number(guidance),
    'Seed': seed,
    'Size': f'{width}x{height}',
    'Model': model,
    'Denoising strength': None if strength is None else format_number(strength),
    'Refiner': refiner,
    'Refiner switch at': None if refiner_start is None else format_number(refiner_start),
    'Clip skip': clip_skip + 1 if clip_skip else None,
    **(extra or {}),
  }
  line = ', '.join(f'{k}: {_quote(v)}' for k, v in fields.items() if v is not None)
  negative = f'\n{NEGATIVE} {negative_prompt}' if negative_prompt else ''
  return f'{prompt}{negative}\n{line}'.strip()


def parse_parameters(text: str) -> dict[str, str]:
  """An A1111 infotext as {'Prompt': ..., 'Negative prompt': ..., 'Steps': '20', ...} (values as text).

  As A1111 reads it: the last line holds the fields if at least three parse; every line before
  'Negative prompt:' belongs to the prompt, every line from it on to the negative prompt."""
  *lines, last = text.strip().split('\n')
  if len(_FIELD.findall(last)) < 3:
    lines, last = lines + [last], ''
  prompt, negative, in_negative = [], [], False
  for line in lines:
    line = line.strip()
    if line.startswith(NEGATIVE):
      in_negative, line = True, line[len(NEGATIVE) :].strip()
    (negative if in_negative else prompt).append(line)
  out = {'Prompt': '\n'.join(prompt), 'Negative prompt': '\n'.join(negative)}
  for key, value in _FIELD.findall(last):
    if len(value) > 1 and value[0] == value[-1] == '"':
      try:
        value = json.loads(value)
      except json.JSONDecodeError:
        pass  # a value that merely looks quoted stays as written
    out[key] = value
  return out


def png_bytes(image, parameters: str | None = None) -> bytes:
  """A uint8 (H, W, 3) image as PNG file bytes with `parameters` in a text chunk of that name (tEXt, or
  iTXt when the text is not Latin-1)."""
  from PIL import Image
  from PIL.PngImagePlugin import PngInfo

  info = PngInfo()
  if parameters is not None:
    info.add_text('parameters', parameters)
  out = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(out, format='PNG', pnginfo=info)
  return out.getvalue()


def save_png(path: str, image, parameters: str | None = None):
  """Write `png_bytes(image, parameters)` to a temporary file first and move it into place, so a reader
  never sees half an image."""
  with atomic_open(path, 'wb') as f:
    f.write(png_bytes(image, parameters))


def read_parameters(path) -> str | None:
  """The `parameters` text of a PNG, a path or a binary file object (None if it has none)."""
  from PIL import Image

  with Image.open(path) as im:
    return im.info.get('parameters')


def grid_shape(n: int) -> tuple[int, int]:
  """(rows, cols) of a near-square grid for n images, wider than tall, as A1111 lays out batches."""
  rows = max(1, min(n, round(math.sqrt(n))))
  return rows, math.ceil(n / rows)


def make_grid(images, rows: int, cols: int) -> np.ndarray:
  """Equal-size uint8 images (N, H, W, C) tiled row by row into (rows*H, cols*W, C); empty cells black."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  if n > rows * cols:
    raise ValueError(f'{n} images do not fit a {rows}x{cols} grid')
  cells = np.zeros((rows * cols, h, w, c), images.dtype)
  cells[:n] = images
  return cells.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _font(size: int):
  from PIL import ImageFont

  try:
    return ImageFont.load_default(size=size)
  except (TypeError, ImportError, OSError):  # Pillow < 10.1, or built without FreeType: fixed bitmap font
    return ImageFont.load_default()


def _wrap(draw, text: str, font, width: float) -> str:
  """Words of `text` in lines no wider than `width` (a longer single word keeps its own line)."""
  lines, line = [], ''
  for word in text.split():
    trial = f'{line} {word}'.strip()
    if line and draw.textlength(trial, font=font) > width:
      lines.append(line)
      trial = word
    line = trial
  return '\n'.join(lines + [line])


def labelled_grid(cells, col_labels=None, row_labels=None, title: str | None = None) -> np.ndarray:
  """An XY plot: `cells` (rows x cols nested lists of equal-size uint8 images) on a white canvas with
  a label above each column, one left of each row, and an optional title line on top."""
  from PIL import Image, ImageDraw

  cells = np.asarray(cells)
  rows, cols, h, w = cells.shape[:4]
  size = max(12, min(h, w) // 16)
  font, pad = _font(size), size // 2
  draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))

  def wrapped(labels, width):  # label texts wrapped to `width`, and the (width, height) of each
    texts = [_wrap(draw, str(t), font, width) for t in labels or []]
    return texts, [draw.multiline_textbbox((0, 0), t, font=font, align='center')[2:] for t in texts]

  def margin(sizes, axis):
    return math.ceil(max(s[axis] for s in sizes)) + 2 * pad if sizes else 0

  # Small cells still get readable labels: at least a few words a line, left labels wider still.
  col_texts, col_sizes = wrapped(col_labels, max(w - 2 * pad, 6 * size))
  row_texts, row_sizes = wrapped(row_labels, max(w - 2 * pad, 10 * size))
  title_texts, title_sizes = wrapped([title] if title else None, max(cols * w, 10 * size))
  left, title_h, col_h = margin(row_sizes, 0), margin(title_sizes, 1), margin(col_sizes, 1)
  top = title_h + col_h
  # A label wider (or taller) than its cell widens its column (row): labels never run into each other.
  cw = max([w] + [math.ceil(b[0]) + 2 * pad for b in col_sizes])
  rh = max([h] + [math.ceil(b[1]) + 2 * pad for b in row_sizes])
  canvas = Image.new('RGB', (left + cols * cw, top + rows * rh), 'white')
  for i in range(rows):
    for j in range(cols):
      a = np.asarray(cells[i, j], np.uint8).reshape(h, w, -1)
      cell = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert('RGB')
      canvas.paste(cell, (left + j * cw + (cw - w) // 2, top + i * rh + (rh - h) // 2))
  draw = ImageDraw.Draw(canvas)

  def put(text, box, cx, cy):  # text of size `box` centred on (cx, cy)
    draw.multiline_text((cx - box[0] / 2, cy - box[1] / 2), text, fill='black', font=font, align='center')

  for t, b in zip(title_texts, title_sizes):
    put(t, b, left + pad + b[0] / 2, title_h / 2)
  for j, (t, b) in enumerate(zip(col_texts, col_sizes)):
    put(t, b, left + j * cw + cw / 2, title_h + col_h / 2)
  for i, (t, b) in enumerate(zip(row_texts, row_sizes)):
    put(t, b, left / 2, top + i * rh + rh / 2)
  return np.asarray(canvas)
