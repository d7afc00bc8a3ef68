"""Hires fix's upscalers (A1111's `enable_hr`, `sampling.hires_fix`): latents resized as torch's `interpolate`
resizes them (A1111's "Latent" modes), or images resized with PIL (its "None", "Lanczos" and "Nearest").

The latent modes are exact to torch's CPU kernels: each is a separable (out, in) weight matrix per axis built with
torch's own index arithmetic (float32 source coordinates, its border clamping, bicubic's A = -0.75 and its
antialiased filters' A = -0.5 and renormalised taps), applied to the height axis and then the width axis."""

from __future__ import annotations

import numpy as np

# A1111's shared.latent_upscale_modes: name -> (torch interpolate mode, antialias)
LATENT_MODES = {
  'Latent': ('bilinear', False),
  'Latent (antialiased)': ('bilinear', True),
  'Latent (bicubic)': ('bicubic', False),
  'Latent (bicubic antialiased)': ('bicubic', True),
  'Latent (nearest)': ('nearest', False),
  'Latent (nearest-exact)': ('nearest-exact', False),
}
# A1111's upscalers that need no model: its "None" resizes with Lanczos, "Lanczos" and "Nearest" upscale with that
# filter to the scale's size (floored to a multiple of 8) and resize the rest with Lanczos.
IMAGE_UPSCALERS = ('None', 'Lanczos', 'Nearest')
UPSCALERS = (*LATENT_MODES, *IMAGE_UPSCALERS)
DEFAULT_UPSCALER = 'Latent'  # A1111's latent_upscale_default_mode_name


def check_upscaler(name) -> str:
  if name not in UPSCALERS:
    raise ValueError(
      f'hires upscaler {name!r}: not one of {", ".join(UPSCALERS)} (model upscalers such as ESRGAN are not supported)'
    )
  return name


def hires_size(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0, factor: int = 8):
  """(upscale width, upscale height, truncate x, truncate y) of a hires pass, in A1111's arithmetic
  (StableDiffusionProcessingTxt2Img.calculate_target_resolution): `scale` times the first pass's size, or the size
  `resize_x` x `resize_y` (0: from the other and the aspect ratio; both given: the size that covers it, whose
  latents are then cropped by `truncate` latent pixels per axis). The images come out (upscale // factor -
  truncate) * factor pixels per axis."""
  if resize_x == 0 and resize_y == 0:
    return int(width * scale), int(height * scale), 0, 0
  if resize_y == 0:
    return resize_x, resize_x * height // width, 0, 0
  if resize_x == 0:
    return resize_y * width // height, resize_y, 0, 0
  if width / height < resize_x / resize_y:
    up_x, up_y = resize_x, resize_x * height // width
  else:
    up_x, up_y = resize_y * width // height, resize_y
  return up_x, up_y, (up_x - resize_x) // factor, (up_y - resize_y) // factor


def output_size(width: int, height: int, scale: float, resize_x: int = 0, resize_y: int = 0, factor: int = 8):
  """(width, height) of the images a hires pass gives (hires_size)."""
  up_x, up_y, tx, ty = hires_size(width, height, scale, resize_x, resize_y, factor)
  return (up_x // factor - tx) * factor, (up_y // factor - ty) * factor


def _cubic(x, a):
  """The cubic convolution kernel at |x| (Keys), with parameter a."""
  x = np.abs(x)
  return np.where(
    x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0)
  )


