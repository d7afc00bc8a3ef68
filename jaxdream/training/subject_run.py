"""A per-subject LoRA run (lora.per_subject=True): one adapter per concept, trained by the vmapped subject
step of training.subjects, each subject exactly as it would train alone.

Subjects train in groups of train.subjects_per_step (0: all in one), one group after another with the same
compiled step (a short last group is padded). Each group has its own checkpoint folder
(workdir/groups/subjects-HASH/checkpoints, HASH of its names), so a resumed run skips finished groups and continues
the interrupted one. Each subject's adapter goes to workdir/loras/NAME/ (lora.export_kohya: also
workdir/loras/NAME.safetensors); subjects skipped for bad photos (data.on_bad_subject='skip') are listed in
workdir/loras/skipped.json.

As a single run does: SIGTERM or Ctrl-C saves the current group's checkpoint and stops (multihost.Preemption);
each subject's validation samples, with its own adapter, go to workdir/samples/NAME/step_N.png (every
validation.every_steps, and at the end of its group); TensorBoard gets each subject's loss and gradient norm
(train/loss/NAME, train/grad_norm/NAME) and the learning rate.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zlib

import jax

from jaxdream.distributed import multihost
from jaxdream.distributed.mesh import make_mesh
from jaxdream.io.files import atomic_write
from jaxdream.training import config as config_lib
from jaxdream.training.checkpoint import _checkpointer, _restore, _save
from jaxdream.training.data import DataError, data_source, make_iterator, prepare_dataset
from jaxdream.training.inputs import (
  _cache_latents,
  _cache_text_embeddings,
  _class_examples,
  _concept_examples,
  _load_base,
  _next_batch,
)
from jaxdream.training.lora import add_adapters, export_adapters, lora_paths, lora_plan
from jaxdream.training.params import (
  _set_params,
  lr_schedule,
  make_optimizer,
  param_groups,
  split_models,
  split_trainable,
)
from jaxdream.training.step import StepFn, TrainingError
from jaxdream.training.subjects import (
  adapted_copy,
  adapter_params,
  group_size,
  jit_subject_step,
  padded,
  stack,
  subject_groups,
  subject_key,
  subject_seed,
  subject_state,
  subject_step_shardings,
  unstack,
)
from jaxdream.training.validation import (
  ValidationMetrics,
  concept_images,
  save_subject_samples,
  subject_sample_path,
  subject_validation_images,
)
from jaxdream.training.writers import _Writer


def check_subjects(config, concepts) -> tuple[list[dict], list[dict], list[dict]]:
  """(concepts to train, their instance examples, skipped subjects): every subject's photos checked before
  anything is built. A bad subject fails the run, or with data.on_bad_subject='skip' is left out and
  reported ({'name', 'instance_dir', 'problems'})."""
  kept, examples, skipped, problems = [], [], [], []
  for c in concepts:
    found, bad = _concept_examples(config, len(kept), c)
    if not bad:
      kept.append(c)
      examples += found
    elif config.data.on_bad_subject == 'skip':
      skipped.append({'name': c['name'], 'instance_dir': c['instance_dir'], 'problems': bad})
      multihost.log(f'skipping subject {c["name"]!r}: ' + '; '.join(bad))
    else:
      problems += bad
  if problems:
    raise DataError('\n'.join(problems) + "\n(data.on_bad_subject='skip' trains the other subjects)")
  if not kept:
    raise DataError(
      'every subject was skipped:\n' + '\n'.join(f'{s["name"]}: {"; ".join(s["problems"])}' for s in skipped)
    )
  return kept, examples, skipped


def _adapted(pipeline, plan, seed: int, name: str):
  """A copy of the base with subject `name`'s freshly initialised adapters (its subject_key)."""
  return adapted_copy(
    pipeline,
    lambda comps, key: add_adapters(dataclasses.replace(pipeline, components=comps), plan, key),
    subject_key(seed, name),
  )


LOSSES_FILE = 'losses.json'  # a group's per-subject losses so far, beside its checkpoints


def _group_losses(group_dir: str, group: list, step: int) -> dict:
  """{subject: [(step, loss), ...]} of a group's steps up to `step` (its restored checkpoint's), as saved with its
  checkpoints: a resumed run's summary has each subject's whole history, as a single run's has."""
  try:
    with open(os.path.join(group_dir, LOSSES_FILE)) as f:
      saved = json.load(f)
  except (OSError, ValueError):  # none yet (a new group), or unreadable: the history starts here
    saved = {}
  if not isinstance(saved, dict):
    saved = {}
  return {n: [tuple(x) for x in saved.get(n, []) if x[0] <= step] for n in group} if step else {}


def _group_folder(names: list[str]) -> str:
  return f'subjects-{zlib.crc32(",".join(names).encode()):08x}'


