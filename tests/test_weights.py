"""Weight folders: bad ones fail at once with a message naming the problem; good ones round-trip."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, nchw, nhwc, rel_err

from jaxdream.io.weights import read_safetensors, write_safetensors
from jaxdream.models import WeightsError, load_unet, load_vae, save_component

WEIGHTS = 'diffusion_pytorch_model.safetensors'


@pytest.fixture
def vae_copy(torch_vae, tmp_path):
  dst = tmp_path / 'vae'
  shutil.copytree(torch_vae[1], dst)
  return dst


def _edit_weights(folder, fn):
  sd = {k: np.array(v) for k, v in read_safetensors(str(folder / WEIGHTS)).items()}
  fn(sd)
  write_safetensors(str(folder / WEIGHTS), sd)


def test_missing_folder_is_reported(tmp_path):
  with pytest.raises(WeightsError, match='missing config.json'):
    load_vae(str(tmp_path))


def test_missing_weights_file_is_reported(vae_copy):
  os.remove(vae_copy / WEIGHTS)
  with pytest.raises(WeightsError, match='no weights file'):
    load_vae(str(vae_copy))


def test_missing_tensor_is_named(vae_copy):
  _edit_weights(vae_copy, lambda sd: sd.pop('decoder.conv_out.bias'))
  with pytest.raises(WeightsError, match=r'missing tensor.*decoder\.conv_out\.bias'):
    load_vae(str(vae_copy))


def test_unexpected_tensor_is_named(vae_copy):
  _edit_weights(vae_copy, lambda sd: sd.update({'decoder.extra.weight': np.zeros(3, np.float32)}))
  with pytest.raises(WeightsError, match=r'unexpected tensor.*decoder\.extra\.weight'):
    load_vae(str(vae_copy))


def test_shape_mismatch_names_tensor_and_both_shapes(vae_copy):
  _edit_weights(vae_copy, lambda sd: sd.update({'decoder.conv_in.weight': np.zeros((64, 4, 1, 1), np.float32)}))
  with pytest.raises(WeightsError, match=r'decoder\.conv_in\.weight.*\(64, 4, 1, 1\).*\(3, 3, 4, 64\)'):
    load_vae(str(vae_copy))


def test_weights_of_another_rank_are_shape_mismatches_not_crashes(vae_copy):
  # a conv kernel stored 2-D, and a Linear (the VAE's attention) given a 3x3 kernel, which must not be cut to 1x1
  _edit_weights(vae_copy, lambda sd: sd.update({'decoder.conv_in.weight': np.zeros((64, 4), np.float32)}))
  with pytest.raises(WeightsError, match=r'shape mismatch for decoder\.conv_in\.weight: file has \(64, 4\)'):
    load_vae(str(vae_copy))


def test_a_linear_weight_given_a_larger_kernel_is_refused(vae_copy):
  key = 'decoder.mid_block.attentions.0.to_q.weight'
  _edit_weights(vae_copy, lambda sd: sd.update({key: np.zeros(sd[key].shape + (3, 3), np.float32)}))
  with pytest.raises(WeightsError, match=rf'shape mismatch for {key}'):
    load_vae(str(vae_copy))


@pytest.mark.parametrize(
  'header',
  [
    [1, 2],
    {'a': 1},
    {'a': {'shape': [1], 'data_offsets': [0, 4]}},
    {'a': {'dtype': 'F32', 'shape': '1', 'data_offsets': [0, 4]}},
    {'a': {'dtype': 'F32', 'shape': [1], 'data_offsets': [-8, -4]}},
  ],
)
def test_a_malformed_safetensors_header_is_a_weights_error(tmp_path, header):
  raw = json.dumps(header).encode()
  path = tmp_path / 'bad.safetensors'
  path.write_bytes(len(raw).to_bytes(8, 'little') + raw + bytes(16))
  with pytest.raises(WeightsError, match='corrupt|not a readable'):
    read_safetensors(str(path))


def test_truncated_safetensors_is_reported(vae_copy):
  path = vae_copy / WEIGHTS
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(WeightsError, match='truncated|corrupt'):
    load_vae(str(vae_copy))


def test_garbage_file_is_reported(vae_copy):
  (vae_copy / WEIGHTS).write_bytes(b'not a safetensors file at all')
  with pytest.raises(WeightsError, match='not a readable safetensors'):
    load_vae(str(vae_copy))


def test_config_with_bad_json_is_reported(vae_copy):
  (vae_copy / 'config.json').write_text('{"block_out_channels": [32, 64,')
  with pytest.raises(WeightsError, match='not valid JSON'):
    load_vae(str(vae_copy))


def test_pickle_checkpoint_is_refused_by_default_and_loads_when_allowed(torch_vae, vae_copy):
  os.remove(vae_copy / WEIGHTS)
  torch.save(torch_vae[0].state_dict(), vae_copy / 'diffusion_pytorch_model.bin')
  with pytest.raises(WeightsError, match='pickle.*arbitrary code.*safetensors.*allow_pickle'):
    load_vae(str(vae_copy))
  z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
  a = jit_call(load_vae(str(vae_copy), allow_pickle=True), 'decode')(z)
  b = jit_call(load_vae(torch_vae[1]), 'decode')(z)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class _Payload:
  """Unpickling this calls open(marker, 'w'): a stand-in for any code a hostile checkpoint runs."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (open, (self.marker, 'w'))


