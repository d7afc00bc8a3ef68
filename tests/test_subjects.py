"""Per-subject LoRA: subjects trained together in one vmapped step (one device or a mesh, padded groups)
each end exactly as if trained alone with the plain single-subject step, and the step is the single one
batched, with no per-subject loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny_base
from flax import nnx
from PIL import Image

from jaxdream import load_pipeline
from jaxdream.distributed.mesh import make_mesh
from jaxdream.nn.adapters import LoRALinear, LoRAParam, add_lora
from jaxdream.nn.layers import Linear
from jaxdream.schedulers import NoiseSchedule
from jaxdream.training.config import base_config
from jaxdream.training.params import make_optimizer, param_groups, split_models, split_trainable
from jaxdream.training.step import StepFn
from jaxdream.training.subjects import (
  adapted_copy,
  group_size,
  jit_subject_step,
  padded,
  split_adapters,
  stack,
  subject_adapters,
  subject_batches,
  subject_groups,
  subject_key,
  subject_mesh_axes,
  subject_seed,
  subject_state,
  subject_step,
  subject_step_shardings,
  unstack,
)

SEED = 7
MAX_GRAD_NORM = 1e-3  # far below the adapters' gradient norms: clipping acts on every step
# Different images, prompts and classes; 'cat' gets a NaN batch on the last step (the guard drops it).
SUBJECTS = {
  'dog': ('a photo of sks dog', 'a photo of dog'),
  'cat': ('a photo of zwx cat', 'a photo of cat'),
  'toy': ('a photo of qlo toy', 'a photo of toy'),
}
STEPS = 4
NAN_SUBJECT, NAN_STEP = 'cat', 3
EXAMPLES = 2  # per subject and step: 1 instance + 1 class example


def _adapt(components, key):
  """LoRA on the UNet's attention, LoCon on its ResNet conv1, LoRA on the text encoder's q/v."""
  k_unet, k_te = jax.random.split(key)
  add_lora(
    components['unet'],
    targets=('to_q', 'to_k', 'to_v', 'to_out.0'),
    rank=4,
    alpha=8,
    conv_targets=('conv1',),
    conv_rank=2,
    key=k_unet,
  )
  add_lora(components['text_encoder'], targets=('q_proj', 'v_proj'), rank=2, key=k_te)


def _images(name, rng):
  """(instance, class) 64 px images: the bundled dog photo for 'dog', synthetic ones otherwise."""
  if name == 'dog':
    with Image.open('jaxdream/assets/sample_subject/dog/00.jpg') as im:
      inst = np.asarray(im.convert('RGB').resize((64, 64)), np.float32) / 127.5 - 1
  else:
    inst = rng.uniform(-1, 1, (64, 64, 3)).astype(np.float32)
  return np.stack([inst, rng.uniform(-1, 1, (64, 64, 3)).astype(np.float32)])


def _batches(pipe, name):
  rng = np.random.default_rng(subject_seed(SEED, name))
  out = []
  for i in range(STEPS):
    pixels = _images(name, rng)
    if (name, i) == (NAN_SUBJECT, NAN_STEP):
      pixels[:] = np.nan
    ids = pipe.tokenize(list(SUBJECTS[name]))
    out.append({'pixels': jnp.asarray(pixels), 'input_ids': jax.tree.map(jnp.asarray, ids)})
  return out


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  base = load_pipeline(tiny_base(str(tmp_path_factory.mktemp('tiny') / 'model')))
  c = base_config()
  c.train.learning_rate, c.train.text_encoder_learning_rate = 1e-2, 5e-3
  c.train.train_text_encoder = True
  c.train.max_grad_norm = MAX_GRAD_NORM
  c.train.ema_decay = 0.5
  c.train.lr_schedule, c.train.warmup_steps = 'warmup_constant', 1
  # The step's structure: any subject's adapted copy (all have the same graph; values come from the state).
  pipe = adapted_copy(base, _adapt, jax.random.key(0))
  graphdefs, templates, flat = split_models(pipe)
  _, frozen = split_adapters(flat)
  trainables = {n: subject_adapters(base, _adapt, SEED, n) for n in SUBJECTS}
  groups = param_groups(c)
  _, _, labels = split_trainable(trainables['dog'], groups)
  tx = make_optimizer(c, groups, labels)
  fn = StepFn(
    graphdefs=graphdefs,
    templates=templates,
    schedule=NoiseSchedule.from_config(pipe.scheduler_config),
    tx=tx,
    num_instance=1,
    prior_weight=0.7,
    snr_gamma=0.0,
    offset_noise=0.0,
    ema_decay=c.train.ema_decay,
    encode_prompt=pipe.encode_prompt,
  )
  batches = {n: _batches(pipe, n) for n in SUBJECTS}
  # Each subject alone: the plain single-subject step (one compile, reused).
  step = jax.jit(fn)
  alone = {}
  for n in SUBJECTS:
    state, history = subject_state(trainables[n], tx, SEED, n, ema=True), []
    for b in batches[n]:
      state, metrics = step(state, frozen, b)
      history.append(jax.device_get((state, metrics)))
    alone[n] = history
  return dict(
    base=base, pipe=pipe, config=c, fn=fn, tx=tx, frozen=frozen, trainables=trainables, batches=batches, alone=alone
  )


# (mesh sizes, group size): one device with the 3 subjects; 8 devices with the group padded to 4 subjects
# by a dummy, subjects split over 'data' (4) and each subject's 2 examples over 'fsdp' (2).
MESHES = {'one_device': ((1, 1, 1), 3), 'eight_devices': ((4, 2, 1), 4)}


@pytest.fixture(scope='module', params=list(MESHES))
def together(setup, request):
  """The subjects trained in one group: per step, the real subjects' (state, metrics)."""
  sizes, size = MESHES[request.param]
  s, names = setup, list(SUBJECTS)
  mesh = make_mesh(*sizes, devices=jax.devices()[: int(np.prod(sizes))])
  shardings = subject_step_shardings(
    s['pipe'], s['trainables']['dog'], s['frozen'], s['tx'], mesh, s['config'], size, EXAMPLES
  )
  states = [subject_state(s['trainables'][n], s['tx'], SEED, n, ema=True) for n in names]
  state = jax.device_put(stack(padded(states, size)), shardings[0])
  frozen = jax.device_put(s['frozen'], shardings[1])
  step = jit_subject_step(s['fn'], shardings, mesh)
  history = []
  for i in range(STEPS):
    batch = jax.device_put(stack(padded([s['batches'][n][i] for n in names], size)), shardings[2])
    state, metrics = step(state, frozen, batch)
    history.append(unstack(jax.device_get((state, metrics)), len(names)))
  leaf = jax.tree.leaves(state['trainable'])[0]
  return dict(history=history, devices=len(leaf.sharding.device_set), subject_spec=leaf.sharding.spec[0])


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.slow
def test_each_subject_trained_together_equals_it_trained_alone(setup, together):
  alone = setup['alone']
  for i in range(STEPS):
    for j, name in enumerate(SUBJECTS):
      state, metrics = together['history'][i][j]
      ref_state, ref_metrics = alone[name][i]
      assert int(state['step']) == i + 1 and int(state['bad_steps']) == int(ref_state['bad_steps'])
      np.testing.assert_array_equal(state['rng'], ref_state['rng'])
      for part in ('trainable', 'ema', 'opt_state'):
        assert rel_err(_flat(state[part]), _flat(ref_state[part])) <= 1e-5, (name, i, part)
      # The updates alone (B starts at zero, so the lora_b factors are all update), not only A's init; the
      # first step's learning rate is 0 (warmup). Losses and gradient norms agree to ~1e-7 (float32 rounding
      # of one big matmul over all subjects' rows vs one subject's), but Adam's first update is ~lr * sign(g):
      # where |g| is near eps that rounding moves it, so updates agree to 1e-5-ish (measured 8e-6), bounded
      # at 1e-4 here, as test_sharding bounds updates more loosely than weights.
      b = lambda st: _flat({k: v for k, v in st['trainable'].items() if k.endswith('lora_b')})
      assert np.any(b(ref_state)) == (i > 0)
      if i > 0:
        assert rel_err(b(state), b(ref_state)) <= 1e-4, (name, i)
      for k in ('loss', 'grad_norm'):
        if bool(ref_metrics['finite']):
          assert rel_err(metrics[k], ref_metrics[k]) <= 1e-5, (name, i, k)


