"""The VAE port computes what diffusers' AutoencoderKL computes."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, nchw, nhwc, rel_err

from jaxdream.io.weights import read_safetensors, write_safetensors
from jaxdream.models import AutoencoderKL, abstract_model, count_params, load_vae, presets

pytestmark = pytest.mark.reference


def _images(batch=2, size=32, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)


@pytest.fixture(scope='module')
def vae(torch_vae):
  return load_vae(torch_vae[1])


def test_encode_mean_and_logvar_match_diffusers(torch_vae, vae):
  x = _images()
  with torch.no_grad():
    dist = torch_vae[0].encode(torch.from_numpy(x)).latent_dist
  mean, logvar = jit_call(vae, 'encode')(jnp.asarray(nhwc(x)))
  assert rel_err(nchw(mean), dist.mean.numpy()) <= 1e-5
  assert rel_err(nchw(logvar), dist.logvar.numpy()) <= 1e-5


def test_decode_matches_diffusers(torch_vae, vae):
  z = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    ref = torch_vae[0].decode(torch.from_numpy(z)).sample.numpy()
  out = jit_call(vae, 'decode')(jnp.asarray(nhwc(z)))
  assert out.shape == (2, 32, 32, 3)
  assert rel_err(nchw(out), ref) <= 1e-5


def test_downsampling_factor_follows_from_config(vae):
  assert vae.downsampling_factor == 4  # three levels in the test config, not SD's 8
  assert vae.scaling_factor == pytest.approx(0.18215)


def test_bfloat16_decode_stays_close(torch_vae):
  z = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():
    ref = torch_vae[0].decode(torch.from_numpy(z)).sample.numpy()
  out = jit_call(load_vae(torch_vae[1], dtype=jnp.bfloat16), 'decode')(jnp.asarray(nhwc(z)))
  assert rel_err(nchw(np.asarray(out, np.float32)), ref) <= 2e-2


def test_legacy_attention_names_load_to_the_same_model(torch_vae, tmp_path):
  """Checkpoints converted before diffusers 0.14 name the mid-block attention query/key/value/proj_attn."""
  import shutil

  src = torch_vae[1]
  sd = read_safetensors(f'{src}/diffusion_pytorch_model.safetensors')
  legacy = {}
  for k, v in sd.items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'), ('to_out.0', 'proj_attn')):
      if '.attentions.0.' in k and f'.{new}.' in k:
        k = k.replace(f'.{new}.', f'.{old}.')
        if k.endswith('weight') and old != 'proj_attn':  # the oldest files stored them as 1x1 convs
          v = np.asarray(v)[:, :, None, None]
    legacy[k] = np.asarray(v)
  assert any('.query.' in k for k in legacy)
  write_safetensors(f'{tmp_path}/diffusion_pytorch_model.safetensors', legacy)
  shutil.copy(f'{src}/config.json', tmp_path)
  z = jnp.asarray(np.random.default_rng(3).standard_normal((1, 8, 8, 4)), jnp.float32)
  a = jit_call(load_vae(src), 'decode')(z)
  b = jit_call(load_vae(str(tmp_path)), 'decode')(z)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sd_vae_parameter_count_matches_diffusers():
  from diffusers import AutoencoderKL as TorchVAE

  cfg = {k: v for k, v in presets.SD_VAE.items() if not k.startswith('_')}
  with torch.device('meta'):
    ref = sum(p.numel() for p in TorchVAE(**cfg).parameters())
  assert count_params(abstract_model(lambda rngs: AutoencoderKL(presets.SD_VAE, rngs=rngs))) == ref


def test_latent_statistics_scale_latents_as_diffusers_sdxl_pipelines_do(torch_vae, tmp_path):
  import json
  import shutil

  from jaxdream.models import ConfigError

  folder = shutil.copytree(torch_vae[1], tmp_path / 'vae')
  config = json.loads((folder / 'config.json').read_text())
  mean, std = [0.1, -0.2, 0.3, 0.05], [0.9, 1.1, 0.8, 1.2]  # Playground v2.5's VAE has these per channel
  (folder / 'config.json').write_text(json.dumps(dict(config, latents_mean=mean, latents_std=std)))
  vae, sf = load_vae(str(folder)), config['scaling_factor']
  m, s = torch.tensor(mean).view(1, 4, 1, 1), torch.tensor(std).view(1, 4, 1, 1)
  x, z = _images(), np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
  with torch.no_grad():  # StableDiffusionXLPipeline's decode and its img2img's encode
    ref_images = torch_vae[0].decode(torch.from_numpy(z) * s / sf + m).sample.numpy()
    ref_latents = ((torch_vae[0].encode(torch.from_numpy(x)).latent_dist.mean - m) * sf / s).numpy()
  assert rel_err(nchw(jit_call(vae, 'decode_latents')(jnp.asarray(nhwc(z)))), ref_images) <= 1e-5
  assert rel_err(nchw(jit_call(vae, 'encode_latents')(jnp.asarray(nhwc(x)))[0]), ref_latents) <= 1e-5
  (folder / 'config.json').write_text(json.dumps(dict(config, latents_mean=mean[:3], latents_std=std)))
  with pytest.raises(ConfigError, match='latents_mean has 3 values for 4 latent channels'):
    load_vae(str(folder))
