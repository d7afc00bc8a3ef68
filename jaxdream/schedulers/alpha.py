"""Schedulers that work on the DDPM sample x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps: DDPM, DDIM, PNDM."""

from __future__ import annotations

import jax
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
  predict_x0_eps,
  spaced_timesteps,
  threshold_sample,
)

_CLIP_DEFAULTS = {
  'clip_sample': True,
  'clip_sample_range': 1.0,
  'timestep_spacing': 'leading',
  'rescale_betas_zero_snr': False,
  **THRESHOLD_DEFAULTS,
}


class _AlphaScheduler(Scheduler):
  """Integer timesteps on the training grid; `add_noise` is the DDPM forward process at timesteps[i]."""

  def __init__(self, cfg, num_inference_steps):
    super().__init__(cfg, num_inference_steps)
    self.alphas_cumprod = alphas_cumprod_from_config(cfg)

  def _set_timesteps(self, timesteps):
    self.timesteps = np.asarray(timesteps, np.int64)
    n_train = len(self.alphas_cumprod)
    if self.timesteps.size and not 0 <= self.timesteps.min() <= self.timesteps.max() < n_train:
      # e.g. 'leading' spacing with steps_offset 1 and as many steps as training timesteps (diffusers fails at
      # its first step)
      raise ValueError(
        f'{self.num_inference_steps} steps with timestep_spacing {self.config["timestep_spacing"]!r} and '
        f'steps_offset {self.config["steps_offset"]} reach timestep {int(self.timesteps.max())}, past the '
        f'{n_train} training timesteps: use fewer steps'
      )
    a = self.alphas_cumprod[self.timesteps]
    self._noise_scales = np.stack([np.sqrt(a), np.sqrt(1 - a)]).astype(np.float32)


class _X0Scheduler(_AlphaScheduler):
  """DDPM and DDIM: predict x0 (clipped or thresholded), then prev = p * x0 + q * x + r * eps + std * noise."""

  def _set_coefs(self, p, q, r, std):
    self._coefs = np.stack([p, q, r, std]).astype(np.float32)
    self.stochastic = bool(np.any(std > 0))

  def step(self, state, model_output, i, sample, key=None):
    x, m = sample.astype(compute_dtype(sample)), model_output.astype(compute_dtype(sample))
    alpha, sigma = at(self._noise_scales, (slice(None), i))
    x0, eps = predict_x0_eps(self.prediction_type, x, m, alpha, sigma)
    cfg = self.config
    if cfg['thresholding']:
      x0 = threshold_sample(x0, cfg['dynamic_thresholding_ratio'], cfg['sample_max_value'])
    elif cfg['clip_sample']:
      x0 = jnp.clip(x0, -cfg['clip_sample_range'], cfg['clip_sample_range'])
    p, q, r, std = at(self._coefs, (slice(None), i))
    prev = p * x0 + q * x + r * eps
    if self.stochastic:
      prev = prev + std * self._noise(key, sample)
    return prev.astype(sample.dtype), {'count': state['count'] + 1}


class DDPM(_X0Scheduler):
  """Ancestral sampling of Ho et al. (2020), as diffusers' DDPMScheduler."""

  name = 'ddpm'
  DEFAULTS = {**BASE_DEFAULTS, **_CLIP_DEFAULTS, 'variance_type': 'fixed_small'}

  def __init__(self, cfg, num_inference_steps):
    check_unsupported(cfg, variance_type=('learned', 'learned_range', 'fixed_large_log'))
    super().__init__(cfg, num_inference_steps)
    self._set_timesteps(
      np.round(
        spaced_timesteps(cfg['timestep_spacing'], cfg['num_train_timesteps'], num_inference_steps, cfg['steps_offset'])
      )
    )
    a_t = self.alphas_cumprod[self.timesteps]
    a_prev = np.append(self.alphas_cumprod[self.timesteps[1:]], 1.0)  # the step after the last is x0
    alpha_t, beta_t = a_t / a_prev, 1 - a_t / a_prev  # one-step alpha/beta between the two timesteps
    variance = np.maximum((1 - a_prev) / (1 - a_t) * beta_t, 1e-20)
    std = np.sqrt(beta_t if cfg['variance_type'] == 'fixed_large' else variance)
    self._set_coefs(
      p=np.sqrt(a_prev) * beta_t / (1 - a_t),
      q=np.sqrt(alpha_t) * (1 - a_prev) / (1 - a_t),
      r=np.zeros_like(a_t),
      std=np.where(self.timesteps > 0, std, 0.0),
    )


