"""Whole diffusers-format model folders: loading, tokenizers in both file forms, writing back."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, nchw, rel_err

from jaxdream import load_pipeline
from jaxdream.diffusion.pipeline import save_pipeline
from jaxdream.io.tokenizer import load_tokenizer, tokenize
from jaxdream.models import WeightsError

pytestmark = pytest.mark.reference

PROMPTS = ['a photo of sks dog', 'A Painting of a fox, wearing a hat!! in the style of Monet ' * 3]


@pytest.fixture(scope='module')
def pipe(tiny_sd_folder):
  return load_pipeline(tiny_sd_folder[1])


def test_prompt_embeddings_match_diffusers_encode_prompt(tiny_sd_folder, pipe):
  ref_pipe, _ = tiny_sd_folder
  with torch.no_grad():
    ref, _ = ref_pipe.encode_prompt(PROMPTS, 'cpu', 1, False)
  ids = pipe.tokenize(PROMPTS)['text_encoder']
  assert ids.shape == (2, 77)
  assert rel_err(jit_call(pipe.text_encoder)(jnp.asarray(ids)), ref.numpy()) <= 1e-5


def test_unet_and_vae_of_the_folder_match_diffusers(tiny_sd_folder, pipe):
  ref_pipe, _ = tiny_sd_folder
  z = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
  c = np.random.default_rng(1).standard_normal((1, 77, 32)).astype(np.float32)
  with torch.no_grad():
    zt = torch.from_numpy(z).permute(0, 3, 1, 2)
    ref_eps = ref_pipe.unet(zt, torch.tensor([400]), torch.from_numpy(c)).sample.numpy()
    ref_img = ref_pipe.vae.decode(zt).sample.numpy()
  assert rel_err(nchw(jit_call(pipe.unet)(jnp.asarray(z), jnp.array([400]), jnp.asarray(c))), ref_eps) <= 1e-5
  assert rel_err(nchw(jit_call(pipe.vae, 'decode')(jnp.asarray(z))), ref_img) <= 1e-5
  assert pipe.vae_scale_factor == 4 and pipe.default_size == (64, 64)


def test_tokenizer_loads_from_vocab_and_merges_or_from_tokenizer_json_alone(tiny_sd_folder, tmp_path):
  from transformers import CLIPTokenizer

  ref = CLIPTokenizer.from_pretrained(os.path.join(tiny_sd_folder[1], 'tokenizer'))
  ref.save_pretrained(tmp_path / 'both')
  files = set(os.listdir(tmp_path / 'both'))
  slow = tmp_path / 'vocab_merges'
  fast = tmp_path / 'tokenizer_json'
  os.makedirs(slow)
  os.makedirs(fast)
  from jaxdream.io.tokenizer import write_clip_tokenizer

  write_clip_tokenizer(str(slow))
  assert 'tokenizer.json' not in os.listdir(slow)
  shutil.copy(tmp_path / 'both' / 'tokenizer.json', fast)
  assert 'tokenizer.json' in files and os.listdir(fast) == ['tokenizer.json']
  expected = ref(PROMPTS, padding='max_length', max_length=77, truncation=True).input_ids
  for folder in (slow, fast):
    np.testing.assert_array_equal(tokenize(load_tokenizer(str(folder)), PROMPTS, 77), expected)


def _gpt2_bytes_to_unicode() -> dict[int, str]:
  """openai/gpt-2's encoder.py bytes_to_unicode, as CLIP's simple_tokenizer.py copies it: the reference order."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  cs = bs[:]
  n = 0
  for b in range(2**8):
    if b not in bs:
      bs.append(b)
      cs.append(2**8 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def test_written_clip_vocabulary_has_clips_ids_for_single_characters_too(tmp_path):
  from jaxdream.io.tokenizer import write_clip_tokenizer

  write_clip_tokenizer(str(tmp_path))
  vocab = json.load(open(tmp_path / 'vocab.json', encoding='utf-8'))
  # CLIP's vocabulary starts with the 256 byte characters, then the same with '</w>', in bytes_to_unicode's order
  chars = list(_gpt2_bytes_to_unicode().values())
  assert [t for t, i in sorted(vocab.items(), key=lambda x: x[1])[:512]] == chars + [c + '</w>' for c in chars]
  ids = tokenize(load_tokenizer(str(tmp_path)), ['a photo of sks dog !'], 9)[0]
  assert list(ids[:8]) == [49406, vocab['a</w>'], 1125, 539, 48136, 1929, vocab['!</w>'], 49407]
  assert vocab['a</w>'] == 256 + chars.index('a')  # 320, as in every CLIP tokenizer


def test_folder_without_model_index_is_reported(tmp_path):
  with pytest.raises(WeightsError, match='model_index.json'):
    load_pipeline(str(tmp_path))


def test_missing_component_is_reported(tiny_sd_folder, tmp_path):
  dst = tmp_path / 'model'
  shutil.copytree(tiny_sd_folder[1], dst)
  shutil.rmtree(dst / 'vae')
  with pytest.raises(WeightsError, match='missing component.*vae'):
    load_pipeline(str(dst))


def test_config_error_is_found_before_any_weights_are_read(tiny_sd_folder, tmp_path):
  from jaxdream.models import ConfigError

  dst = tmp_path / 'model'
  shutil.copytree(tiny_sd_folder[1], dst)
  os.remove(dst / 'unet' / 'diffusion_pytorch_model.safetensors')  # never reached
  cfg = json.load(open(dst / 'vae' / 'config.json'))
  cfg['up_block_types'] = ['AttnUpDecoderBlock2D'] * 3
  json.dump(cfg, open(dst / 'vae' / 'config.json', 'w'))
  with pytest.raises(ConfigError, match='up_block_types'):
    load_pipeline(str(dst))


def test_saved_pipeline_loads_in_diffusers_and_generates_the_same(tiny_sd_folder, pipe, tmp_path):
  from diffusers import StableDiffusionPipeline

  save_pipeline(pipe, str(tmp_path / 'out'))
  reloaded = StableDiffusionPipeline.from_pretrained(str(tmp_path / 'out'), safety_checker=None)
  ref_pipe, _ = tiny_sd_folder
  kw = dict(num_inference_steps=2, height=32, width=32, output_type='np')
  a = reloaded('a dog', generator=torch.Generator().manual_seed(0), **kw).images
  b = ref_pipe('a dog', generator=torch.Generator().manual_seed(0), **kw).images
  np.testing.assert_array_equal(a, b)


def test_tiny_model_made_without_torch_loads_in_diffusers(tmp_path):
  from diffusers import StableDiffusionPipeline

  from jaxdream.diffusion.tiny_model import create_tiny_pipeline

  path = create_tiny_pipeline(str(tmp_path / 'tiny'))
  ref = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
  ours = load_pipeline(path)
  ids = ours.tokenize(['a photo of sks dog'])['text_encoder']
  with torch.no_grad():
    emb = ref.text_encoder(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
  assert rel_err(jit_call(ours.text_encoder)(jnp.asarray(ids)), emb) <= 1e-5
