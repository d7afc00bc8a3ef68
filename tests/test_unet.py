"""The UNet port computes what diffusers' UNet2DConditionModel computes, from the same weight files."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, nchw, nhwc, rel_err

from jaxdream.models import ConfigError, UNet2DConditionModel, abstract_model, count_params, load_unet, presets

pytestmark = pytest.mark.reference


def _inputs(cfg_ctx, size=16, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, 4, size, size)).astype(np.float32)
  t = np.array([3, 917][:batch], np.int64)
  c = rng.standard_normal((batch, 7, cfg_ctx)).astype(np.float32)
  return x, t, c


def _compare(torch_model, path, size=16, dtype=jnp.float32):
  x, t, c = _inputs(torch_model.config.cross_attention_dim, size)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).sample.numpy()
  unet = load_unet(path, dtype=dtype)
  out = jit_call(unet)(jnp.asarray(nhwc(x)), jnp.asarray(t), jnp.asarray(c))
  return rel_err(nchw(np.asarray(out, np.float32)), ref)


def test_sd1_like_unet_matches_diffusers(torch_unet_sd1):
  assert _compare(*torch_unet_sd1) <= 1e-5


def test_sd2_like_unet_matches_diffusers(torch_unet_sd2):
  # linear projections, per-block head counts, upcast attention, 2 transformer layers, freq_shift 1
  assert _compare(*torch_unet_sd2) <= 1e-5


def test_latents_not_divisible_by_the_downsampling_match_diffusers(torch_unet_sd1):
  assert _compare(*torch_unet_sd1, size=18) <= 1e-5


def test_bfloat16_compute_stays_close_to_float32_reference(torch_unet_sd2):
  assert _compare(*torch_unet_sd2, dtype=jnp.bfloat16) <= 2e-2


def test_nine_channel_inpainting_unet_matches_diffusers(tmp_path):
  from conftest import UNET_SD1, perturb_
  from diffusers import UNet2DConditionModel as TorchUNet

  torch.manual_seed(7)
  model = perturb_(TorchUNet(**dict(UNET_SD1, in_channels=9)), seed=7)
  model.save_pretrained(tmp_path)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 9, 16, 16)).astype(np.float32)
  c = rng.standard_normal((1, 5, 32)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.tensor([250]), torch.from_numpy(c)).sample.numpy()
  out = jit_call(load_unet(str(tmp_path)))(jnp.asarray(nhwc(x)), jnp.array([250]), jnp.asarray(c))
  assert out.shape == (1, 16, 16, 4)
  assert rel_err(nchw(out), ref) <= 1e-5


@pytest.mark.parametrize('preset, count', [('SD15_UNET', 859_520_964), ('SDXL_UNET', 2_567_463_684)])
def test_published_configs_have_diffusers_parameter_counts(preset, count):
  model = abstract_model(lambda rngs: UNet2DConditionModel(getattr(presets, preset), rngs=rngs))
  assert count_params(model) == count


def test_unknown_config_key_is_an_error_naming_it():
  with pytest.raises(ConfigError, match='frobnicate'):
    UNet2DConditionModel.resolve_config(dict(presets.SD15_UNET, frobnicate=1))


@pytest.mark.parametrize(
  'key,value',
  [
    ('class_embed_type', 'timestep'),
    ('addition_embed_type', 'text_image'),
    ('down_block_types', ['CrossAttnDownBlock2D', 'SimpleDownBlock2D', 'DownBlock2D', 'DownBlock2D']),
  ],
)
def test_unsupported_config_value_is_an_error_naming_the_key(key, value):
  with pytest.raises(ConfigError, match=key):
    UNet2DConditionModel.resolve_config(dict(presets.SD15_UNET, **{key: value}))


def test_head_counts_divide_only_the_channels_of_blocks_with_attention():
  from conftest import UNET_SD1
  from diffusers import UNet2DConditionModel as TorchUNet

  # 5 heads on the middle level, whose blocks have no attention (diffusers never splits its 48 channels).
  cfg = dict(
    UNET_SD1,
    block_out_channels=(32, 48, 64),
    attention_head_dim=[4, 5, 4],
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D', 'CrossAttnUpBlock2D'),
  )
  want = sum(p.numel() for p in TorchUNet(**cfg).parameters())
  assert count_params(abstract_model(lambda rngs: UNet2DConditionModel(cfg, rngs=rngs))) == want
  with pytest.raises(ConfigError, match='block 0 has 32 channels, not divisible by 5 heads'):
    abstract_model(lambda rngs: UNet2DConditionModel(dict(cfg, attention_head_dim=[5, 4, 4]), rngs=rngs))
