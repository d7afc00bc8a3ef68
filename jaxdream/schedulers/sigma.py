"""Schedulers on a sigma grid, sigma_t = sqrt((1 - a_t) / a_t).

LMS, Euler and Euler ancestral are k-diffusion samplers on x = x0 + sigma * eps (the model sees
x / sqrt(sigma^2 + 1), the DDPM sample). DPM-Solver++(2M) uses the same sigmas but steps the DDPM sample.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdream.schedulers.common import (
  BASE_DEFAULTS,
  THRESHOLD_DEFAULTS,
  Scheduler,
  alphas_cumprod_from_config,
  at,
  check_unsupported,
  compute_dtype,
  karras_sigmas,
  predict_x0_eps,
  sigma_to_t,
  spaced_timesteps,
  threshold_sample,
)

_SIGMA_SCHEDULES = {'use_karras_sigmas': False, 'use_exponential_sigmas': False, 'use_beta_sigmas': False}
_UNSUPPORTED = dict(
  use_exponential_sigmas=(True,),
  use_beta_sigmas=(True,),
  use_lu_lambdas=(True,),
  use_flow_sigmas=(True,),
  use_dynamic_shifting=(True,),
)


def _train_sigmas(cfg):
  ac = alphas_cumprod_from_config(cfg)
  if cfg.get('rescale_betas_zero_snr'):
    ac[-1] = 2.0**-24  # as diffusers: keeps the zero-SNR sigma_max finite
  return ac, np.sqrt((1 - ac) / ac)


def _vp_scales(sigmas):
  """(alpha, sigma) of the DDPM sample x_vp = alpha x0 + sigma eps at each sigma of the grid."""
  alpha = 1 / np.sqrt(sigmas.astype(np.float64) ** 2 + 1)
  return np.stack([alpha, sigmas * alpha])


class _KDiffusion(Scheduler):
  """x_{i+1} = x_i + sum_k coefs[i, k] * d_{i-k} (+ noise_std[i] * noise), with d = (x - x0) / sigma.

  Subclasses set `_coefs` (num_steps, K); `K - 1` past derivatives are kept in the state.
  """

  DEFAULTS = {**BASE_DEFAULTS, **_SIGMA_SCHEDULES, 'timestep_spacing': 'linspace'}
  _noise_std: np.ndarray | None = None

  def __init__(self, cfg, num_inference_steps):
    super().__init__(cfg, num_inference_steps)
    check_unsupported(cfg, **_UNSUPPORTED)
    n_train, n = cfg['num_train_timesteps'], num_inference_steps
    _, train_sigmas = _train_sigmas(cfg)
    ts = spaced_timesteps(cfg['timestep_spacing'], n_train, n, cfg['steps_offset']).astype(np.float32)
    sigmas = np.interp(ts, np.arange(n_train), train_sigmas)
    if cfg.get('use_karras_sigmas'):  # the range of the spaced sigmas unless the config pins it
      lo, hi = cfg.get('sigma_min'), cfg.get('sigma_max')
      sigmas = karras_sigmas(sigmas[-1] if lo is None else lo, sigmas[0] if hi is None else hi, n)
      ts = sigma_to_t(sigmas, train_sigmas)
    final = cfg.get('final_sigmas_type', 'zero')
    if final not in ('zero', 'sigma_min'):
      raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final!r}")
    self.sigmas = np.append(sigmas, train_sigmas[0] if final == 'sigma_min' else 0.0).astype(np.float32)
    self.timesteps = ts.astype(np.float32)
    max_sigma = self.sigmas.max()
    spread = cfg['timestep_spacing'] in ('linspace', 'trailing')
    self.init_noise_sigma = float(max_sigma if spread else np.sqrt(max_sigma**2 + np.float32(1)))
    self._input_scales = np.sqrt(self.sigmas[:-1] ** 2 + np.float32(1))
    self._vp = _vp_scales(self.sigmas[:-1]).astype(np.float32)
    self._noise_scales = np.stack([np.ones_like(self.sigmas[:-1]), self.sigmas[:-1]]).astype(np.float32)

  def init_state(self, sample):
    k = self._coefs.shape[1]
    return {
      'count': jnp.zeros((), jnp.int32),
      'derivs': jnp.zeros((k - 1,) + sample.shape, compute_dtype(sample)),
    }  # newest first

  def step(self, state, model_output, i, sample, key=None):
    x, m = sample.astype(compute_dtype(sample)), model_output.astype(compute_dtype(sample))
    sigma = at(self.sigmas, i)
    alpha, vp_sigma = at(self._vp, (slice(None), i))
    x0, _ = predict_x0_eps(self.prediction_type, alpha * x, m, alpha, vp_sigma)
    # history slots not yet filled since init_state are zeros, so they drop out as in diffusers' list
    derivs = jnp.concatenate([((x - x0) / sigma)[None], state['derivs']])
    prev = x + jnp.tensordot(at(self._coefs, i), derivs, axes=1)
    if self._noise_std is not None:
      prev = prev + at(self._noise_std, i) * self._noise(key, sample)
    return prev.astype(sample.dtype), {'count': state['count'] + 1, 'derivs': derivs[:-1]}


class Euler(_KDiffusion):
  """Euler method of Karras et al. (2022), as diffusers' EulerDiscreteScheduler (no churn)."""

  name = 'euler'
  DEFAULTS = {
    **_KDiffusion.DEFAULTS,
    'interpolation_type': 'linear',
    'sigma_min': None,
    'sigma_max': None,
    'timestep_type': 'discrete',
    'rescale_betas_zero_snr': False,
    'final_sigmas_type': 'zero',
  }

  def __init__(self, cfg, num_inference_steps):
    check_unsupported(cfg, interpolation_type=lambda v: v != 'linear')
    super().__init__(cfg, num_inference_steps)
    if self.prediction_type == 'original_sample':
      self.prediction_type = 'sample'
    if cfg['timestep_type'] == 'continuous' and self.prediction_type == 'v_prediction':
      self.timesteps = (np.float32(0.25) * np.log(self.sigmas[:-1])).astype(np.float32)
    self._coefs = np.diff(self.sigmas.astype(np.float64))[:, None].astype(np.float32)


