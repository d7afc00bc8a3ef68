"""DreamBooth fine-tuning: one explicit training loop over plain pytrees.

    jaxdream train --config configs/quickstart.py --workdir DIR [--config.train.num_steps=...]

Running the same command again on the same workdir resumes from the latest checkpoint. Everything is
checked (config, model folder, every image) before anything is compiled.

The step is a pure function of (state, frozen parameters, batch): trainable parameters are a flat
{path: array} dict chosen by regex groups, so frozen parameters (the VAE always, the text encoder
unless trained) are arguments that are never differentiated: no gradient is computed for them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdream import config as config_lib
from jaxdream import multihost
from jaxdream.data import DataError, data_source, instance_prompt, make_iterator, prepare_dataset, scan_images
from jaxdream.mesh import make_mesh
from jaxdream.schedulers import NoiseSchedule
from jaxdream.sharding import batch_sharding, logical_axes, param_shardings, process_rows, state_shardings

MODELS = ('unet', 'text_encoder', 'vae')


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- parameters

def flatten(tree: dict, prefix: str = '') -> dict[str, jax.Array]:
  """Nested pure dict -> {'unet/down_blocks/0/.../kernel': array}."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, path + '/'))
    else:
      out[path] = v
  return out


def unflatten(flat: dict[str, jax.Array], template: dict) -> dict:
  """Inverse of `flatten`, keyed like `template` (whose list indices are ints)."""
  def build(node, prefix):
    return {k: build(v, f'{prefix}{k}/') if isinstance(v, dict) else flat[f'{prefix}{k}']
            for k, v in node.items()}
  return build(template, '')


def split_models(pipeline) -> tuple[dict, dict, dict]:
  """(graph definitions, pure-dict parameter templates, flat parameters) of the pipeline's models."""
  graphdefs, templates, flat = {}, {}, {}
  for m in MODELS:
    graphdefs[m], st = nnx.split(getattr(pipeline, m))
    templates[m] = st.to_pure_dict()
    flat.update(flatten(templates[m], m + '/'))
  return graphdefs, templates, flat


def param_groups(config) -> dict[str, tuple[str, float]]:
  """Trainable groups: name -> (regex over flat paths, learning rate). First match wins."""
  t = config.train
  if len(t.param_groups):
    return {name: (g.pattern, g.learning_rate) for name, g in t.param_groups.items()}
  groups = {'unet': (r'^unet/', t.learning_rate)}
  if t.train_text_encoder:
    groups['text_encoder'] = (r'^text_encoder/', t.text_encoder_learning_rate)
  return groups


def split_trainable(flat: dict, groups: dict) -> tuple[dict, dict, dict]:
  """(trainable, frozen, labels): the VAE is frozen whatever the groups say."""
  trainable, frozen, labels = {}, {}, {}
  for path, value in flat.items():
    group = None if path.startswith('vae/') else next(
        (name for name, (pattern, _) in groups.items() if re.search(pattern, path)), None)
    if group is None:
      frozen[path] = value
    else:
      trainable[path], labels[path] = value, group
  return trainable, frozen, labels


def lr_schedule(config, lr: float) -> optax.Schedule:
  """The learning-rate schedule of a group whose peak rate is `lr` (also what the log reports)."""
  t = config.train
  if t.lr_schedule == 'constant':
    return optax.constant_schedule(lr)
  warmup = optax.linear_schedule(0.0, lr, max(t.warmup_steps, 1))
  if t.lr_schedule == 'warmup_constant':
    rest = optax.constant_schedule(lr)
  else:
    rest = optax.cosine_decay_schedule(lr, max(t.num_steps - t.warmup_steps, 1))
  return optax.join_schedules([warmup, rest], [t.warmup_steps]) if t.warmup_steps else rest


def make_optimizer(config, groups: dict, labels: dict) -> optax.GradientTransformation:
  t = config.train
  adamw = {name: optax.adamw(lr_schedule(config, lr), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                             weight_decay=t.weight_decay) for name, (_, lr) in groups.items()}
  tx = optax.multi_transform(adamw, labels)
  if t.max_grad_norm > 0:  # one global norm over all trainable parameters, as diffusers clips
    tx = optax.chain(optax.clip_by_global_norm(t.max_grad_norm), tx)
  if t.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
  return tx


# ----------------------------------------------------------------------------- the step

