"""Single-file checkpoints (original CompVis/Stability layout): the model type inferred from key names as diffusers
infers it; SD 1.x, SD 2.x (v-prediction) and SDXL base and refiner files that jaxdream writes load in diffusers
(`from_single_file` with a local config folder, offline) with the original's tensors and outputs, and back in
jaxdream with identical tensors; float16, EMA weights, `jaxdream convert` both ways, and bad files.

No model is compiled here: equal tensors prove jaxdream's side (its models match diffusers' elsewhere), and each
family's UNet runs once, in torch, from the file diffusers read."""

import json
import os
import types

import numpy as np
import pytest
import torch
from conftest import UNET_SDXL, _clip_config, perturb_

from jaxdream import load_pipeline
from jaxdream.diffusion import sdxl
from jaxdream.diffusion.pipeline import Pipeline, save_pipeline
from jaxdream.io.weights import (
  WeightsError,
  read_safetensors,
  read_weights,
  read_weights_file,
  state_dict,
  write_safetensors,
)
from jaxdream.models import presets, single_file

pytestmark = pytest.mark.reference


def _shapes(**keys):
  return {k: types.SimpleNamespace(shape=s) for k, s in keys.items()}


def _key_set(unet_in=4, to_k=768, text=(), **extra):
  keys = {
    'model.diffusion_model.input_blocks.0.0.weight': (320, unet_in, 3, 3),
    'model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight': (320, to_k),
    'model.diffusion_model.output_blocks.11.0.skip_connection.weight': (320, 640, 1, 1),
    'first_stage_model.decoder.conv_in.weight': (512, 4, 3, 3),
  }
  keys.update({k: (1,) for k in text}, **extra)
  return _shapes(**keys)


CLIP = 'cond_stage_model.transformer.text_model.embeddings.position_embedding.weight'
OPEN_CLIP = 'cond_stage_model.model.token_embedding.weight'
XL_CLIP = 'conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight'
# the keys diffusers probes for SDXL (a 10th OpenCLIP layer), and their tiny-model counterparts (layer 0)
XL_BASE = 'conditioner.embedders.1.model.transformer.resblocks.{}.mlp.c_proj.bias'
XL_REFINER = 'conditioner.embedders.0.model.transformer.resblocks.{}.mlp.c_proj.bias'


def test_model_type_is_inferred_from_key_names_and_shapes_as_diffusers_does():
  from diffusers.loaders.single_file_utils import infer_diffusers_model_type

  cases = {
    'v1': _key_set(text=[CLIP]),
    'v2': _key_set(to_k=1024, text=[OPEN_CLIP]),
    'inpainting': _key_set(unet_in=9, text=[CLIP]),
    'inpainting_v2': _key_set(unet_in=9, to_k=1024, text=[OPEN_CLIP]),
    'xl_base': _key_set(to_k=2048, text=[XL_CLIP, XL_BASE.format(9)]),
    'xl_inpaint': _key_set(unet_in=9, to_k=2048, text=[XL_CLIP, XL_BASE.format(9)]),
    'xl_refiner': _key_set(to_k=1280, text=[XL_REFINER.format(9)]),
  }
  for expected, keys in cases.items():
    assert infer_diffusers_model_type(keys) == expected  # the crafted sets are what diffusers says they are
    assert single_file.infer_model_type(keys) == expected
  # small models: the text encoders' prefixes decide, where diffusers' probes of deep layers find nothing
  assert single_file.infer_model_type(_key_set(to_k=32, text=[OPEN_CLIP])) == 'v2'
  assert single_file.infer_model_type(_key_set(to_k=64, text=[XL_CLIP, XL_BASE.format(0)])) == 'xl_base'
  assert single_file.infer_model_type(_key_set(to_k=32, text=[XL_REFINER.format(0)])) == 'xl_refiner'
  # v-prediction as diffusers decides it: SD 2.x 768 unless its global step is SD 2.0 base's
  assert single_file.default_prediction_type('v2') == 'v_prediction'
  assert single_file.default_prediction_type('v2', {'global_step': np.array(875000)}) == 'epsilon'
  assert single_file.default_prediction_type('v2', {'global_step': np.array([470000])}) == 'v_prediction'
  assert [single_file.default_prediction_type(t) for t in ('v1', 'inpainting_v2', 'xl_base')] == ['epsilon'] * 3
  with pytest.raises(WeightsError, match=r'expected the original .* model\.diffusion_model\.\* \(UNet\).*has unet\.'):
    single_file.infer_model_type(_shapes(**{'unet.conv_in.weight': (32, 4, 3, 3)}))
  with pytest.raises(WeightsError, match='holds joint_blocks, not a UNet'):  # SD3's layout under the same prefix
    single_file.infer_model_type(_shapes(**{'model.diffusion_model.joint_blocks.0.x.weight': (8, 8)}))
  playground = _key_set(to_k=2048, text=[XL_CLIP, XL_BASE.format(9)], edm_mean=(1, 4, 1, 1), edm_std=(1, 4, 1, 1))
  assert infer_diffusers_model_type(playground) == 'playground-v2-5'
  with pytest.raises(WeightsError, match='Playground v2.5'):
    single_file.infer_model_type(playground)


