"""The DreamBooth training step: a pure function of (state, frozen parameters, batch), jitted
with in/out shardings over the mesh.

Trainable parameters are a flat {path: array} dict chosen by regex groups, so frozen parameters (the VAE
always, the text encoder unless trained) are arguments that are never differentiated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdream.distributed.sharding import batch_sharding, logical_axes, param_shardings, state_shardings
from jaxdream.nn.attention import describe, training_implementation
from jaxdream.nn.remat import set_training_mode
from jaxdream.runtime.compiler import compiler_options
from jaxdream.schedulers import NoiseSchedule
from jaxdream.training.params import unflatten


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


def dreambooth_loss(
  pred, target, timesteps, schedule: NoiseSchedule, *, num_instance: int, prior_weight: float, snr_gamma: float
):
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


class TrainStep:
  """A jitted training step over a state pytree ({step, trainable, opt_state, rng, bad_steps[, ema]}): the
  gradient of `loss(trainable, frozen, batch, key) -> (loss, aux)`, the optimizer `tx` and the EMA of the
  weights. Subclasses (frozen dataclasses) hold what `loss` needs, `tx` and `ema_decay`."""

  tx: optax.GradientTransformation
  ema_decay: float

  def loss(self, trainable, frozen, batch, key):
    raise NotImplementedError

  def update(self, grads, params, opt_state, grad_norm=None):
    """The optimizer step: (new parameters, new optimizer state). `grad_norm` (of `grads`, when known)
    reaches the gradient clipping (training.params.clip_by_global_norm), except under gradient
    accumulation, whose clipping sees the accumulated gradients instead."""
    given = grad_norm is not None and not isinstance(opt_state, optax.MultiStepsState)
    extra = {'grad_norm': grad_norm} if given else {}
    updates, opt_state = self.tx.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), opt_state

  def __call__(self, state, frozen, batch):
    key = step_key(state)
    (loss, aux), grads = jax.value_and_grad(self.loss, has_aux=True)(state['trainable'], frozen, batch, key)
    grad_norm = optax.global_norm(grads)
    # A non-finite loss or gradient never reaches the weights: the step is dropped in the graph, and
    # the host stops the run (nan_policy='stop') or carries on (nan_policy='skip'). Dropped by a
    # conditional, not a select per leaf: where(ok, new, old) needs the old and the new state at once, so
    # XLA kept a second copy of it (docs/performance.md); the conditional updates the donated state in place.
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    trainable, opt_state = jax.lax.cond(
      ok,
      self.update,
      lambda grads, params, opt_state, grad_norm: (params, opt_state),
      grads,
      state['trainable'],
      state['opt_state'],
      grad_norm,
    )
    new = dict(
      state,
      step=state['step'] + 1,
      trainable=trainable,
      opt_state=opt_state,
      bad_steps=state['bad_steps'] + (~ok),
    )
    if self.ema_decay:
      # diffusers' EMAModel: one EMA step per optimizer update; the first copies the weights (decay 0),
      # the n-th decays by n / (9 + n), capped at ema_decay.
      applied, n = _optimizer_updates(opt_state, new['step'] - new['bad_steps'])
      n = n.astype(jnp.float32)
      d = jnp.where(n > 1, jnp.minimum(self.ema_decay, n / (9 + n)), 0.0)
      new['ema'] = jax.tree.map(
        lambda e, p: jnp.where(ok & applied, d * e + (1 - d) * p, e), state['ema'], new['trainable']
      )
    return new, dict(aux, loss=loss, grad_norm=grad_norm, finite=ok)


def step_key(state):
  """The random key of the step about to run: the run's key folded with the step number (a resumed run
  draws the same numbers)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit caches on it
