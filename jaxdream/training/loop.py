"""DreamBooth fine-tuning (and VAE training, training/vae.py): one explicit training loop.

    jaxdream train --config configs/quickstart.py --workdir DIR [--config.train.num_steps=...]

Running the same command again on the same workdir resumes from the latest checkpoint. Everything is
checked (config, model folder, every image) before anything is compiled.
"""

from __future__ import annotations

import json
import os
import re

import jax

from jaxdream.distributed import multihost
from jaxdream.distributed.mesh import make_mesh
from jaxdream.distributed.sharding import batch_sharding, process_rows
from jaxdream.io.files import atomic_write
from jaxdream.training import config as config_lib
from jaxdream.training.checkpoint import check_resumable
from jaxdream.training.data import data_source, make_iterator, prepare_dataset
from jaxdream.training.inputs import (
  _cache_latents,
  _cache_text_embeddings,
  _class_examples,
  _instance_examples,
  _load_base,
  _next_batch,
)
from jaxdream.training.lock import workdir_lock
from jaxdream.training.lora import adapter_key, add_adapters, export_adapters, lora_paths, lora_plan, merge_adapters
from jaxdream.training.params import (
  _set_params,
  lr_schedule,
  make_optimizer,
  param_groups,
  split_models,
  split_trainable,
)
from jaxdream.training.runner import run_steps
from jaxdream.training.step import StepFn, TrainingError, _place  # noqa: F401 - TrainingError: re-exported
from jaxdream.training.subject_run import check_subjects, run_subjects
from jaxdream.training.validation import ValidationMetrics, _validation_images, concept_images
from jaxdream.training.writers import loss_curve_image


def train(config, workdir: str) -> dict:
  """Run (or resume) a DreamBooth fine-tuning; returns a summary. Writes `workdir/model`, or with
  lora.rank > 0 the adapter `workdir/loras/NAME/pytorch_lora_weights.safetensors` (NAME: the concept's name;
  workdir/model only with lora.export_merged); with lora.per_subject one such adapter per concept
  (training.subject_run).

  With task='vae' the run trains an AutoencoderKL instead (training/vae.py): workdir/vae.

  The config and every image are checked before anything is made; the workdir is locked for the run."""
  concepts = config_lib.validate(config)
  if config.task == 'vae':
    from jaxdream.training.vae import train_vae

    return train_vae(config, workdir)
  for c in concepts:  # class images may live in the run folder
    c['class_dir'] = c['class_dir'].replace('{workdir}', workdir)
  if config.lora.per_subject:
    concepts, instance, skipped = check_subjects(config, concepts)
  else:
    instance = _instance_examples(config, concepts)
  os.makedirs(workdir, exist_ok=True)
  multihost.check_shared_folder(workdir)
  with workdir_lock(workdir):
    if not config.lora.per_subject:  # per-subject runs keep a checkpoint folder per group
      check_resumable(workdir, config)
    if config.lora.per_subject:  # one adapter per concept (validate: only with lora.rank > 0)
      return run_subjects(config, workdir, concepts, instance, skipped)
    return _run(config, workdir, concepts, instance)