def _torch_state(module) -> dict:
  """A torch module's parameters, named as jaxdream's state_dict names them (transformers 5's CLIPTextModel
  drops the `text_model.` prefix)."""
  out = {k: v.numpy() for k, v in module.state_dict().items() if not k.endswith('position_ids')}
  if not hasattr(module, 'text_model') and hasattr(module, 'embeddings'):
    out = {f'text_model.{k}': v for k, v in out.items()}
  return out


def _assert_same(ref: dict, ours: dict, name: str):
  assert sorted(ref) == sorted(ours), name
  for k in ref:
    np.testing.assert_array_equal(ref[k], ours[k], err_msg=f'{name}: {k}')


def _check_family(folder, ref, path, pipeline_cls, unet_inputs, skip=()):
  """jaxdream loads the folder and writes a single file; diffusers loads that file (offline, the folder as its
  config) with every tensor of the original (`skip`: components checked otherwise) and the same UNet output;
  jaxdream reads the file back to the folder's tensors. Returns (the file's tensors, jaxdream's pipeline from the
  file)."""
  pipe = load_pipeline(folder)
  save_pipeline(pipe, path, single_file=True)
  loaded = pipeline_cls.from_single_file(path, config=folder, local_files_only=True)
  for name in pipe.components:
    if name not in skip:
      _assert_same(_torch_state(getattr(ref, name)), _torch_state(getattr(loaded, name)), name)
  assert loaded.scheduler.config.prediction_type == ref.scheduler.config.prediction_type
  with torch.no_grad():
    args, kwargs = unet_inputs
    expected, out = ref.unet(*args, **kwargs).sample, loaded.unet(*args, **kwargs).sample
  assert float((out - expected).norm() / expected.norm()) <= 1e-5
  back = load_pipeline(path, config_dir=folder)
  assert list(back.components) == list(pipe.components) and back.pipeline_class == pipe.pipeline_class
  for name in pipe.components:
    _assert_same(state_dict(pipe.components[name]), state_dict(back.components[name]), name)
  assert back.scheduler_config == pipe.scheduler_config
  return read_safetensors(path), back


def _sd_unet_inputs(cross_dim):
  g = torch.Generator().manual_seed(0)
  return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 5, cross_dim, generator=g)), {}