def dreambooth_loss(pred, target, timesteps, schedule: NoiseSchedule, *, num_instance: int,
                    prior_weight: float, snr_gamma: float):
  """MSE on the instance examples + prior_weight * MSE on the class examples (those after the first
  `num_instance`), as diffusers' train_dreambooth.py; min-SNR-gamma weights the instance term."""
  err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3))
  inst = err[:num_instance]
  if snr_gamma > 0:
    snr = schedule.snr(timesteps[:num_instance])
    w = jnp.minimum(snr, snr_gamma) / (snr + 1 if schedule.prediction_type == 'v_prediction' else snr)
    inst = inst * w
  instance_loss = jnp.mean(inst)
  prior_loss = jnp.mean(err[num_instance:]) if err.shape[0] > num_instance else jnp.float32(0)
  return instance_loss + prior_weight * prior_loss, (instance_loss, prior_loss)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit caches on it
class StepFn:
  """What the jitted step closes over: graph definitions, the noise schedule and static settings."""
  graphdefs: dict
  templates: dict
  schedule: NoiseSchedule
  tx: optax.GradientTransformation
  num_instance: int
  prior_weight: float
  snr_gamma: float
  offset_noise: float
  ema_decay: float
  scaling_factor: float
  shift_factor: float

  def draws(self, key, latent_shape):
    """The step's random numbers: posterior sample noise, diffusion noise, timesteps."""
    k_latent, k_noise, k_time, k_offset = jax.random.split(key, 4)
    b = latent_shape[0]
    noise = jax.random.normal(k_noise, latent_shape)
    if self.offset_noise:  # per-channel offsets teach the model to change overall brightness
      noise = noise + self.offset_noise * jax.random.normal(k_offset, (b, 1, 1, latent_shape[-1]))
    return {'latent_noise': jax.random.normal(k_latent, latent_shape), 'noise': noise,
            'timesteps': jax.random.randint(k_time, (b,), 0, self.schedule.num_train_timesteps)}

  def loss(self, trainable, frozen, batch, key):
    params = unflatten({**trainable, **frozen}, self.templates)
    models = {m: nnx.merge(self.graphdefs[m], params[m]) for m in MODELS}
    if 'latent_mean' in batch:  # cached posterior
      mean, std = batch['latent_mean'], batch['latent_std']
    else:
      dist = models['vae'].encode(batch['pixels'])
      mean, std = (dist.mean - self.shift_factor) * self.scaling_factor, dist.std * self.scaling_factor
    r = self.draws(key, mean.shape)
    latents = jax.lax.stop_gradient(mean + std * r['latent_noise'])
    noise, t = r['noise'], r['timesteps']
    noisy = self.schedule.add_noise(latents, noise, t)
    context = batch['context'] if 'context' in batch else models['text_encoder'](batch['input_ids'])
    pred = models['unet'](noisy, t, context)
    target = self.schedule.target(latents, noise, t)
    loss, (inst, prior) = dreambooth_loss(pred, target, t, self.schedule, num_instance=self.num_instance,
                                          prior_weight=self.prior_weight, snr_gamma=self.snr_gamma)
    return loss, {'instance_loss': inst, 'prior_loss': prior}

  def __call__(self, state, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state['trainable'], frozen, batch, key)
    updates, opt_state = self.tx.update(grads, state['opt_state'], state['trainable'])
    trainable = optax.apply_updates(state['trainable'], updates)
    grad_norm = optax.global_norm(grads)
    # A non-finite loss or gradient never reaches the weights: the step is dropped in the graph, and
    # the host stops the run (nan_policy='stop') or carries on (nan_policy='skip').
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new = dict(state, step=state['step'] + 1, trainable=keep(trainable, state['trainable']),
               opt_state=keep(opt_state, state['opt_state']), bad_steps=state['bad_steps'] + (~ok))
    if self.ema_decay:
      # diffusers' EMAModel decay: warms up as (1 + n) / (10 + n), capped at ema_decay.
      n = state['step'].astype(jnp.float32)
      d = jnp.minimum(self.ema_decay, (1 + n) / (10 + n))
      new['ema'] = keep(jax.tree.map(lambda e, p: d * e + (1 - d) * p, state['ema'], new['trainable']),
                        state['ema'])
    return new, dict(aux, loss=loss, grad_norm=grad_norm, finite=ok)


