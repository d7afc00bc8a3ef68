"""jaxdream.schedulers against diffusers' torch schedulers (CPU, float32), fed identical model outputs."""

import json
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import (
  scheduling_ddim,
  scheduling_ddpm,
  scheduling_dpmsolver_multistep,
  scheduling_euler_ancestral_discrete,
)

from jaxdream.schedulers import SCHEDULER_NAMES, NoiseSchedule, make_scheduler, scheduler_name_for_config

# Stable Diffusion 1.5's scheduler_config.json.
SD_CONFIG = {
  '_class_name': 'PNDMScheduler',
  '_diffusers_version': '0.6.0',
  'beta_end': 0.012,
  'beta_schedule': 'scaled_linear',
  'beta_start': 0.00085,
  'num_train_timesteps': 1000,
  'set_alpha_to_one': False,
  'skip_prk_steps': True,
  'steps_offset': 1,
  'trained_betas': None,
  'clip_sample': False,
}
# our name -> (diffusers class, the from_config kwargs the name implies)
REFERENCE = {
  'ddpm': (diffusers.DDPMScheduler, {}),
  'ddim': (diffusers.DDIMScheduler, {}),
  'pndm': (diffusers.PNDMScheduler, {}),
  'lms': (diffusers.LMSDiscreteScheduler, {}),
  'euler': (diffusers.EulerDiscreteScheduler, {}),
  'euler_a': (diffusers.EulerAncestralDiscreteScheduler, {}),
  'heun': (diffusers.HeunDiscreteScheduler, {}),
  'euler_karras': (diffusers.EulerDiscreteScheduler, {'use_karras_sigmas': True}),
  'lms_karras': (diffusers.LMSDiscreteScheduler, {'use_karras_sigmas': True}),
  'heun_karras': (diffusers.HeunDiscreteScheduler, {'use_karras_sigmas': True}),
  'unipc': (diffusers.UniPCMultistepScheduler, {}),
  'unipc_karras': (diffusers.UniPCMultistepScheduler, {'use_karras_sigmas': True}),
  'dpmpp_2m': (diffusers.DPMSolverMultistepScheduler, {}),
  'dpmpp_2m_karras': (diffusers.DPMSolverMultistepScheduler, {'use_karras_sigmas': True}),
  'dpmpp_2m_sde': (diffusers.DPMSolverMultistepScheduler, {'algorithm_type': 'sde-dpmsolver++'}),
  'dpmpp_2m_sde_karras': (
    diffusers.DPMSolverMultistepScheduler,
    {'algorithm_type': 'sde-dpmsolver++', 'use_karras_sigmas': True},
  ),
}
# modules whose randn_tensor a stochastic scheduler draws its noise from
RANDN_MODULES = {
  'ddpm': scheduling_ddpm,
  'ddim': scheduling_ddim,
  'euler_a': scheduling_euler_ancestral_discrete,
  'dpmpp_2m_sde': scheduling_dpmsolver_multistep,
  'dpmpp_2m_sde_karras': scheduling_dpmsolver_multistep,
}
pytestmark = [
  pytest.mark.reference,
  pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning'),  # diffusers' own
]

SHAPE = (2, 8, 8, 4)  # NHWC here, NCHW on the torch side: the maths is elementwise
KEY = jax.random.key(0)


def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def to_nhwc(t):
  return t.numpy().transpose(0, 2, 3, 1)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def build(name, n, eta=0.0, **overrides):
  cls, implied = REFERENCE[name]
  ref = cls.from_config(SD_CONFIG, **{**overrides, **implied})
  ref.set_timesteps(n)
  return ref, make_scheduler(name, SD_CONFIG, n, eta=eta, **overrides)


def step_noise(i):
  return jax.random.normal(jax.random.fold_in(KEY, i), SHAPE, jnp.float32)


