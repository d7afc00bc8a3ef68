"""Class-prior images for DreamBooth, generated with the base model through the jaxdream sampler.

Generation is seeded (a class image's seed depends only on the class prompt, the run seed and its number),
each PNG is written atomically, and a manifest records what was made, so an interrupted run resumes
where it stopped and a rerun makes the same images.
"""

from __future__ import annotations

import hashlib
import json
import os

from jaxdream.distributed import multihost
from jaxdream.io.files import atomic_write
from jaxdream.io.images import list_images

MANIFEST = 'manifest.json'


def _base_seed(prompt: str, seed: int) -> int:
  return int.from_bytes(hashlib.sha256(f'{seed}:{prompt}'.encode()).digest()[:4], 'little') & 0x3FFFFFFF


def ensure_class_images(
  pipeline,
  concept: dict,
  *,
  seed: int,
  steps: int,
  guidance_scale: float,
  scheduler: str | None,
  batch_size: int,
  resolution: int,
  mesh=None,
  log=print,
  usable=None,
) -> list[str]:
  """Make sure `class_dir` holds `num_class_images` images of `class_prompt`; returns their paths. `usable(folder)`
  lists the folder's images a run can use (default: every image file); the shortfall is generated."""
  usable = usable or list_images
  from tqdm import tqdm

  from jaxdream.diffusion.sampling import txt2img
  from jaxdream.io.images import save_png

  folder, prompt, wanted = concept['class_dir'], concept['class_prompt'], concept['num_class_images']
  # With several hosts every process samples (the batch is split over the whole mesh), the primary
  # one writes, and all wait for it before anyone lists the folder again.
  primary = multihost.is_primary()
  if primary:
    os.makedirs(folder, exist_ok=True)
  manifest_path = os.path.join(folder, MANIFEST)
  manifest = {'prompt': prompt, 'images': []}
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
  existing = usable(folder) if os.path.isdir(folder) else []
  missing = wanted - len(existing)
  if missing <= 0:
    return existing[:wanted]
  base = _base_seed(prompt, seed)
  made = {e['number'] for e in manifest['images']}
  numbers = [n for n in range(wanted + len(made)) if n not in made][:missing]
  log(f'generating {missing} class image(s) of {prompt!r} in {folder}')
  bar = tqdm(total=missing, desc='class images', unit='image', disable=not primary)
  for start in range(0, len(numbers), batch_size):
    chunk = numbers[start : start + batch_size]
    seeds = [base + n for n in chunk]
    images = txt2img(
      pipeline,
      [prompt] * len(chunk),
      num_inference_steps=steps,
      guidance_scale=guidance_scale,
      scheduler=scheduler or None,
      seed=seeds,
      height=resolution,
      width=resolution,
      mesh=mesh,
    )
    bar.update(len(chunk))
    if not primary:
      continue
    for n, s, image in zip(chunk, seeds, images):
      name = f'class_{n:05d}.png'
      save_png(
        os.path.join(folder, name),
        image,
        f'{prompt}\nSteps: {steps}, CFG scale: {guidance_scale}, Seed: {s}, Size: {resolution}x{resolution}',
      )
      manifest['images'].append({'number': n, 'file': name, 'seed': s})
    atomic_write(manifest_path, json.dumps(manifest, indent=2))  # after the images: a listed image always exists
  bar.close()
  multihost.barrier(f'class-images:{folder}')
  return usable(folder)[:wanted]
