"""The scoring models' image preprocessing, pixel for pixel as their reference pipelines do it (PIL resampling
on uint8 images), giving NHWC float32 pixel values.

CLIP: the model folder's `CLIPImageProcessor` (transformers' PIL backend): shortest edge -> `size` (bicubic),
center crop (offsets rounded down), rescale, CLIP mean/std.
DINO: the evaluation transform of DINO's code, torchvision `Resize(256, bicubic)` + `CenterCrop(224)` on a PIL
image, ImageNet mean/std; for a model whose image_size is not 224 the shorter side goes to
round(image_size * 256 / 224) and the crop is image_size. torchvision's semantics: an int Resize scales the
shorter side, the longer one to int(size * long / short); CenterCrop offsets are int(round((h - crop) / 2)).
"""

from __future__ import annotations

import numpy as np

from jaxdream.vlm.processor import load_image, preprocess_image, read_image_processor_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE, DINO_CROP = 256, 224  # DINO's eval transform at its native resolution
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


class ClipTransform:
  """`transform(images)` -> (N, H, W, 3) float32: CLIPImageProcessor with a folder's settings."""

  def __init__(self, folder: str, image_size: int):
    # Without a preprocessor file: the processor's defaults at the model's resolution.
    default = {'size': {'shortest_edge': image_size}, 'crop_size': {'height': image_size, 'width': image_size}}
    self.config = read_image_processor_config(folder, default=default)
    crop = self.config.get('crop_size') or {'height': 224, 'width': 224}
    if isinstance(crop, int):
      crop = {'height': crop, 'width': crop}
    if not isinstance(crop, dict) or not {'height', 'width'} <= set(crop):
      raise ValueError(f"{folder}: crop_size {crop!r}: expected {{'height': ..., 'width': ...}}")
    if self.config.get('do_center_crop', True) and (crop['height'], crop['width']) != (image_size, image_size):
      raise ValueError(
        f'{folder}: the image processor crops to {crop["height"]}x{crop["width"]} but the model takes '
        f'{image_size}x{image_size} images'
      )
    self.image_size = image_size
    # Every other setting is read when an image is processed: try one now (not square, as photos are), so a
    # setting the processor cannot follow fails at load, naming the folder, not after images are generated.
    from PIL import Image

    try:
      probe = self([Image.new('RGB', (45, 30), (128, 64, 32))])
    except Exception as e:  # noqa: BLE001 - any failure here is the folder's settings
      raise ValueError(f'{folder}: image processor settings {self.config}: {e}') from None
    if probe.shape[1:] != (image_size, image_size, 3):
      raise ValueError(
        f'{folder}: the image processor makes {probe.shape[2]}x{probe.shape[1]} pixels of a 45x30 image; the '
        f'model takes {image_size}x{image_size} (a center crop, do_center_crop, makes every image fit)'
      )

  def describe(self) -> dict:
    return {'kind': 'CLIPImageProcessor', **self.config}

  def __call__(self, images) -> np.ndarray:
    return np.stack([preprocess_image(load_image(im), self.config) for im in images])


def dino_pixels(image, image_size: int = DINO_CROP) -> np.ndarray:
  """One PIL image -> (image_size, image_size, 3) float32, as DINO's eval transform (see the module doc)."""
  from PIL import Image

  image = image.convert('RGB')  # torchvision's ImageFolder loader: alpha is dropped, not composited
  resize = round(image_size * DINO_RESIZE / DINO_CROP)
  w, h = image.size
  if w <= h:
    size = (resize, int(resize * h / w))
  else:
    size = (int(resize * w / h), resize)
  if size != (w, h):
    image = image.resize(size, resample=Image.Resampling.BICUBIC)
  w, h = size  # the shorter side is at least image_size: no padding case
  top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
  x = np.asarray(image.crop((left, top, left + image_size, top + image_size)), np.float32) / np.float32(255)
  return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)


class DinoTransform:
  """`transform(images)` -> (N, image_size, image_size, 3) float32: DINO's evaluation transform."""

  def __init__(self, image_size: int = DINO_CROP):
    self.image_size = image_size

  def describe(self) -> dict:
    return {
      'kind': 'DINO eval transform',
      'resize_shorter_side': round(self.image_size * DINO_RESIZE / DINO_CROP),
      'resample': 'bicubic',
      'center_crop': self.image_size,
      'mean': IMAGENET_MEAN,
      'std': IMAGENET_STD,
    }

  def __call__(self, images) -> np.ndarray:
    # Files as torchvision's ImageFolder loader reads them: no EXIF rotation (CLIP's processor applies it).
    return np.stack([dino_pixels(load_image(im, upright=False), self.image_size) for im in images])
