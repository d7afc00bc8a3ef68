"""`save_images`: the PNGs a request asked to keep, written as A1111 writes them (OUTDIR/txt2img-images/DATE/
NNNNN-SEED.png, numbered on from the highest number in that folder). Paths are made from the kind, the date and
numbers only: nothing a request sends names a file, so nothing is written outside the output folder."""

from __future__ import annotations

import os
import re
import threading
import time

DEFAULT_OUTDIR = os.path.join('outputs', 'serve')
_NUMBERED = re.compile(r'^(\d+)-')
_lock = threading.Lock()  # one numbering at a time (concurrent requests write into the same folder)


def _next_number(folder: str) -> int:
  """A1111's get_next_sequence_number: one past the highest NNNNN- prefix in the folder (0 when none)."""
  numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := _NUMBERED.match(name))]
  return max(numbers, default=-1) + 1


def save_pngs(outdir: str, kind: str, pngs: list[bytes], seeds: list[int]) -> list[str]:
  """Write each PNG (bytes with its parameters chunk) as OUTDIR/{kind}-images/YYYY-MM-DD/NNNNN-SEED.png;
  returns the paths. kind is 'txt2img' or 'img2img'."""
  if kind not in ('txt2img', 'img2img'):
    raise ValueError(f'kind {kind!r}: txt2img or img2img')
  folder = os.path.join(outdir, f'{kind}-images', time.strftime('%Y-%m-%d'))
  os.makedirs(folder, exist_ok=True)
  paths = []
  with _lock:
    n = _next_number(folder)
    for png, seed in zip(pngs, seeds, strict=True):
      path = os.path.join(folder, f'{n:05d}-{int(seed)}.png')
      with open(path, 'xb') as f:  # never over an existing file
        f.write(png)
      paths.append(path)
      n += 1
  return paths
