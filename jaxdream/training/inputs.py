"""A training run's inputs, shared by the single-adapter loop (loop.py) and per-subject runs (subject_run.py):
the base model, every concept's checked photos, class images, and the step's batches (with cached latents
and prompt conditioning)."""

from __future__ import annotations

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.distributed import multihost
from jaxdream.training import config as config_lib
from jaxdream.training.data import DataError, data_source, instance_prompt, make_iterator, scan_images


def _concept_examples(config, i, c) -> tuple[list[dict], list[str]]:
  """(examples, problems) of concept `i`'s photos (and the check of its user-supplied class images)."""
  d = config.data
  try:
    paths = scan_images(c['instance_dir'], min_size=d.min_image_size, on_bad=d.on_bad_image)
    if config.prior.enabled and os.path.isdir(c['class_dir']):
      scan_images(c['class_dir'], min_size=d.min_image_size, on_bad=d.on_bad_image)
  except DataError as e:
    return [], [str(e)]
  problems = []
  if config.prior.enabled and os.path.exists(c['class_dir']) and not os.path.isdir(c['class_dir']):
    problems.append(f'{c["class_dir"]}: class_dir is a file, not a folder (class images are kept there)')
  if len(paths) < d.min_instance_images:
    problems.append(
      f'{c["instance_dir"]}: {len(paths)} usable image(s); at least '
      f'data.min_instance_images={d.min_instance_images} are needed'
    )
  examples = [{'file': p, 'prompt': instance_prompt(p, c, d.caption_ext, d.caption_mode), 'concept': i} for p in paths]
  return examples, problems


def _instance_examples(config, concepts) -> list[dict]:
  """Every concept's photos, checked (and user-supplied class images): before anything is built or written,
  so that a data error costs seconds and leaves the workdir as it was."""
  examples, problems = [], []
  for i, c in enumerate(concepts):
    found, bad = _concept_examples(config, i, c)
    examples += found
    problems += bad
  if problems:
    raise DataError('\n'.join(problems))
  return examples


def _class_examples(config, concepts, pipeline, mesh) -> list[dict]:
  """The class-prior examples, generated where missing."""
  from jaxdream.training.class_images import ensure_class_images

  examples = []
  for i, c in enumerate(concepts):
    paths = ensure_class_images(
      pipeline,
      c,
      seed=config.seed,
      steps=config.prior.sample_steps,
      guidance_scale=config.prior.guidance_scale,
      scheduler=config.prior.scheduler or None,
      batch_size=config.prior.batch_size,
      resolution=config.resolution,
      mesh=mesh,
      log=multihost.log,
      usable=lambda folder: _usable_images(config, folder),
    )
    examples += [{'file': p, 'prompt': c['class_prompt'], 'concept': i} for p in paths]
  return examples