def init_state(trainable: dict, tx, seed: int, ema: bool) -> dict:
  state = {'step': jnp.int32(0), 'trainable': trainable, 'opt_state': tx.init(trainable),
           'rng': jax.random.key_data(jax.random.key(seed)), 'bad_steps': jnp.int32(0)}
  if ema:
    state['ema'] = jax.tree.map(jnp.copy, trainable)
  return state


# ----------------------------------------------------------------------------- the run

def _log(msg):
  if multihost.is_primary():
    print(msg, flush=True)


def _examples(config, concepts, pipeline, mesh) -> dict[str, list[dict]]:
  """Every training example, checked, with class images generated where missing."""
  from jaxdream.class_images import ensure_class_images
  d = config.data
  examples = {'instance': [], 'class': []}
  problems = []
  for i, c in enumerate(concepts):
    try:
      paths = scan_images(c['instance_dir'], min_size=d.min_image_size, on_bad=d.on_bad_image)
    except DataError as e:
      problems.append(str(e))
      continue
    if len(paths) < d.min_instance_images:
      problems.append(f'{c["instance_dir"]}: {len(paths)} usable image(s); at least '
                      f'data.min_instance_images={d.min_instance_images} are needed')
    examples['instance'] += [{'file': p, 'prompt': instance_prompt(p, c, d.caption_ext, d.caption_mode),
                              'concept': i} for p in paths]
  if problems:
    raise DataError('\n'.join(problems))
  if config.prior.enabled:
    for i, c in enumerate(concepts):
      if os.path.isdir(c['class_dir']):  # user-supplied class images are checked like instance images
        scan_images(c['class_dir'], min_size=d.min_image_size, on_bad=d.on_bad_image)
      paths = ensure_class_images(
          pipeline, c, seed=config.seed, steps=config.prior.sample_steps,
          guidance_scale=config.prior.guidance_scale, scheduler=config.prior.scheduler or None,
          batch_size=config.prior.batch_size, resolution=config.resolution, mesh=mesh, log=_log)
      examples['class'] += [{'file': p, 'prompt': c['class_prompt'], 'concept': i} for p in paths]
  return examples


def _checkpointer(workdir, config):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep,
                                         enable_async_checkpointing=config.checkpoint.async_save)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options,
                               item_names=('state', 'data', 'config'))


def _save(mngr, step, state, iterators, config):
  import orbax.checkpoint as ocp
  data = {k: it.get_state() for k, it in iterators.items()}
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                                          config=ocp.args.JsonSave(config_lib.run_defining(config))))


def _restore(mngr, state, iterators, config):
  """Restore the latest checkpoint into `state`'s structure; refuse a changed run unless overridden."""
  import orbax.checkpoint as ocp
  step = mngr.latest_step()
  if step is None:
    return state
  meta = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  diffs = config_lib.config_differences(meta['config'], config_lib.run_defining(config))
  if diffs and not config.resume_override:
    raise config_lib.RunConfigError(
        f'the workdir holds a checkpoint (step {step}) of a different run:\n  - ' + '\n  - '.join(diffs)
        + '\nUse another --workdir, or pass --config.resume_override=True to continue anyway.')
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                        data=ocp.args.JsonRestore()))
  for k, it in iterators.items():
    it.set_state(restored['data'][k])
  _log(f'resumed from the checkpoint at step {step}')
  return restored['state']


def _load_base(config, workdir):
  from jaxdream.pipeline import load_pipeline
  model = config.model
  if model == config_lib.BUILTIN_TINY:
    from jaxdream.tiny_model import create_tiny_pipeline
    model = multihost.primary_first(lambda: create_tiny_pipeline(os.path.join(workdir, 'base_model')),
                                    'tiny-base-model')
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.compute_dtype]
  return load_pipeline(model, dtype=dtype, attention_impl=config.attention, allow_pickle=config.allow_pickle)


def _state_maker(tx, config):
  return lambda trainable: init_state(trainable, tx, config.seed, config.train.ema_decay > 0)


def step_shardings(pipeline, trainable, frozen, tx, mesh, config):
  """Shardings of (state, frozen parameters, batch). `trainable`/`frozen` may be abstract
  (ShapeDtypeStruct): memory planning compiles the step without any weights."""
  axes = {}
  for m in MODELS:
    axes.update(logical_axes(getattr(pipeline, m), m + '/'))
  rules, min_size = tuple(tuple(r) for r in config.mesh.rules), config.mesh.fsdp_min_size
  trainable_sh = param_shardings(trainable, axes, mesh, rules, min_size)
  state_sh = state_shardings(jax.eval_shape(_state_maker(tx, config), trainable), trainable_sh, mesh)
  return state_sh, param_shardings(frozen, axes, mesh, rules, min_size), batch_sharding(mesh)