@pytest.mark.slow
def test_clipping_and_the_nan_guard_act_per_subject(setup, together):
  history = together['history']
  for i in range(STEPS):
    for j, name in enumerate(SUBJECTS):
      state, metrics = history[i][j]
      nan = (name, i) == (NAN_SUBJECT, NAN_STEP)
      assert bool(metrics['finite']) is not nan
      if not nan:  # every finite step was clipped: its own norm is far above the limit
        assert float(metrics['grad_norm']) > 10 * MAX_GRAD_NORM
  j = list(SUBJECTS).index(NAN_SUBJECT)
  before, after = history[NAN_STEP - 1][j][0], history[NAN_STEP][j][0]
  assert int(after['bad_steps']) == 1
  np.testing.assert_array_equal(_flat(after['trainable']), _flat(before['trainable']))
  others = [k for k, n in enumerate(SUBJECTS) if n != NAN_SUBJECT]
  for k in others:  # the others still moved on the step where one subject's batch was NaN
    assert int(history[NAN_STEP][k][0]['bad_steps']) == 0
    assert rel_err(_flat(history[NAN_STEP][k][0]['trainable']), _flat(history[NAN_STEP - 1][k][0]['trainable'])) > 0
  # The subjects really differ (different data and init), so equality with each alone run is not trivial.
  finals = [_flat(history[-1][k][0]['trainable']) for k in range(len(SUBJECTS))]
  assert min(rel_err(finals[a], finals[b]) for a in range(3) for b in range(3) if a != b) > 1e-2