class Heun(_KDiffusion):
  """Heun's method of Karras et al. (2022), as diffusers' HeunDiscreteScheduler: each step an Euler step (one model
  call) corrected with the derivative at its end (a second call), the sigmas and timesteps interleaved so that every
  call is one step of the loop (2n - 1 calls; the last step, to sigma 0, Euler's alone).
  """

  name = 'heun'
  order = 2
  DEFAULTS = {
    **_KDiffusion.DEFAULTS,
    'beta_start': 0.00085,
    'beta_end': 0.012,
    'clip_sample': False,
    'clip_sample_range': 1.0,
  }

  def __init__(self, cfg, num_inference_steps):
    super().__init__(cfg, num_inference_steps)  # the n steps' sigmas (n + 1) and timesteps (n)
    s, t = self.sigmas, self.timesteps
    self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]]).astype(np.float32)
    self.timesteps = np.concatenate([t[:1], np.repeat(t[1:], 2)]).astype(np.float32)
    self._input_scales = np.sqrt(self.sigmas[:-1] ** 2 + np.float32(1))
    self._vp = _vp_scales(self.sigmas[:-1]).astype(np.float32)
    self._noise_scales = np.stack([np.ones_like(self.sigmas[:-1]), self.sigmas[:-1]]).astype(np.float32)

  def init_state(self, sample):
    zeros = jnp.zeros(sample.shape, compute_dtype(sample))
    return {'count': jnp.zeros((), jnp.int32), 'derivative': zeros, 'sample': zeros, 'dt': jnp.zeros((), zeros.dtype)}

  def step(self, state, model_output, i, sample, key=None):
    x, m = sample.astype(compute_dtype(sample)), model_output.astype(compute_dtype(sample))
    sigma = at(self.sigmas, i)  # where the model looked: the step's start (even i) or its Euler end (odd i)
    alpha, vp_sigma = at(self._vp, (slice(None), i))
    x0, _ = predict_x0_eps(self.prediction_type, alpha * x, m, alpha, vp_sigma)
    if self.config['clip_sample']:
      x0 = jnp.clip(x0, -self.config['clip_sample_range'], self.config['clip_sample_range'])
    d = (x - x0) / sigma
    first = i % 2 == 0
    dt = jnp.where(first, at(self.sigmas, i + 1) - sigma, state['dt'])
    # even i: an Euler step, remembered; odd i: from the remembered sample with the two derivatives' mean
    prev = jnp.where(first, x + d * dt, state['sample'] + (state['derivative'] + d) / 2 * dt)
    new = {'count': state['count'] + 1, 'derivative': d, 'sample': x, 'dt': dt}
    return prev.astype(sample.dtype), new

  def start_index(self, strength: float) -> int:
    """diffusers' img2img pipelines start a second-order scheduler at twice the first-order index."""
    return super().start_index(strength) * self.order


