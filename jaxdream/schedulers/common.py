"""Pieces shared by every scheduler: config resolution, beta/sigma tables, timestep spacing, base class.

Tables are built once in NumPy: the training schedule rounded to float32 exactly where diffusers rounds
it, everything derived from it in float64, stored as float32. `Scheduler.step` indexes them with a
(possibly traced) step number and does only scalar-times-array maths on top.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Keys every diffusers scheduler class takes, with the defaults all of them share.
BASE_DEFAULTS = {
  'num_train_timesteps': 1000,
  'beta_start': 0.0001,
  'beta_end': 0.02,
  'beta_schedule': 'linear',
  'trained_betas': None,
  'prediction_type': 'epsilon',
  'steps_offset': 0,
}
THRESHOLD_DEFAULTS = {'thresholding': False, 'dynamic_thresholding_ratio': 0.995, 'sample_max_value': 1.0}


def resolve_config(config: dict | None, defaults: dict, overrides: dict | None = None) -> dict:
  """The init kwargs `XScheduler.from_config(config, **overrides)` would use, for the keys in `defaults`.

  As in diffusers, keys the target class does not take are ignored (in `overrides` too), keys listed in
  `_use_default_values` fall back to the class default, and `overrides` win over the config.
  """
  config = dict(config or {})
  use_default = set(config.get('_use_default_values', ()))
  config = {k: v for k, v in config.items() if k not in use_default} | dict(overrides or {})
  return {k: config.get(k, v) for k, v in defaults.items()}


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _cumprod(alphas: np.ndarray) -> np.ndarray:
  return np.cumprod(alphas.astype(np.float64)).astype(np.float32)  # torch.cumprod accumulates in double


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shift and scale sqrt(alphas_cumprod) so the last step has SNR 0 (Lin et al. 2023, algorithm 1).

  In float32, op for op as diffusers: the near-zero tail is sensitive to that rounding.
  """
  sqrt_ac = np.sqrt(_cumprod(np.float32(1) - betas))
  first, last = sqrt_ac[0], sqrt_ac[-1]
  ac = ((sqrt_ac - last) * (first / (first - last))) ** 2
  return np.float32(1) - np.concatenate([ac[:1], ac[1:] / ac[:-1]])