def _subject_iterators(config, folder, name, tokenize) -> dict:
  """The subject's instance (and class) iterators, seeded by its name: its data is that it has alone."""
  seed = subject_seed(config.seed, name)
  splits = ['instance'] + (['class'] if config.prior.enabled else [])
  return {
    s: make_iterator(
      data_source(folder, s),
      batch_size=config.train.batch_size,
      seed=seed + 17 * k,
      resolution=config.resolution,
      center_crop=config.data.center_crop,
      flip_p=config.data.flip_p,
      tokenize=tokenize,
    )
    for k, s in enumerate(splits)
  }


def _group_samples(workdir, step, pipe, config, members, adapters, mesh, writer, scorer=None) -> dict[str, str]:
  """The group's validation samples at `step`, each subject's with its own row of the stacked `adapters`
  (see training.validation); {name: PNG path}. Samples already there (a finished group resumed) are kept;
  none with validation.num_images=0. With validation.metrics, each subject's scores go to TensorBoard
  (validation/METRIC/NAME) and to samples/NAME/metrics_step_STEP.json."""
  if not config.validation.num_images:
    return {}
  paths = {c['name']: subject_sample_path(workdir, c['name'], step) for c in members}
  if all(os.path.isfile(p) for p in paths.values()):
    return paths
  images = subject_validation_images(pipe, config, members, adapters, mesh)
  by_name = {c['name']: c for c in members}
  scores = scorer({n: concept_images([by_name[n]], bp).get(n, {}) for n, bp in images.items()}) if scorer else None
  if scores and multihost.is_primary():
    for n, values in scores['subjects'].items():
      os.makedirs(os.path.dirname(paths[n]), exist_ok=True)
      atomic_write(os.path.join(os.path.dirname(paths[n]), f'metrics_step_{step}.json'), json.dumps(values))
    if writer:
      writer.scalars(
        step, prefix='validation', **{f'{m}/{n}': v for n, d in scores['subjects'].items() for m, v in d.items()}
      )
  return save_subject_samples(workdir, step, images, writer)