class EulerAncestral(_KDiffusion):
  """Euler ancestral: an Euler step down to sigma_down, then fresh noise back up to sigma_{i+1}."""

  name = 'euler_a'
  stochastic = True
  DEFAULTS = {**BASE_DEFAULTS, 'timestep_spacing': 'linspace', 'rescale_betas_zero_snr': False}

  def __init__(self, cfg, num_inference_steps):
    if cfg['prediction_type'] == 'sample':
      raise NotImplementedError("euler_a does not support prediction_type 'sample' (nor does diffusers)")
    super().__init__(cfg, num_inference_steps)
    s_from, s_to = self.sigmas[:-1].astype(np.float64), self.sigmas[1:].astype(np.float64)
    up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
    self._coefs = (np.sqrt(s_to**2 - up**2) - s_from)[:, None].astype(np.float32)
    self._noise_std = up.astype(np.float32)


class LMS(_KDiffusion):
  """Linear multistep (order 4): integrates the Lagrange interpolant of the last derivatives over sigma."""

  name = 'lms'
  ORDER = 4

  def __init__(self, cfg, num_inference_steps):
    super().__init__(cfg, num_inference_steps)
    s = self.sigmas.astype(np.float64)
    self._coefs = np.zeros((self.num_steps, self.ORDER), np.float32)
    for i in range(self.num_steps):
      order = min(i + 1, self.ORDER)
      for k in range(order):  # weight of the derivative from k steps back
        nodes = [s[i - j] for j in range(order) if j != k]
        basis = np.polyint(np.atleast_1d(np.poly(nodes))) / np.prod([s[i - k] - node for node in nodes])
        self._coefs[i, k] = np.polyval(basis, s[i + 1]) - np.polyval(basis, s[i])