class DDIM(_X0Scheduler):
  """Song et al. (2021); `eta` > 0 adds DDPM-like noise, as the `eta` argument of diffusers' step."""

  name = 'ddim'
  DEFAULTS = {**BASE_DEFAULTS, **_CLIP_DEFAULTS, 'set_alpha_to_one': True}

  def __init__(self, cfg, num_inference_steps, eta: float = 0.0):
    super().__init__(cfg, num_inference_steps)
    self.eta = float(eta)  # part of the schedule: the sampler's compile cache tells loops apart by it
    n_train = cfg['num_train_timesteps']
    self._set_timesteps(
      np.round(spaced_timesteps(cfg['timestep_spacing'], n_train, num_inference_steps, cfg['steps_offset']))
    )
    a_t = self.alphas_cumprod[self.timesteps]
    final = 1.0 if cfg['set_alpha_to_one'] else self.alphas_cumprod[0]
    # diffusers steps back by a fixed stride, whatever the spacing
    prev_t = self.timesteps - n_train // num_inference_steps
    a_prev = np.where(prev_t >= 0, self.alphas_cumprod[np.maximum(prev_t, 0)], final)
    std = eta * np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    self._set_coefs(p=np.sqrt(a_prev), q=np.zeros_like(a_t), r=np.sqrt(1 - a_prev - std**2), std=std)