class StepFn(TrainStep):
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
  encode_prompt: Callable  # the pipeline's: token ids -> (context, extra UNet inputs)
  # Set on the step's own copy of the models only (nn.remat.set_training_mode): sampling is untouched.
  attention: str | None = None  # None: as the models were built
  remat: str = 'none'

  @classmethod
  def from_config(cls, config, pipeline, graphdefs, templates, tx) -> StepFn:
    """The run's step: `config.train.batch_size` instance examples first, then as many class examples."""
    t = config.train
    return cls(
      graphdefs=graphdefs,
      templates=templates,
      schedule=NoiseSchedule.from_config(pipeline.scheduler_config),
      tx=tx,
      num_instance=t.batch_size,
      prior_weight=config.prior.loss_weight if config.prior.enabled else 0.0,
      snr_gamma=t.snr_gamma,
      offset_noise=t.offset_noise,
      ema_decay=t.ema_decay,
      encode_prompt=pipeline.encode_prompt,
      attention=training_implementation(config.attention),
      remat=t.remat,
    )

  def describe(self) -> str:
    """The run log's line on how the step computes."""
    attention = describe(self.attention) if self.attention else 'attention as the models were built'
    return f'train step: {attention}; remat {self.remat!r}'

  def draws(self, key, latent_shape):
    """The step's random numbers: posterior sample noise, diffusion noise, timesteps."""
    k_latent, k_noise, k_time, k_offset = jax.random.split(key, 4)
    b = latent_shape[0]
    noise = jax.random.normal(k_noise, latent_shape)
    if self.offset_noise:  # per-channel offsets teach the model to change overall brightness
      noise = noise + self.offset_noise * jax.random.normal(k_offset, (b, 1, 1, latent_shape[-1]))
    return {
      'latent_noise': jax.random.normal(k_latent, latent_shape),
      'noise': noise,
      'timesteps': jax.random.randint(k_time, (b,), 0, self.schedule.num_train_timesteps),
    }

  def loss(self, trainable, frozen, batch, key):
    params = unflatten({**trainable, **frozen}, self.templates)
    models = {
      m: set_training_mode(nnx.merge(graphdef, params[m]), remat=self.remat, attention=self.attention)
      for m, graphdef in self.graphdefs.items()
    }
    if 'latent_mean' in batch:  # cached posterior
      mean, std = batch['latent_mean'], batch['latent_std']
    else:
      mean, std = models['vae'].encode_latents(batch['pixels'])
    r = self.draws(key, mean.shape)
    latents = jax.lax.stop_gradient(mean + std * r['latent_noise'])
    noise, t = r['noise'], r['timesteps']
    noisy = self.schedule.add_noise(latents, noise, t)
    if 'context' in batch:  # cached prompt embeddings
      context, extra = batch['context'], batch.get('extra', {})
    else:
      context, extra = self.encode_prompt(models, batch['input_ids'])
    extra = {**extra, **batch.get('micro_conditioning', {})}  # SDXL's time ids
    pred = models['unet'](noisy, t, context, **extra)
    target = self.schedule.target(latents, noise, t)
    loss, (inst, prior) = dreambooth_loss(
      pred,
      target,
      t,
      self.schedule,
      num_instance=self.num_instance,
      prior_weight=self.prior_weight,
      snr_gamma=self.snr_gamma,
    )
    return loss, {'instance_loss': inst, 'prior_loss': prior}


def _optimizer_updates(opt_state, good_steps):
  """(whether this step updated the weights, optimizer updates so far): under gradient accumulation
  (optax.MultiSteps) only every k-th micro-step does."""
  if isinstance(opt_state, optax.MultiStepsState):
    return opt_state.mini_step == 0, opt_state.gradient_step
  return jnp.bool_(True), good_steps


def init_state(trainable: dict, tx, seed: int, ema: bool) -> dict:
  state = {
    'step': jnp.int32(0),
    'trainable': trainable,
    'opt_state': tx.init(trainable),
    'rng': jax.random.key_data(jax.random.key(seed)),
    'bad_steps': jnp.int32(0),
  }
  if ema:
    state['ema'] = jax.tree.map(jnp.copy, trainable)
  return state


def _state_maker(tx, config):
  return lambda trainable: init_state(trainable, tx, config.seed, config.train.ema_decay > 0)


def step_shardings(pipeline, trainable, frozen, tx, mesh, config):
  """Shardings of (state, frozen parameters, batch). `trainable`/`frozen` may be abstract
  (ShapeDtypeStruct): memory planning compiles the step without any weights."""
  axes = {}
  for m, model in pipeline.components.items():
    axes.update(logical_axes(model, m + '/'))
  rules, min_size = tuple(tuple(r) for r in config.mesh.rules), config.mesh.fsdp_min_size
  trainable_sh = param_shardings(trainable, axes, mesh, rules, min_size)
  state_sh = state_shardings(jax.eval_shape(_state_maker(tx, config), trainable), trainable_sh, mesh)
  return state_sh, param_shardings(frozen, axes, mesh, rules, min_size), batch_sharding(mesh)


def jit_step(step_fn, shardings, mesh):
  """The step under jax.jit with in/out shardings; the old state's buffers are donated. Compiled for memory
  (runtime.compiler: XLA:CPU's memory-optimized scheduler)."""
  state_sh, frozen_sh, batch_sh = shardings
  return jax.jit(
    step_fn,
    in_shardings=(state_sh, frozen_sh, batch_sh),
    out_shardings=(state_sh, NamedSharding(mesh, P())),
    donate_argnums=(0,),
    compiler_options=compiler_options(low_memory=True, backend=mesh.devices.flat[0].platform),
  )


def _place(step_fn, pipeline, trainable, frozen, tx, mesh, config):
  """Shard parameters, optimizer state and batches over the mesh; the jitted, donating step."""
  shardings = step_shardings(pipeline, trainable, frozen, tx, mesh, config)
  state_sh, frozen_sh, batch_sh = shardings
  trainable_sh = {k: state_sh['trainable'][k] for k in trainable}
  state = jax.jit(_state_maker(tx, config), out_shardings=state_sh)(jax.device_put(trainable, trainable_sh))
  return state, jax.device_put(frozen, frozen_sh), jit_step(step_fn, shardings, mesh), batch_sh