@pytest.mark.slow
def test_subject_axis_is_sharded_over_the_mesh(together):
  if together['devices'] == 1:
    assert together['subject_spec'] is None
  else:
    assert together['devices'] == 8 and together['subject_spec'] in ('data', ('data',))


def _eqns(jaxpr):
  """Every equation, also inside sub-jaxprs (jit, custom_vjp, cond branches)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _eqns(inner)


def test_adapter_matmuls_are_batched_over_subjects_and_the_base_matmul_is_one():
  layer = LoRALinear(Linear(16, 24, rngs=nnx.Rngs(0)), 4, scale=2.0, key=jax.random.key(1))
  graphdef, lora, base = nnx.split(layer, LoRAParam, ...)
  subjects, rows = 3, 5
  lora = jax.tree.map(lambda x: jnp.stack([x] * subjects), lora)
  x = jnp.ones((subjects, rows, 16))

  def loss(lora, x):
    return jnp.sum(nnx.merge(graphdef, lora, base)(x) ** 2)

  jaxpr = jax.make_jaxpr(jax.vmap(jax.grad(loss, argnums=(0, 1))))(lora, x).jaxpr
  names = [e.primitive.name for e in _eqns(jaxpr)]
  assert not {'while', 'scan'} & set(names)
  dots = [e for e in _eqns(jaxpr) if e.primitive.name == 'dot_general']
  base_dots = [e for e in dots if any(v.aval.shape == (16, 24) for v in e.invars)]
  lora_dots = [e for e in dots if e not in base_dots]
  assert len(base_dots) == 2 and lora_dots  # forward x W and the input gradient g W^T (as in a deeper net)
  for e in base_dots:  # no batch dimension: all subjects' rows in one matmul against the one W
    (_, _), (lb, rb) = e.params['dimension_numbers']
    assert lb == () and rb == ()
    act = next(v for v in e.invars if v.aval.shape != (16, 24))
    assert act.aval.shape[:2] == (subjects, rows)
  for e in lora_dots:  # x A_s, (x A_s) B_s and their gradients: batched over subjects
    (_, _), (lb, rb) = e.params['dimension_numbers']
    assert len(lb) == 1 and all(v.aval.shape[lb[0] if i == 0 else rb[0]] == subjects for i, v in enumerate(e.invars))


def test_the_subject_step_adds_no_loop_and_no_matmul(setup):
  s = setup
  state = subject_state(s['trainables']['dog'], s['tx'], SEED, 'dog', ema=True)
  batch = s['batches']['dog'][0]
  one = jax.make_jaxpr(s['fn'])(state, s['frozen'], batch).jaxpr
  many = jax.make_jaxpr(subject_step(s['fn']))(stack([state] * 3), s['frozen'], stack([batch] * 3)).jaxpr
  count = lambda jaxpr, prim: sum(e.primitive.name == prim for e in _eqns(jaxpr))
  for prim in ('while', 'scan', 'dot_general', 'conv_general_dilated'):
    assert count(many, prim) == count(one, prim), prim
  assert count(one, 'dot_general') > 0


def test_subject_randomness_depends_on_seed_and_name_only(setup):
  # Pinned: zlib.crc32 of the name, not Python's per-process salted hash(); a change would silently
  # change the data order and init of every earlier run.
  assert subject_seed(0, 'dog') == subject_seed(0, 'dog') == 2102649510
  assert len({subject_seed(0, n) for n in ('dog', 'cat', 'toy')} | {subject_seed(1, 'dog')}) == 4
  assert not np.array_equal(jax.random.key_data(subject_key(0, 'dog')), jax.random.key_data(subject_key(0, 'cat')))
  # Adapters are drawn from the subject's key alone: the same again, different for another name.
  t = setup['trainables']
  np.testing.assert_array_equal(_flat(subject_adapters(setup['base'], _adapt, SEED, 'dog')), _flat(t['dog']))
  assert rel_err(_flat(t['dog']), _flat(t['cat'])) > 0.1


def test_groups_pad_the_last_and_mesh_axes_need_divisible_sizes():
  assert subject_groups(['a', 'b', 'c', 'd', 'e'], 2) == [['a', 'b'], ['c', 'd'], ['e']]
  assert padded(['e'], 2) == ['e', 'e']
  with pytest.raises(ValueError, match='unique'):
    subject_groups(['a', 'a'], 2)
  with pytest.raises(ValueError, match='at least 1'):
    subject_groups(['a'], 0)
  mesh = make_mesh(2, 4, 1)
  assert subject_mesh_axes(64, 2, mesh) == (('data', 'fsdp'), ())
  assert subject_mesh_axes(2, 4, mesh) == (('data',), ('fsdp',))
  assert subject_mesh_axes(1, 8, mesh) == ((), ('data', 'fsdp'))
  with pytest.raises(ValueError, match="mesh axis 'fsdp'"):
    subject_mesh_axes(2, 2, mesh)
  # subjects_per_step=0 (all): padded up to what the mesh divides (30 DreamBench subjects, 8 devices: 32);
  # a set size that does not fit is refused.
  assert group_size(30, 0, 2, make_mesh(8, 1, 1)) == 32
  assert group_size(3, 0, 2, make_mesh(2, 1, 1, devices=jax.devices()[:2])) == 3  # the examples split instead
  assert group_size(5, 2, 4, mesh) == 2
  with pytest.raises(ValueError, match="mesh axis 'fsdp'"):
    group_size(5, 3, 2, mesh)


def _png_source(seed, n=3):
  """A data source in memory: n 80x72 random images (bigger than the 64 px crop), PNG-encoded."""
  import io

  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(buf, format='PNG')
    out.append({'png': np.frombuffer(buf.getvalue(), np.uint8), 'prompt': f'p{i}', 'concept': 0, 'index': i})
  return out


def test_subject_batches_give_each_subject_the_data_it_has_alone():
  args = dict(
    batch_size=2, resolution=64, center_crop=False, flip_p=0.5, tokenize=lambda p: {'te': np.zeros((len(p), 4))}
  )
  same = _png_source(0)  # two subjects with identical images: only their seeds tell them apart
  together = subject_batches({'a': same, 'b': same, 'c': _png_source(1)}, seed=SEED, **args)
  alone_b = subject_batches({'b': same}, seed=SEED, **args)
  for _ in range(3):
    batch, ref = next(together), next(alone_b)
    assert batch['pixels'].shape == (3, 2, 64, 64, 3) and batch['input_ids']['te'].shape == (3, 2, 4)
    np.testing.assert_array_equal(batch['pixels'][1], ref['pixels'][0])
    assert not np.array_equal(batch['pixels'][0], batch['pixels'][1])