def _usable_images(config, folder: str) -> list[str]:
  """A folder's images that pass the data checks (data.on_bad_image='skip' left the others out: they were named
  when the folders were checked, before the model loaded)."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return scan_images(folder, min_size=config.data.min_image_size, on_bad='skip')


def _load_base(config, workdir):
  from jaxdream.diffusion.pipeline import load_pipeline
  from jaxdream.diffusion.tiny_model import builtin_model_folder

  # builtin:tiny is written once, by the primary host, into the shared workdir
  model = multihost.primary_first(lambda: builtin_model_folder(config.model, workdir), 'tiny-base-model')
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.compute_dtype]
  pipeline = load_pipeline(model, dtype=dtype, attention_impl=config.attention, allow_pickle=config.allow_pickle)
  check_trainable(pipeline, per_subject=config.lora.per_subject)
  if config.vae_model:
    _replace_vae(pipeline, config, dtype)
  if config.resolution % pipeline.vae_scale_factor:
    raise config_lib.RunConfigError(
      f'resolution {config.resolution} is not a multiple of the VAE factor {pipeline.vae_scale_factor}'
    )
  return pipeline


def check_trainable(pipeline, per_subject: bool = False):
  """SDXL base trains with per-example time ids (original size, crop, target size: data.make_iterator). The
  refiner's time ids carry an aesthetic score instead of the target size, which training images do not have
  (and diffusers has no refiner training script to follow): refused by name, before anything is compiled; so are
  per-subject LoRA runs of SDXL, whose batches do not carry time ids yet."""
  from jaxdream.diffusion import sdxl

  if pipeline.micro_conditioning is sdxl.aesthetic_time_ids:
    raise config_lib.RunConfigError(
      f'{pipeline.path}: an SDXL refiner (requires_aesthetics_score); jaxdream samples from it but cannot train it '
      '(its time ids take an aesthetic score that training images do not have): train the SDXL base model'
    )
  if per_subject and pipeline.micro_conditioning(64, 64):
    raise config_lib.RunConfigError(
      f'{pipeline.path}: lora.per_subject runs cannot train a {pipeline.pipeline_class} model yet (its UNet takes '
      'time ids that per-subject batches do not carry): train one adapter per run'
    )


def _replace_vae(pipeline, config, dtype):
  """config.vae_model's AutoencoderKL in place of the model's VAE (before anything is compiled with it): its
  latents must have the channels the UNet takes."""
  from jaxdream.models import load_vae

  path = config.vae_model
  if not os.path.isfile(os.path.join(path, 'config.json')):
    path = os.path.join(path, 'vae')
  vae = load_vae(path, dtype=dtype, attention_impl=config.attention, allow_pickle=config.allow_pickle)
  channels = pipeline.unet.config['in_channels']
  if vae.latent_channels != channels:
    raise config_lib.RunConfigError(
      f'vae_model={config.vae_model!r} makes {vae.latent_channels}-channel latents; the UNet takes {channels}'
    )
  pipeline.components['vae'] = vae
  pipeline.compiled.clear()


def _next_batch(iterators, prior: bool, latents: dict | None = None, contexts: dict | None = None) -> dict:
  """The step's examples: instance ones first, then class ones. Cached latents replace the images by
  their stored posterior (mean, std), cached prompt conditioning (context, extra) replaces the token
  ids; both are looked up by example index. A model's micro-conditioning (SDXL's time ids) comes with each
  example."""
  parts = []
  for split in ('instance', 'class') if prior else ('instance',):
    ex = next(iterators[split])
    part = {'pixels': ex['pixels']}
    if latents is not None:
      part = {'latent_mean': latents[split][0][ex['index']], 'latent_std': latents[split][1][ex['index']]}
    if contexts is not None:
      part.update(jax.tree.map(lambda a: a[ex['index']], contexts[split]))
    else:
      part['input_ids'] = ex['input_ids']
    if 'micro_conditioning' in ex:  # SDXL's time ids, per example
      part['micro_conditioning'] = ex['micro_conditioning']
    parts.append(part)
  return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _cache_text_embeddings(pipeline, data_folder, splits, batch_size=16) -> dict:
  """Every example's prompt conditioning, computed once (the text encoders are frozen):
  {split: {'context': (N, L, D), 'extra': {name: (N, ...)}}}, row i for example index i."""
  graphdefs, params = {}, {}
  for name, model in pipeline.components.items():
    graphdefs[name], params[name] = nnx.split(model)

  @jax.jit
  def encode(params, ids):
    context, extra = pipeline.encode_prompt({n: nnx.merge(g, params[n]) for n, g in graphdefs.items()}, ids)
    return {'context': context, 'extra': extra}

  out = {}
  for split in splits:
    source = data_source(data_folder, split)
    prompts = [None] * len(source)
    for i in range(len(source)):
      ex = source[i]
      p = ex['prompt']
      prompts[int(ex['index'])] = p.decode() if isinstance(p, bytes) else str(p)
    ids = pipeline.tokenize(prompts)
    chunks = [
      jax.device_get(encode(params, jax.tree.map(lambda a: a[i : i + batch_size], ids)))
      for i in range(0, len(prompts), batch_size)
    ]
    out[split] = jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
  return out


def _cache_latents(pipeline, data_folder, splits, resolution, batch_size=8) -> dict:
  """Every example's VAE posterior (mean, std) in latent space, computed once (center crops, no flips)."""
  vae_def, vae_params = nnx.split(pipeline.vae)
  encode = jax.jit(lambda params, pixels: nnx.merge(vae_def, params).encode_latents(pixels))

  out = {}
  for split in splits:
    source = data_source(data_folder, split)
    it = make_iterator(
      source,
      batch_size=1,
      seed=0,
      resolution=resolution,
      center_crop=True,
      flip_p=0.0,
      tokenize=lambda p: {},
    )
    pixels, order = [], []
    for _ in range(len(source)):  # the first epoch visits every example once
      ex = next(it)
      pixels.append(ex['pixels'][0])
      order.append(int(ex['index'][0]))
    means, stds = [None] * len(order), [None] * len(order)
    for i in range(0, len(order), batch_size):
      m, s = jax.device_get(encode(vae_params, np.stack(pixels[i : i + batch_size])))
      for j, idx in enumerate(order[i : i + batch_size]):
        means[idx], stds[idx] = m[j], s[j]
    out[split] = (np.stack(means), np.stack(stds))
  return out