def resize_weights(n_in: int, n_out: int, mode: str, antialias: bool = False) -> np.ndarray:
  """float64 (n_out, n_in): output i = sum_j w[i, j] * input j, as torch's interpolate(size=..., mode,
  align_corners=False, antialias) computes one axis on CPU."""
  w = np.zeros((n_out, n_in))
  scale = np.float32(n_in) / np.float32(n_out)  # torch's area_pixel_compute_scale, in float32
  rows = np.arange(n_out)
  if mode in ('nearest', 'nearest-exact'):
    if n_out == n_in:
      src = rows
    elif mode == 'nearest' and n_out == 2 * n_in:
      src = rows >> 1
    elif mode == 'nearest':
      src = np.floor(rows.astype(np.float32) * scale).astype(np.int64)
    else:
      src = np.floor(((rows + 0.5) * np.float64(scale)).astype(np.float32)).astype(np.int64)  # floorf of a double
    w[rows, np.minimum(src, n_in - 1)] = 1.0
    return w
  if mode not in ('bilinear', 'bicubic'):
    raise ValueError(f'resize mode {mode!r}: not nearest, nearest-exact, bilinear or bicubic')
  if antialias:  # torch's _compute_indices_min_size_weights_aa (PIL's filters)
    size = 2 if mode == 'bilinear' else 4
    support = size * 0.5 * scale if scale >= 1 else size * 0.5
    inv = 1.0 / scale if scale >= 1 else 1.0
    filt = (lambda x: np.maximum(1 - np.abs(x), 0.0)) if mode == 'bilinear' else (lambda x: _cubic(x, -0.5))
    for i in range(n_out):
      center = np.float32(scale * np.float32(i + 0.5))
      lo = max(int(center - support + 0.5), 0)
      hi = min(int(center + support + 0.5), n_in)
      taps = filt((np.arange(lo, hi) - center + 0.5) * inv)
      total = taps.sum()
      w[i, lo:hi] = taps / total if total != 0 else taps
    return w
  # scale * (i + 0.5) - 0.5 rounded once, as torch's kernel computes it (a fused multiply-add)
  src = (np.float64(scale) * (rows + 0.5) - 0.5).astype(np.float32)
  if mode == 'bilinear':
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    frac = np.clip(src - i0, 0, 1).astype(np.float64)
    i1 = i0 + (i0 < n_in - 1)
    np.add.at(w, (rows, i0), 1 - frac)
    np.add.at(w, (rows, i1), frac)
    return w
  i0 = np.floor(src).astype(np.int64)
  t = np.clip(src - i0, 0, 1).astype(np.float64)
  for k, weight in zip(
    range(-1, 3), (_cubic(t + 1, -0.75), _cubic(t, -0.75), _cubic(1 - t, -0.75), _cubic(2 - t, -0.75))
  ):
    np.add.at(w, (rows, np.clip(i0 + k, 0, n_in - 1)), weight)
  return w


def resize_latents(latents, height: int, width: int, mode: str = 'bilinear', antialias: bool = False):
  """NHWC latents (B, H, W, C) resized to (B, height, width, C) as torch's interpolate resizes NCHW ones."""
  import jax.numpy as jnp

  latents = jnp.asarray(latents, jnp.float32)
  wh = jnp.asarray(resize_weights(latents.shape[1], height, mode, antialias), jnp.float32)
  ww = jnp.asarray(resize_weights(latents.shape[2], width, mode, antialias), jnp.float32)
  hi = jnp.einsum('oh,bhwc->bowc', wh, latents, precision='highest')
  return jnp.einsum('pw,bowc->bopc', ww, hi, precision='highest')


def upscale_images(images, width: int, height: int, upscaler: str) -> np.ndarray:
  """uint8 (B, height, width, 3) of uint8 NHWC images, by an image upscaler as A1111's images.resize_image
  (resize mode 0) applies it."""
  from PIL import Image

  lanczos, nearest = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
  out = []
  for array in np.asarray(images):
    im = Image.fromarray(array)
    if upscaler != 'None':
      scale = max(width / im.width, height / im.height)
      if scale > 1.0:  # A1111's Upscaler.upscale: one pass of the filter, then to a multiple of 8 by Lanczos
        dest = (int((im.width * scale) // 8 * 8), int((im.height * scale) // 8 * 8))
        im = im.resize((int(im.width * scale), int(im.height * scale)), lanczos if upscaler == 'Lanczos' else nearest)
        if im.size != dest:
          im = im.resize(dest, lanczos)
    if im.size != (width, height):
      im = im.resize((width, height), lanczos)
    out.append(np.asarray(im))
  return np.stack(out)