class PatchedRandn:
  """Stands in for diffusers' randn_tensor, returning the noise our step `i` draws."""

  def __init__(self):
    self.noise, self.calls = None, 0

  def __call__(self, shape, **kwargs):
    assert tuple(shape) == (SHAPE[0], SHAPE[3], SHAPE[1], SHAPE[2])
    self.calls += 1
    return to_torch(self.noise)


def run_diffusers(ref, x, residuals, start=0, eta=0.0, randn=None):
  """Reference loop from step `start`, model output 0.5 * model_input + residual; per-step samples."""
  kwargs = {'eta': eta} if isinstance(ref, diffusers.DDIMScheduler) else {}
  xt, inputs, outputs, samples = to_torch(x), [], [], []
  for k, t in enumerate(ref.timesteps[start:]):
    inp = ref.scale_model_input(xt, t)
    out = 0.5 * inp + to_torch(residuals[k])
    if randn is not None:
      randn.noise = step_noise(start + k)
    xt = ref.step(out, t, xt, **kwargs).prev_sample
    inputs.append(to_nhwc(inp))
    outputs.append(to_nhwc(out))
    samples.append(to_nhwc(xt))
  return inputs, outputs, samples


@pytest.fixture
def patch_randn(monkeypatch):
  def patch(name):
    randn = PatchedRandn()
    if name in RANDN_MODULES:
      monkeypatch.setattr(RANDN_MODULES[name], 'randn_tensor', randn)
    return randn

  return patch


def check_trajectory(name, n, patch_randn, eta=0.0, rtol=1e-5, **overrides):
  ref, sch = build(name, n, eta=eta, **overrides)
  randn = patch_randn(name)
  if np.issubdtype(sch.timesteps.dtype, np.integer):
    np.testing.assert_array_equal(sch.timesteps, ref.timesteps.numpy())
  else:  # interpolated from log-sigmas, which carry diffusers' float32 rounding
    assert sch.timesteps.dtype == ref.timesteps.numpy().dtype
    np.testing.assert_allclose(sch.timesteps, ref.timesteps.numpy(), rtol=1e-4, atol=1e-5)
  assert sch.num_steps == len(ref.timesteps)
  np.testing.assert_allclose(sch.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)
  rng = np.random.default_rng(n)
  x = rng.standard_normal(SHAPE).astype(np.float32) * sch.init_noise_sigma
  residuals = rng.standard_normal((sch.num_steps,) + SHAPE).astype(np.float32)
  inputs, outputs, samples = run_diffusers(ref, x, residuals, eta=eta, randn=randn)

  xj, state = jnp.asarray(x), sch.init_state(jnp.asarray(x))
  for i, ref_sample in enumerate([x] + samples[:-1]):
    assert rel_err(sch.scale_model_input(jnp.asarray(ref_sample), i), inputs[i]) < 1e-6, f'model input {i}'
    xj, state = sch.step(state, jnp.asarray(outputs[i]), i, xj, jax.random.fold_in(KEY, i))
    assert rel_err(xj, samples[i]) < rtol, f'sample after step {i}: {rel_err(xj, samples[i]):.2e}'
  assert randn.calls == (sch.num_steps if sch.stochastic else 0) - (name == 'ddpm' and sch.timesteps[-1] == 0)


SPACINGS = [
  {'prediction_type': 'v_prediction'},
  {'timestep_spacing': 'leading'},
  {'timestep_spacing': 'trailing'},
  {'timestep_spacing': 'linspace'},
]
CORE_NAMES = SCHEDULER_NAMES + ('pndm_prk',)


@pytest.mark.parametrize('n', [10, 25])
@pytest.mark.parametrize('variant', SPACINGS, ids=lambda v: next(iter(v.values())))
@pytest.mark.parametrize('name', CORE_NAMES)
def test_matches_diffusers(name, variant, n, patch_randn):
  if name == 'pndm_prk':
    name, variant = 'pndm', {**variant, 'skip_prk_steps': False}
  # DPM++ 2M SDE's trajectories keep rounding rather than contracting it: diffusers' float32 coefficients (its
  # log-SNRs in float32) and ours agree to 2e-6 a step, which adds up to 1.0-1.1e-5 over 25 random-output steps.
  rtol = 2e-5 if 'sde' in name and n > 10 else 1e-5
  check_trajectory(name, n, patch_randn, rtol=rtol, **variant)