def _run(config, workdir, concepts, instance) -> dict:
  from jaxdream.diffusion.pipeline import save_pipeline

  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  b = config.train.batch_size
  n_dev = mesh.shape['data'] * mesh.shape['fsdp']
  total = b * (2 if config.prior.enabled else 1)
  if total % n_dev:
    raise config_lib.RunConfigError(
      f"a step's {total} examples (train.batch_size={b}, prior examples on "
      f'top) do not split over the {n_dev} devices of the data axes'
    )
  pipeline = _load_base(config, workdir)
  lora = config.lora.rank > 0
  plan = lora_plan(pipeline, config) if lora else {}  # the targets are checked before anything slow
  examples = {
    'instance': instance,
    'class': _class_examples(config, concepts, pipeline, mesh) if config.prior.enabled else [],
  }
  # After the class images, which the base model makes.
  adapted = add_adapters(pipeline, plan, adapter_key(config.seed)) if lora else {}
  data_folder = multihost.primary_first(
    lambda: prepare_dataset(os.path.join(workdir, 'data'), examples, config.resolution), 'dataset'
  )
  batch_sh = batch_sharding(mesh)
  rows = process_rows(batch_sh, total)
  splits = ['instance'] + (['class'] if config.prior.enabled else [])
  iterators = {
    s: make_iterator(
      data_source(data_folder, s),
      batch_size=b,
      seed=config.seed + 17 * k,
      resolution=config.resolution,
      center_crop=config.data.center_crop,
      flip_p=config.data.flip_p,
      tokenize=pipeline.tokenize,
      rows=slice(max(rows.start - k * b, 0), max(rows.stop - k * b, 0)),
      caption_dropout=config.train.caption_dropout,
      micro_conditioning=pipeline.micro_conditioning,
    )
    for k, s in enumerate(splits)
  }
  latents = _cache_latents(pipeline, data_folder, splits, config.resolution) if config.train.cache_latents else None
  contexts = _cache_text_embeddings(pipeline, data_folder, splits) if config.train.cache_text_embeddings else None

  graphdefs, templates, flat = split_models(pipeline)
  groups = param_groups(config)
  trainable, frozen, labels = split_trainable(flat, groups)
  if not trainable:
    raise config_lib.RunConfigError(f'no parameter matches the trainable groups {groups}')
  tx = make_optimizer(config, groups, labels)
  step_fn = StepFn.from_config(config, pipeline, graphdefs, templates, tx)
  multihost.log(step_fn.describe())
  state, frozen, jstep, _ = _place(step_fn, pipeline, trainable, frozen, tx, mesh, config)

  def next_batch():
    batch = _next_batch(iterators, config.prior.enabled, latents, contexts)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sh, x, (total,) + x.shape[1:]), batch)

  metrics = ValidationMetrics(config, concepts, mesh) if config.validation.metrics else None

  def validate(done, state, writer):
    _set_params(pipeline, multihost.to_host(state['trainable']))  # every process: a collective
    images = _validation_images(pipeline, config, concepts, mesh)
    scores = metrics(concept_images(concepts, images)) if metrics else None  # every process: a collective
    if writer:
      writer.images(done, images)
      if scores:
        writer.scalars(done, prefix='validation', **scores['overall'])

  lr = lr_schedule(config, next(iter(groups.values()))[1])
  state, losses, stopped, writer = run_steps(config, workdir, state, frozen, jstep, next_batch, iterators, lr, validate)
  if stopped:
    return {'step': stopped, 'preempted': True}
  summary = {'step': int(state['step']), 'bad_steps': int(state['bad_steps']), 'losses': losses}
  final = state['ema'] if config.train.ema_decay > 0 else state['trainable']
  _set_params(pipeline, multihost.to_host(final))  # every process: gathering is a collective
  model = os.path.join(workdir, 'model')
  if lora:  # a LoRA run's output is its adapter; the base model is the user's, unchanged
    exported = lora_paths(workdir, config_lib.adapter_name(concepts), config.lora.export_kohya)
    if multihost.is_primary():
      export_adapters(pipeline, adapted, exported)
  else:
    exported = {'model': model}
    if multihost.is_primary():
      save_pipeline(pipeline, model)
  # Validation samples of the adapted model.
  summary['outputs'] = dict(
    exported, **_final_outputs(pipeline, config, concepts, workdir, losses, mesh, writer, metrics, summary)
  )
  if lora and config.lora.export_merged:
    merge_adapters(pipeline)
    if multihost.is_primary():
      save_pipeline(pipeline, model)
    summary['outputs']['model'] = model
  if writer:
    writer.close()
  multihost.barrier('exported')
  return summary


def _final_outputs(pipeline, config, concepts, workdir, losses, mesh, writer, metrics, summary) -> dict:
  """Validation images of every prompt side by side, and the loss curve, as PNGs in workdir/samples; with
  validation.metrics their scores in workdir/samples/metrics.json and summary['metrics'].
  Every process samples and scores (the batch is split over the mesh); the primary one writes."""
  from jaxdream.io.images import make_grid, save_png

  folder = os.path.join(workdir, 'samples')
  images = _validation_images(pipeline, config, concepts, mesh)
  out = {'samples': {}, 'loss_curve': os.path.join(folder, 'loss_curve.png')}
  scores = metrics(concept_images(concepts, images)) if metrics else None
  if scores:
    summary['metrics'] = scores
    out['metrics'] = os.path.join(folder, 'metrics.json')
  if not multihost.is_primary():
    return out
  os.makedirs(folder, exist_ok=True)
  if scores:
    step = int(losses[-1][0]) if losses else 0
    atomic_write(out['metrics'], json.dumps(dict(step=step, **scores), indent=2))
    if writer:
      writer.scalars(step, prefix='validation', **scores['overall'])
  paths = out['samples']
  for k, (prompt, ims) in enumerate(images.items()):
    path = os.path.join(folder, f'{k:02d}_' + re.sub(r'[^A-Za-z0-9]+', '_', prompt).strip('_')[:60] + '.png')
    save_png(path, make_grid(list(ims), 1, len(ims)), prompt)
    paths[prompt] = path
  if writer:
    writer.images(int(losses[-1][0]) if losses else 0, images)
  save_png(out['loss_curve'], loss_curve_image(losses), 'training loss')
  return out
