"""Parameter trees of a pipeline: flat paths, trainable groups by regex, the optimizer."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx


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
    return {k: build(v, f'{prefix}{k}/') if isinstance(v, dict) else flat[f'{prefix}{k}'] for k, v in node.items()}

  return build(template, '')


def split_models(pipeline) -> tuple[dict, dict, dict]:
  """(graph definitions, pure-dict parameter templates, flat parameters) of the pipeline's components,
  by component name; flat paths start with it ('unet/down_blocks/...')."""
  graphdefs, templates, flat = {}, {}, {}
  for m, model in pipeline.components.items():
    graphdefs[m], st = nnx.split(model)
    templates[m] = st.to_pure_dict()
    flat.update(flatten(templates[m], m + '/'))
  return graphdefs, templates, flat


def param_groups(config) -> dict[str, tuple[str, float]]:
  """Trainable groups: name -> (regex over flat paths, learning rate). First match wins."""
  t = config.train
  if config.lora.rank > 0:  # only the adapters: the base gets no gradient and no optimizer state
    groups = {'unet': (r'^unet/.*/lora_[ab]$', t.learning_rate)}
    if config.lora.text_encoder:  # every text encoder's (SDXL's text_encoder_2 too)
      groups['text_encoder'] = (r'^text_encoder(_2)?/.*/lora_[ab]$', t.text_encoder_learning_rate)
    return groups
  if len(t.param_groups):
    return {name: (g.pattern, g.learning_rate) for name, g in t.param_groups.items()}
  groups = {'unet': (r'^unet/', t.learning_rate)}
  if t.train_text_encoder:  # every text encoder (SDXL's text_encoder_2 too)
    groups['text_encoder'] = (r'^text_encoder(_2)?/', t.text_encoder_learning_rate)
  return groups


def split_trainable(flat: dict, groups: dict) -> tuple[dict, dict, dict]:
  """(trainable, frozen, labels): the VAE is frozen whatever the groups say."""
  trainable, frozen, labels = {}, {}, {}
  for path, value in flat.items():
    group = (
      None
      if path.startswith('vae/')
      else next((name for name, (pattern, _) in groups.items() if re.search(pattern, path)), None)
    )
    if group is None:
      frozen[path] = value
    else:
      trainable[path], labels[path] = value, group
  return trainable, frozen, labels


def lr_schedule(config, lr: float) -> optax.Schedule:
  """The learning-rate schedule of a group whose peak rate is `lr` (also what the log reports), a function
  of the optimizer update count."""
  t = config.train
  if t.lr_schedule == 'constant':
    return optax.constant_schedule(lr)
  warmup = optax.linear_schedule(0.0, lr, max(t.warmup_steps, 1))
  if t.lr_schedule == 'warmup_constant':
    rest = optax.constant_schedule(lr)
  else:
    # num_steps counts micro-batches; the schedule counts optimizer updates (one per grad_accum_steps).
    rest = optax.cosine_decay_schedule(lr, max(t.num_steps // t.grad_accum_steps - t.warmup_steps, 1))
  return optax.join_schedules([warmup, rest], [t.warmup_steps]) if t.warmup_steps else rest


def group_optimizer(config, lr: float) -> optax.GradientTransformation:
  """The optimizer of one trainable group (train.optimizer, train.optimizer_state_dtype).

  AdamW keeps two moments per parameter (8 bytes in float32); with optimizer_state_dtype='bfloat16' the
  first moment is bfloat16 (6 bytes). The second stays float32: bfloat16's 8 significant bits cannot hold
  its per-step decay of 1 - adam_b2 = 0.1% (rounding would undo it, and the moment would stop following
  smaller gradients). Adafactor keeps factored second moments, one value per row and per column of each
  matrix of at least 128 x 128 (a few bytes per thousand parameters) and no first moment; its learning
  rate is absolute as AdamW's (not scaled by each parameter's size: diffusers' Adafactor(scale_parameter=
  False, relative_step=False)), and weight decay is decoupled as AdamW's."""
  t = config.train
  schedule = lr_schedule(config, lr)
  if t.optimizer == 'adafactor':
    # optax.adafactor's own weight_decay_rate is added after the learning rate (each step takes wd * p off, not
    # lr * wd * p): the decay goes in before the learning rate here, as transformers' Adafactor and AdamW do it.
    return optax.chain(
      optax.adafactor(None, multiply_by_parameter_scale=False),  # -(clipped, factored-RMS-scaled gradient)
      optax.add_decayed_weights(-t.weight_decay),
      optax.scale_by_learning_rate(schedule, flip_sign=False),
    )
  mu_dtype = jnp.bfloat16 if t.optimizer_state_dtype == 'bfloat16' else None
  return optax.adamw(
    schedule, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, mu_dtype=mu_dtype, weight_decay=t.weight_decay
  )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """optax.clip_by_global_norm (same state; the same numbers to rounding) that takes the norm as the extra argument
  `grad_norm` when its caller already has it: the training step computes it for its finite check, outside
  the conditional update. A second reduction over every gradient inside the conditional made XLA:CPU keep a
  relaid-out copy of each convolution kernel's gradient alive at once until the update (2 GiB of SD 1.5's
  step; docs/performance.md); with the norm given, each gradient is used by its own update only. The gradients are
  multiplied by one scalar factor, as torch's clip_grad_norm_ scales them: XLA fuses that product into each moment's
  update (a division per element it kept as a fusion of its own, one per trained array)."""

  def update(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = optax.global_norm(updates) if grad_norm is None else grad_norm
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(config, groups: dict, labels: dict) -> optax.GradientTransformation:
  """One optimizer per group over the trainable parameters only: frozen ones get no state."""
  t = config.train
  tx = optax.multi_transform({name: group_optimizer(config, lr) for name, (_, lr) in groups.items()}, labels)
  if t.max_grad_norm > 0:  # one global norm over all trainable parameters, as diffusers clips
    tx = optax.chain(clip_by_global_norm(t.max_grad_norm), tx)
  if t.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=t.grad_accum_steps)
  return tx


def _set_params(pipeline, flat: dict):
  """Write flat parameters (trained or EMA ones, any subset) into the pipeline's components, in place."""
  for m, model in pipeline.components.items():
    sub = {k[len(m) + 1 :]: v for k, v in flat.items() if k.startswith(m + '/')}
    if sub:
      state = nnx.state(model)
      current = flatten(state.to_pure_dict())
      current.update(sub)
      nnx.replace_by_pure_dict(state, unflatten(current, state.to_pure_dict()))
      nnx.update(model, state)