@pytest.mark.parametrize(
  'name,options',
  [
    ('ddpm', {'prediction_type': 'sample', 'clip_sample': True, 'clip_sample_range': 1.5}),
    ('ddpm', {'variance_type': 'fixed_large', 'beta_schedule': 'linear', 'beta_start': 1e-4, 'beta_end': 0.02}),
    ('ddpm', {'thresholding': True, 'sample_max_value': 3.0, 'dynamic_thresholding_ratio': 0.9}),
    ('ddim', {'prediction_type': 'sample'}),
    ('ddim', {'beta_schedule': 'squaredcos_cap_v2', 'timestep_spacing': 'trailing'}),
    ('ddim', {'clip_sample': True, 'set_alpha_to_one': True}),
    ('ddim', {'thresholding': True, 'sample_max_value': 3.0, 'dynamic_thresholding_ratio': 0.9}),
    ('ddim', {'eta': 1.0}),
    ('ddim', {'rescale_betas_zero_snr': True, 'prediction_type': 'v_prediction', 'timestep_spacing': 'trailing'}),
    ('pndm', {'trained_betas': np.linspace(1e-4, 0.02, 1000).tolist(), 'set_alpha_to_one': True}),
    ('lms_karras', {}),
    ('lms', {'prediction_type': 'sample', 'timestep_spacing': 'leading'}),
    ('euler_karras', {'timestep_spacing': 'leading'}),
    ('euler_karras', {'sigma_min': 0.1, 'sigma_max': 10.0}),
    ('euler', {'final_sigmas_type': 'sigma_min', 'prediction_type': 'sample'}),
    ('euler', {'timestep_type': 'continuous', 'prediction_type': 'v_prediction'}),
    # From sigma_max = 4096 the first step cancels ~40x, magnifying diffusers' own float32 rounding of
    # the zero-SNR sigmas (with diffusers' sigma table substituted, we agree to 3e-7).
    (
      'euler',
      {'rescale_betas_zero_snr': True, 'prediction_type': 'v_prediction', 'timestep_spacing': 'trailing', 'rtol': 3e-5},
    ),
    ('euler_a', {'beta_schedule': 'squaredcos_cap_v2', 'timestep_spacing': 'leading'}),
    ('dpmpp_2m', {'solver_type': 'heun', 'prediction_type': 'sample'}),
    ('dpmpp_2m', {'final_sigmas_type': 'sigma_min', 'lower_order_final': False}),
    ('dpmpp_2m', {'final_sigmas_type': 'sigma_min', 'euler_at_final': True, 'timestep_spacing': 'leading'}),
    ('dpmpp_2m', {'thresholding': True, 'sample_max_value': 3.0, 'prediction_type': 'sample'}),
    ('dpmpp_2m', {'lambda_min_clipped': -5.1, 'timestep_spacing': 'leading'}),
    ('dpmpp_2m_karras', {'rescale_betas_zero_snr': True, 'prediction_type': 'v_prediction'}),
    ('dpmpp_2m', {'beta_schedule': 'squaredcos_cap_v2'}),
    (
      'unipc',
      {'solver_type': 'bh1', 'thresholding': True, 'prediction_type': 'sample', 'final_sigmas_type': 'sigma_min'},
    ),
    ('unipc', {'solver_type': 'midpoint', 'final_sigmas_type': 'sigma_min'}),  # DPM-Solver's name: diffusers' bh2
    ('unipc_karras', {'sigma_min': 0.1, 'sigma_max': 10.0, 'final_sigmas_type': 'sigma_min'}),
  ],
)
def test_options_match_diffusers(name, options, patch_randn):
  options = dict(options)
  eta, rtol = options.pop('eta', 0.0), options.pop('rtol', 1e-5)
  check_trajectory(name, 20, patch_randn, eta=eta, rtol=rtol, **options)


