"""The tiny base model's training data (configs/tiny_base_pretrain.py, scripts/make_tiny_base.sh): DreamBench's
subjects but the quickstart's, each captioned with its class.

DreamBench (the DreamBooth paper's dataset, CC-BY 4.0) has 30 subjects of 16 classes. The base model is
trained on every subject but `dog` (jaxdream/assets/sample_subject/dog: the same photos, downscaled), so that
fine-tuning the base on the quickstart's dog is a real DreamBooth: a subject it has never seen, of a class
(`dog`: dog2, dog3, ...) it knows. Each subject is a concept without an identifier whose prompt is its
caption, "a photo of CLASS"; the trainer reads the photos where they are (nothing is copied).

  python -m jaxdream.training.pretrain_data --dreambench DIR --out FOLDER

copies the same images, with "a photo of CLASS" caption sidecars (FOLDER/SUBJECT/NN.jpg + NN.txt), into one
folder: what a VAE run (vae.data_dir, searched recursively) or any captioned-folder run takes; and

  python -m jaxdream.training.pretrain_data --calibrate-vae VAE_FOLDER --out FOLDER

sets a trained VAE's scaling_factor so that the diffusion model's latents of those images have unit standard
deviation (Stable Diffusion's 0.18215 was chosen so for its VAE; a new VAE's latents have their own scale), and

  python -m jaxdream.training.pretrain_data --export-base MODEL_FOLDER --out FOLDER

writes the trained model as the shipped base (float16 weights: half the size, as SD's own half-precision
checkpoints; jaxdream loads them back as float32 parameters).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

from jaxdream.io.dreambench import read_dreambench
from jaxdream.io.images import list_images

QUICKSTART_SUBJECTS = ('dog',)  # never seen by the base: the quickstart fine-tunes on it
CAPTION = 'a photo of {}'


def pretraining_concepts(dreambench: str, exclude=QUICKSTART_SUBJECTS) -> list[dict]:
  """One concept per DreamBench subject not in `exclude`, in the classes file's order: its photo folder and
  the caption "a photo of CLASS", without an identifier (text-to-image training)."""
  bench = read_dreambench(dreambench)
  unknown = sorted(set(exclude) - set(bench.classes))
  if unknown:  # a misspelt subject would be silently trained on
    raise ValueError(f'{dreambench}: no subject(s) {unknown} to leave out (subjects: {", ".join(bench.classes)})')
  return [
    {
      'name': subject,
      'instance_dir': os.path.abspath(os.path.join(dreambench, subject)),
      'instance_prompt': CAPTION.format(cls),
      'identifier': '',
      'class_prompt': '',
      'class_dir': '',
      'num_class_images': 0,
    }
    for subject, cls in bench.classes.items()
    if subject not in exclude
  ]


def write_captioned_folder(dreambench: str, out: str, exclude=QUICKSTART_SUBJECTS) -> list[str]:
  """Copy the pretraining images to out/SUBJECT/ with caption sidecars (NN.jpg + NN.txt: its concept's
  prompt); returns the copied images' paths. An existing `out` is refused (it might hold other images)."""
  if os.path.exists(out):
    raise FileExistsError(f'{out} exists: give a new folder for the pretraining images')
  tmp = out.rstrip(os.sep) + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  paths = []
  for c in pretraining_concepts(dreambench, exclude):
    folder = os.path.join(tmp, c['name'])
    os.makedirs(folder)
    for src in list_images(c['instance_dir']):
      dst = os.path.join(folder, os.path.basename(src))
      shutil.copyfile(src, dst)
      with open(os.path.splitext(dst)[0] + '.txt', 'w', encoding='utf-8') as f:
        f.write(c['instance_prompt'] + '\n')
      paths.append(os.path.join(out, c['name'], os.path.basename(src)))
  os.rename(tmp, out)  # whole or not at all
  return paths


def calibrate_scaling_factor(vae_folder: str, image_dir: str, resolution: int, batch_size: int = 16) -> float:
  """Set the AutoencoderKL folder's scaling_factor to 1 / the standard deviation of its posterior means over every
  image under `image_dir` (centre crops at `resolution`), as Stable Diffusion's was chosen; returns it."""
  import jax

  from jaxdream.io.files import atomic_write
  from jaxdream.models import load_vae
  from jaxdream.training.data import _crop_flip, image_folders, resized_png

  vae = load_vae(vae_folder)
  paths = list_images(image_folders(image_dir))
  if not paths:
    raise ValueError(f'{image_dir}: no images to calibrate the VAE on')
  encode = jax.jit(lambda x: vae.encode(x).mean - vae.shift_factor)
  latents = []
  for i in range(0, len(paths), batch_size):
    crops = [
      _crop_flip(np.frombuffer(resized_png(p, resolution), np.uint8), resolution, True, 0.0, None)
      for p in paths[i : i + batch_size]
    ]
    latents.append(np.asarray(encode(np.stack(crops).astype(np.float32) / 127.5 - 1.0), np.float64))
  factor = float(1.0 / np.std(np.concatenate(latents)))
  path = os.path.join(vae_folder, 'config.json')
  with open(path, encoding='utf-8') as f:
    config = json.load(f)
  config['scaling_factor'] = factor
  atomic_write(path, json.dumps(config, indent=2) + '\n')
  return factor


def export_base(model_folder: str, out: str):
  """The trained model folder at `out` with float16 weights: the tokenizer, configs and scheduler as they are."""
  from jaxdream.diffusion.pipeline import load_pipeline, save_pipeline

  save_pipeline(load_pipeline(model_folder), out, weights_dtype='float16')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--dreambench', default=os.path.join('..', 'shared', 'dreambench'), help='DreamBench folder')
  p.add_argument('--out', required=True, help='the folder to write (must not exist); with --calibrate-vae: to read')
  p.add_argument('--exclude', nargs='*', default=list(QUICKSTART_SUBJECTS), help='subjects left out')
  p.add_argument('--calibrate-vae', metavar='VAE_FOLDER', help="set this VAE's scaling_factor from --out's images")
  p.add_argument('--resolution', type=int, default=64, help='with --calibrate-vae: the training resolution')
  p.add_argument('--export-base', metavar='MODEL_FOLDER', help='write this trained model to --out, float16 weights')
  args = p.parse_args(argv)
  if args.export_base:
    export_base(args.export_base, args.out)
    print(f'{args.out}: {args.export_base} with float16 weights')
    return 0
  if args.calibrate_vae:
    factor = calibrate_scaling_factor(args.calibrate_vae, args.out, args.resolution)
    print(f'{args.calibrate_vae}: scaling_factor {factor:.6g} (unit-variance latents of {args.out})')
    return 0
  paths = write_captioned_folder(args.dreambench, args.out, tuple(args.exclude))
  print(f'{args.out}: {len(paths)} images of {len({os.path.dirname(x) for x in paths})} subjects, captioned')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