class PNDM(_AlphaScheduler):
  """Pseudo numerical methods (Liu et al. 2022): PLMS, optionally started by Runge-Kutta (PRK) steps.

  Follows diffusers' PNDMScheduler step for step, including its state machine: PLMS runs a
  Heun-like correction on its second call, and PRK uses 3 four-call Runge-Kutta steps. The history
  is counted in calls since `init_state` (`count`), as diffusers counts them, not in step indices.
  """

  name = 'pndm'
  DEFAULTS = {**BASE_DEFAULTS, 'skip_prk_steps': False, 'set_alpha_to_one': False, 'timestep_spacing': 'leading'}
  # Adams-Bashforth weights on (newest, ..., oldest) model outputs, by number of outputs available.
  _AB = np.array(
    [
      [0, 0, 0, 0],
      [1, 0, 0, 0],
      [3 / 2, -1 / 2, 0, 0],
      [23 / 12, -16 / 12, 5 / 12, 0],
      [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ],
    np.float32,
  )

  def __init__(self, cfg, num_inference_steps):
    if cfg['prediction_type'] not in ('epsilon', 'v_prediction'):
      raise ValueError(f"PNDM supports prediction_type 'epsilon' or 'v_prediction', not {cfg['prediction_type']!r}")
    super().__init__(cfg, num_inference_steps)
    n_train, n = cfg['num_train_timesteps'], num_inference_steps
    base = np.round(spaced_timesteps(cfg['timestep_spacing'], n_train, n, cfg['steps_offset']))[::-1]
    self._stride = n_train // n
    if cfg['skip_prk_steps']:  # the first timestep is visited twice (predictor, then corrector)
      prk, plms = np.zeros(0), np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
    elif n < 4:
      raise ValueError(f'PNDM with Runge-Kutta steps (skip_prk_steps=False) needs at least 4 steps, got {n}')
    else:  # RK4 over the first 3 strides: each stride as t, t - stride/2 (twice), t - stride
      prk = base[-4:].repeat(2) + np.tile([0, self._stride // 2], 4)
      prk, plms = prk[:-1].repeat(2)[1:-1][::-1], base[:-3][::-1]
    self._prk_timesteps = prk.astype(np.int32)
    self._set_timesteps(np.concatenate([prk, plms]))
    self._ac = self.alphas_cumprod.astype(np.float32)
    self._final_ac = np.float32(1.0 if cfg['set_alpha_to_one'] else self._ac[0])

  def init_state(self, sample):
    x = jnp.zeros(sample.shape, compute_dtype(sample))
    return {
      'count': jnp.zeros((), jnp.int32),
      'n_ets': jnp.zeros((), jnp.int32),
      'ets': jnp.zeros((3,) + sample.shape, x.dtype),  # last model outputs, newest first
      'cur_sample': x,
      'prk_sum': x,
    }

  def _transfer(self, x, model_output, t, prev_t):
    """Eq. 9 of the paper: x_t -> x_{prev_t} given a noise estimate (diffusers' _get_prev_sample)."""
    ac = jnp.asarray(self._ac)
    a_t = ac[jnp.clip(t, 0, len(self._ac) - 1)]
    a_prev = jnp.where(prev_t >= 0, ac[jnp.clip(prev_t, 0, len(self._ac) - 1)], self._final_ac)
    if self.prediction_type == 'v_prediction':
      model_output = jnp.sqrt(a_t) * model_output + jnp.sqrt(1 - a_t) * x
    denom = a_t * jnp.sqrt(1 - a_prev) + jnp.sqrt(a_t * (1 - a_t) * a_prev)
    return jnp.sqrt(a_prev / a_t) * x - (a_prev - a_t) * model_output / denom

  @staticmethod
  def _push(state, m, push):
    ets = jnp.where(push, jnp.concatenate([m[None], state['ets'][:-1]]), state['ets'])
    return ets, jnp.where(push, jnp.minimum(state['n_ets'] + 1, 3), state['n_ets'])

  def _plms(self, state, m, i, x):
    c, t_i = state['count'], at(self.timesteps.astype(np.int32), i)
    corrector = c == 1  # re-does the first stride with the mean of both outputs
    ets = state['ets']
    w = at(self._AB, jnp.minimum(state['n_ets'] + 1, 4))
    combined = jnp.where(corrector, (m + ets[0]) / 2, w[0] * m + jnp.tensordot(w[1:], ets, axes=1))
    t, prev_t = jnp.where(corrector, t_i + self._stride, t_i), jnp.where(corrector, t_i, t_i - self._stride)
    prev = self._transfer(jnp.where(corrector, state['cur_sample'], x), combined, t, prev_t)
    new_ets, n_ets = self._push(state, m, ~corrector)
    return prev, {**state, 'ets': new_ets, 'n_ets': n_ets, 'cur_sample': jnp.where(c == 0, x, state['cur_sample'])}

  def _prk(self, state, m, i, x):
    c = state['count']
    phase = c % 4  # RK4 stages: k1 at t, k2 and k3 at t - stride/2, k4 at t - stride
    prev_t = at(self.timesteps.astype(np.int32), i) - jnp.where(c % 2 == 0, self._stride // 2, 0)
    start = jnp.where(phase == 0, x, state['cur_sample'])
    out = jnp.where(phase == 3, state['prk_sum'] + m / 6, m)
    prk_sum = jnp.where(phase == 0, m / 6, jnp.where(phase == 3, 0.0, state['prk_sum'] + m / 3))
    prev = self._transfer(start, out, at(self._prk_timesteps, c // 4 * 4), prev_t)
    ets, n_ets = self._push(state, m, phase == 0)
    return prev, {**state, 'ets': ets, 'n_ets': n_ets, 'cur_sample': start, 'prk_sum': prk_sum}

  def step(self, state, model_output, i, sample, key=None):
    x, m = sample.astype(compute_dtype(sample)), model_output.astype(compute_dtype(sample))
    if len(self._prk_timesteps):  # both branches are cheap elementwise maths: select rather than lax.cond
      in_prk = state['count'] < len(self._prk_timesteps)
      prev, state = jax.tree.map(
        lambda a, b: jnp.where(in_prk, a, b), self._prk(state, m, i, x), self._plms(state, m, i, x)
      )
    else:
      prev, state = self._plms(state, m, i, x)
    return prev.astype(sample.dtype), {**state, 'count': state['count'] + 1}