def jit_step(step_fn, shardings, mesh):
  """The step under jax.jit with in/out shardings; the old state's buffers are donated."""
  state_sh, frozen_sh, batch_sh = shardings
  return jax.jit(step_fn, in_shardings=(state_sh, frozen_sh, batch_sh),
                 out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))


def _place(step_fn, pipeline, trainable, frozen, tx, mesh, config):
  """Shard parameters, optimizer state and batches over the mesh; the jitted, donating step."""
  shardings = step_shardings(pipeline, trainable, frozen, tx, mesh, config)
  state_sh, frozen_sh, batch_sh = shardings
  trainable_sh = {k: state_sh['trainable'][k] for k in trainable}
  state = jax.jit(_state_maker(tx, config), out_shardings=state_sh)(jax.device_put(trainable, trainable_sh))
  return state, jax.device_put(frozen, frozen_sh), jit_step(step_fn, shardings, mesh), batch_sh


def _set_params(pipeline, flat: dict):
  """Write flat parameters (trained or EMA ones, any subset) into the pipeline's models, in place."""
  for m in MODELS:
    sub = {k[len(m) + 1:]: v for k, v in flat.items() if k.startswith(m + '/')}
    if sub:
      state = nnx.state(getattr(pipeline, m))
      current = flatten(state.to_pure_dict())
      current.update(sub)
      nnx.replace_by_pure_dict(state, unflatten(current, state.to_pure_dict()))
      nnx.update(getattr(pipeline, m), state)


