"""The optimizer choices (train.optimizer, train.optimizer_state_dtype): the state they keep, and the
steps they take."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import rel_err
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from optax.tree_utils import tree_get_all_with_path

from jaxdream.distributed.mesh import make_mesh
from jaxdream.distributed.sharding import state_shardings
from jaxdream.training.config import RunConfigError, base_config, run_defining, validate
from jaxdream.training.params import make_optimizer, param_groups, split_trainable
from jaxdream.training.step import init_state

# A matrix big enough for adafactor to factor (both dims >= 128), a small one, a bias; the VAE's is frozen.
SHAPES = {
  'unet/proj/kernel': (256, 160),
  'unet/proj/bias': (160,),
  'text_encoder/q_proj/kernel': (32, 48),
  'vae/conv/kernel': (3, 3, 4, 8),
}


def _setup(**train):
  config = base_config()
  config.train.train_text_encoder = True
  config.train.update(train)
  rng = np.random.default_rng(0)
  flat = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}
  trainable, frozen, labels = split_trainable(flat, param_groups(config))
  return config, trainable, make_optimizer(config, param_groups(config), labels)


def _moments(state, name):
  """{parameter path: moment} of every group's AdamW state (each holds its own group's parameters, the
  others' masked out)."""
  out = {}
  for _, moments in tree_get_all_with_path(state, name):
    out.update({k: m for k, m in moments.items() if not isinstance(m, optax.MaskedNode)})
  return out


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_adamw_state_dtypes_follow_the_config_and_frozen_parameters_get_none(dtype):
  config, trainable, tx = _setup(optimizer_state_dtype=dtype)
  state = tx.init(trainable)
  mu, nu = _moments(state, 'mu'), _moments(state, 'nu')
  assert set(mu) == set(nu) == set(trainable) == {k for k in SHAPES if not k.startswith('vae/')}
  for path, p in trainable.items():
    assert p.dtype == jnp.float32  # parameters stay float32
    assert mu[path].shape == nu[path].shape == p.shape
    assert mu[path].dtype == jnp.dtype(dtype)
    assert nu[path].dtype == jnp.float32  # see training.params.group_optimizer
  assert not [x for x in jax.tree.leaves(state) if x.shape == SHAPES['vae/conv/kernel']]


def test_adafactor_steps_are_transformers_adafactor_with_decoupled_weight_decay_and_its_state_is_factored():
  import torch
  from transformers.optimization import Adafactor

  config, trainable, tx = _setup(
    optimizer='adafactor', max_grad_norm=0.0, learning_rate=1e-3, text_encoder_learning_rate=1e-3, weight_decay=0.1
  )
  state = tx.init(trainable)
  # What the config means: diffusers' Adafactor(scale_parameter=False, relative_step=False), whose weight decay
  # is lr * wd * p per step (optax's own weight_decay_rate takes wd * p). Two steps, on the matrix both factor.
  path = 'unet/proj/kernel'
  ref = torch.nn.Parameter(torch.tensor(np.asarray(trainable[path])))
  opt = Adafactor([ref], lr=1e-3, scale_parameter=False, relative_step=False, weight_decay=0.1)
  params = trainable
  for _ in range(2):
    ref.grad = torch.tensor(np.asarray(jnp.cos(3 * params[path])))
    opt.step()
    updates, state = jax.jit(tx.update)(jax.tree.map(lambda p: jnp.cos(3 * p), params), state, params)
    params = optax.apply_updates(params, updates)
  # The changes (~3e-3 of weights ~1) are differences of float32 weights: 1e-4 is their rounding, not more.
  assert rel_err(params[path] - trainable[path], ref.detach().numpy() - np.asarray(trainable[path])) <= 1e-4
  # A parameter without gradient decays by lr * wd, as under AdamW.
  zero, state0 = jax.tree.map(jnp.zeros_like, trainable), tx.init(trainable)
  decayed = optax.apply_updates(trainable, jax.jit(tx.update)(zero, state0, trainable)[0])
  np.testing.assert_allclose(decayed[path], trainable[path] * (1 - 1e-3 * 0.1), rtol=1e-6)
  # The big matrix keeps one second moment per row and per column, nothing of its size.
  sizes = [x.size for x in jax.tree.leaves(state)]
  assert 256 in sizes and 160 in sizes and 256 * 160 not in sizes
  assert not tree_get_all_with_path(state, 'mu')


def test_optimizer_typos_and_bfloat16_adafactor_are_config_errors_and_defaults_keep_old_checkpoints():
  config = base_config()
  config.train.optimizer, config.train.optimizer_state_dtype = 'adam', 'bf16'
  with pytest.raises(RunConfigError) as e:
    validate(config)
  assert "train.optimizer='adam': choose one of ('adamw', 'adafactor')" in str(e.value)
  assert "train.optimizer_state_dtype='bf16': choose one of ('float32', 'bfloat16')" in str(e.value)
  config.train.optimizer, config.train.optimizer_state_dtype = 'adafactor', 'bfloat16'
  with pytest.raises(RunConfigError, match='adafactor has none'):
    validate(config)
  # A changed optimizer changes the checkpointed state: resuming with it is refused; at the defaults the
  # keys are left out, so checkpoints from before they existed still resume.
  assert run_defining(config)['train.optimizer'] == 'adafactor'
  assert 'train.optimizer' not in run_defining(base_config())
  assert 'train.optimizer_state_dtype' not in run_defining(base_config())


def test_adafactor_state_is_placed_on_an_fsdp_mesh():
  """Factored moments (one value per row or column) are not shaped like their parameter: they replicate,
  while full-size state follows the parameter's sharding."""
  config, trainable, tx = _setup(optimizer='adafactor')
  mesh = make_mesh(1, -1, 1)
  sh = {k: NamedSharding(mesh, P('fsdp', None) if k == 'unet/proj/kernel' else P()) for k in trainable}
  make = lambda tr: init_state(tr, tx, 0, False)
  state_sh = state_shardings(jax.eval_shape(make, trainable), sh, mesh)
  state = jax.jit(make, out_shardings=state_sh)(trainable)
  assert state['trainable']['unet/proj/kernel'].sharding.spec == P('fsdp', None)
  rows = [x for p, x in tree_get_all_with_path(state, 'v_row') if 'unet' in jax.tree_util.keystr(p)]
  assert any(x['unet/proj/kernel'].ndim == 1 and x['unet/proj/kernel'].sharding.spec == P() for x in rows)
