"""`attention_impl` reaches every attention call of every model: UNet, CLIP text encoder, VAE, Kosmos-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import UNET_TWO_LEVEL, VAE, rel_err
from flax import nnx

from jaxdream.io.weights import abstract_model, init_model
from jaxdream.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from jaxdream.models.kosmos2 import Kosmos2ForConditionalGeneration

CLIP = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
KOSMOS2 = dict(
  text_config=dict(vocab_size=200, embed_dim=32, layers=2, ffn_dim=64, attention_heads=4, max_position_embeddings=64),
  vision_config=dict(
    hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
  ),  # fmt: skip
  latent_query_num=8,
)


def _kosmos2_inputs():
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 200, (1, 12)), jnp.int32)
  image_mask = jnp.zeros((1, 12), jnp.int32).at[:, 2:10].set(1)
  return jnp.zeros((1, 32, 32, 3)), ids, image_mask


# model name: (class, config, inputs, how to run it on them)
MODELS = {
  'unet': (
    UNet2DConditionModel,
    UNET_TWO_LEVEL,
    lambda: (jnp.ones((1, 8, 8, 4)), jnp.array([10]), jnp.ones((1, 7, 32))),
    lambda m, *a: m(*a),
  ),
  'clip': (CLIPTextModel, CLIP, lambda: (jnp.arange(1, 8)[None],), lambda m, *a: m(*a)),
  'vae': (AutoencoderKL, VAE, lambda: (jnp.ones((1, 16, 16, 3)) * 0.5,), lambda m, x: m(x)),
  'kosmos2': (Kosmos2ForConditionalGeneration, KOSMOS2, _kosmos2_inputs, lambda m, *a: m(*a)),
}
# Which attention calls each model makes: unmasked (spatial, vision, resampler) and/or masked (causal text).
CALLS = {'unet': {False}, 'clip': {True}, 'vae': {False}, 'kosmos2': {False, True}}
MODULES_THAT_CALL_ATTENTION = ('jaxdream.nn.blocks', 'jaxdream.models.clip_text', 'jaxdream.models.kosmos2')


def _trace(name, impl):
  """Run the model shape-only (nothing compiled, no weights made) with attention_impl=impl."""
  cls, config, inputs, run = MODELS[name]
  graphdef, state = nnx.split(abstract_model(lambda rngs: cls(config, attention_impl=impl, rngs=rngs)))
  return jax.eval_shape(lambda state: run(nnx.merge(graphdef, state), *inputs()), state)


@pytest.mark.parametrize('name', sorted(MODELS))
@pytest.mark.parametrize('impl', ['xla', 'tiled', 'cudnn'])
def test_every_attention_call_gets_the_models_setting(name, impl, monkeypatch):
  calls = []

  def spy(q, k, v, *, mask=None, implementation='auto', **kw):
    calls.append((mask is not None, implementation))
    return jnp.zeros(q.shape[:-1] + v.shape[-1:], q.dtype)

  for module in MODULES_THAT_CALL_ATTENTION:
    monkeypatch.setattr(f'{module}.dot_product_attention', spy)
  _trace(name, impl)
  assert {masked for masked, _ in calls} == CALLS[name]
  for masked, got in calls:
    # 'tiled' takes no mask: a masked call of a model built with it runs on XLA (nn.attention.kernel_for).
    assert got == ('xla' if masked and impl == 'tiled' else impl)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_cudnn_on_cpu_is_the_same_clear_error_for_every_model(name):
  with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU; JAX runs on 'cpu'"):
    _trace(name, 'cudnn')


@pytest.mark.parametrize('name', sorted(MODELS))
def test_unknown_setting_fails_when_the_model_is_built(name):
  cls, config, _, _ = MODELS[name]
  with pytest.raises(ValueError, match='flash3'):
    abstract_model(lambda rngs: cls(config, attention_impl='flash3', rngs=rngs))


@pytest.mark.parametrize('name', sorted(MODELS))
def test_tiled_and_xla_models_compute_the_same_outputs(name):
  cls, config, inputs, run = MODELS[name]
  xla = init_model(lambda rngs: cls(config, attention_impl='xla', rngs=rngs))
  graphdef, state = nnx.split(xla)
  tiled_graphdef, _ = nnx.split(abstract_model(lambda rngs: cls(config, attention_impl='tiled', rngs=rngs)))
  a, b = (
    jax.tree.leaves(jax.jit(lambda state, *x, g=g: run(nnx.merge(g, state), *x))(state, *inputs()))
    for g in (graphdef, tiled_graphdef)
  )
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert rel_err(y, x) <= 1e-5