def train(config, workdir: str) -> dict:
  """Run (or resume) a DreamBooth fine-tuning; returns a summary. Writes `workdir/model`."""
  from jaxdream.pipeline import save_pipeline
  concepts = config_lib.validate(config)
  for c in concepts:  # class images may live in the run folder
    c['class_dir'] = c['class_dir'].replace('{workdir}', workdir)
  os.makedirs(workdir, exist_ok=True)
  multihost.check_shared_folder(workdir)
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  b = config.train.batch_size
  n_dev = mesh.shape['data'] * mesh.shape['fsdp']
  total = b * (2 if config.prior.enabled else 1)
  if total % n_dev:
    raise config_lib.RunConfigError(f'a step\'s {total} examples (train.batch_size={b}, prior examples on '
                                    f'top) do not split over the {n_dev} devices of the data axes')
  pipeline = _load_base(config, workdir)
  if config.resolution % pipeline.vae_scale_factor:
    raise config_lib.RunConfigError(f'resolution {config.resolution} is not a multiple of the VAE factor '
                                    f'{pipeline.vae_scale_factor}')
  examples = _examples(config, concepts, pipeline, mesh)
  data_folder = multihost.primary_first(
      lambda: prepare_dataset(os.path.join(workdir, 'data'), examples, config.resolution), 'dataset')
  batch_sh = batch_sharding(mesh)
  rows = process_rows(batch_sh, total)
  splits = ['instance'] + (['class'] if config.prior.enabled else [])
  iterators = {s: make_iterator(data_source(data_folder, s), batch_size=b, seed=config.seed + 17 * k,
                                resolution=config.resolution, center_crop=config.data.center_crop,
                                flip_p=config.data.flip_p, tokenize=pipeline.tokenize,
                                rows=slice(max(rows.start - k * b, 0), max(rows.stop - k * b, 0)))
               for k, s in enumerate(splits)}
  latents = (_cache_latents(pipeline, data_folder, splits, config.resolution)
             if config.train.cache_latents else None)
  contexts = (_cache_text_embeddings(pipeline, data_folder, splits)
              if config.train.cache_text_embeddings else None)

  graphdefs, templates, flat = split_models(pipeline)
  groups = param_groups(config)
  trainable, frozen, labels = split_trainable(flat, groups)
  if not trainable:
    raise config_lib.RunConfigError(f'no parameter matches the trainable groups {groups}')
  tx = make_optimizer(config, groups, labels)
  schedule = NoiseSchedule.from_config(pipeline.scheduler_config)
  step_fn = StepFn(graphdefs=graphdefs, templates=templates, schedule=schedule, tx=tx, num_instance=b,
                   prior_weight=config.prior.loss_weight if config.prior.enabled else 0.0,
                   snr_gamma=config.train.snr_gamma, offset_noise=config.train.offset_noise,
                   ema_decay=config.train.ema_decay, scaling_factor=pipeline.vae.scaling_factor,
                   shift_factor=pipeline.vae.shift_factor)
  state, frozen, jstep, _ = _place(step_fn, pipeline, trainable, frozen, tx, mesh, config)
  mngr = _checkpointer(workdir, config)
  state = _restore(mngr, state, iterators, config)
  start = int(state['step'])

  writer = _Writer(workdir, config) if multihost.is_primary() else None
  preempt = multihost.Preemption()
  losses = _load_losses(workdir)
  t_last, s_last = time.perf_counter(), start
  try:
    from tqdm import tqdm
    bar = tqdm(total=config.train.num_steps, initial=start, desc='train', disable=not multihost.is_primary())
    for step in range(start, config.train.num_steps):
      batch = _next_batch(iterators, config.prior.enabled, latents, contexts)
      batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(
          batch_sh, x, (total,) + x.shape[1:]), batch)
      if step == start:  # compiled ahead, so that no host waits in a collective while another compiles
        jstep = jstep.lower(state, frozen, batch).compile()
        multihost.barrier('train step compiled')
      state, metrics = jstep(state, frozen, batch)
      m = multihost.to_host(metrics)
      done = step + 1
      stop = preempt.reached(done)
      if not m['finite']:
        msg = f'non-finite loss or gradient at step {done} (loss={float(m["loss"])})'
        if config.train.nan_policy == 'stop':
          raise TrainingError(msg + '; the step was not applied and the run stopped. The last good '
                              f'checkpoint is in {workdir}/checkpoints. Lower the learning rate, or set '
                              "train.nan_policy='skip' to skip such steps.")
        warnings.warn(msg + '; step skipped')
      losses.append((done, float(m['loss'])))
      bar.set_postfix(loss=f'{float(m["loss"]):.4f}')
      bar.update(1)
      if writer and (done % config.logging.every_steps == 0 or done == config.train.num_steps):
        now = time.perf_counter()
        writer.scalars(done, loss=m['loss'], instance_loss=m['instance_loss'], prior_loss=m['prior_loss'],
                       grad_norm=m['grad_norm'], learning_rate=lr_schedule(config, next(iter(groups.values()))[1])(done),
                       steps_per_second=(done - s_last) / max(now - t_last, 1e-9))
        t_last, s_last = now, done
      if done % config.checkpoint.every_steps == 0 or done == config.train.num_steps or stop:
        _save(mngr, done, state, iterators, config)
        if multihost.is_primary():
          _save_losses(workdir, losses)
      if config.validation.every_steps and done % config.validation.every_steps == 0:
        _set_params(pipeline, multihost.to_host(state['trainable']))  # every process: a collective
        images = _validation_images(pipeline, config, concepts, mesh)
        if writer:
          writer.images(done, images)
      if stop:
        mngr.wait_until_finished()
        _log(f'\nSIGTERM: saved the checkpoint at step {done}; run the same command to resume.')
        return {'step': done, 'preempted': True}
    bar.close()
  finally:
    preempt.restore()
    mngr.wait_until_finished()
  summary = {'step': int(state['step']), 'bad_steps': int(state['bad_steps']), 'losses': losses}
  final = state['ema'] if config.train.ema_decay > 0 else state['trainable']
  _set_params(pipeline, multihost.to_host(final))  # every process: gathering is a collective
  if multihost.is_primary():
    save_pipeline(pipeline, os.path.join(workdir, 'model'))
  summary['outputs'] = _final_outputs(pipeline, config, concepts, workdir, losses, mesh, writer)
  if writer:
    writer.close()
  multihost.barrier('exported')
  return summary


