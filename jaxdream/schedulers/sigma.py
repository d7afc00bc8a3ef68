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


def _multistep_schedule(cfg, n: int, lambda_min_clipped: float = -float('inf'), unipc: bool = False):
  """(sigmas (n + 1,) float32, timesteps (n,) int64) of diffusers' multistep solvers (DPMSolverMultistep, UniPC):
  n + 1 spaced points with the clean end dropped, or Karras sigmas over the training range (UniPC: between the
  config's sigma_min / sigma_max when given); the last sigma 0 or the training minimum (final_sigmas_type; UniPC's
  Karras sigmas: their own last)."""
  n_train, spacing = cfg['num_train_timesteps'], cfg['timestep_spacing']
  ac, train_sigmas = _train_sigmas(cfg)
  # timesteps whose log-SNR is below lambda_min_clipped are never visited
  lambdas = 0.5 * np.log(ac / (1 - ac))
  last = n_train - int(np.searchsorted(lambdas[::-1], lambda_min_clipped))
  if spacing == 'trailing':
    ts = np.round(np.arange(last, 0, -n_train / n)) - 1
  else:  # one extra point, dropped at the clean end
    ts = np.round(spaced_timesteps(spacing, last, n + 1, cfg['steps_offset'])[:-1])
  if cfg['use_karras_sigmas']:  # over the whole training range
    # In float32, as diffusers holds them: DPMSolverMultistep truncates cosine schedules' timesteps (UniPC rounds
    # them), and the top one is 998.99999996 -> 998 from float32 sigmas, 999.0 -> 999 from float64 ones.
    train32 = train_sigmas.astype(np.float32)
    lo, hi = (cfg['sigma_min'], cfg['sigma_max']) if unipc else (None, None)
    sigmas = karras_sigmas(float(train32[0]) if lo is None else lo, float(train32[-1]) if hi is None else hi, n)
    ts = sigma_to_t(sigmas, train32)
    ts = ts if cfg['beta_schedule'] == 'squaredcos_cap_v2' and not unipc else np.round(ts)
  else:
    sigmas = np.interp(ts, np.arange(n_train), train_sigmas)
  final = cfg['final_sigmas_type']
  if final not in ('zero', 'sigma_min'):
    raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final!r}")
  least = sigmas[-1] if unipc and cfg['use_karras_sigmas'] else train_sigmas[0]
  return np.append(sigmas, least if final == 'sigma_min' else 0.0).astype(np.float32), ts.astype(np.int64)


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
    self.sigmas, self.timesteps = _multistep_schedule(cfg, num_inference_steps, cfg['lambda_min_clipped'])
    final = cfg['final_sigmas_type']
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