def test_unipc_steps_to_a_final_sigma_zero_at_first_order_even_without_lower_order_final():
  """Second order's coefficients are infinite at sigma 0 (diffusers' step gives inf): the last step is first order,
  the clean-sample estimate."""
  sch = make_scheduler('unipc', SD_CONFIG, 6, lower_order_final=False)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(SHAPE), jnp.float32)
  state = sch.init_state(x)
  for i in range(sch.num_steps):
    out = 0.5 * x
    x, state = sch.step(state, out, i, x)
  assert np.isfinite(np.asarray(x)).all() and np.abs(np.asarray(x)).max() > 0


def test_an_override_against_what_the_name_sets_is_an_error():
  with pytest.raises(ValueError, match="'dpmpp_2m_karras' sets use_karras_sigmas=True; got use_karras_sigmas=False"):
    make_scheduler('dpmpp_2m_karras', SD_CONFIG, 10, use_karras_sigmas=False)
  assert make_scheduler('dpmpp_2m_karras', SD_CONFIG, 10, use_karras_sigmas=True).config['use_karras_sigmas']


def test_a_strength_that_leaves_no_step_is_refused_as_by_diffusers_pipelines():
  sch = make_scheduler('ddim', SD_CONFIG, 3)
  assert sch.start_index(0.34) == 2  # int(3 * 0.34) = 1 step
  with pytest.raises(ValueError, match='strength 0.3 of 3 steps runs no denoising step'):
    sch.start_index(0.3)


@pytest.mark.parametrize('n', [3, 10, 25])
def test_karras_timesteps_of_a_cosine_schedule_are_diffusers_truncated_ones(n):
  # Not rounded for cosine schedules: the top one is 998 from diffusers' float32 sigmas (999 from float64).
  # (diffusers' own multistep loop then trips over the repeated 998s, so only the schedule is compared.)
  ref, sch = build('dpmpp_2m_karras', n, beta_schedule='squaredcos_cap_v2')
  np.testing.assert_array_equal(sch.timesteps, ref.timesteps.numpy())
  np.testing.assert_allclose(sch.sigmas, ref.sigmas.numpy(), rtol=1e-6)


@pytest.mark.parametrize('name', CORE_NAMES)
def test_jit_fori_loop(name, patch_randn):
  """The whole loop under jit + fori_loop with a traced step index ends where diffusers does."""
  overrides = {'skip_prk_steps': False} if name == 'pndm_prk' else {}
  name = 'pndm' if name == 'pndm_prk' else name
  ref, sch = build(name, 10, **overrides)
  randn = patch_randn(name)
  rng = np.random.default_rng(1)
  x = rng.standard_normal(SHAPE).astype(np.float32) * sch.init_noise_sigma
  residuals = rng.standard_normal((sch.num_steps,) + SHAPE).astype(np.float32)
  expected = run_diffusers(ref, x, residuals, randn=randn)[2][-1]

  @jax.jit
  def sample(x, residuals):
    def body(i, carry):
      x, state = carry
      out = 0.5 * sch.scale_model_input(x, i) + residuals[i]
      return sch.step(state, out, i, x, jax.random.fold_in(KEY, i))

    return jax.lax.fori_loop(0, sch.num_steps, body, (x, sch.init_state(x)))[0]

  assert rel_err(sample(jnp.asarray(x), jnp.asarray(residuals)), expected) < 1e-5


