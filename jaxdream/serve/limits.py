"""What a request may ask for, and the checks that answer 413/422 naming the field; where the server may bind."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import ipaddress
import math
import re

import numpy as np


class ApiError(Exception):
  """An error answered with `status` and {'error', 'detail', 'field'}: the field of the request at fault."""

  def __init__(self, status: int, field: str | None, detail: str, kind: str = 'invalid_request'):
    super().__init__(detail)
    self.status, self.field, self.detail, self.kind = status, field, detail, kind


@dataclasses.dataclass(frozen=True)
class Limits:
  max_size: int = 2048  # width and height, pixels
  max_steps: int = 150
  max_batch_size: int = 16
  max_n_iter: int = 16
  max_images: int = 64  # batch_size * n_iter of one request
  max_loras: int = 8  # <lora:...> tags in one prompt
  max_prompt_chars: int = 16384  # each of prompt and negative_prompt, checked before tokenizing
  max_prompt_chunks: int = 8  # 75-token chunks of a prompt (600 tokens); each number compiles its own loop
  max_prompt_encodings: int = 160  # prompt-editing texts x chunks of one prompt (each is encoded)
  max_body_bytes: int = 32 * 2**20
  max_image_pixels: int = 4096 * 4096  # a decoded init image or mask (decompression bombs)


def check_range(field: str, value, low, high):
  if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
    raise ApiError(422, field, f'{field} must be in [{low}, {high}], got {value}')


def check_size(field: str, value: int, factor: int, limits: Limits):
  check_range(field, value, factor, limits.max_size)
  if value % factor:
    raise ApiError(422, field, f"{field} must be a multiple of {factor} (this model's VAE factor), got {value}")


_DATA_URL = re.compile(r'^data:image/[\w.+-]+;base64,', re.IGNORECASE)


def image_bytes(field: str, text: str) -> bytes:
  """The file bytes of a base64 image or data URL."""
  if not isinstance(text, str) or not text:
    raise ApiError(422, field, f'{field}: expected a base64-encoded image')
  try:
    return base64.b64decode(_DATA_URL.sub('', text.strip()), validate=True)
  except (binascii.Error, ValueError):
    raise ApiError(422, field, f'{field}: not valid base64') from None


def decode_image(field: str, text: str, limits: Limits, mode: str = 'RGB'):
  """A base64 (or data-URL) image as a PIL image; its size is read from the header and checked before any
  pixel is decoded, so a small file that decodes to gigapixels (a decompression bomb) is refused (413)."""
  from PIL import Image

  data = image_bytes(field, text)
  try:
    im = Image.open(io.BytesIO(data))
  except (OSError, Image.DecompressionBombError) as e:
    raise ApiError(422 if not isinstance(e, Image.DecompressionBombError) else 413, field, f'{field}: {e}') from None
  w, h = im.size
  if w * h > limits.max_image_pixels:
    raise ApiError(413, field, f'{field}: {w}x{h} pixels is more than the limit of {limits.max_image_pixels}')
  try:
    return im.convert(mode)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ApiError(422, field, f'{field}: not a readable image ({e})') from None


def encode_png_b64(png: bytes) -> str:
  return base64.b64encode(png).decode('ascii')


def resized(im, width: int, height: int) -> np.ndarray:
  """A PIL image as a uint8 array of the request's size (A1111's resize_mode 0, "just resize")."""
  from PIL import Image

  return np.asarray(im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS))


def check_bind(host: str, auth: str | None, insecure: bool):
  """A bind beyond loopback needs --api-auth (or --insecure, said out loud)."""
  if auth or insecure:
    return
  try:
    loopback = ipaddress.ip_address(host).is_loopback
  except ValueError:
    loopback = host == 'localhost'
  if not loopback:
    raise ValueError(
      f'--host {host}: serving beyond this machine needs --api-auth user:password (or --insecure to serve '
      'without authentication)'
    )


def parse_auth(text: str | None) -> dict[str, str]:
  """'user:pass[,user2:pass2]' -> {user: password}."""
  users = {}
  for item in (text or '').split(','):
    if not item.strip():
      continue
    user, sep, password = item.strip().partition(':')
    if not sep or not user or not password:
      raise ValueError(f'--api-auth: expected user:password[,user2:password2], got {item.strip()!r}')
    users[user] = password
  return users
