"""DreamBooth data: checking images, preparing them once into an array_record dataset, reading with grain.

Images are checked (and odd ones reported by file name) before training starts. Each subject's images
and the class-prior images are resized once (shorter side = resolution) and stored PNG-encoded in a
tensorflow-datasets array_record dataset (two splits: 'instance' and 'class'; no TensorFlow needed).
Training reads them with grain: shuffled over all subjects, decoded, cropped, flipped and tokenized per
example from a seed, so the iterator state (saved in every checkpoint) replays exactly after a resume.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import warnings

import jax
import numpy as np
from PIL import Image, ImageOps

from jaxdream.io.images import list_images

MAX_PIXELS = 64 * 1024 * 1024  # larger images are refused as possible decompression bombs
MAX_ASPECT = 16  # longer side over shorter side: a photo's shorter side is scaled to the resolution
FORMAT = 2  # the records' features; 2: each image's original size (SDXL's micro-conditioning)


class DataError(ValueError):
  """Bad training data; the message names every bad file and what is wrong with it."""


def to_rgb(im: Image.Image) -> Image.Image:
  """An RGB image from any PIL mode: EXIF orientation applied, alpha over white, 16-bit scaled."""
  im = ImageOps.exif_transpose(im)
  if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    # by the mode's range, not the image's own maximum (a dark 16-bit photo is dark); 32-bit data past 16 bits
    # has no known range: its maximum is white
    a = np.asarray(im, np.float64)
    top = 65535.0 if im.mode != 'I' or a.max() <= 65535 else a.max()
    im = Image.fromarray(np.clip(np.round(a / top * 255), 0, 255).astype(np.uint8))
  elif im.mode == 'F':  # float data: [0, 1] as most writers mean it, else 0..255
    a = np.nan_to_num(np.asarray(im, np.float64))
    im = Image.fromarray(np.clip(np.round(a * 255 if a.max() <= 1.0 else a), 0, 255).astype(np.uint8))
  if im.mode == 'P':
    im = im.convert('RGBA')
  if im.mode in ('RGBA', 'LA', 'PA'):
    rgba = im.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    im = Image.alpha_composite(background, rgba)
  return im.convert('RGB')


def check_image(path: str, min_size: int) -> str | None:
  """Why `path` cannot be used as a training image, or None if it can."""
  try:
    with Image.open(path) as im:
      w, h = im.size
      if w * h > MAX_PIXELS:
        return f'{w}x{h} pixels is over the {MAX_PIXELS} limit (possible decompression bomb)'
      if max(w, h) > MAX_ASPECT * min(w, h):  # its shorter side scaled to the resolution would be huge
        return f'{w}x{h} is more elongated than {MAX_ASPECT}:1'
      im.verify()
    with Image.open(path) as im:
      im.load()
      rgb = to_rgb(im)
  except Image.DecompressionBombError as e:
    return f'decompression bomb ({e})'
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
    return f'not a readable image ({type(e).__name__}: {e})'
  if min(rgb.size) < min_size:
    return f'{rgb.size[0]}x{rgb.size[1]} is smaller than data.min_image_size={min_size}'
  return None


def image_folders(root: str) -> list[str]:
  """`root` and every folder under it, in a fixed order (hidden folders skipped): a recursive image search."""
  out = []
  for path, folders, _ in os.walk(root):
    folders[:] = sorted(f for f in folders if not f.startswith('.'))
    out.append(path)
  return out


def scan_images(folder: str, *, min_size: int, on_bad: str, recursive: bool = False) -> list[str]:
  """The usable images of a folder (and with `recursive`, of the folders under it). Bad ones raise
  DataError (on_bad='fail') or are skipped with a warning (on_bad='skip'); either way every bad file is named."""
  paths, bad = [], []
  with warnings.catch_warnings():
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    for path in list_images(image_folders(folder) if recursive else folder):
      reason = check_image(path, min_size)
      (bad.append(f'{path}: {reason}') if reason else paths.append(path))
  if bad:
    message = f'{len(bad)} bad image(s) in {folder}:\n  ' + '\n  '.join(bad)
    if on_bad == 'fail':
      raise DataError(message + "\n(set data.on_bad_image='skip' to train without them)")
    warnings.warn(message + '\n(skipped)')
  return paths


def instance_prompt(path: str, concept: dict, caption_ext: str, caption_mode: str) -> str:
  """The prompt of one instance image: the concept's prompt, with the caption sidecar if there is one."""
  sidecar = os.path.splitext(path)[0] + caption_ext
  if not os.path.exists(sidecar):
    return concept['instance_prompt']
  try:
    with open(sidecar, encoding='utf-8') as f:
      caption = ' '.join(f.read().split())
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f'{sidecar}: not a readable UTF-8 caption file ({e})') from None
  if not caption:
    return concept['instance_prompt']
  return caption if caption_mode == 'replace' else f'{concept["instance_prompt"]}, {caption}'