def _next_batch(iterators, prior: bool, latents: dict | None = None, contexts: dict | None = None) -> dict:
  """The step's examples: instance ones first, then class ones. Cached latents replace the images by
  their stored posterior (mean, std), cached text embeddings replace the token ids; both are looked up
  by example index."""
  parts = []
  for split in ('instance', 'class') if prior else ('instance',):
    ex = next(iterators[split])
    part = {'pixels': ex['pixels']}
    if latents is not None:
      part = {'latent_mean': latents[split][0][ex['index']], 'latent_std': latents[split][1][ex['index']]}
    part.update({'context': contexts[split][ex['index']]} if contexts is not None else
                {'input_ids': ex['input_ids']})
    parts.append(part)
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _cache_text_embeddings(pipeline, data_folder, splits, batch_size=16) -> dict:
  """Every example's prompt embedding, computed once (the text encoder is frozen)."""
  te_def, te_params = nnx.split(pipeline.text_encoder)
  encode = jax.jit(lambda params, ids: nnx.merge(te_def, params)(ids))
  out = {}
  for split in splits:
    source = data_source(data_folder, split)
    prompts = [None] * len(source)
    for i in range(len(source)):
      ex = source[i]
      p = ex['prompt']
      prompts[int(ex['index'])] = p.decode() if isinstance(p, bytes) else str(p)
    ids = pipeline.tokenize(prompts)
    out[split] = np.concatenate([np.asarray(jax.device_get(encode(te_params, ids[i:i + batch_size])))
                                 for i in range(0, len(ids), batch_size)])
  return out


def _cache_latents(pipeline, data_folder, splits, resolution, batch_size=8) -> dict:
  """Every example's scaled VAE posterior (mean, std), computed once (center crops, no flips)."""
  vae_def, vae_params = nnx.split(pipeline.vae)

  @jax.jit
  def encode(params, pixels):
    vae = nnx.merge(vae_def, params)
    dist = vae.encode(pixels)
    return ((dist.mean - vae.shift_factor) * vae.scaling_factor, dist.std * vae.scaling_factor)

  out = {}
  for split in splits:
    source = data_source(data_folder, split)
    it = make_iterator(source, batch_size=1, seed=0, resolution=resolution, center_crop=True, flip_p=0.0,
                       tokenize=lambda p: np.zeros((len(p), 1), np.int32))
    pixels, order = [], []
    for _ in range(len(source)):  # the first epoch visits every example once
      ex = next(it)
      pixels.append(ex['pixels'][0])
      order.append(int(ex['index'][0]))
    means, stds = [None] * len(order), [None] * len(order)
    for i in range(0, len(order), batch_size):
      m, s = jax.device_get(encode(vae_params, np.stack(pixels[i:i + batch_size])))
      for j, idx in enumerate(order[i:i + batch_size]):
        means[idx], stds[idx] = m[j], s[j]
    out[split] = (np.stack(means), np.stack(stds))
  return out


def _load_losses(workdir) -> list:
  path = os.path.join(workdir, 'losses.json')
  if os.path.exists(path):
    with open(path) as f:
      return [tuple(x) for x in json.load(f)]
  return []


def _save_losses(workdir, losses):
  path = os.path.join(workdir, 'losses.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(losses, f)
  os.replace(path + '.tmp', path)


def _validation_prompts(config, concepts) -> list[str]:
  if config.validation.prompts:
    return list(config.validation.prompts)
  prompts = []
  for c in concepts[:4]:
    prompts += [c['instance_prompt']] + ([c['class_prompt']] if c['class_prompt'] else [])
  return prompts


def _validation_images(pipeline, config, concepts, mesh) -> dict[str, np.ndarray]:
  from jaxdream.sampling import txt2img
  v = config.validation
  out = {}
  for prompt in _validation_prompts(config, concepts):
    out[prompt] = txt2img(pipeline, [prompt] * v.num_images, negative_prompts=[v.negative_prompt] * v.num_images,
                          num_inference_steps=v.steps, guidance_scale=v.guidance_scale,
                          scheduler=v.scheduler or None, seed=v.seed, height=config.resolution,
                          width=config.resolution, mesh=mesh)
  return out


def _final_outputs(pipeline, config, concepts, workdir, losses, mesh, writer) -> dict:
  """Validation images of every prompt side by side, and the loss curve, as PNGs in workdir/samples.
  Every process samples (the batch is split over the mesh); the primary one writes."""
  from jaxdream.images import make_grid, save_png
  folder = os.path.join(workdir, 'samples')
  images = _validation_images(pipeline, config, concepts, mesh)
  out = {'model': os.path.join(workdir, 'model'), 'samples': {}, 'loss_curve': os.path.join(folder, 'loss_curve.png')}
  if not multihost.is_primary():
    return out
  os.makedirs(folder, exist_ok=True)
  paths = out['samples']
  for k, (prompt, ims) in enumerate(images.items()):
    path = os.path.join(folder, f'{k:02d}_' + re.sub(r'[^A-Za-z0-9]+', '_', prompt).strip('_')[:60] + '.png')
    save_png(path, make_grid(list(ims), 1, len(ims)), prompt)
    paths[prompt] = path
  if writer:
    writer.images(int(losses[-1][0]) if losses else 0, images)
  save_png(out['loss_curve'], loss_curve_image(losses), 'training loss')
  return out


def loss_curve_image(losses, size=(640, 360)) -> np.ndarray:
  """A plain loss-vs-step plot (raw and smoothed), drawn with PIL."""
  from PIL import Image, ImageDraw
  w, h = size
  im = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(im)
  if len(losses) >= 2:
    steps = np.array([s for s, _ in losses], np.float64)
    vals = np.array([v for _, v in losses], np.float64)
    vals = np.where(np.isfinite(vals), vals, np.nan)
    smooth = np.convolve(np.nan_to_num(vals), np.ones(min(20, len(vals))) / min(20, len(vals)), 'valid')
    lo, hi = np.nanmin(vals), np.nanmax(vals)
    pad = 40
    xy = lambda s, v: (pad + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 2 * pad),
                       h - pad - (v - lo) / max(hi - lo, 1e-12) * (h - 2 * pad))
    draw.line([xy(s, v) for s, v in zip(steps, vals) if np.isfinite(v)], fill=(170, 190, 230), width=1)
    draw.line([xy(s, v) for s, v in zip(steps[len(steps) - len(smooth):], smooth)], fill=(20, 60, 160), width=2)
    draw.text((pad, 8), f'loss  (min {lo:.4f}, max {hi:.4f})', fill='black')
    draw.text((pad, h - pad + 8), f'step {int(steps[0])}', fill='black')
    draw.text((w - pad - 60, h - pad + 8), f'step {int(steps[-1])}', fill='black')
  return np.asarray(im)