@pytest.mark.parametrize('name', CORE_NAMES)
def test_img2img_matches_diffusers(name, patch_randn):
  """start_index, add_noise and a loop from there, as diffusers' img2img pipeline runs them."""
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

  overrides = {'skip_prk_steps': False} if name == 'pndm_prk' else {}
  name = 'pndm' if name == 'pndm_prk' else name
  n, strength = 10, 0.55
  ref, sch = build(name, n, **overrides)
  randn = patch_randn(name)
  timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=ref), n, strength, None)
  start = sch.start_index(strength)
  assert start == len(ref.timesteps) - len(timesteps) and start > 0
  rng = np.random.default_rng(2)
  latents, noise = rng.standard_normal((2,) + SHAPE).astype(np.float32)
  x = sch.add_noise(jnp.asarray(latents), jnp.asarray(noise), start)
  x_ref = ref.add_noise(to_torch(latents), to_torch(noise), timesteps[:1].repeat(SHAPE[0]))
  assert rel_err(x, to_nhwc(x_ref)) < 1e-6
  residuals = rng.standard_normal((sch.num_steps - start,) + SHAPE).astype(np.float32)
  _, outputs, samples = run_diffusers(ref, np.asarray(x), residuals, start=start, randn=randn)
  state = sch.init_state(x)
  for k, i in enumerate(range(start, sch.num_steps)):
    x, state = sch.step(state, jnp.asarray(outputs[k]), i, x, jax.random.fold_in(KEY, i))
    assert rel_err(x, samples[k]) < 1e-5, f'step {i}'


@pytest.mark.parametrize('name', SCHEDULER_NAMES)
def test_add_noise_every_step(name):
  ref, sch = build(name, 25)
  rng = np.random.default_rng(3)
  x, noise = rng.standard_normal((2,) + SHAPE).astype(np.float32)
  add = jax.jit(sch.add_noise)
  for i in range(sch.num_steps):
    if hasattr(ref, 'set_begin_index'):  # sigma schedulers look the level up by step, as in img2img
      ref.set_begin_index(i)
    expected = ref.add_noise(to_torch(x), to_torch(noise), ref.timesteps[i : i + 1].repeat(SHAPE[0]))
    assert rel_err(add(jnp.asarray(x), jnp.asarray(noise), i), to_nhwc(expected)) < 1e-5, f'step {i}'


@pytest.mark.parametrize(
  'options',
  [
    {},
    {'prediction_type': 'v_prediction', 'rescale_betas_zero_snr': True},
    {'beta_schedule': 'squaredcos_cap_v2', 'prediction_type': 'sample'},
  ],
)
def test_noise_schedule_matches_ddpm(options):
  from diffusers.training_utils import compute_snr

  ref = diffusers.DDPMScheduler.from_config(SD_CONFIG, **options)
  ns = NoiseSchedule.from_config(SD_CONFIG, **options)
  assert ns.prediction_type == ref.config.prediction_type and ns.num_train_timesteps == 1000
  assert ns.alphas_cumprod.dtype == np.float32
  np.testing.assert_allclose(ns.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=2e-6, atol=1e-9)
  rng = np.random.default_rng(4)
  x0, noise = rng.standard_normal((2,) + SHAPE).astype(np.float32)
  t = np.array([0, 999]) if options else rng.integers(0, 1000, SHAPE[0])
  tt = torch.from_numpy(t)
  for ours, theirs in [(ns.add_noise, ref.add_noise), (ns.get_velocity, ref.get_velocity)]:
    assert rel_err(jax.jit(ours)(x0, noise, t), to_nhwc(theirs(to_torch(x0), to_torch(noise), tt))) < 1e-6
  target = {'epsilon': noise, 'sample': x0}.get(ns.prediction_type)
  target = to_nhwc(ref.get_velocity(to_torch(x0), to_torch(noise), tt)) if target is None else target
  assert rel_err(ns.target(x0, noise, t), target) < 1e-6
  finite = t < 999  # zero terminal SNR makes the last one 0 / 0-ish on both sides
  np.testing.assert_allclose(np.asarray(ns.snr(t))[finite], compute_snr(ref, tt).numpy()[finite], rtol=1e-5)