def test_sd1_file_loads_in_diffusers_and_back_with_identical_tensors_ema_and_float16(tiny_sd_folder, tmp_path):
  from diffusers import StableDiffusionPipeline
  from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

  ref, folder = tiny_sd_folder
  path = str(tmp_path / 'sd1.safetensors')
  tensors, back = _check_family(folder, ref, path, StableDiffusionPipeline, _sd_unet_inputs(32))
  assert single_file.infer_model_type(tensors) == 'v1' and back.tokenizer.pad_token == ref.tokenizer.pad_token
  # the original layout: VAE attention as 1x1 convolutions, the CLIP text model under cond_stage_model.transformer
  assert tensors['first_stage_model.decoder.mid.attn_1.q.weight'].shape == (64, 64, 1, 1)
  assert 'cond_stage_model.transformer.text_model.final_layer_norm.weight' in tensors

  # EMA weights: the LDM names (model_ema. + the UNet key without its dots) hold another UNet, read when asked
  unet = {k: v for k, v in tensors.items() if k.startswith('model.diffusion_model.')}
  ema = {'model_ema.' + ''.join(k.split('.')[1:]): v + 1 for k, v in unet.items()}
  both = {**tensors, **ema, 'model_ema.num_updates': np.array(7)}
  config, keys = back.unet.resolve_config(back.unet.config), state_dict(back.unet)
  _assert_same(keys, single_file.from_single_file(both, 'model.diffusion_model.', 'unet', config, keys), 'unet')
  with_ema = single_file.from_single_file(both, 'model.diffusion_model.', 'unet', config, keys, extract_ema=True)
  expected = convert_ldm_unet_checkpoint({**unet, **ema}, dict(ref.unet.config), extract_ema=True)  # diffusers'
  _assert_same(expected, with_ema, 'ema unet')
  write_safetensors(str(tmp_path / 'ema.safetensors'), both)
  _assert_same(
    expected,
    state_dict(load_pipeline(str(tmp_path / 'ema.safetensors'), config_dir=folder, extract_ema=True).unet),
    'ema',
  )
  with pytest.raises(WeightsError, match='no model_ema'):
    load_pipeline(path, config_dir=folder, extract_ema=True)

  # float16: every tensor stored in half precision, the float32 weights rounded
  save_pipeline(back, str(tmp_path / 'fp16.safetensors'), single_file=True, weights_dtype='float16')
  half = read_safetensors(str(tmp_path / 'fp16.safetensors'))
  assert sorted(half) == sorted(tensors) and {v.dtype for v in half.values()} == {np.dtype(np.float16)}
  for k in tensors:
    np.testing.assert_array_equal(half[k], tensors[k].astype(np.float16))


@pytest.fixture(scope='module')
def sd2_folder(torch_unet_sd2, torch_vae, tmp_path_factory):
  """A tiny SD 2.x folder: conftest's SD2-like UNet and VAE, an OpenCLIP-like text encoder (gelu, its width the
  UNet's cross-attention width), OpenCLIP's '!'-padding tokenizer, a v-prediction scheduler."""
  from diffusers import DDIMScheduler, StableDiffusionPipeline
  from transformers import CLIPTextModel

  from jaxdream.io.tokenizer import load_tokenizer, write_clip_tokenizer

  root = tmp_path_factory.mktemp('tiny_sd2')
  write_clip_tokenizer(str(root / 'tok'), pad_token='!')
  ref = StableDiffusionPipeline(
    unet=torch_unet_sd2[0],
    vae=torch_vae[0],
    text_encoder=perturb_(CLIPTextModel(_clip_config(2, hidden_size=48, hidden_act='gelu')), seed=7),
    tokenizer=load_tokenizer(str(root / 'tok')),
    scheduler=DDIMScheduler(
      beta_schedule='scaled_linear', prediction_type='v_prediction', clip_sample=False, steps_offset=1
    ),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  ref.save_pretrained(str(root / 'model'))
  return ref, str(root / 'model')


def test_sd2_v_prediction_file_loads_in_diffusers_and_back_with_identical_tensors(sd2_folder, tmp_path, monkeypatch):
  from diffusers import StableDiffusionPipeline

  ref, folder = sd2_folder
  path = str(tmp_path / 'sd2.safetensors')
  tensors, back = _check_family(folder, ref, path, StableDiffusionPipeline, _sd_unet_inputs(48))
  assert single_file.infer_model_type(tensors) == 'v2' and back.scheduler_config['prediction_type'] == 'v_prediction'
  # OpenCLIP's layout: q, k and v fused in one in_proj
  fused = tensors['cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight']
  q = _torch_state(ref.text_encoder)['text_model.encoder.layers.1.self_attn.q_proj.weight']
  assert fused.shape == (144, 48)
  np.testing.assert_array_equal(fused[:48], q)
  # Without a config folder the published model of the file's type gives configs, tokenizer and scheduler (here
  # stood in for by the tiny folder's configs): SD 2.x predicts v, its OpenCLIP tokenizer pads with '!'. Its files
  # keep OpenCLIP's last layer and projection, which SD 2.x never reads: both are skipped.
  configs = {name: json.load(open(os.path.join(folder, name, 'config.json'))) for name in back.components}
  monkeypatch.setitem(single_file.PRESETS, 'v2', configs)
  extra = {
    'cond_stage_model.model.transformer.resblocks.2.ln_1.weight': np.ones(48, np.float32),
    'cond_stage_model.model.text_projection': np.ones((48, 48), np.float32),
    'cond_stage_model.model.logit_scale': np.array(1.0, np.float32),
  }
  write_safetensors(str(tmp_path / 'full.safetensors'), {**tensors, **extra})
  full = load_pipeline(str(tmp_path / 'full.safetensors'))
  for name in back.components:
    _assert_same(state_dict(back.components[name]), state_dict(full.components[name]), name)
  assert full.scheduler_config == dict(presets.SD_SCHEDULER, prediction_type='v_prediction')
  assert full.tokenizer.pad_token == '!' and full.pipeline_class == 'StableDiffusionPipeline'


def _sdxl_unet_inputs(cross_dim, time_ids):
  g = torch.Generator().manual_seed(1)
  added = {'text_embeds': torch.randn(1, 32, generator=g), 'time_ids': torch.tensor([time_ids], dtype=torch.float32)}
  return (torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 5, cross_dim, generator=g)), {
    'added_cond_kwargs': added
  }


