"""A pipeline is its named components plus `encode_prompt`: a fake second text encoder, added as a component
with its own prompt encoding, is sampled from and trained (or kept frozen) by the unchanged sampler and step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdream import load_pipeline
from jaxdream.diffusion.conditioning import encode_prompt
from jaxdream.diffusion.pipeline import Pipeline
from jaxdream.diffusion.sampling import txt2img
from jaxdream.distributed.mesh import make_mesh
from jaxdream.schedulers import NoiseSchedule
from jaxdream.training.config import base_config
from jaxdream.training.params import make_optimizer, split_models, split_trainable
from jaxdream.training.step import StepFn, init_state, jit_step, step_shardings

PROMPTS = ['a photo of sks dog', 'a red fox in the snow']


class FakeTextEncoder2(nnx.Module):
  """A second text encoder in miniature: token embeddings (of ids folded into a small vocabulary),
  mean-pooled into one more context token."""

  def __init__(self, dim: int, seed: int):
    self.embed = nnx.Embed(97, dim, rngs=nnx.Rngs(seed))

  def __call__(self, ids):
    return self.embed(ids % 97).mean(axis=1, keepdims=True) * 10.0


def two_encoder_prompt(models, ids):
  """SD's context with the second encoder's token appended (the UNet attends over both)."""
  context, extra = encode_prompt(models, ids)
  return jnp.concatenate([context, models['text_encoder_2'](ids['text_encoder_2'])], axis=1), extra


def with_second_encoder(base: Pipeline, seed: int) -> Pipeline:
  return Pipeline(
    components={**base.components, 'text_encoder_2': FakeTextEncoder2(base.unet.config['cross_attention_dim'], seed)},
    tokenizers={**base.tokenizers, 'text_encoder_2': base.tokenizer},
    scheduler_config=base.scheduler_config,
    encode_prompt=two_encoder_prompt,
  )


@pytest.fixture(scope='module')
def base(small_sd_folder):
  return load_pipeline(small_sd_folder[1])


def test_components_are_named_attributes_and_tokenize_gives_ids_per_text_encoder(base):
  assert list(base.components) and set(base.components) == {'unet', 'text_encoder', 'vae'}
  assert base.unet is base.components['unet'] and base.vae is base.components['vae']
  two = with_second_encoder(base, 0)
  ids = two.tokenize(PROMPTS)
  assert set(ids) == {'text_encoder', 'text_encoder_2'} and ids['text_encoder'].shape == (2, 77)
  with pytest.raises(AttributeError, match='text_encoder_3'):
    two.text_encoder_3  # noqa: B018


def test_txt2img_encodes_prompts_with_a_second_text_encoder_component(base):
  kw = dict(num_inference_steps=2, scheduler='ddim', seed=[1, 2], height=32, width=32)
  a = txt2img(with_second_encoder(base, 0), PROMPTS, **kw)
  again = txt2img(with_second_encoder(base, 0), PROMPTS, **kw)
  other_weights = txt2img(with_second_encoder(base, 1), PROMPTS, **kw)
  assert a.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(a, again)
  assert not np.array_equal(a, other_weights)  # the second encoder's weights reach the images


def _step_parts(pipe, groups):
  c = base_config()
  c.train.weight_decay = 0.0  # so that a parameter changes only where its gradient is not zero
  graphdefs, templates, flat = split_models(pipe)
  trainable, frozen, labels = split_trainable(flat, groups)
  tx = make_optimizer(c, groups, labels)
  fn = StepFn(
    graphdefs=graphdefs,
    templates=templates,
    schedule=NoiseSchedule.from_config(pipe.scheduler_config),
    tx=tx,
    num_instance=1,
    prior_weight=1.0,
    snr_gamma=0.0,
    offset_noise=0.0,
    ema_decay=0.0,
    encode_prompt=pipe.encode_prompt,
  )
  mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
  step = jit_step(fn, step_shardings(pipe, trainable, frozen, tx, mesh, c), mesh)
  return fn, step, trainable, frozen


def _fresh_state(fn, trainable):
  return init_state(jax.tree.map(jnp.copy, trainable), fn.tx, 0, False)  # the step donates its state


def _batch(pipe):
  rng = np.random.default_rng(0)
  return {
    'pixels': jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32),
    'input_ids': jax.tree.map(jnp.asarray, pipe.tokenize(['a photo of sks dog', 'a photo of dog'])),
  }


@pytest.mark.slow
def test_training_step_trains_or_freezes_a_second_text_encoder_by_its_parameter_paths(base):
  pipe = with_second_encoder(base, 0)
  batch = _batch(pipe)
  te2 = 'text_encoder_2/embed/embedding'

  # Trained: its parameters are trainable and change (no weight decay: only a gradient through
  # encode_prompt can move them).
  groups = {'unet': (r'^unet/', 1e-3), 'text_encoder_2': (r'^text_encoder_2/', 1e-2)}
  fn, step, trainable, frozen = _step_parts(pipe, groups)
  state = _fresh_state(fn, trainable)
  assert te2 in trainable and te2 not in frozen
  before = np.asarray(trainable[te2]).copy()
  state, metrics = step(state, frozen, batch)
  state, metrics = step(state, frozen, batch)
  assert bool(metrics['finite']) and int(state['step']) == 2
  assert np.abs(np.asarray(state['trainable'][te2]) - before).max() > 0

  # Frozen (the default groups train the UNet only): an argument of the step, yet it is used.
  fn, step, trainable, frozen = _step_parts(pipe, {'unet': (r'^unet/', 1e-3)})
  assert te2 in frozen and not any(k.startswith('text_encoder_2/') for k in trainable)
  _, m_a = step(_fresh_state(fn, trainable), frozen, batch)
  _, m_b = step(_fresh_state(fn, trainable), dict(frozen, **{te2: frozen[te2] * 3.0}), batch)
  assert bool(m_a['finite']) and float(m_a['loss']) != float(m_b['loss'])
