"""Noise schedulers in pure JAX, numerically matching their diffusers counterparts.

Sampling::

  from jaxdream.schedulers import make_scheduler

  sch = make_scheduler('euler_a', scheduler_config, num_inference_steps=30)  # config: scheduler_config.json
  ts = jnp.asarray(sch.timesteps)                   # what the UNet gets at step i (int or float)
  x = noise * sch.init_noise_sigma
  state = sch.init_state(x)

  def body(i, carry):
    x, state = carry
    eps = unet(sch.scale_model_input(x, i), ts[i], ...)
    return sch.step(state, eps, i, x, jax.random.fold_in(key, i))

  x, _ = jax.lax.fori_loop(0, sch.num_steps, body, (x, state))

`step(state, model_output, i, sample, key=None) -> (prev_sample, state)` takes the step index `i`
(a Python or traced int); everything per-step is a precomputed table, so `step`, `scale_model_input`
and `add_noise` work under `jit`/`fori_loop`, and the state is a fixed-shape pytree (a `count` of
calls since `init_state`, plus history for pndm/lms/heun/unipc/dpmpp). `key` is required by stochastic
schedulers (`sch.stochastic`: ddpm, euler_a, dpmpp_2m_sde(_karras), ddim with eta > 0), which draw
`jax.random.normal(key, sample.shape, sample.dtype)`; pass a fresh key per step.

img2img: `i0 = sch.start_index(strength)`, `x = sch.add_noise(latents, noise, i0)`, then run steps
`i0 .. sch.num_steps - 1` from a fresh `init_state`, as diffusers' img2img pipeline does.

Names (`SCHEDULER_NAMES`): ddpm, ddim, pndm, lms, euler, euler_a, heun, unipc, dpmpp_2m, dpmpp_2m_sde, and
the Karras ones lms_karras, euler_karras, heun_karras, unipc_karras, dpmpp_2m_karras, dpmpp_2m_sde_karras.
Settings are read from a diffusers scheduler config as `XScheduler.from_config(config, **overrides)`
reads them: keys the class does not take are ignored, missing keys take that class's defaults. A name fixes
use_karras_sigmas (False / True: one schedule per name); the dpmpp names also fix algorithm_type ('dpmsolver++' /
'sde-dpmsolver++') and solver_order=2, the unipc names solver_order=2 (a folder asking for another order is refused).
Supported: beta_schedule linear / scaled_linear / squaredcos_cap_v2, trained_betas,
rescale_betas_zero_snr, prediction_type epsilon / v_prediction / sample (where diffusers has it),
timestep_spacing leading / trailing / linspace, steps_offset, set_alpha_to_one, clip_sample(_range),
thresholding, variance_type fixed_small(_log) / fixed_large, PNDM with or without PRK steps,
use_karras_sigmas, sigma_min / sigma_max, final_sigmas_type, timestep_type, lower_order_final,
euler_at_final, lambda_min_clipped, solver_type. Unsupported options raise NotImplementedError.

Training: `NoiseSchedule.from_config(config)` gives `add_noise`, `get_velocity`, `target` and `snr`.
"""

from __future__ import annotations

from jaxdream.schedulers.alpha import DDIM, DDPM, PNDM
from jaxdream.schedulers.common import Scheduler, resolve_config
from jaxdream.schedulers.sigma import LMS, DPMSolverPP2M, Euler, EulerAncestral, Heun, UniPC
from jaxdream.schedulers.training import NoiseSchedule

_DPM_PP_2M = {'algorithm_type': 'dpmsolver++', 'solver_order': 2}
_DPM_PP_2M_SDE = {'algorithm_type': 'sde-dpmsolver++', 'solver_order': 2}
# name -> (class, options the name itself fixes)
_REGISTRY = {
  'ddpm': (DDPM, {}),
  'ddim': (DDIM, {}),
  'pndm': (PNDM, {}),
  # A name is one schedule: the plain names run their evenly spaced sigmas whatever a folder's use_karras_sigmas says
  'lms': (LMS, {'use_karras_sigmas': False}),
  'euler': (Euler, {'use_karras_sigmas': False}),
  'euler_a': (EulerAncestral, {}),
  'heun': (Heun, {'use_karras_sigmas': False}),
  # A1111's Karras schedule type with these samplers (its 'Euler' + 'Karras'; 'LMS Karras' of older versions)
  'euler_karras': (Euler, {'use_karras_sigmas': True}),
  'lms_karras': (LMS, {'use_karras_sigmas': True}),
  'heun_karras': (Heun, {'use_karras_sigmas': True}),
  'unipc': (UniPC, {'solver_order': 2, 'use_karras_sigmas': False}),
  'unipc_karras': (UniPC, {'solver_order': 2, 'use_karras_sigmas': True}),
  'dpmpp_2m': (DPMSolverPP2M, {**_DPM_PP_2M, 'use_karras_sigmas': False}),
  'dpmpp_2m_karras': (DPMSolverPP2M, {**_DPM_PP_2M, 'use_karras_sigmas': True}),
  'dpmpp_2m_sde': (DPMSolverPP2M, {**_DPM_PP_2M_SDE, 'use_karras_sigmas': False}),
  'dpmpp_2m_sde_karras': (DPMSolverPP2M, {**_DPM_PP_2M_SDE, 'use_karras_sigmas': True}),
}
SCHEDULER_NAMES = tuple(_REGISTRY)

