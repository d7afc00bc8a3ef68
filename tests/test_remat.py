"""Training-time remat policies (nn.remat, train.remat) change memory, not gradients."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import UNET_ONE_LEVEL, rel_err
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from jaxdream.models.clip_text import CLIPAttention, CLIPEncoderLayer, CLIPTextModel
from jaxdream.models.unet_2d_condition import BasicTransformerBlock, UNet2DConditionModel
from jaxdream.nn.blocks import Attention, ResnetBlock2D
from jaxdream.nn.remat import REMAT, set_training_mode
from jaxdream.training.config import RunConfigError, base_config, validate

# UNET_SD1 cut to one level: compiling four gradients of the three-level one costs too much CI time.
UNET = UNET_ONE_LEVEL
CLIP = dict(
  vocab_size=100,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=1,
  num_attention_heads=4,
  max_position_embeddings=16,
  eos_token_id=99,
)


def _count(model, types):
  return sum(isinstance(node, types) for _, node in nnx.iter_graph(model))


def test_every_remat_policy_gives_the_gradients_without_remat():
  unet = UNet2DConditionModel(UNET, rngs=nnx.Rngs(0))
  text = CLIPTextModel(CLIP, rngs=nnx.Rngs(1))
  (gu, su), (gt, st) = nnx.split(unet), nnx.split(text)
  rng = np.random.default_rng(0)
  sample = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 99, (2, 16)))

  def loss(states, remat):
    u = set_training_mode(nnx.merge(gu, states[0]), remat=remat)
    t = set_training_mode(nnx.merge(gt, states[1]), remat=remat)
    return jnp.mean(jnp.square(u(sample, jnp.array([10, 500]), t(ids))))

  # Eager, not jitted: each operation compiles once and every policy reuses it (four jitted gradient
  # programs cost about four times the CI time).
  grads = {r: jax.grad(loss)((su, st), r) for r in REMAT}
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  for remat in REMAT[1:]:
    assert rel_err(flat(grads[remat]), flat(grads['none'])) <= 1e-6, remat

  # ...and each policy does checkpoint what it says: every attention call, or every block.
  attentions = _count(unet, Attention) + _count(text, CLIPAttention)
  blocks = _count(unet, (BasicTransformerBlock, ResnetBlock2D)) + _count(text, CLIPEncoderLayer)
  assert attentions == 4 * 2 + 1 and blocks == 4 + 5 + 1
  for remat, expected in (('none', 0), ('attention', attentions), ('blocks', blocks), ('full', blocks)):
    jaxpr = str(jax.make_jaxpr(lambda states: loss(states, remat))((su, st)))
    assert len(re.findall(r'\b(?:remat2|checkpoint)\[', jaxpr)) == expected, remat


def test_a_misspelt_remat_policy_is_a_config_error_naming_the_choices():
  config = base_config()
  config.train.remat = 'block'
  with pytest.raises(RunConfigError, match=r"train.remat='block': choose one of \('none', 'attention', 'blocks'"):
    validate(config)
  with pytest.raises(ValueError, match='unknown remat policy'):
    set_training_mode(Attention(8, heads=1, dim_head=8, rngs=nnx.Rngs(0)), remat='block')


def test_blocks_policy_keeps_weight_products_but_no_attention_scores(capsys):
  """'blocks' keeps the projections' outputs by name; the flash kernel's own per-tile products, stacked
  over its loops, would be whole score matrices (300 x 300 here, past 'flash''s hand-off to XLA)."""
  block = BasicTransformerBlock(
    32, 2, 16, 32, upcast=False, attention_impl='flash', dtype=jnp.float32, rngs=nnx.Rngs(0)
  )
  graphdef, state = nnx.split(set_training_mode(block, remat='blocks'))
  x, context = jnp.ones((1, 300, 32)), jnp.ones((1, 77, 32))
  print_saved_residuals(lambda s: jnp.sum(nnx.merge(graphdef, s)(x, context)), state)
  # One line per residual, e.g. 'f32[1,300,32] output of ...'.
  shapes = re.findall(r'^\w+\[([\d,]*)\]', capsys.readouterr().out, re.M)
  sizes = [math.prod(int(n) for n in shape.split(',') if n) for shape in shapes]
  assert max(sizes) < 300 * 300
  assert sizes.count(300 * 32) >= 6  # q, k, v, to_out of self-attention, q and to_out of cross-attention


class _Chain(nnx.Module):
  def __init__(self, n: int, channels: int):
    self.blocks = nnx.List(
      [ResnetBlock2D(channels, channels, temb_channels=None, groups=8, eps=1e-5, rngs=nnx.Rngs(i)) for i in range(n)]
    )

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


def test_remat_keeps_less_for_the_backward_pass_in_the_compiled_gradient():
  """XLA's memory analysis of a chain of four ResNet blocks' gradient: 'full' keeps each block's input and
  recomputes one block at a time, 'blocks' also keeps convolution outputs; both hold far less than 'none'.
  With jax.checkpoint alone XLA:CPU ran every recomputation early and both held more than 'none' (8.7 MB
  against 8.2 MB here); remat.checkpoint makes each block's recomputation wait for its incoming gradient."""
  graphdef, params = nnx.split(_Chain(4, 32))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 32)), jnp.float32)
  temp = {}
  for remat in ('none', 'blocks', 'full'):
    loss = lambda p: jnp.mean(jnp.square(set_training_mode(nnx.merge(graphdef, p), remat=remat)(x)))
    temp[remat] = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes
  assert temp['full'] <= 0.6 * temp['none'] and temp['blocks'] <= 0.7 * temp['none'], temp