def test_sdxl_base_file_loads_in_diffusers_and_back_with_identical_tensors(sdxl_folder, tmp_path):
  from diffusers import StableDiffusionXLPipeline
  from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

  ref, folder, _ = sdxl_folder
  path = str(tmp_path / 'sdxl.safetensors')
  inputs = _sdxl_unet_inputs(64, [1024, 1024, 0, 0, 1024, 1024])
  # diffusers picks a CLIP converter by width: with both tiny encoders 32 wide it would read text_encoder_2 from
  # embedders.0 (SDXL's are 768 and 1280), so that one is checked with diffusers' OpenCLIP converter itself
  tensors, back = _check_family(folder, ref, path, StableDiffusionXLPipeline, inputs, skip=('text_encoder_2',))
  prefixed = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
  te2 = convert_open_clip_checkpoint(ref.text_encoder_2, prefixed, prefix='conditioner.embedders.1.model.')
  _assert_same(_torch_state(ref.text_encoder_2), {k: v.numpy() for k, v in te2.items()}, 'text_encoder_2')
  assert single_file.infer_model_type(tensors) == 'xl_base' and back.encode_prompt is sdxl.encode_prompt
  assert 'model.diffusion_model.label_emb.0.0.weight' in tensors  # the added (pooled + time ids) embedding
  assert [back.tokenizers[n].pad_token for n in ('text_encoder', 'text_encoder_2')] == ['<|endoftext|>', '!']


def test_sdxl_refiner_file_loads_in_diffusers_and_back_with_identical_tensors(sdxl_folder, tmp_path):
  from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

  base = sdxl_folder[0]
  ref = StableDiffusionXLImg2ImgPipeline(
    vae=base.vae,
    text_encoder=None,
    text_encoder_2=base.text_encoder_2,
    tokenizer=None,
    tokenizer_2=base.tokenizer_2,
    unet=perturb_(
      UNet2DConditionModel(**dict(UNET_SDXL, cross_attention_dim=32, projection_class_embeddings_input_dim=72)),
      seed=8,
    ),
    scheduler=base.scheduler,
    requires_aesthetics_score=True,
    add_watermarker=False,
  )
  folder = str(tmp_path / 'refiner')
  ref.save_pretrained(folder)
  path = str(tmp_path / 'refiner.safetensors')
  inputs = _sdxl_unet_inputs(32, [1024, 1024, 0, 0, 6.0])
  tensors, back = _check_family(folder, ref, path, StableDiffusionXLImg2ImgPipeline, inputs)
  assert single_file.infer_model_type(tensors) == 'xl_refiner'
  assert back.micro_conditioning is sdxl.aesthetic_time_ids
  assert not any(k.startswith('conditioner.embedders.1.') for k in tensors)