@pytest.mark.parametrize('name', SCHEDULER_NAMES)
@pytest.mark.parametrize(
  'config',
  [
    SD_CONFIG,
    {
      '_class_name': 'DDIMScheduler',
      'beta_schedule': 'linear',
      'timestep_spacing': 'trailing',
      'prediction_type': 'v_prediction',
      'clip_sample': False,
      'use_karras_sigmas': True,
      'solver_order': 3,
      'rescale_betas_zero_snr': True,
      '_use_default_values': ['timestep_spacing'],
      'some_future_key': 1,
    },
    {},
  ],
  ids=['sd15', 'ddim_like', 'empty'],
)
def test_config_resolution_matches_from_config(name, config):
  """Each option takes the value diffusers' from_config gives it: ignored, defaulted or read."""
  cls, implied = REFERENCE[name]
  ref = cls.from_config(config, **implied)
  sch = make_scheduler(name, config, 10)
  forced = {'use_karras_sigmas', 'solver_order', 'algorithm_type'} if name.startswith('dpmpp') else set()
  forced |= {'use_karras_sigmas'} if name.endswith('karras') or name in ('euler', 'lms', 'heun') else set()
  forced |= {'use_karras_sigmas', 'solver_order'} if name.startswith('unipc') else set()
  for key, value in sch.config.items():
    if key not in forced:
      assert value == ref.config[key], key
  if forced:
    assert sch.config['use_karras_sigmas'] == name.endswith('karras')
  if name.startswith(('dpmpp', 'unipc')):
    assert sch.config['solver_order'] == 2


@pytest.mark.parametrize('name', SCHEDULER_NAMES)
def test_name_for_config_roundtrip(name):
  cls, implied = REFERENCE[name]
  config = json.loads(cls.from_config(SD_CONFIG, **implied).to_json_string())
  assert scheduler_name_for_config(config) == name
  assert make_scheduler(None, config, 10).name == name


def test_name_for_config_rejects_unsupported():
  with pytest.raises(ValueError, match='DEISMultistepScheduler'):
    scheduler_name_for_config({'_class_name': 'DEISMultistepScheduler'})
  with pytest.raises(ValueError, match='sde-dpmsolver'):
    scheduler_name_for_config({'_class_name': 'DPMSolverMultistepScheduler', 'algorithm_type': 'sde-dpmsolver'})
  sde = {'_class_name': 'DPMSolverMultistepScheduler', 'algorithm_type': 'sde-dpmsolver++'}
  assert scheduler_name_for_config(sde) == 'dpmpp_2m_sde'
  assert scheduler_name_for_config({**sde, 'use_karras_sigmas': True}) == 'dpmpp_2m_sde_karras'
  with pytest.raises(ValueError, match='solver_order'):
    scheduler_name_for_config({'_class_name': 'DPMSolverMultistepScheduler', 'solver_order': 3})


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match='unknown scheduler') as err:
    make_scheduler('restart', SD_CONFIG, 10)
  assert all(name in str(err.value) for name in SCHEDULER_NAMES)


@pytest.mark.parametrize(
  'name,options',
  [
    ('euler', {'use_exponential_sigmas': True}),
    ('euler', {'interpolation_type': 'log_linear'}),
    ('lms', {'use_beta_sigmas': True}),
    ('ddpm', {'variance_type': 'learned_range'}),
    ('ddim', {'beta_schedule': 'sigmoid'}),
    ('dpmpp_2m', {'variance_type': 'learned'}),
    ('euler_a', {'prediction_type': 'sample'}),
  ],
)
def test_unsupported_options_raise(name, options):
  with pytest.raises(NotImplementedError):
    make_scheduler(name, SD_CONFIG, 10, **options)


