"""What an evaluation leaves behind: the manifest that makes it reproducible (versions, device, settings and
the sha256 of every file used) and its report files (scores.json, scores.csv, report.md with one grid image
per subject)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess

import numpy as np

from jaxdream.evaluation.metrics import METRICS, REAL_METRICS

# DreamBooth paper (Ruiz et al., CVPR 2023), Table 1: (row, DINO, CLIP-I, CLIP-T).
ANCHORS = (
  ('Real images (paper)', 0.774, 0.885, None),
  ('DreamBooth, Stable Diffusion (paper)', 0.668, 0.803, 0.305),
  ('DreamBooth, Imagen (paper)', 0.696, 0.812, 0.306),
  ('Textual Inversion (paper)', 0.569, 0.780, 0.255),
)
NAMES = {'dino': 'DINO', 'clip_i': 'CLIP-I', 'clip_t': 'CLIP-T', 'vlm': 'Kosmos-2 grounded'}
GRID_CELL = 128  # px of each image in the per-subject grids
GRID_COLS = 8


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def sha256_tree(path: str) -> dict[str, str]:
  """{relative path: sha256} of a file, or of every file under a folder (hidden ones skipped), sorted."""
  if os.path.isfile(path):
    return {os.path.basename(path): sha256_file(path)}
  out = {}
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for f in sorted(files):
      if not f.startswith('.'):
        full = os.path.join(root, f)
        out[os.path.relpath(full, path)] = sha256_file(full)
  return dict(sorted(out.items()))


def git_commit() -> str | None:
  """The commit of the jaxdream checkout in use (with '-dirty' for uncommitted changes); None when jaxdream is
  not run from a git checkout or git is missing."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if not os.path.exists(os.path.join(root, '.git')):
    return None
  try:
    run = lambda *a: subprocess.run(['git', '-C', root, *a], capture_output=True, text=True, timeout=10, check=True)
    commit = run('rev-parse', 'HEAD').stdout.strip()
    dirty = run('status', '--porcelain', '--untracked-files=no').stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('-dirty' if dirty else '')


def environment() -> dict:
  """Versions and the device: what else must match for two runs to give the same numbers."""
  import sys

  import flax
  import jax
  import jaxlib

  devices = jax.devices()
  return {
    # The parent package is loaded with this module; importing it by name would be an upward import.
    'jaxdream': sys.modules['jaxdream'].__version__,
    'git_commit': git_commit(),
    'jax': jax.__version__,
    'jaxlib': jaxlib.__version__,
    'flax': flax.__version__,
    'numpy': np.__version__,
    'platform': devices[0].platform,
    'device_kind': devices[0].device_kind,
    'device_count': len(devices),
  }


def _fmt(value, ci=None) -> str:
  if value is None:
    return '–'
  return f'{value:.3f}' + (f' [{ci[0]:.3f}, {ci[1]:.3f}]' if ci else '')


