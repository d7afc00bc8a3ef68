"""The Qwen2.5-VL and Qwen3-VL vision towers compute what transformers' `model.visual` computes, and the Qwen-VL
processor makes the inputs transformers' processors make.

The tiny folders (conftest.write_qwen_vl_folder) hold a random model saved by transformers, a byte-level BPE
tokenizer with Qwen's added tokens, the published chat templates and small pixel budgets.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, reference_processor, rel_err

from jaxdream.io.weights import abstract_model, load_state_dict
from jaxdream.models.config import ConfigError
from jaxdream.models.qwen_vision import Qwen2_5VisionTransformer, Qwen3VisionModel, resolve_qwen_vision_config

pytestmark = pytest.mark.reference

TOWERS = {'qwen2_5_vl': Qwen2_5VisionTransformer, 'qwen3_vl': Qwen3VisionModel}
# Two images of different sizes and a two-frame clip in one call. Qwen2.5 (windows of 2x2 merged tokens): the
# 2x3 and 3x4 merged grids end in partial windows. Qwen3 (a 4x4 position table): 4x6 and 6x4 interpolate it.
GRIDS = {'qwen2_5_vl': ((1, 4, 6), (1, 6, 8), (2, 4, 4)), 'qwen3_vl': ((1, 4, 6), (1, 6, 4), (2, 4, 4))}


def load_tower(torch_model, path, kind, dtype=jnp.float32):
  cfg = resolve_qwen_vision_config(json.load(open(os.path.join(path, 'config.json'))), kind)
  weights = {
    k.removeprefix('model.visual.'): v.numpy()
    for k, v in torch_model.state_dict().items()
    if k.startswith('model.visual.')
  }
  tower = abstract_model(lambda rngs: TOWERS[kind](cfg, dtype=dtype, rngs=rngs))
  load_state_dict(tower, weights)
  return tower, cfg


@pytest.mark.parametrize('kind', ['qwen2_5_vl', 'qwen3_vl'])
def test_vision_tower_matches_transformers(kind, request):
  torch_model, path = request.getfixturevalue(f'{kind}_folder')
  tower, cfg = load_tower(torch_model, path, kind)
  grid = GRIDS[kind]
  n = sum(t * h * w for t, h, w in grid)
  pixels = np.random.default_rng(0).standard_normal((n, 3 * 2 * cfg['patch_size'] ** 2)).astype(np.float32)
  with torch.no_grad():
    ref = torch_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid))
  out = jit_call(tower, grid_thw=grid)(jnp.asarray(pixels))
  if kind == 'qwen3_vl':
    out, deepstack = out
    assert len(deepstack) == len(ref.deepstack_features) == 2
    for ours, theirs in zip(deepstack, ref.deepstack_features):
      assert ours.shape == (n // 4, cfg['out_hidden_size'])
      assert rel_err(ours, theirs.numpy()) <= 1e-5
  assert out.shape == (n // 4, cfg['out_hidden_size'])
  assert rel_err(out, ref.pooler_output.numpy()) <= 1e-5
  half = jit_call(load_tower(torch_model, path, kind, jnp.bfloat16)[0], grid_thw=grid)(jnp.asarray(pixels))
  half = half[0] if kind == 'qwen3_vl' else half
  assert half.dtype == jnp.bfloat16  # float32 parameters, bfloat16 compute
  assert rel_err(np.asarray(half, np.float32), ref.pooler_output.numpy()) <= 3e-2


# The vision_config of Qwen2.5-VL-7B-Instruct's config.json (older key names: in_chans, spatial_patch_size) and
# of Qwen3-VL-4B-Instruct's.
PUBLISHED_VISION = {
  'qwen2_5_vl': dict(
    depth=32,
    hidden_act='silu',
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_chans=3,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    spatial_patch_size=14,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    temporal_patch_size=2,
  ),
  'qwen3_vl': dict(
    deepstack_visual_indexes=[5, 11, 17],
    depth=24,
    hidden_act='gelu_pytorch_tanh',
    hidden_size=1024,
    in_channels=3,
    intermediate_size=4096,
    model_type='qwen3_vl',
    num_heads=16,
    num_position_embeddings=2304,
    out_hidden_size=2560,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
  ),
}


@pytest.mark.parametrize('kind', ['qwen2_5_vl', 'qwen3_vl'])
def test_parameter_count_of_published_vision_configs_matches_transformers(kind):
  from transformers import Qwen2_5_VLConfig, Qwen3VLConfig
  from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
  from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

  from jaxdream.io.weights import count_params

  config_cls, torch_cls = {
    'qwen2_5_vl': (Qwen2_5_VLConfig, Qwen2_5_VisionTransformerPretrainedModel),
    'qwen3_vl': (Qwen3VLConfig, Qwen3VLVisionModel),
  }[kind]
  vision = PUBLISHED_VISION[kind]
  with torch.device('meta'):
    ref = torch_cls._from_config(config_cls(vision_config=dict(vision)).vision_config)
  cfg = resolve_qwen_vision_config({'vision_config': vision}, kind)
  ours = abstract_model(lambda rngs: TOWERS[kind](cfg, rngs=rngs))
  assert count_params(ours) == sum(p.numel() for p in ref.parameters())
  assert cfg['in_channels'] == 3 and cfg['head_dim'] == (80 if kind == 'qwen2_5_vl' else 64)


def test_bad_vision_configs_and_inputs_are_named(qwen2_5_vl_folder):
  _, path = qwen2_5_vl_folder
  config = json.load(open(os.path.join(path, 'config.json')))
  with pytest.raises(ConfigError, match='unsupported Qwen-VL model_type'):
    resolve_qwen_vision_config(config, 'qwen2_vl')
  with pytest.raises(ConfigError, match='no vision_config'):
    resolve_qwen_vision_config({'model_type': 'qwen2_5_vl'}, 'qwen2_5_vl')
  for key, value, message in (
    ('hidden_act', 'swiglu', 'hidden_act'),
    ('fullatt_block_indexes', [1, 7], 'fullatt_block_indexes'),
    ('num_heads', 3, 'head dim'),
    ('rope_parameters', {'rope_type': 'default'}, 'rope_type'),
  ):
    with pytest.raises(ConfigError, match=message):
      resolve_qwen_vision_config(
        dict(config, vision_config=dict(config['vision_config'], **{key: value})), 'qwen2_5_vl'
      )
  cfg = resolve_qwen_vision_config(config, 'qwen2_5_vl')
  with pytest.raises(ConfigError, match='resolve_qwen_vision_config'):
    Qwen3VisionModel(cfg, rngs=None)
  tower = abstract_model(lambda rngs: Qwen2_5VisionTransformer(cfg, rngs=rngs))
  with pytest.raises(ValueError, match='do not match grid_thw'):
    tower(jnp.zeros((23, 1176)), ((1, 4, 6),))
  with pytest.raises(ValueError, match='multiples of 2'):
    tower(jnp.zeros((15, 1176)), ((1, 3, 5),))


@pytest.mark.parametrize('kind', ['qwen2_5_vl', 'qwen3_vl'])
def test_processor_matches_transformers(kind, request):
  from PIL import Image

  from jaxdream.vlm.qwen_processor import QwenVLProcessor

  _, path = request.getfixturevalue(f'{kind}_folder')
  ref = reference_processor(path, kind)
  assert type(ref.image_processor).__name__ == 'Qwen2VLImageProcessorPil'
  ours = QwenVLProcessor(path)
  rng = np.random.default_rng(0)
  images = [
    Image.fromarray(rng.integers(0, 256, (61, 90, 3), np.uint8)),
    # far over the folder's max_pixels (12544 / 12288), and with transparency
    Image.fromarray(rng.integers(0, 256, (230, 310, 4), np.uint8), 'RGBA'),
  ]
  questions = ['Describe this image.', 'Locate the sks dog and output its bbox coordinates in JSON format.']
  prompts = [
    ref.apply_chat_template(
      [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': q}]}],
      add_generation_prompt=True,
      tokenize=False,
    )
    for q in questions
  ]
  assert [ours.prompt(q) for q in questions] == prompts
  assert prompts[0].startswith('<|im_start|>system\n' if kind == 'qwen2_5_vl' else '<|im_start|>user\n')
  expected = ref(images=images, text=prompts, padding=True, padding_side='left', return_tensors='np')
  out = ours(images, questions)
  np.testing.assert_array_equal(out['image_grid_thw'], expected['image_grid_thw'])
  assert out['pixel_values'].dtype == np.float32
  np.testing.assert_allclose(out['pixel_values'], expected['pixel_values'], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(out['input_ids'], expected['input_ids'])
  np.testing.assert_array_equal(out['attention_mask'], expected['attention_mask'])
  mask = out['attention_mask']
  assert out['input_ids'].dtype == mask.dtype == np.int32
  assert mask[:, 0].min() == 0 and (np.diff(mask, axis=1) >= 0).all()  # the shorter row is padded on the left
  factor = ours.patch_size * ours.merge_size
  assert [(w * factor // 2, h * factor // 2) for _, h, w in expected['image_grid_thw']] == out['input_sizes']
  assert out['image_sizes'] == [(90, 61), (310, 230)]
  tokens = [(out['input_ids'][i] == ours.image_token_id).sum() for i in range(2)]
  assert tokens == [t * h * w // 4 for t, h, w in expected['image_grid_thw']]
  torch_model, _ = request.getfixturevalue(f'{kind}_folder')
  assert ours.image_token_id == torch_model.config.image_token_id
  assert ours.vision_start_token_id == torch_model.config.vision_start_token_id
  assert ours.eos_token_ids == tuple(torch_model.generation_config.eos_token_id)
  assert ours.pad_token_id == ref.tokenizer.pad_token_id
  assert ours.decode(out['input_ids']) == ref.batch_decode(expected['input_ids'], skip_special_tokens=True)


def test_processor_folder_without_image_config_or_tokenizer_is_refused(qwen2_5_vl_folder, tmp_path):
  import shutil

  from jaxdream.io.weights import WeightsError
  from jaxdream.vlm.qwen_processor import QwenVLProcessor

  _, path = qwen2_5_vl_folder
  for missing, message in (
    ('preprocessor_config.json', 'no preprocessor_config.json'),
    ('tokenizer.json', 'no tokenizer'),
  ):
    folder = tmp_path / missing
    folder.mkdir()
    for name in os.listdir(path):
      if name not in (missing, 'model.safetensors'):
        shutil.copy(os.path.join(path, name), folder / name)
    with pytest.raises(WeightsError, match=message):
      QwenVLProcessor(str(folder))