def test_configs_diffusers_cannot_run_are_clear_errors_before_any_step():
  # DEIS ending at sigma zero: diffusers' from_config refuses it (and would run it as dpmsolver++ otherwise).
  deis = {**SD_CONFIG, '_class_name': 'DPMSolverMultistepScheduler', 'algorithm_type': 'deis', 'solver_order': 2}
  with pytest.raises(ValueError, match="final_sigmas_type 'zero' is not supported for algorithm_type 'deis'"):
    make_scheduler(None, deis, 10)
  with pytest.raises(ValueError, match='final_sigmas_type. zero is not supported'):
    diffusers.DPMSolverMultistepScheduler.from_config(deis)
  make_scheduler(None, {**deis, 'final_sigmas_type': 'sigma_min'}, 10)
  # As many steps as training timesteps with 'leading' spacing and offset 1: timestep 1000 of 0..999.
  for name in ('ddim', 'ddpm', 'pndm'):
    with pytest.raises(
      ValueError, match="1000 steps with timestep_spacing 'leading' and steps_offset 1 reach timestep 1000"
    ):
      make_scheduler(name, SD_CONFIG, 1000)
  make_scheduler('ddim', {**SD_CONFIG, 'steps_offset': 0}, 1000)
  # PNDM's Runge-Kutta start needs three strides and one more step.
  with pytest.raises(ValueError, match='at least 4 steps, got 3'):
    make_scheduler('pndm', SD_CONFIG, 3, skip_prk_steps=False)


def test_stochastic_step_needs_key():
  sch = make_scheduler('euler_a', SD_CONFIG, 10)
  x = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match='PRNG key'):
    sch.step(sch.init_state(x), x, 0, x)


def test_bfloat16_sample_keeps_dtype():
  sch = make_scheduler('dpmpp_2m', SD_CONFIG, 10)
  x = jax.random.normal(KEY, SHAPE)
  run = jax.jit(
    lambda x: jax.lax.fori_loop(
      0, sch.num_steps, lambda i, c: sch.step(c[1], 0.1 * c[0], i, c[0]), (x, sch.init_state(x))
    )[0]
  )
  low, full = run(x.astype(jnp.bfloat16)), run(x)
  assert low.dtype == jnp.bfloat16
  assert rel_err(low.astype(jnp.float32), full) < 2e-2


@pytest.mark.parametrize(
  'name,options',
  [
    ('ddim', {'thresholding': True, 'sample_max_value': 3.0}),
    ('dpmpp_2m', {'thresholding': True, 'sample_max_value': 3.0}),
    ('pndm', {'skip_prk_steps': False}),
    ('lms', {}),
  ],
)
def test_vmap_per_image_matches_batch(name, options):
  """Pipelines may vmap `step` over images (state per image, shared step index)."""
  sch = make_scheduler(name, SD_CONFIG, 10, **options)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32) * 3)
  batched, state = x, sch.init_state(x)
  per_image, states = x, jax.vmap(sch.init_state)(x)
  vstep = jax.jit(jax.vmap(sch.step, in_axes=(0, 0, None, 0)))
  for i in range(3):
    out = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32) * 3)
    batched, state = sch.step(state, out, i, batched)
    per_image, states = vstep(states, out, i, per_image)
    assert rel_err(per_image, batched) < 1e-6


