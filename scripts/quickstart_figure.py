"""The README's quickstart picture: the five photos the quickstart fine-tunes on, then the fine-tuned model's
"a photo of sks dog" and "a photo of dog" samples (workdir/samples, written at the end of the run), and the
base model's own "a photo of sks dog" samples (same seeds and sampler settings) for comparison.

  python scripts/quickstart_figure.py outputs/quickstart docs/images/quickstart.png
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np
from PIL import Image


def _row(path: str) -> list[np.ndarray]:
  """The images of a samples/ grid PNG (one row of square images)."""
  grid = np.asarray(Image.open(path).convert('RGB'))
  h = grid.shape[0]
  return [grid[:, i : i + h] for i in range(0, grid.shape[1], h)]


def main(argv=None) -> int:
  from jaxdream import load_pipeline
  from jaxdream.diffusion.tiny_model import builtin_model_folder
  from jaxdream.io.images import labelled_grid, list_images, save_png
  from jaxdream.training import config as config_lib
  from jaxdream.training.data import _crop_flip, resized_png
  from jaxdream.training.validation import validation_samples

  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('workdir', help='a finished quickstart run (configs/quickstart.py)')
  p.add_argument('out', help='the PNG to write')
  args = p.parse_args(argv)
  c = config_lib.config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'quickstart.py'))
  concept, r = c.concepts[0], c.resolution
  samples = {os.path.basename(f)[3:-4]: f for f in glob.glob(os.path.join(args.workdir, 'samples', '0*.png'))}
  tuned, generic = _row(samples['a_photo_of_sks_dog']), _row(samples['a_photo_of_dog'])
  n = len(tuned)
  photos = [
    _crop_flip(np.frombuffer(resized_png(f, r), np.uint8), r, True, 0.0, None)
    for f in list_images(concept.instance_dir)
  ]
  base = validation_samples(
    load_pipeline(builtin_model_folder(c.model, args.workdir)), c, [concept.instance_prompt], None
  )
  blank = np.full_like(tuned[0], 255)
  cols = max(n, len(photos))
  rows = [row + [blank] * (cols - len(row)) for row in (photos, tuned, generic, list(base))]
  labels = [
    f'the {len(photos)} photos',
    'fine-tuned: "a photo of sks dog"',
    'fine-tuned: "a photo of dog"',
    'base: "a photo of sks dog"',
  ]
  big = [[np.asarray(Image.fromarray(im).resize((2 * r, 2 * r), Image.NEAREST)) for im in row] for row in rows]
  save_png(args.out, labelled_grid(big, row_labels=labels))
  print(args.out)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
