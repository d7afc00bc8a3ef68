"""The CLIP text encoder port computes what transformers' CLIPTextModel computes."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, make_text_encoder, rel_err

from jaxdream.models import CLIPTextModel, ConfigError, abstract_model, count_params, load_text_encoder, presets

pytestmark = pytest.mark.reference


@pytest.fixture(scope='module', params=['quick_gelu', 'gelu'])
def text_encoders(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(f'te_{request.param}'))
  return make_text_encoder(path, request.param), load_text_encoder(path)


def _ids(batch=2, n=77, seed=0):
  ids = np.random.default_rng(seed).integers(0, 998, (batch, n))
  ids[:, 0], ids[0, 9:], ids[1, 30:] = 998, 999, 999  # BOS ... EOS padding, as the tokenizer pads
  return ids


def test_last_hidden_state_and_pooled_output_match_transformers(text_encoders):
  ref_model, model = text_encoders
  ids = _ids()
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(ids))
  out = jit_call(model, 'forward')(jnp.asarray(ids))
  assert rel_err(out['last_hidden_state'], ref.last_hidden_state.numpy()) <= 1e-5
  assert rel_err(out['pooler_output'], ref.pooler_output.numpy()) <= 1e-5
  assert rel_err(jit_call(model)(jnp.asarray(ids)), ref.last_hidden_state.numpy()) <= 1e-5


def test_clip_skip_uses_penultimate_layer_through_final_norm_like_diffusers(text_encoders):
  ref_model, model = text_encoders
  ids = _ids(seed=1)
  with torch.no_grad():
    hidden = ref_model(torch.from_numpy(ids), output_hidden_states=True).hidden_states
    final_norm = getattr(ref_model, 'text_model', ref_model).final_layer_norm  # transformers 4 / 5
    ref = final_norm(hidden[-2]).numpy()  # diffusers' clip_skip=1
  assert rel_err(jit_call(model, clip_skip=1)(jnp.asarray(ids)), ref) <= 1e-5


def test_attention_mask_matches_transformers(text_encoders):
  ref_model, model = text_encoders
  ids = _ids(seed=2)
  mask = (np.arange(77)[None] < np.array([[12], [40]])).astype(np.int64)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
  out = jit_call(model)(jnp.asarray(ids), jnp.asarray(mask))
  valid = mask.astype(bool)  # padded positions are garbage on both sides
  assert rel_err(np.asarray(out)[valid], ref[valid]) <= 1e-5


def test_bfloat16_compute_stays_close(tmp_path):
  ref_model = make_text_encoder(str(tmp_path), 'gelu', seed=9)
  ids = _ids(seed=3)
  with torch.no_grad():
    ref = ref_model(torch.from_numpy(ids)).last_hidden_state.numpy()
  out = jit_call(load_text_encoder(str(tmp_path), dtype=jnp.bfloat16))(jnp.asarray(ids))
  assert out.dtype == jnp.bfloat16
  assert rel_err(np.asarray(out, np.float32), ref) <= 2e-2


@pytest.mark.parametrize('preset', ['SD15_TEXT_ENCODER', 'SD21_TEXT_ENCODER'])
def test_sd_text_encoder_parameter_counts_match_transformers(preset):
  from transformers import CLIPTextConfig
  from transformers import CLIPTextModel as TorchCLIP

  cfg = getattr(presets, preset)
  with torch.device('meta'):
    ref = sum(p.numel() for p in TorchCLIP(CLIPTextConfig(**cfg)).parameters())
  assert count_params(abstract_model(lambda rngs: CLIPTextModel(cfg, rngs=rngs))) == ref


def test_unsupported_activation_is_an_error_naming_the_key():
  with pytest.raises(ConfigError, match='hidden_act'):
    CLIPTextModel.resolve_config(dict(presets.SD15_TEXT_ENCODER, hidden_act='silu'))