def resized_png(path: str, resolution: int) -> bytes:
  """The image with its shorter side scaled to `resolution`, PNG-encoded."""
  return resized_png_and_size(path, resolution)[0]


def resized_png_and_size(path: str, resolution: int) -> tuple[bytes, tuple[int, int]]:
  """(resized_png's; the image's (height, width) before resizing, SDXL's original size)."""
  with Image.open(path) as im:
    im = to_rgb(im)
  original = (im.size[1], im.size[0])
  scale = resolution / min(im.size)
  size = (max(resolution, round(im.size[0] * scale)), max(resolution, round(im.size[1] * scale)))
  im = im.resize(size, Image.BICUBIC)
  buf = io.BytesIO()
  im.save(buf, format='PNG')
  return buf.getvalue(), original


@functools.cache  # tfds registers builder classes by name: define it once
def _builder_class():
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()

  class DreamBoothSubjects(tfds.core.GeneratorBasedBuilder):
    """Instance and class images of a DreamBooth run, prepared by jaxdream."""

    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, examples=None, resolution=None, **kwargs):
      self._examples, self._resolution = examples, resolution
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'png': tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            'prompt': tfds.features.Text(),
            'concept': np.int32,
            'index': np.int32,
            'file': tfds.features.Text(),
            'original_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),  # (height, width) before resizing
          }
        ),
      )

    # tfds announces a download ("Downloading and preparing dataset Unknown size ...") and its end: nothing
    # is downloaded here, and the loop says what it prepares.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

    def _split_generators(self, dl_manager):
      # tfds refuses empty splits (a run without prior preservation has no class images)
      return {split: self._generate_examples(split) for split in ('instance', 'class') if self._examples[split]}

    def _generate_examples(self, split):
      for i, ex in enumerate(self._examples[split]):
        png, original = resized_png_and_size(ex['file'], self._resolution)
        # The path as text the record can hold: a file name that is not UTF-8 keeps its bytes as \x escapes.
        name = os.fsencode(ex['file']).decode('utf-8', 'backslashreplace')
        yield (
          i,
          dict(ex, file=name, index=i, png=np.frombuffer(png, np.uint8), original_size=np.asarray(original, np.int32)),
        )

  return DreamBoothSubjects


def prepare_dataset(data_dir: str, examples: dict[str, list[dict]], resolution: int) -> str:
  """Write (or reuse, if its inputs are unchanged) the run's array_record dataset; returns its folder.

  examples: split -> [{'file', 'prompt', 'concept'}]; files are read and resized here, once.
  """
  for split in ('instance', 'class'):
    examples.setdefault(split, [])
  # A fingerprint of everything the dataset is made from: a changed file or prompt rebuilds it (and so does a
  # change of the records' features: a dataset of another FORMAT is not read).
  h = hashlib.sha256(json.dumps([FORMAT, resolution, examples], sort_keys=True).encode())
  for split in ('instance', 'class'):
    for ex in examples[split]:
      st = os.stat(ex['file'])
      h.update(f'{st.st_size}:{st.st_mtime_ns}'.encode())
  folder = os.path.join(data_dir, h.hexdigest()[:16])
  if os.path.exists(os.path.join(folder, 'dream_booth_subjects', '1.0.0', 'dataset_info.json')):
    return folder
  cls = _builder_class()
  builder = cls(examples=examples, resolution=resolution, data_dir=folder, file_format='array_record')
  import absl.logging

  verbosity = absl.logging.get_verbosity()
  absl.logging.set_verbosity(absl.logging.WARNING)  # tfds narrates every split at INFO
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      builder.download_and_prepare()
  finally:
    absl.logging.set_verbosity(verbosity)
  return folder


