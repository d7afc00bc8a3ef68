"""The training step's memory: dropping a non-finite step keeps no second copy of the state; on CPU the step
is scheduled for memory; its gradient clipping reuses the norm the step has already computed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import UNET_ONE_LEVEL
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdream.diffusion.tiny_model import SD15_SCHEDULER
from jaxdream.models.unet_2d_condition import UNet2DConditionModel
from jaxdream.runtime.compiler import compiler_options
from jaxdream.schedulers import NoiseSchedule
from jaxdream.training.config import base_config
from jaxdream.training.params import clip_by_global_norm, flatten, make_optimizer, param_groups, split_trainable
from jaxdream.training.step import StepFn, init_state, jit_step

# UNET_SD1 cut to one level, fed cached latents and text embeddings: the step's structure (gradient,
# clipped AdamW, the drop) at a small fraction of the tiny pipeline's compile time.
UNET = UNET_ONE_LEVEL


def _step():
  """(step function, state, frozen parameters, batch) of a UNet-only run config."""
  graphdef, params = nnx.split(UNet2DConditionModel(UNET, rngs=nnx.Rngs(0)))
  template = params.to_pure_dict()
  config = base_config()
  groups = param_groups(config)
  trainable, frozen, labels = split_trainable(flatten(template, 'unet/'), groups)
  tx = make_optimizer(config, groups, labels)
  fn = StepFn(
    graphdefs={'unet': graphdef},
    templates={'unet': template},
    schedule=NoiseSchedule.from_config(SD15_SCHEDULER),
    tx=tx,
    num_instance=1,
    prior_weight=1.0,
    snr_gamma=0.0,
    offset_noise=0.0,
    ema_decay=0.0,
    encode_prompt=None,  # the batch carries the text embeddings
  )
  rng = np.random.default_rng(0)
  latent = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  batch = {
    'latent_mean': latent,
    'latent_std': jnp.full_like(latent, 0.1),
    'context': jnp.asarray(rng.standard_normal((2, 7, UNET['cross_attention_dim'])), jnp.float32),
  }
  return fn, init_state(trainable, tx, 0, False), frozen, batch


def test_a_non_finite_step_is_dropped_without_a_second_copy_of_the_state():
  """The step drops a non-finite step in the graph (weights and optimizer moments untouched) at no memory
  cost: its temporaries are those of the same step without the drop (XLA's memory analysis of the donating
  step, as a run compiles it). A select per leaf, where(finite, new, old), kept a second copy of the state."""
  fn, state, frozen, batch = _step()

  def undropped(state, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    (loss, _), grads = jax.value_and_grad(fn.loss, has_aux=True)(state['trainable'], frozen, batch, key)
    trainable, opt_state = fn.update(grads, state['trainable'], state['opt_state'])
    return dict(state, step=state['step'] + 1, trainable=trainable, opt_state=opt_state), loss

  compiled = lambda f: jax.jit(f, donate_argnums=0).lower(state, frozen, batch).compile()
  step = compiled(fn)
  temp = {'dropping': step.memory_analysis().temp_size_in_bytes}
  temp['undropped'] = compiled(undropped).memory_analysis().temp_size_in_bytes
  state_bytes = sum(x.nbytes for x in jax.tree.leaves((state['trainable'], state['opt_state'])))
  assert temp['dropping'] <= temp['undropped'] + 0.02 * state_bytes, (temp, state_bytes)

  # ...and it does drop the step: a NaN batch leaves weights and moments as they were, a good one moves them.
  before = jax.device_get((state['trainable'], state['opt_state']))
  bad = dict(batch, latent_mean=batch['latent_mean'].at[0, 0, 0, 0].set(jnp.nan))
  state, metrics = step(state, frozen, bad)
  assert not bool(metrics['finite']) and int(state['step']) == 1 and int(state['bad_steps']) == 1
  after = jax.device_get((state['trainable'], state['opt_state']))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  state, metrics = step(state, frozen, batch)
  assert bool(metrics['finite']) and int(state['step']) == 2 and int(state['bad_steps']) == 1
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(state['trainable']))]
  assert sum(moved) >= 0.9 * len(moved)


def test_the_jitted_step_keeps_one_of_several_independent_temporaries_alive_on_cpu():
  """jit_step compiles with XLA:CPU's memory-optimized scheduler: eight independent 1 MiB temporaries,
  each reduced into the result, are computed one after another (1-2 MiB alive), where XLA:CPU's default
  schedule computes them all first (8 MiB). On SD 1.5's step this took 9.34 GiB of temporaries to 5.79
  (docs/performance.md)."""
  assert compiler_options(low_memory=True, backend='gpu') is None

  def step(x, frozen, batch):
    parts = [jnp.sum(jnp.sin(x * (i + 1)) @ x) for i in range(8)]
    return x + sum(parts), {}

  x = jnp.ones((512, 512))
  mesh = jax.make_mesh((1,), ('data',), devices=jax.devices()[:1])
  whole = NamedSharding(mesh, P())
  jitted = jit_step(step, (whole, whole, whole), mesh)
  temp = {
    'jit_step': jitted.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes,
    'default': jax.jit(step).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes,
  }
  assert temp['jit_step'] <= 3 * x.nbytes < 6 * x.nbytes <= temp['default'], temp


def test_clipping_given_the_norm_equals_optax_clip_by_global_norm():
  """training.params.clip_by_global_norm, with the norm computed by its caller or by itself, equals
  optax.clip_by_global_norm (below and above the threshold) and keeps the same (empty) state, so that
  checkpoints written before still restore."""
  rng = np.random.default_rng(0)
  grads = {'a': jnp.asarray(rng.standard_normal((3, 4)), jnp.float32), 'b': jnp.asarray(rng.standard_normal(5))}
  norm = optax.global_norm(grads)
  for max_norm in (0.5 * float(norm), 2.0 * float(norm)):
    ours, theirs = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
    want, _ = theirs.update(grads, theirs.init(grads))
    for got in (ours.update(grads, ours.init(grads))[0], ours.update(grads, ours.init(grads), grad_norm=norm)[0]):
      for k in grads:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
  # The step hands its norm over (and not under gradient accumulation, whose clip sees the sum).
  clipped = optax.chain(clip_by_global_norm(1e-3), optax.sgd(1.0))
  wrong_norm = jnp.float32(1e6)  # a caller's norm is used as given: this one shrinks the step to ~0
  updates, _ = clipped.update(grads, clipped.init(grads), grads, grad_norm=wrong_norm)
  assert float(optax.global_norm(updates)) < 1e-6