def run_subjects(config, workdir, concepts, instance, skipped) -> dict:
  if jax.process_count() > 1:
    raise config_lib.RunConfigError('lora.per_subject runs on one host for now (use one process)')
  if multihost.is_primary():
    path = os.path.join(workdir, 'loras', 'skipped.json')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(skipped, indent=2))
  names = [c['name'] for c in concepts]
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  examples = config.train.batch_size * (2 if config.prior.enabled else 1)
  try:  # the mesh's fit, before the base model loads and class images are made
    size = group_size(len(names), config.train.subjects_per_step, examples, mesh)
  except ValueError as e:
    raise config_lib.RunConfigError(str(e)) from None
  pipeline = _load_base(config, workdir)
  plan = lora_plan(pipeline, config)
  # Class images are made once per class folder (ensure_class_images finds them for the next subject).
  classes = _class_examples(config, concepts, pipeline, mesh) if config.prior.enabled else []
  splits = ['instance'] + (['class'] if config.prior.enabled else [])
  folders = {
    name: prepare_dataset(
      os.path.join(workdir, 'data', name),
      {
        'instance': [e for e in instance if e['concept'] == i],
        'class': [e for e in classes if e['concept'] == i],
      },
      config.resolution,
    )
    for i, name in enumerate(names)
  }

  # The step's structure: any subject's adapted copy (same graph for all; values come from the state).
  pipe = _adapted(pipeline, plan, config.seed, names[0])
  graphdefs, templates, flat = split_models(pipe)
  groups = param_groups(config)
  template, frozen, labels = split_trainable(flat, groups)
  tx = make_optimizer(config, groups, labels)
  step_fn = StepFn.from_config(config, pipeline, graphdefs, templates, tx)
  multihost.log(step_fn.describe())
  try:
    shardings = subject_step_shardings(pipe, template, frozen, tx, mesh, config, size, examples)
  except ValueError as e:
    raise config_lib.RunConfigError(str(e)) from None
  frozen = jax.device_put(frozen, shardings[1])
  jstep = jit_subject_step(step_fn, shardings, mesh)
  ema = config.train.ema_decay > 0

  outputs, losses, samples = {}, {}, {}
  by_name = {c['name']: c for c in concepts}
  writer = _Writer(workdir, config) if multihost.is_primary() else None
  scorer = ValidationMetrics(config, concepts, mesh) if config.validation.metrics else None  # not `metrics`: the step's
  lr = lr_schedule(config, next(iter(groups.values()))[1])
  preempt = multihost.Preemption()
  try:
    for group in subject_groups(names, size):
      states = []
      for n in group:
        adapters = adapter_params(_adapted(pipeline, plan, config.seed, n))
        states.append(subject_state({k: adapters[k] for k in template}, tx, config.seed, n, ema))
      state = jax.device_put(stack(padded(states, size)), shardings[0])
      iterators, latents, contexts = {}, {}, {}
      for n in group:
        its = _subject_iterators(config, folders[n], n, pipeline.tokenize)
        iterators.update({f'{n}/{s}': it for s, it in its.items()})
        if config.train.cache_latents:
          latents[n] = _cache_latents(pipeline, folders[n], splits, config.resolution)
        if config.train.cache_text_embeddings:
          contexts[n] = _cache_text_embeddings(pipeline, folders[n], splits)
      group_dir = os.path.join(workdir, 'groups', _group_folder(group))
      mngr = _checkpointer(group_dir, config)
      members = [by_name[n] for n in group]
      try:
        state = _restore_group(mngr, state, iterators, config, len(group), size, shardings[0])
        losses.update(_group_losses(group_dir, group, int(state['step'][0])))  # the steps before a resume
        for step in range(int(state['step'][0]), config.train.num_steps):
          batches = [
            _next_batch(
              {s: iterators[f'{n}/{s}'] for s in splits},
              config.prior.enabled,
              latents.get(n),
              contexts.get(n),
            )
            for n in group
          ]
          state, metrics = jstep(state, frozen, jax.device_put(stack(padded(batches, size)), shardings[2]))
          m = unstack(jax.device_get(metrics), len(group))
          done = step + 1
          stop = preempt.reached(done)
          bad = [n for n, mi in zip(group, m) if not mi['finite']]
          if bad:
            msg = f'non-finite loss or gradient at step {done} of subject(s) {", ".join(bad)}'
            if config.train.nan_policy == 'stop':
              raise TrainingError(
                msg + f'; the run stopped. The last good checkpoint is in {mngr.directory}. Lower the learning '
                "rate, or set train.nan_policy='skip' to skip such steps (per subject)."
              )
            warnings.warn(msg + '; their step skipped')
          for n, mi in zip(group, m):
            losses.setdefault(n, []).append((done, float(mi['loss'])))
          if done % config.logging.every_steps == 0 or done == config.train.num_steps:
            multihost.log(f'step {done}: ' + ', '.join(f'{n} loss {float(mi["loss"]):.4f}' for n, mi in zip(group, m)))
            if writer:  # each subject's curve over its own steps (groups train one after another)
              per_subject = {f'{k}/{n}': mi[k] for n, mi in zip(group, m) for k in ('loss', 'grad_norm')}
              writer.scalars(done, learning_rate=lr(done // config.train.grad_accum_steps), **per_subject)
          if done % config.checkpoint.every_steps == 0 or done == config.train.num_steps or stop:
            _save(mngr, done, _real_rows(state, len(group)), iterators, config)  # the padding depends on the mesh
            if multihost.is_primary():
              atomic_write(os.path.join(group_dir, LOSSES_FILE), json.dumps({n: losses.get(n, []) for n in group}))
          if (
            config.validation.every_steps
            and done % config.validation.every_steps == 0
            and done < config.train.num_steps
          ):
            _group_samples(workdir, done, pipe, config, members, state['trainable'], mesh, writer, scorer)
          if stop:
            mngr.wait_until_finished()
            preempt.stopped(done, f'the checkpoint of subject(s) {", ".join(group)}')
            return {'step': done, 'preempted': True, 'group': group, 'losses': losses}
      finally:
        mngr.wait_until_finished()
      final = state['ema'] if ema else state['trainable']
      # Every group ends with its subjects' samples of their exported adapters.
      samples.update(
        _group_samples(workdir, config.train.num_steps, pipe, config, members, final, mesh, writer, scorer)
      )
      for n, values in zip(group, unstack(jax.device_get(final), len(group))):
        _set_params(pipe, values)
        outputs[n] = lora_paths(workdir, n, config.lora.export_kohya)
        export_adapters(pipe, plan, outputs[n])
  finally:
    preempt.restore()
    if writer:
      writer.close()
  return {
    'step': config.train.num_steps,
    'outputs': {'loras': outputs, 'samples': samples, 'skipped': os.path.join(workdir, 'loras', 'skipped.json')},
    'skipped': [s['name'] for s in skipped],
    'losses': losses,
  }


def _real_rows(state, k: int):
  """The group's own subjects' rows of a padded stacked state."""
  return jax.tree.map(lambda a: a[:k], state)


def _restore_group(mngr, state, iterators, config, k: int, size: int, sharding):
  """A group's newest checkpoint (its k subjects' rows; a checkpoint of the padded group, as written before, also
  restores), padded again to this mesh's group size: a run resumes on a mesh that pads the group otherwise."""
  try:
    restored = _restore(mngr, _real_rows(state, k), iterators, config)
  except config_lib.RunConfigError:
    restored = _real_rows(_restore(mngr, state, iterators, config), k)
  return jax.device_put(stack(padded(unstack(restored), size)), sharding)