@pytest.mark.parametrize('suffix', ['.ckpt', '.pt', '.bin'])
def test_hostile_pickle_is_refused_even_when_allowed_and_never_runs(torch_vae, vae_copy, tmp_path, suffix):
  os.remove(vae_copy / WEIGHTS)
  marker = tmp_path / 'payload-ran'
  path = vae_copy / f'diffusion_pytorch_model{suffix}'
  torch.save({**torch_vae[0].state_dict(), 'payload': _Payload(marker)}, path)
  with pytest.raises(WeightsError, match='pickle.*arbitrary code'):
    load_vae(str(vae_copy))
  with pytest.raises(WeightsError, match=rf'{path.name} holds more than tensors \(it needs \S*open\)'):
    try:
      load_vae(str(vae_copy), allow_pickle=True)
    finally:  # checked whatever load_vae raised
      assert not marker.exists(), 'unpickling ran the payload'


def test_sharded_safetensors_with_index_loads(torch_unet_sd1, tmp_path):
  model, _ = torch_unet_sd1
  model.save_pretrained(tmp_path, max_shard_size='200KB')
  assert os.path.exists(tmp_path / 'diffusion_pytorch_model.safetensors.index.json')
  x = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
  c = np.random.default_rng(1).standard_normal((1, 7, 32)).astype(np.float32)
  with torch.no_grad():
    ref = model(torch.from_numpy(x), torch.tensor([10]), torch.from_numpy(c)).sample.numpy()
  out = jit_call(load_unet(str(tmp_path)))(jnp.asarray(nhwc(x)), jnp.array([10]), jnp.asarray(c))
  assert rel_err(nchw(out), ref) <= 1e-5


def test_saved_unet_loads_in_diffusers_with_identical_weights(torch_unet_sd1, tmp_path):
  from diffusers import UNet2DConditionModel as TorchUNet

  model, path = torch_unet_sd1
  save_component(load_unet(path), str(tmp_path))
  assert json.load(open(tmp_path / 'config.json'))['_class_name'] == 'UNet2DConditionModel'
  reloaded = TorchUNet.from_pretrained(str(tmp_path))
  ref = model.state_dict()
  got = reloaded.state_dict()
  assert set(got) == set(ref)
  for k in ref:
    torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_saved_text_encoder_loads_in_transformers_with_identical_weights(tmp_path):
  from conftest import make_text_encoder
  from transformers import CLIPTextModel as TorchCLIP

  from jaxdream.models import load_text_encoder

  ref_model = make_text_encoder(str(tmp_path / 'src'), 'quick_gelu')
  save_component(load_text_encoder(str(tmp_path / 'src')), str(tmp_path / 'dst'))
  reloaded = TorchCLIP.from_pretrained(str(tmp_path / 'dst'))
  ids = torch.randint(0, 998, (2, 77))
  with torch.no_grad():
    torch.testing.assert_close(reloaded(ids).last_hidden_state, ref_model(ids).last_hidden_state, rtol=0, atol=0)