def test_denoising_start_and_end_pick_diffusers_sdxl_timesteps_for_every_scheduler():
  """The SDXL hand-off's step selection (diffusers' discrete timestep cutoff): denoising_end keeps the steps at or
  above (1 - fraction) * 1000, denoising_start the steps below it (StableDiffusionXLImg2ImgPipeline.get_timesteps),
  both together in one img2img run; PNDM with its PRK steps too, leading and trailing spacings."""
  from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
  )

  checked = 0
  for name in (*SCHEDULER_NAMES, 'pndm_prk'):
    overrides = {'skip_prk_steps': False} if name == 'pndm_prk' else {}
    for spacing in ('leading', 'trailing'):
      for n, start_at, end_at in ((10, 0.8, None), (25, 0.35, 0.8), (7, 0.5, 0.9)):
        ref, sch = build(name.removesuffix('_prk'), n, timestep_spacing=spacing, **overrides)
        assert ref.order == sch.order  # diffusers' +1 for second-order schedulers (Heun) included
        ref_ts = ref.timesteps.numpy()
        # the base: txt2img to end_at or start_at
        cutoff = round(1000 - start_at * 1000)
        assert sch.denoising_end_index(start_at) == len([t for t in ref_ts if t >= cutoff]), (name, spacing, n)
        # the refiner: from start_at to the end, or to end_at (diffusers' filter on the remaining timesteps)
        timesteps, steps = StableDiffusionXLImg2ImgPipeline.get_timesteps(
          types.SimpleNamespace(scheduler=ref), n, 0.3, None, denoising_start=start_at
        )
        start = sch.denoising_start_index(start_at)
        if end_at is not None:
          steps = len([t for t in timesteps.numpy() if t >= round(1000 - end_at * 1000)])
        end = sch.num_steps if end_at is None else sch.denoising_end_index(end_at, start)
        assert (start, end) == (len(ref_ts) - len(timesteps), len(ref_ts) - len(timesteps) + steps), (name, spacing, n)
        np.testing.assert_allclose(sch.timesteps[start:end], timesteps.numpy()[:steps], rtol=1e-6)
        checked += 0 < start < end < sch.num_steps
  assert checked > 20  # most cases split the schedule in three
  with pytest.raises(ValueError, match=r'must be in \(0, 1\), got 1.0'):
    sch.denoising_start_index(1.0)


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
@pytest.mark.parametrize('name', ['ddpm', 'ddim', 'euler', 'euler_a', 'lms', 'dpmpp_2m'])
def test_denoised_is_diffusers_predicted_original_sample(name, prediction_type, patch_randn):
  """`denoised` (the clean-sample estimate A1111 previews and keeps on interrupt) is what diffusers' step returns as
  `pred_original_sample` (DPM-Solver: its converted model output) at every step of a trajectory."""
  n = 7
  ref, sch = build(name, n, prediction_type=prediction_type)
  randn = patch_randn(name)
  rng = np.random.default_rng(3)
  xt = to_torch(rng.standard_normal(SHAPE).astype(np.float32) * sch.init_noise_sigma)
  for i, t in enumerate(ref.timesteps):
    out = 0.5 * ref.scale_model_input(xt, t) + to_torch(rng.standard_normal(SHAPE).astype(np.float32))
    ours = sch.denoised(jnp.asarray(to_nhwc(xt)), jnp.asarray(to_nhwc(out)), i)
    randn.noise = step_noise(i)
    if name == 'dpmpp_2m':
      if ref.step_index is None:
        ref._init_step_index(t)
      expected = ref.convert_model_output(out, sample=xt)
      xt = ref.step(out, t, xt).prev_sample
    else:
      result = ref.step(out, t, xt)
      expected, xt = result.pred_original_sample, result.prev_sample
    assert rel_err(ours, to_nhwc(expected)) < 1e-5, f'step {i}: {rel_err(ours, to_nhwc(expected)):.2e}'


@pytest.mark.parametrize(
  'name, prediction_type',
  [
    (n, p)
    for n in CORE_NAMES
    for p in ('epsilon', 'v_prediction', 'sample')
    if not (p == 'sample' and n in ('pndm', 'pndm_prk', 'euler_a'))  # as in diffusers: no sample prediction
  ],
)
def test_denoised_recovers_the_clean_sample_from_the_true_model_output(name, prediction_type):
  """Every scheduler, pndm's Runge-Kutta steps included: a sample noised to step i and the model output that is
  exactly right for it give back the clean sample."""
  overrides = {'skip_prk_steps': False} if name == 'pndm_prk' else {}
  sch = make_scheduler(name.removesuffix('_prk'), {**SD_CONFIG, 'prediction_type': prediction_type}, 9, **overrides)
  rng = np.random.default_rng(4)
  x0, eps = (jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32)) for _ in range(2))
  for i in range(sch.num_steps):
    x = sch.add_noise(x0, eps, i)
    a, s = np.asarray(sch._noise_scales)[:, i]
    c = 1.0 if sch._input_scales is None else float(np.asarray(sch._input_scales)[i])
    alpha, sigma = a / c, s / c  # of the model's input, x / c = alpha x0 + sigma eps
    target = {'epsilon': eps, 'v_prediction': alpha * eps - sigma * x0, 'sample': x0}[prediction_type]
    assert rel_err(sch.denoised(x, target, i), x0) < 1e-5, f'step {i}'