def data_source(folder: str, split: str):
  """Random-access source of a prepared split (tfds without TensorFlow)."""
  cls = _builder_class()
  return cls(data_dir=folder, file_format='array_record').as_data_source(split=split)


def _crop_flip(png, resolution: int, center_crop: bool, flip_p: float, rng: np.random.Generator):
  return _crop_flip_at(png, resolution, center_crop, flip_p, rng)[0]


def _crop_flip_at(png, resolution: int, center_crop: bool, flip_p: float, rng: np.random.Generator):
  """(the cropped, maybe flipped image; the crop's top-left corner (top, left) in the resized image)."""
  im = np.asarray(Image.open(io.BytesIO(np.asarray(png).tobytes())).convert('RGB'))
  h, w = im.shape[:2]
  if center_crop:
    top, left = (h - resolution) // 2, (w - resolution) // 2
  else:
    top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
  im = im[top : top + resolution, left : left + resolution]
  if flip_p > 0 and rng.random() < flip_p:
    im = im[:, ::-1]
  return im, (top, left)


def make_iterator(
  source,
  *,
  batch_size: int,
  seed: int,
  resolution: int,
  center_crop: bool,
  flip_p: float,
  tokenize,
  rows: slice = slice(None),
  prefetch: int = 2,
  caption_dropout: float = 0.0,
  micro_conditioning=None,
):
  """An endless, shuffled, checkpointable iterator of batches: pixels float32 NHWC in [-1, 1],
  input_ids (int32 token ids, as `tokenize` gives them: per text encoder), concept int32, index int32.

  Every host walks the same global sequence of batches (a shuffled index stream, reshuffled each
  epoch) and reads and decodes only `rows` of each: the rows its devices hold. Sharding batches rather
  than the dataset keeps a 5-image subject usable on a 64-host pod, and makes the run independent of
  the number of hosts: each example's crop and flip depend only on (seed, batch, row). A model's
  `micro_conditioning` (Pipeline.micro_conditioning: SDXL's time ids) adds its UNet inputs per example under
  'micro_conditioning', from the image's original size and its crop's top-left corner. With `caption_dropout`
  an example's prompt is replaced by the empty one with that probability (drawn after its crop and flip, so
  that runs without it see the batches they always saw).

  `prefetch` batches are decoded ahead, one thread each. (grain's default, 16 threads filling a buffer
  of 500 batches, decoded hundreds of images per step that a short run never used, held them all in
  memory, and took the CPU from the step: one iterator per split and per subject.)
  """
  import grain

  wanted = range(batch_size)[rows]
  micro = micro_conditioning(resolution, resolution) if micro_conditioning else {}  # {} for SD 1.x/2.x
  empty = {
    'pixels': np.zeros((0, resolution, resolution, 3), np.float32),
    'input_ids': jax.tree.map(lambda a: np.asarray(a)[:0], tokenize([''])),
    'concept': np.zeros((0,), np.int32),
    'index': np.zeros((0,), np.int32),
  }
  if micro:
    empty['micro_conditioning'] = jax.tree.map(lambda a: np.asarray(a)[None][:0], micro)

  def load(step, indices):
    out = []
    for row in wanted:
      ex = source[int(indices[row])]
      rng = np.random.default_rng([seed, step, row])
      im, crop = _crop_flip_at(ex['png'], resolution, center_crop, flip_p, rng)
      prompt = ex['prompt'].decode() if isinstance(ex['prompt'], bytes) else str(ex['prompt'])
      if caption_dropout > 0 and rng.random() < caption_dropout:
        prompt = ''
      example = {
        'pixels': im.astype(np.float32) / 127.5 - 1.0,
        'input_ids': jax.tree.map(lambda a: np.asarray(a[0]), tokenize([prompt])),
        'concept': np.int32(ex['concept']),
        'index': np.int32(ex['index']),
      }
      if micro:  # as diffusers' SDXL scripts: the size before resizing, the crop in the resized image
        original = tuple(int(v) for v in ex['original_size'])
        example['micro_conditioning'] = micro_conditioning(
          resolution, resolution, original_size=original, crops_coords_top_left=crop
        )
      out.append(example)
    return jax.tree.map(lambda *xs: np.stack(xs), *out) if out else dict(empty)

  ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
  ds = ds.batch(batch_size, drop_remainder=True).map_with_index(load)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)))