class _Writer:
  """TensorBoard event files (tensorboardX, no TensorFlow) and, if asked for, Weights & Biases."""

  def __init__(self, workdir, config):
    self.tb = self.wandb = None
    if config.logging.tensorboard:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    if config.logging.wandb:
      try:
        import wandb
        self.wandb = wandb.init(project=config.logging.wandb_project, config=config.to_dict(), resume='allow')
      except ImportError:
        warnings.warn('logging.wandb=True but wandb is not installed; logging to TensorBoard only')

  def scalars(self, step, **values):
    values = {k: float(v) for k, v in values.items()}
    if self.tb:
      for k, v in values.items():
        self.tb.add_scalar(f'train/{k}', v, step)
    if self.wandb:
      self.wandb.log(values, step=step)

  def images(self, step, images: dict):
    from jaxdream.images import make_grid
    for k, (prompt, ims) in enumerate(images.items()):
      grid = make_grid(list(ims), 1, len(ims))
      if self.tb:
        self.tb.add_image(f'validation/{k:02d} {prompt}', grid, step, dataformats='HWC')
      if self.wandb:
        import wandb
        self.wandb.log({f'validation/{prompt}': wandb.Image(grid)}, step=step)

  def close(self):
    if self.tb:
      self.tb.close()
    if self.wandb:
      self.wandb.finish()


def main(argv=None):
  """`jaxdream train --config FILE --workdir DIR [--config.key=value ...]`."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'a configs/*.py file with get_config()', flag_values=fv,
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'run folder: checkpoints, logs, samples, the exported model',
                      flag_values=fv)
  argv = ['jaxdream train'] + list(sys.argv[2:] if argv is None else argv)
  try:
    fv(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f'jaxdream train: error: {e}', file=sys.stderr)
    return 2
  if fv.config is None or fv.workdir is None:
    print('jaxdream train: error: --config and --workdir are required', file=sys.stderr)
    return 2
  multihost.initialize()
  try:
    summary = train(fv.config, fv.workdir)
  except (config_lib.RunConfigError, DataError, TrainingError, ValueError, OSError) as e:
    print(f'jaxdream train: error: {e}', file=sys.stderr)
    return 2
  if summary.get('preempted'):
    return 0
  out = summary.get('outputs', {})
  if out:
    _log(f'\nDone: {summary["step"]} steps. Fine-tuned model (diffusers format): {out["model"]}\n'
         f'Samples: {os.path.dirname(out["loss_curve"])}/  (loss curve: {out["loss_curve"]})\n'
         f'Sample more with: jaxdream sample --model {out["model"]} --prompt "..." --out DIR')
  return 0
