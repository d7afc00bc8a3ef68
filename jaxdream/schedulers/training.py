"""The training-side forward process: noising, v targets and SNR at sampled timesteps."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxdream.schedulers.alpha import DDPM
from jaxdream.schedulers.common import alphas_cumprod_from_config, resolve_config


@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
  """q(x_t | x0) of the training schedule, read from a scheduler config as diffusers' DDPMScheduler would."""

  alphas_cumprod: np.ndarray  # (num_train_timesteps,) float32
  prediction_type: str = 'epsilon'

  @classmethod
  def from_config(cls, scheduler_config: dict | None = None, **overrides) -> NoiseSchedule:
    cfg = resolve_config(scheduler_config, DDPM.DEFAULTS, overrides)
    if cfg['prediction_type'] not in ('epsilon', 'v_prediction', 'sample'):
      raise ValueError(f"prediction_type {cfg['prediction_type']!r} must be 'epsilon', 'v_prediction' or 'sample'")
    return cls(alphas_cumprod_from_config(cfg).astype(np.float32), cfg['prediction_type'])

  @property
  def num_train_timesteps(self) -> int:
    return len(self.alphas_cumprod)

  def _scales(self, timesteps, ndim):
    a = jnp.asarray(self.alphas_cumprod)[timesteps].reshape((-1,) + (1,) * (ndim - 1))
    return jnp.sqrt(a), jnp.sqrt(1 - a)

  def add_noise(self, x0, noise, timesteps):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with per-example integer `timesteps` of shape (B,)."""
    alpha, sigma = self._scales(timesteps, x0.ndim)
    return (alpha * x0 + sigma * noise).astype(x0.dtype)

  def get_velocity(self, x0, noise, timesteps):
    """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    alpha, sigma = self._scales(timesteps, x0.ndim)
    return (alpha * noise - sigma * x0).astype(x0.dtype)

  def target(self, x0, noise, timesteps):
    """What the model should predict under `prediction_type`."""
    if self.prediction_type == 'epsilon':
      return noise
    if self.prediction_type == 'v_prediction':
      return self.get_velocity(x0, noise, timesteps)
    return x0

  def snr(self, timesteps):
    """Signal-to-noise ratio a_t / (1 - a_t) (for Min-SNR loss weighting), shaped like `timesteps`."""
    a = jnp.asarray(self.alphas_cumprod)[timesteps]
    return a / (1 - a)