class DPMSolverPP2M(Scheduler):
  """DPM-Solver++(2M) of Lu et al. (2022), as diffusers' DPMSolverMultistepScheduler with
  algorithm_type 'dpmsolver++' and solver_order 2: prev = c0 x + c1 x0 + c2 x0_prev; with 'sde-dpmsolver++' (A1111's
  DPM++ 2M SDE) the SDE solver's coefficients, plus noise_std * fresh noise.
  """

  name = 'dpmpp_2m'
  DEFAULTS = {
    **BASE_DEFAULTS,
    **THRESHOLD_DEFAULTS,
    **_SIGMA_SCHEDULES,
    'solver_order': 2,
    'algorithm_type': 'dpmsolver++',
    'solver_type': 'midpoint',
    'lower_order_final': True,
    'euler_at_final': False,
    'use_lu_lambdas': False,
    'use_flow_sigmas': False,
    'final_sigmas_type': 'zero',
    'lambda_min_clipped': -float('inf'),
    'variance_type': None,
    'timestep_spacing': 'linspace',
    'rescale_betas_zero_snr': False,
    'use_dynamic_shifting': False,
  }

  def __init__(self, cfg, num_inference_steps):
    super().__init__(cfg, num_inference_steps)
    check_unsupported(
      cfg,
      **_UNSUPPORTED,
      variance_type=('learned', 'learned_range'),
      algorithm_type=lambda v: v not in ('dpmsolver++', 'sde-dpmsolver++', 'deis'),
      solver_order=lambda v: v != 2,
      solver_type=lambda v: v not in ('midpoint', 'heun', 'logrho', 'bh1', 'bh2'),
    )
    n_train, n, spacing = cfg['num_train_timesteps'], num_inference_steps, cfg['timestep_spacing']
    ac, train_sigmas = _train_sigmas(cfg)
    # timesteps whose log-SNR is below lambda_min_clipped are never visited
    lambdas = 0.5 * np.log(ac / (1 - ac))
    last = n_train - int(np.searchsorted(lambdas[::-1], cfg['lambda_min_clipped']))
    if spacing == 'trailing':
      ts = np.round(np.arange(last, 0, -n_train / n)) - 1
    else:  # one extra point, dropped at the clean end
      ts = np.round(spaced_timesteps(spacing, last, n + 1, cfg['steps_offset'])[:-1])
    if cfg['use_karras_sigmas']:  # over the whole training range
      # In float32, as diffusers holds them: cosine schedules' timesteps are truncated, not rounded, and the
      # top one is 998.99999996 -> 998 from float32 sigmas, 999.0 -> 999 from float64 ones.
      train32 = train_sigmas.astype(np.float32)
      sigmas = karras_sigmas(float(train32[0]), float(train32[-1]), n)
      ts = sigma_to_t(sigmas, train32)
      ts = ts if cfg['beta_schedule'] == 'squaredcos_cap_v2' else np.round(ts)
    else:
      sigmas = np.interp(ts, np.arange(n_train), train_sigmas)
    final = cfg['final_sigmas_type']
    if final not in ('zero', 'sigma_min'):
      raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final!r}")
    self.sigmas = np.append(sigmas, train_sigmas[0] if final == 'sigma_min' else 0.0).astype(np.float32)
    self.timesteps = ts.astype(np.int64)
    n = len(self.timesteps)
    alpha, sig = _vp_scales(self.sigmas)
    self._noise_scales = np.stack([alpha[:-1], sig[:-1]]).astype(np.float32)

    # Coefficients in log-SNR lambda = -log(sigma): h = lambda_{i+1} - lambda_i, exp(-h) = s_{i+1} / s_i.
    s = self.sigmas.astype(np.float64)
    decay = s[1:] / s[:-1]
    sde = cfg['algorithm_type'] == 'sde-dpmsolver++'
    if sde:  # diffusers' sde-dpmsolver++ updates: exp(-h) -> exp(-2h) in the data term, and noise
      c0, c1 = sig[1:] / sig[:-1] * decay, alpha[1:] * (1 - decay**2)
      self._noise_std = (sig[1:] * np.sqrt(1 - decay**2)).astype(np.float32)
      self.stochastic = True
    else:
      c0, c1 = sig[1:] / sig[:-1], alpha[1:] * (1 - decay)
    with np.errstate(divide='ignore', invalid='ignore'):
      h = np.log(s[:-1] / s[1:])
      inv_r = h / np.roll(h, 1)  # h over the previous step's h (diffusers' 1 / r0)
      if cfg['solver_type'] == 'heun':
        d1 = alpha[1:] * (((1 - decay**2) / (-2 * h) if sde else (decay - 1) / h) + 1) * inv_r
      else:  # midpoint
        d1 = 0.5 * c1 * inv_r
      second = np.nan_to_num(np.stack([c0, c1 + d1, -d1]), nan=0.0, posinf=0.0, neginf=0.0)
    second[:, 0] = 0.0  # there is no previous output at the first step
    self._first = np.stack([c0, c1, np.zeros(n)]).T.astype(np.float32)
    self._second = second.T.astype(np.float32)
    lower_final = cfg['euler_at_final'] or (cfg['lower_order_final'] and n < 15) or final == 'zero'
    self._first_only = (np.arange(n) == n - 1) & lower_final

  def init_state(self, sample):
    return {'count': jnp.zeros((), jnp.int32), 'prev_x0': jnp.zeros(sample.shape, compute_dtype(sample))}

  def step(self, state, model_output, i, sample, key=None):
    x, m = sample.astype(compute_dtype(sample)), model_output.astype(compute_dtype(sample))
    alpha, sigma = at(self._noise_scales, (slice(None), i))
    x0, _ = predict_x0_eps(self.prediction_type, x, m, alpha, sigma)
    if self.config['thresholding']:
      x0 = threshold_sample(x0, self.config['dynamic_thresholding_ratio'], self.config['sample_max_value'])
    first = (state['count'] == 0) | at(self._first_only, i)  # first order until a previous x0 exists
    c = jnp.where(first, at(self._first, i), at(self._second, i))
    prev = c[0] * x + c[1] * x0 + c[2] * state['prev_x0']
    if self.stochastic:
      prev = prev + at(self._noise_std, i) * self._noise(key, sample).astype(prev.dtype)
    return prev.astype(sample.dtype), {'count': state['count'] + 1, 'prev_x0': x0}