_CLASS_NAMES = {
  'DDPMScheduler': 'ddpm',
  'DDIMScheduler': 'ddim',
  'PNDMScheduler': 'pndm',
  'LMSDiscreteScheduler': 'lms',
  'EulerDiscreteScheduler': 'euler',
  'EulerAncestralDiscreteScheduler': 'euler_a',
  'HeunDiscreteScheduler': 'heun',
  'UniPCMultistepScheduler': 'unipc',
  'DPMSolverMultistepScheduler': 'dpmpp_2m',
}


def scheduler_name_for_config(scheduler_config: dict) -> str:
  """Our name for the diffusers scheduler a config was saved from (its `_class_name`)."""
  cls = scheduler_config.get('_class_name')
  if cls not in _CLASS_NAMES:
    raise ValueError(
      f'unsupported scheduler class {cls!r}; supported: {sorted(_CLASS_NAMES)}. '
      f'Pick one of {SCHEDULER_NAMES} by name instead.'
    )
  name = _CLASS_NAMES[cls]
  if name == 'dpmpp_2m':
    cfg = resolve_config(scheduler_config, DPMSolverPP2M.DEFAULTS)
    if cfg['algorithm_type'] not in ('dpmsolver++', 'sde-dpmsolver++', 'deis') or cfg['solver_order'] != 2:
      raise ValueError(
        f"only DPMSolverMultistepScheduler with algorithm_type 'dpmsolver++' or 'sde-dpmsolver++' and solver_order 2 "
        f'is supported, got {cfg["algorithm_type"]!r} / {cfg["solver_order"]}; '
        f'pick one of {SCHEDULER_NAMES} by name instead.'
      )
    if cfg['algorithm_type'] == 'deis' and cfg['final_sigmas_type'] == 'zero':  # diffusers' from_config refuses it
      raise ValueError(
        "DPMSolverMultistepScheduler: final_sigmas_type 'zero' is not supported for algorithm_type 'deis' (diffusers "
        "refuses it too); use 'sigma_min', or pick one of the scheduler names"
      )
    if cfg['algorithm_type'] == 'sde-dpmsolver++':
      name = 'dpmpp_2m_sde'
    if cfg['use_karras_sigmas']:
      name += '_karras'
  elif name == 'unipc' and resolve_config(scheduler_config, UniPC.DEFAULTS)['solver_order'] != 2:
    raise ValueError(
      'only UniPCMultistepScheduler with solver_order 2 (its default) is supported, got '
      f'{resolve_config(scheduler_config, UniPC.DEFAULTS)["solver_order"]}; pick one of {SCHEDULER_NAMES} by name instead.'
    )
  if (
    name in ('euler', 'lms', 'heun', 'unipc')
    and resolve_config(scheduler_config, {'use_karras_sigmas': False})['use_karras_sigmas']
  ):
    name += '_karras'
  return name


def make_scheduler(
  name: str | None, scheduler_config: dict | None, num_inference_steps: int, *, eta: float = 0.0, **overrides
) -> Scheduler:
  """A sampling schedule of `num_inference_steps` for the named scheduler.

  name: one of SCHEDULER_NAMES, or None for the config's own class (`scheduler_name_for_config`).
  scheduler_config: a diffusers scheduler_config.json dict (None: the class defaults).
  eta: DDIM noise scale (ignored by the other schedulers, as diffusers' pipelines do).
  overrides: config values that win over the file, like `from_config(config, **overrides)`.
  """
  if name is None:
    name = scheduler_name_for_config(scheduler_config or {})
  if name not in _REGISTRY:
    raise ValueError(f'unknown scheduler {name!r}; valid names: {", ".join(SCHEDULER_NAMES)}')
  cls, fixed = _REGISTRY[name]
  clashes = [f'{k}={v!r}' for k, v in overrides.items() if k in fixed and fixed[k] != v]
  if clashes:  # the name decides these; an explicit other value would be dropped without a word
    raise ValueError(
      f'scheduler {name!r} sets {", ".join(f"{k}={fixed[k]!r}" for k in overrides if k in fixed)}; '
      f'got {", ".join(clashes)}'
    )
  cfg = resolve_config(scheduler_config, cls.DEFAULTS, {**overrides, **fixed})
  sch = cls(cfg, num_inference_steps, eta=eta) if cls is DDIM else cls(cfg, num_inference_steps)
  sch.name = name
  return sch


__all__ = ['SCHEDULER_NAMES', 'NoiseSchedule', 'Scheduler', 'make_scheduler', 'scheduler_name_for_config']
