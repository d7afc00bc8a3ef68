"""A1111's request bodies, with its field names and defaults (modules/api/models.py there). Unknown fields are
accepted and ignored, as A1111 does. width/height default to the model's own size (512 for SD 1.x, A1111's)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Request(BaseModel):
  model_config = ConfigDict(extra='ignore')

  @model_validator(mode='before')
  @classmethod
  def _nulls_are_defaults(cls, data):
    """A1111's request fields are all optional: null means the default (seed: null is a random seed)."""
    return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Txt2ImgRequest(_Request):
  prompt: str = ''
  negative_prompt: str = ''
  styles: list[str] | None = None
  seed: int = -1
  subseed: int = -1
  subseed_strength: float = 0.0
  seed_resize_from_h: int = -1
  seed_resize_from_w: int = -1
  sampler_name: str | None = None
  sampler_index: str = 'Euler'
  scheduler: str | None = None
  batch_size: int = 1
  n_iter: int = 1
  steps: int = 50
  cfg_scale: float = 7.0
  width: int | None = None
  height: int | None = None
  restore_faces: bool | None = None
  tiling: bool | None = None
  do_not_save_samples: bool = False
  do_not_save_grid: bool = False
  eta: float | None = None
  denoising_strength: float | None = None
  override_settings: dict[str, Any] | None = None
  override_settings_restore_afterwards: bool = True
  script_name: str | None = None
  script_args: list = Field(default_factory=list)
  send_images: bool = True
  save_images: bool = False
  alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
  infotext: str | None = None
  enable_hr: bool = False
  hr_scale: float = 2.0
  hr_upscaler: str | None = None
  hr_second_pass_steps: int = 0
  hr_resize_x: int = 0
  hr_resize_y: int = 0
  hr_checkpoint_name: str | None = None
  hr_sampler_name: str | None = None
  hr_scheduler: str | None = None
  hr_prompt: str = ''
  hr_negative_prompt: str = ''


class Img2ImgRequest(Txt2ImgRequest):
  init_images: list[str] | None = None
  resize_mode: int = 0
  image_cfg_scale: float | None = None
  mask: str | None = None
  mask_blur_x: int = 4
  mask_blur_y: int = 4
  mask_blur: int | None = None
  inpainting_fill: int = 0
  inpaint_full_res: bool = True
  inpaint_full_res_padding: int = 32
  inpainting_mask_invert: int = 0
  initial_noise_multiplier: float | None = None
  latent_mask: str | None = None
  include_init_images: bool = False
  denoising_strength: float | None = 0.75


class PngInfoRequest(_Request):
  image: str = ''


class OptionsRequest(BaseModel):
  model_config = ConfigDict(extra='allow')