def alphas_cumprod_from_config(cfg: dict) -> np.ndarray:
  """Cumulative alpha products of the training noise schedule: float32 values, as a float64 array.

  Like diffusers, betas and alphas are float32 and the product accumulates in double (torch.cumprod
  does); this rounding is part of the schedule, and reproducing it keeps us within ~1e-7 of diffusers.
  """
  n, schedule = cfg['num_train_timesteps'], cfg['beta_schedule']
  f32 = np.float32
  if cfg['trained_betas'] is not None:
    betas = np.asarray(cfg['trained_betas'], f32)
  elif schedule == 'linear':
    betas = np.linspace(cfg['beta_start'], cfg['beta_end'], n).astype(f32)
  elif schedule == 'scaled_linear':
    betas = np.linspace(cfg['beta_start'] ** 0.5, cfg['beta_end'] ** 0.5, n).astype(f32) ** 2
  elif schedule == 'squaredcos_cap_v2':
    betas = _cosine_betas(n).astype(f32)
  else:
    raise NotImplementedError(
      f"beta_schedule {schedule!r} is not supported (use 'linear', 'scaled_linear' or 'squaredcos_cap_v2')"
    )
  if cfg.get('rescale_betas_zero_snr'):
    betas = _rescale_zero_terminal_snr(betas)
  return _cumprod(f32(1) - betas).astype(np.float64)


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int) -> np.ndarray:
  """Descending float64 timesteps for `n` steps; callers round/cast the way their diffusers class does."""
  if spacing == 'linspace':
    return np.linspace(0, num_train - 1, n)[::-1].copy()
  if spacing == 'leading':
    return (np.arange(n) * (num_train // n))[::-1].astype(np.float64) + steps_offset
  if spacing == 'trailing':
    return np.round(np.arange(num_train, 0, -num_train / n)) - 1
  raise ValueError(f"timestep_spacing {spacing!r} is not supported: use 'linspace', 'leading' or 'trailing'")


def strength_steps(num_inference_steps: int, strength: float) -> int:
  """Steps an img2img run of `strength` takes of `num_inference_steps` (diffusers' get_timesteps)."""
  return min(int(num_inference_steps * strength), num_inference_steps)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
  """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma**(1/rho), descending."""
  ramp = np.linspace(0, 1, n)
  return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_t(sigmas: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
  """Fractional training timestep of each sigma, by linear interpolation in log-sigma."""
  log_train = np.log(train_sigmas)
  log_sigma = np.log(np.maximum(sigmas, 1e-10))
  low = np.clip(np.sum(log_sigma[None, :] >= log_train[:, None], axis=0) - 1, 0, len(log_train) - 2)
  w = np.clip((log_train[low] - log_sigma) / (log_train[low] - log_train[low + 1]), 0, 1)
  return (1 - w) * low + w * (low + 1)


def check_unsupported(cfg: dict, **unsupported_values) -> None:
  """Raise NotImplementedError when an option has a value this port does not implement."""
  for key, bad in unsupported_values.items():
    if key in cfg and (cfg[key] in bad if isinstance(bad, tuple) else bad(cfg[key])):
      raise NotImplementedError(f'scheduler option {key}={cfg[key]!r} is not supported by jaxdream')


def predict_x0_eps(prediction_type: str, x, model_output, alpha, sigma):
  """Clean-sample and noise estimates from a model output, for x = alpha * x0 + sigma * eps."""
  if prediction_type == 'epsilon':
    return (x - sigma * model_output) / alpha, model_output
  if prediction_type == 'v_prediction':
    return alpha * x - sigma * model_output, alpha * model_output + sigma * x
  if prediction_type == 'sample':
    return model_output, (x - alpha * model_output) / sigma
  raise ValueError(f"prediction_type {prediction_type!r} must be 'epsilon', 'v_prediction' or 'sample'")


def threshold_sample(x0, ratio: float, max_value: float):
  """Imagen dynamic thresholding: clip each example to its `ratio` quantile of |x0| (at least 1), rescale.

  An example is the trailing (H, W, C) block, so (B, H, W, C) batches and per-image vmaps agree.
  """
  s = jnp.quantile(jnp.abs(x0), ratio, axis=(-3, -2, -1), keepdims=True)
  s = jnp.clip(s, 1.0, max_value)
  return jnp.clip(x0, -s, s) / s


def at(table: np.ndarray, i):
  """Row `i` (a Python or traced int) of a precomputed table."""
  return jnp.asarray(table)[i]


def compute_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


class Scheduler:
  """Base class: a fixed sampling schedule, with tables indexed by the step number `i`.

  Subclasses set `timesteps`, `_noise_scales` (2, num_steps) for `add_noise`, optionally
  `_input_scales` for `scale_model_input`, and implement `step`.
  """

  name: str = ''
  stochastic: bool = False  # whether `step` needs a PRNG key
  order: int = 1  # model calls per step of the method (Heun: 2, its calls interleaved in the timesteps)
  init_noise_sigma: float = 1.0
  _input_scales: np.ndarray | None = None

  def __init__(self, cfg: dict, num_inference_steps: int):
    if not 1 <= num_inference_steps <= cfg['num_train_timesteps']:
      raise ValueError(f'num_inference_steps must be in [1, {cfg["num_train_timesteps"]}], got {num_inference_steps}')
    self.config = cfg
    self.num_inference_steps = int(num_inference_steps)
    self.prediction_type = cfg['prediction_type']

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  def __repr__(self):
    return f'<{type(self).__name__} {self.name!r}: {self.num_steps} steps>'

  def scale_model_input(self, sample, i):
    if self._input_scales is None:
      return sample
    return (sample / at(self._input_scales, i)).astype(sample.dtype)

  def init_state(self, sample) -> dict[str, Any]:
    return {'count': jnp.zeros((), jnp.int32)}

  def step(self, state, model_output, i, sample, key=None):
    """One denoising step from `sample` at step `i`; returns (prev_sample, new_state)."""
    raise NotImplementedError

  def denoised(self, sample, model_output, i):
    """The clean sample that `model_output` predicts from `sample` at step `i`, in the loop's latent space:
    diffusers' `pred_original_sample` before clipping, and what A1111 shows as its live preview and keeps when a
    run is interrupted. The model saw scale_model_input(sample) = (a x0 + s eps) / c."""
    x, m = sample.astype(compute_dtype(sample)), model_output.astype(compute_dtype(sample))
    a, s = at(self._noise_scales, (slice(None), i))
    c = 1.0 if self._input_scales is None else at(self._input_scales, i)
    x0, _ = predict_x0_eps(self.prediction_type, x / c, m, a / c, s / c)
    return x0.astype(sample.dtype)

  def start_index(self, strength: float) -> int:
    """First step of an img2img run, as diffusers' img2img `get_timesteps` picks it. A strength that leaves no
    step is an error, as in diffusers' pipelines (the image would come back noised, not denoised)."""
    n = self.num_inference_steps
    if strength_steps(n, strength) < 1:
      raise ValueError(
        f'strength {strength:g} of {n} steps runs no denoising step (int(steps * strength) = 0): raise the strength '
        'or the steps'
      )
    return n - strength_steps(n, strength)

  def timestep_cutoff(self, fraction: float) -> int:
    """The training timestep at `fraction` of the way from noise to image (diffusers' discrete_timestep_cutoff)."""
    if not 0.0 < fraction < 1.0:
      raise ValueError(f'denoising_start / denoising_end must be in (0, 1), got {fraction}')
    n = self.config['num_train_timesteps']
    return int(round(n - fraction * n))

  def denoising_start_index(self, denoising_start: float) -> int:
    """First step of a run that takes over at `denoising_start` (the SDXL refiner's): the steps whose timestep is
    below the cutoff remain, as diffusers' img2img `get_timesteps(denoising_start=...)` counts them, with its +1 for
    second-order schedulers."""
    remaining = int(np.sum(self.timesteps < self.timestep_cutoff(denoising_start)))
    # a second-order scheduler starts on a step's first call: diffusers' +1 when the count is even
    return self.num_steps - remaining - (self.order == 2 and remaining % 2 == 0)

  def denoising_end_index(self, denoising_end: float, start: int = 0) -> int:
    """Step index at which a run from `start` stops to hand over at `denoising_end` (the SDXL base's): it keeps as
    many steps as its timesteps from `start` on are at or above the cutoff, as diffusers' pipelines count them."""
    return start + int(np.sum(self.timesteps[start:] >= self.timestep_cutoff(denoising_end)))

  def add_noise(self, original, noise, i):
    """Noise a clean sample to the level the loop expects at step `i` (diffusers' `add_noise`)."""
    scales = at(self._noise_scales, (slice(None), i))
    return (scales[0] * original + scales[1] * noise).astype(original.dtype)

  def _noise(self, key, sample):
    if key is None:
      raise ValueError(f'scheduler {self.name!r} is stochastic: step() needs a PRNG key')
    return jax.random.normal(key, sample.shape, sample.dtype)
