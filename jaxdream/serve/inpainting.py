"""A1111's inpainting inputs and output (modules/masking.py and processing.py there): the mask blurred and inverted,
`inpainting_fill` (0 fill: the masked area painted with the colours around it before encoding; 1 original;
2 latent noise, 3 latent nothing: its latents replaced, in the sampler), `inpaint_full_res` (only the mask's
region, padded and widened to the output's aspect ratio, is cropped, repainted at the request's size and pasted
back) and the paste-back: the original shows outside the mask, the blurred mask blending the two."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxdream.serve.limits import resized

FILLS = ('fill', 'original', 'latent noise', 'latent nothing')  # inpainting_fill 0..3
# What the sampler does with the masked area's latents (diffusion.sampling.inpaint's masked_content).
MASKED_CONTENT = {0: 'original', 1: 'original', 2: 'latent_noise', 3: 'latent_nothing'}


@dataclasses.dataclass(frozen=True)
class Overlay:
  """What an inpainted image is pasted into: the original (H, W, 3) and its mask (H, W) at the output size, and
  the box (x1, y1, x2, y2) the generated image covers."""

  original: np.ndarray
  mask: np.ndarray
  box: tuple[int, int, int, int]


def prepare_mask(im, *, blur: int, invert: bool):
  """The mask (PIL 'L') inverted with inpainting_mask_invert, then blurred by mask_blur."""
  from PIL import ImageFilter, ImageOps

  if invert:
    im = ImageOps.invert(im)
  return im.filter(ImageFilter.GaussianBlur(blur)) if blur > 0 else im


def crop_region(mask: np.ndarray, pad: int) -> tuple[int, int, int, int]:
  """A1111's get_crop_region: the box of the mask's non-zero pixels, `pad` wider on each side, within the image."""
  ys, xs = np.nonzero(mask)
  h, w = mask.shape
  return (
    max(int(xs.min()) - pad, 0),
    max(int(ys.min()) - pad, 0),
    min(int(xs.max()) + 1 + pad, w),
    min(int(ys.max()) + 1 + pad, h),
  )


def _widen(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
  diff = int(size - (hi - lo))
  lo, hi = lo - diff // 2, hi + diff - diff // 2
  if hi >= limit:
    lo, hi = lo - (hi - limit), limit
  if lo < 0:
    lo, hi = 0, hi - lo
  return lo, min(hi, limit)


def expand_crop_region(box, width: int, height: int, image_width: int, image_height: int):
  """A1111's expand_crop_region: the box widened (or heightened) about its centre to the output's aspect ratio,
  shifted back inside the image."""
  x1, y1, x2, y2 = box
  ratio = width / height
  if (x2 - x1) / (y2 - y1) > ratio:
    y1, y2 = _widen(y1, y2, (x2 - x1) / ratio, image_height)
  else:
    x1, x2 = _widen(x1, x2, (y2 - y1) * ratio, image_width)
  return x1, y1, x2, y2


def fill(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """A1111's masking.fill (inpainting_fill 0): the masked area painted with the colours around it, by layering
  ever less blurred copies of the unmasked image (premultiplied alpha, as there)."""
  from PIL import Image, ImageFilter, ImageOps

  im, m = Image.fromarray(image), Image.fromarray(mask)
  out = Image.new('RGBA', im.size)
  masked = Image.new('RGBa', im.size)
  masked.paste(im.convert('RGBA').convert('RGBa'), mask=ImageOps.invert(m.convert('L')))
  for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
    blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert('RGBA')
    for _ in range(repeats):
      out.alpha_composite(blurred)
  return np.asarray(out.convert('RGB'))


def inputs(image, mask, *, width: int, height: int, fill_mode: int, full_res: bool, padding: int):
  """(init uint8 (height, width, 3), mask uint8 (height, width), Overlay) of one init image and the prepared
  mask (PIL), both first resized to the output size (resize_mode 0). With full_res the mask's region is then
  cropped and repainted at the output size (A1111 keeps the init image's own size there; here every output has
  the request's width and height)."""
  from PIL import Image

  original, full = resized(image, width, height), resized(mask, width, height)
  box = (0, 0, width, height)
  if full_res and full.any():
    box = expand_crop_region(crop_region(full, padding), width, height, width, height)
  crop = lambda a: resized(Image.fromarray(a[box[1] : box[3], box[0] : box[2]]), width, height)
  init, m = crop(original), crop(full)
  if fill_mode != 1:  # A1111 fills for every mode but 'original' (2 and 3 replace the latents besides)
    init = fill(init, m)
  return init, m, Overlay(original, full, box)


def paste_back(generated: np.ndarray, overlay: Overlay) -> np.ndarray:
  """The generated image resized into its box of the original, shown through the (blurred) mask: outside the
  mask the original's own pixels."""
  from PIL import Image

  x1, y1, x2, y2 = overlay.box
  canvas = overlay.original.astype(np.float32)
  canvas[y1:y2, x1:x2] = resized(Image.fromarray(generated), x2 - x1, y2 - y1)
  alpha = overlay.mask.astype(np.float32)[..., None] / 255.0
  out = np.round(canvas * alpha + overlay.original.astype(np.float32) * (1.0 - alpha))
  return out.astype(np.uint8)