class UniPC(Scheduler):
  """UniPC of Zhao et al. (2023), as diffusers' UniPCMultistepScheduler with solver_order 2 and predict_x0 (its
  defaults; bh1 or bh2): each call first corrects the sample the model just saw with that output (UniC, from the
  previous step's sample and outputs), then predicts the next sample from the corrected one (UniP). Both are linear
  in the samples and the clean-sample estimates, so their coefficients are tables; the first call of a run (no
  previous step) predicts to first order only, as does the last step (lower_order_final).
  """

  name = 'unipc'
  DEFAULTS = {
    **BASE_DEFAULTS,
    **THRESHOLD_DEFAULTS,
    **_SIGMA_SCHEDULES,
    'solver_order': 2,
    'predict_x0': True,
    'solver_type': 'bh2',
    'lower_order_final': True,
    'disable_corrector': [],
    'solver_p': None,
    'use_flow_sigmas': False,
    'timestep_spacing': 'linspace',
    'final_sigmas_type': 'zero',
    'rescale_betas_zero_snr': False,
    'use_dynamic_shifting': False,
    'sigma_min': None,
    'sigma_max': None,
  }

  def __init__(self, cfg, num_inference_steps):
    super().__init__(cfg, num_inference_steps)
    if cfg['solver_type'] in ('midpoint', 'heun', 'logrho'):  # DPM-Solver's names: diffusers runs them as bh2
      cfg = self.config = {**cfg, 'solver_type': 'bh2'}
    check_unsupported(
      cfg,
      **_UNSUPPORTED,
      solver_order=lambda v: v != 2,
      predict_x0=(False,),
      solver_type=lambda v: v not in ('bh1', 'bh2'),
      disable_corrector=lambda v: bool(v),
      solver_p=lambda v: v is not None,
    )
    if self.prediction_type not in ('epsilon', 'v_prediction', 'sample'):
      raise ValueError(f'unipc: prediction_type {self.prediction_type!r} is not supported')
    self.sigmas, self.timesteps = _multistep_schedule(cfg, num_inference_steps, unipc=True)
    n = len(self.timesteps)
    alpha, sig = _vp_scales(self.sigmas)
    self._noise_scales = np.stack([alpha[:-1], sig[:-1]]).astype(np.float32)
    with np.errstate(divide='ignore', invalid='ignore'):
      lam = np.log(alpha) - np.log(sig)  # log-SNR, +inf at a final sigma 0
      bh2 = cfg['solver_type'] == 'bh2'
      # UniP at step i, from the corrected x_i to x_{i+1}: P0 x_i + P1 m_i (+ P2 m_{i-1} at second order)
      h = lam[1:] - lam[:-1]
      hh = -h
      phi1 = np.expm1(hh)
      b_h = np.expm1(hh) if bh2 else hh
      r1 = (np.roll(lam[:-1], 1) - lam[:-1]) / h  # (lambda_{i-1} - lambda_i) / h
      p_first = np.stack([sig[1:] / sig[:-1], -alpha[1:] * phi1, np.zeros(n)])
      d = alpha[1:] * b_h * 0.5 / r1  # rho_p = 1/2: x - alpha B_h rho (m_{i-1} - m_i) / r1
      p_second = np.stack([sig[1:] / sig[:-1], -alpha[1:] * phi1 + d, -d])
      # UniC at step i (i >= 1), correcting the sample the model saw at i from x_{i-1} (corrected) and m_{i-1}, m_i,
      # (and m_{i-2} at second order): C0 x_{i-1} + C1 m_{i-1} + C2 m_{i-2} + C3 m_i
      hc = np.concatenate([[np.nan], h[:-1]])  # lambda_i - lambda_{i-1}
      hhc = -hc
      phi1c = np.expm1(hhc)
      bc = np.expm1(hhc) if bh2 else hhc
      a_i, s_ratio = alpha[:-1], sig[:-1] / np.roll(sig[:-1], 1)
      c_first = np.stack([s_ratio, -a_i * phi1c + a_i * bc * 0.5, np.zeros(n), -a_i * bc * 0.5])
      rc = (np.roll(lam[:-1], 2) - np.roll(lam[:-1], 1)) / hc  # (lambda_{i-2} - lambda_{i-1}) / h
      phik = phi1c / hhc - 1
      b1 = phik / bc
      b2 = (phik / hhc - 0.5) * 2 / bc
      # solve([[1, 1], [rc, 1]], [b1, b2]) for (rho_0, rho_1)
      rho0 = (b1 - b2) / (1 - rc)
      rho1 = b1 - rho0
      c_second = np.stack(
        [s_ratio, -a_i * phi1c + a_i * bc * (rho0 / rc + rho1), -a_i * bc * rho0 / rc, -a_i * bc * rho1]
      )
    # (n, 2 orders, coefficients); entries a step never uses (no earlier step to read) are 0
    table = lambda *orders: np.nan_to_num(np.stack(orders).transpose(2, 0, 1), posinf=0, neginf=0).astype(np.float32)
    self._predict, self._correct = table(p_first, p_second), table(c_first, c_second)
    # first order at the last step: lower_order_final, and always to a final sigma 0 (second order's coefficients are
    # infinite there: diffusers' result is inf)
    self._last = n - 1 if cfg['lower_order_final'] or self.sigmas[-1] == 0 else -1

  def init_state(self, sample):
    zeros = jnp.zeros(sample.shape, compute_dtype(sample))
    return {'count': jnp.zeros((), jnp.int32), 'x': zeros, 'm1': zeros, 'm2': zeros}

  def step(self, state, model_output, i, sample, key=None):
    x, out = sample.astype(compute_dtype(sample)), model_output.astype(compute_dtype(sample))
    alpha, sigma = at(self._noise_scales, (slice(None), i))
    m, _ = predict_x0_eps(self.prediction_type, x, out, alpha, sigma)
    if self.config['thresholding']:
      m = threshold_sample(m, self.config['dynamic_thresholding_ratio'], self.config['sample_max_value'])
    n = state['count']
    # UniC with the order the previous call predicted with (first after a run's first call), none on the first
    c = at(self._correct, i)[jnp.where(n == 1, 0, 1)]
    corrected = c[0] * state['x'] + c[1] * state['m1'] + c[2] * state['m2'] + c[3] * m
    x = jnp.where(n == 0, x, corrected)
    p = at(self._predict, i)[jnp.where((n == 0) | (i == self._last), 0, 1)]
    prev = p[0] * x + p[1] * m + p[2] * state['m1']
    return prev.astype(sample.dtype), {'count': n + 1, 'x': x, 'm1': m, 'm2': state['m1']}