def _table(header: list[str], rows: list[list[str]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def _metrics(scores: dict) -> list[str]:
  """The score columns of a run: the three DreamBench ones, and Kosmos-2's when it was asked for."""
  return list(METRICS) + ['vlm'] * ('vlm' in scores['overall'])


def write_csv(path: str, scores: dict):
  metrics = _metrics(scores)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  w.writerow(['subject', 'class', 'images', *metrics, *(f'real_{m}' for m in REAL_METRICS)])
  for s, row in scores['subjects'].items():
    real = scores['real_subjects'].get(s, {})
    w.writerow(
      [
        s,
        scores['classes'][s],
        len(scores['images'][s]),
        *(row[m] for m in metrics),
        *(real.get(m, '') for m in REAL_METRICS),
      ]
    )
  _write(path, buf.getvalue())


def _write(path: str, text: str):
  from jaxdream.io.files import atomic_write

  atomic_write(path, text)


def _cell(path: str) -> np.ndarray:
  """An image center-cropped to a square and resized to GRID_CELL px (grids need equal cells)."""
  from PIL import Image

  with Image.open(path) as im:
    im = im.convert('RGB')
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((GRID_CELL, GRID_CELL), Image.Resampling.BICUBIC)
    return np.asarray(im)


def subject_grid(subject: str, real: list[str], generated: list[str]) -> np.ndarray:
  """The subject's real images (first row, up to GRID_COLS) above its generated ones."""
  from jaxdream.io.images import labelled_grid

  blank = np.full((GRID_CELL, GRID_CELL, 3), 255, np.uint8)
  real_row = [_cell(p) for p in real[:GRID_COLS]]
  gen = [_cell(p) for p in generated]
  cols = max(len(real_row), min(len(gen), GRID_COLS))
  rows = [real_row] + [gen[i : i + cols] for i in range(0, len(gen), cols)]
  rows = [r + [blank] * (cols - len(r)) for r in rows]
  labels = ['real'] + ['generated'] + [''] * (len(rows) - 2)
  return labelled_grid(rows, None, labels, subject)


def write_markdown(path: str, scores: dict, grids: dict[str, str]):
  metrics, cfg = _metrics(scores), scores['manifest']['config']
  n = len(scores['subjects'])
  header = ['', *(NAMES[m] for m in metrics)]
  rows = [
    [f'this run ({n} subject{"s" * (n > 1)}, 95% CI)', *(_fmt(scores['overall'][m], scores['ci'][m]) for m in metrics)]
  ]
  if scores['real']:
    rows.append(['real images', *(_fmt(scores['real'].get(m), scores['real_ci'].get(m)) for m in metrics)])
  rows += [[name, *(_fmt(v) for v in values), *(['–'] * (len(metrics) - 3))] for name, *values in ANCHORS]
  settings = ', '.join(
    f'{k.replace("_", " ")} {cfg[k]}'
    for k in ('num_prompts', 'images_per_prompt', 'steps', 'guidance', 'scheduler', 'seed')
    if cfg.get(k) is not None
  )
  source = f'generated images from `{cfg["images"]}`' if cfg.get('images') else f'model `{cfg.get("model")}`'
  per_subject = [
    [
      s,
      scores['classes'][s],
      *(_fmt(row[m]) for m in metrics),
      *(_fmt(scores['real_subjects'].get(s, {}).get(m)) for m in REAL_METRICS),
    ]
    for s, row in scores['subjects'].items()
  ]
  parts = [
    '# DreamBench evaluation',
    f'{source}; {settings}. Protocol: docs/evaluation.md. Anchors: DreamBooth paper, Table 1 (their prompts, '
    '4 images per prompt).',
    _table(header, rows),
    '## Per subject',
    _table(
      ['subject', 'class', *(NAMES[m] for m in metrics), *(f'real {NAMES[m]}' for m in REAL_METRICS)], per_subject
    ),
    '## Images',
    *(f'![{s}]({p})' for s, p in grids.items()),
  ]
  _write(path, '\n\n'.join(parts) + '\n')


def write_report(out: str, scores: dict, real: dict[str, list[str]], generated: dict[str, list[str]]) -> list[str]:
  """scores.json, scores.csv, report.md and grids/<subject>.png in `out`; returns their paths."""
  from jaxdream.io.images import save_png

  os.makedirs(os.path.join(out, 'grids'), exist_ok=True)
  grids = {}
  for s in scores['subjects']:
    grids[s] = f'grids/{s}.png'
    save_png(os.path.join(out, grids[s]), subject_grid(s, real[s], generated[s]))
  paths = [os.path.join(out, f) for f in ('scores.json', 'scores.csv', 'report.md')]
  _write(paths[0], json.dumps(scores, indent=1) + '\n')
  write_csv(paths[1], scores)
  write_markdown(paths[2], scores, grids)
  return paths + [os.path.join(out, g) for g in grids.values()]