def test_convert_cli_writes_a_single_file_and_a_folder_back(tiny_sd_folder, tmp_path, capsys):
  from jaxdream.cli.main import main

  _, folder = tiny_sd_folder
  path, out = str(tmp_path / 'model.safetensors'), str(tmp_path / 'back')
  assert main(['convert', folder, path, '--fp16']) == 0
  assert {v.dtype for v in read_safetensors(path).values()} == {np.dtype(np.float16)}
  assert main(['convert', path, out, '--config-dir', folder, '--prediction-type', 'v_prediction']) == 0
  scheduler = json.load(open(os.path.join(out, 'scheduler', 'scheduler_config.json')))
  assert scheduler == dict(
    json.load(open(os.path.join(folder, 'scheduler', 'scheduler_config.json'))), prediction_type='v_prediction'
  )
  for name, weights in (
    ('unet', 'diffusion_pytorch_model'),
    ('vae', 'diffusion_pytorch_model'),
    ('text_encoder', 'model'),
  ):
    # transformers 5 writes CLIPTextModel without its text_model. prefix; jaxdream writes it
    original, converted = (
      {k.removeprefix('text_model.'): v for k, v in read_weights(os.path.join(root, name), weights).items()}
      for root in (folder, out)
    )
    original = {
      k: v.astype(np.float16).astype(np.float32) for k, v in original.items() if not k.endswith('position_ids')
    }
    _assert_same(original, converted, name)
  assert main(['convert', folder, str(tmp_path / 'model.ckpt')]) == 2
  assert 'converts to a single .safetensors file' in capsys.readouterr().err
  assert main(['convert', path, str(tmp_path / 'new.safetensors')]) == 2  # a folder is never named as a file
  assert 'converts to a model folder' in capsys.readouterr().err and not os.path.exists(tmp_path / 'new.safetensors')


def test_bad_files_are_errors_that_say_what_is_wrong(tiny_sd_folder, sdxl_folder, tmp_path):
  _, folder = tiny_sd_folder
  path = str(tmp_path / 'sd1.safetensors')
  pipe = load_pipeline(folder)
  save_pipeline(pipe, path, single_file=True)
  tensors = read_safetensors(path)

  def write(name, drop):
    out = str(tmp_path / name)
    write_safetensors(out, {k: v for k, v in tensors.items() if not k.startswith(drop)})
    return out

  with pytest.raises(WeightsError, match=r'missing block\(s\) model\.diffusion_model\.input_blocks\.1 '):
    load_pipeline(write('no_block.safetensors', 'model.diffusion_model.input_blocks.1.'), config_dir=folder)
  with pytest.raises(WeightsError, match=r'missing block first_stage_model\.\* \(the VAE\)'):
    load_pipeline(write('no_vae.safetensors', 'first_stage_model.'), config_dir=folder)
  with pytest.raises(WeightsError, match='expected the original'):
    load_pipeline(write('no_unet.safetensors', 'model.'), config_dir=folder)
  # a config folder of another kind of model, or one that does not fit the file's shapes
  with pytest.raises(WeightsError, match=r'v1 checkpoint .* config_dir .* text_encoder_2'):
    load_pipeline(path, config_dir=sdxl_folder[1])
  # pickle checkpoints: refused unless asked for, as model folders' .bin files
  ckpt = tmp_path / 'model.ckpt'
  torch.save({'state_dict': {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}}, str(ckpt))
  with pytest.raises(WeightsError, match='pickle-based checkpoint'):
    load_pipeline(str(ckpt), config_dir=folder)
  from_pickle = load_pipeline(str(ckpt), config_dir=folder, allow_pickle=True)
  _assert_same(state_dict(pipe.unet), state_dict(from_pickle.unet), 'unet')
  # CompVis checkpoints keep their step count beside the state dict: it still decides SD 2.0 base's epsilon
  torch.save({'global_step': 875000, 'state_dict': {'a': torch.zeros(1)}}, str(ckpt))
  step = read_weights_file(str(ckpt), allow_pickle=True)['global_step']
  assert single_file.default_prediction_type('v2', {'global_step': step}) == 'epsilon'
  with pytest.raises(ValueError, match='not model folders'):
    load_pipeline(folder, extract_ema=True)


def test_a_pipeline_that_is_no_known_family_is_not_written_as_a_single_file(tiny_sd_folder, tmp_path):
  pipe = load_pipeline(tiny_sd_folder[1])
  odd = Pipeline(components={'unet': pipe.unet, 'vae': pipe.vae}, tokenizers={}, scheduler_config={})
  with pytest.raises(WeightsError, match='holds unet, vae, text_encoder'):
    save_pipeline(odd, str(tmp_path / 'x.safetensors'), single_file=True)
  with pytest.raises(ValueError, match='written as .safetensors'):
    save_pipeline(pipe, str(tmp_path / 'x.ckpt'), single_file=True)
