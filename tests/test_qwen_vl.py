"""Qwen2.5-VL and Qwen3-VL assembled (vision tower + decoder + LM head, models/qwen_vl.py) compute transformers'
logits, generate transformers' tokens (greedy, beam, left-padded batches), load from a folder through
`jaxdream.vlm.load`, and generate the same on a tensor-parallel mesh.

The tiny folders come from conftest.write_qwen_vl_folder (random weights saved by transformers, a byte-level BPE
tokenizer with Qwen's added tokens, the published chat templates).
"""

import gc
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import reference_processor, rel_err
from flax import nnx

from jaxdream import vlm
from jaxdream.models.qwen_vl import QwenVLForConditionalGeneration, quantize_int8
from jaxdream.nn.layers import Linear
from jaxdream.runtime import compiled

pytestmark = pytest.mark.reference

KINDS = ['qwen2_5_vl', 'qwen3_vl']


def _images():
  from PIL import Image

  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, shape, np.uint8)) for shape in ((61, 90, 3), (120, 84, 3))]


def _torch_inputs(inputs, image_token_id):
  """Our processor's arrays as transformers' generate takes them (mm_token_type_ids marks image tokens)."""
  ids = torch.from_numpy(np.asarray(inputs['input_ids'], np.int64))
  return dict(
    input_ids=ids,
    attention_mask=torch.from_numpy(np.asarray(inputs['attention_mask'], np.int64)),
    pixel_values=torch.from_numpy(np.asarray(inputs['pixel_values'])),
    image_grid_thw=torch.from_numpy(np.asarray(inputs['image_grid_thw'], np.int64)),
    mm_token_type_ids=(ids == image_token_id).int(),
  )


def _forward(model, inputs):
  return compiled(model, QwenVLForConditionalGeneration.__call__)(inputs)


@pytest.fixture(scope='module', params=KINDS)
def qwen(request):
  torch_model, path = request.getfixturevalue(f'{request.param}_folder')
  return request.param, torch_model, path, vlm.load(path)


def test_logits_and_generation_match_transformers(qwen):
  """Two images of different sizes in one prompt, a left-padded second row with one image: logits at the
  real tokens <= 1e-5; greedy tokens of a left-padded batch identical to transformers' (and so to each row
  alone), beam search identical."""
  kind, torch_model, path, bundle = qwen
  assert bundle.model.tied == (kind == 'qwen3_vl')  # both kinds of LM head are compared
  proc = reference_processor(path, kind)
  two = [{'type': 'image'}, {'type': 'image'}, {'type': 'text', 'text': 'Compare these.'}]
  one = [{'type': 'image'}, {'type': 'text', 'text': 'What is this? Answer briefly.'}]
  prompts = [proc.apply_chat_template([{'role': 'user', 'content': c}], add_generation_prompt=True) for c in (two, one)]
  images = _images()
  ref_in = proc(
    images=[images[0], images[1], images[1]], text=prompts, padding=True, padding_side='left', return_tensors='np'
  )
  model = bundle.model
  inputs = model.generation_inputs(
    ref_in['pixel_values'], ref_in['image_grid_thw'], ref_in['input_ids'], ref_in['attention_mask']
  )
  ours = np.asarray(_forward(model, inputs))
  t_in = _torch_inputs(ref_in, torch_model.config.image_token_id)
  with torch.no_grad():
    expected = torch_model(**t_in).logits.numpy()
  real = ref_in['attention_mask'].astype(bool)
  assert rel_err(ours[real], expected[real]) <= 1e-5

  kw = dict(max_new_tokens=6, eos_token_id=bundle.eos_token_id, pad_token_id=bundle.pad_token_id)
  with torch.no_grad():
    ref_greedy = torch_model.generate(**t_in, do_sample=False, **kw).numpy()
    ref_beam = torch_model.generate(**t_in, do_sample=False, num_beams=3, **kw).numpy()
  args = (ref_in['pixel_values'], ref_in['image_grid_thw'], ref_in['input_ids'], ref_in['attention_mask'])
  np.testing.assert_array_equal(vlm.generate(model, *args, **kw), ref_greedy)
  np.testing.assert_array_equal(vlm.generate(model, *args, num_beams=3, **kw), ref_beam)
  # The model's own defaults are transformers' generate's: generation_config.json's EOS list and pad id.
  defaults = torch_model.generation_config
  assert (model.eos_token_id, model.pad_token_id) == (tuple(defaults.eos_token_id), defaults.pad_token_id)
  # A text-only prompt, without pixels or grids, as transformers takes it.
  text = proc(text=[proc.apply_chat_template([{'role': 'user', 'content': 'Hi.'}])], return_tensors='np')
  with torch.no_grad():
    ref_text = torch_model.generate(torch.from_numpy(text['input_ids']), do_sample=False, max_new_tokens=3).numpy()
  np.testing.assert_array_equal(vlm.generate(model, None, None, text['input_ids'], max_new_tokens=3), ref_text)


def test_ask_decodes_transformers_answer_and_reports_the_input_size(qwen):
  kind, torch_model, path, bundle = qwen
  images = _images()
  questions = ['Describe this image.', 'Where is the dog?']
  out = vlm.ask(bundle, images, questions, max_new_tokens=5)
  inputs = bundle.processor(images, questions)
  with torch.no_grad():
    ref = torch_model.generate(
      **_torch_inputs(inputs, torch_model.config.image_token_id),
      do_sample=False,
      max_new_tokens=5,
      eos_token_id=bundle.eos_token_id,
      pad_token_id=bundle.pad_token_id,
    ).numpy()
  expected = bundle.processor.decode(ref[:, inputs['input_ids'].shape[1] :])
  assert [o['text'] for o in out] == expected
  assert all(o['entities'] == [] or isinstance(o['entities'], list) for o in out)
  assert bundle.model_type == kind


def test_repetition_penalty_is_transformers_and_generation_config_json_sets_its_default(qwen, tmp_path):
  """transformers' RepetitionPenaltyLogitsProcessor in greedy and beam search, and the folder's
  generation_config.json's repetition_penalty applied by default, as transformers' generate does (Qwen2.5-VL
  Instruct's file sets 1.05)."""
  kind, torch_model, path, bundle = qwen
  images, question = _images()[:1], ['Describe this image.']
  inputs = bundle.processor(images, question)
  t_in = _torch_inputs(inputs, torch_model.config.image_token_id)
  args = (inputs['pixel_values'], inputs['image_grid_thw'], inputs['input_ids'], inputs['attention_mask'])
  kw = dict(max_new_tokens=8, eos_token_id=bundle.eos_token_id, pad_token_id=bundle.pad_token_id)
  refs = {}
  for name, extra in (('greedy', {}), ('beam', dict(num_beams=3))):
    with torch.no_grad():
      refs[name] = torch_model.generate(**t_in, do_sample=False, repetition_penalty=2.0, **extra, **kw).numpy()
      plain = torch_model.generate(**t_in, do_sample=False, **extra, **kw).numpy()
    assert not np.array_equal(refs[name], plain), 'the penalty changes nothing here: the test proves nothing'
    np.testing.assert_array_equal(vlm.generate(bundle.model, *args, repetition_penalty=2.0, **extra, **kw), refs[name])
  folder = str(tmp_path / kind)
  shutil.copytree(path, folder)
  with open(os.path.join(folder, 'generation_config.json')) as f:
    config = json.load(f)
  with open(os.path.join(folder, 'generation_config.json'), 'w') as f:
    json.dump(dict(config, repetition_penalty=2.0), f)
  answer = vlm.ask(vlm.load(folder), images, question, max_new_tokens=8)[0]['text']
  assert answer == bundle.processor.decode(refs['greedy'][:, inputs['input_ids'].shape[1] :])[0]
  with pytest.raises(ValueError, match='repetition_penalty must be a positive number'):
    vlm.generate(bundle.model, *args, repetition_penalty=0.0, **kw)


def test_generation_on_a_tensor_parallel_mesh_equals_one_device(qwen):
  """Attention heads and MLP split over 8 devices' 'tensor' axis (`vlm.load(..., tensor_parallel=8)`; kv
  heads 2, split mid-head where the width divides): the same tokens as one device, the parameters really
  sharded."""
  kind, _, path, bundle = qwen
  images = _images()[:1]
  inputs = bundle.processor(images, ['Describe this image.'])
  args = (inputs['pixel_values'], inputs['image_grid_thw'], inputs['input_ids'], inputs['attention_mask'])
  kw = dict(max_new_tokens=4, eos_token_id=bundle.eos_token_id, pad_token_id=bundle.pad_token_id)
  single = vlm.generate(bundle.model, *args, **kw)
  sharded = vlm.load(path, tensor_parallel=8)
  mlp = sharded.model.model.language_model.layers[0].mlp.gate_proj.kernel[...]
  assert mlp.sharding.spec[1] == 'tensor' and len(mlp.sharding.device_set) == 8
  np.testing.assert_array_equal(vlm.generate(sharded.model, *args, **kw), single)


def test_ask_cli_runs_a_qwen_folder_with_int8_weights_on_two_devices(qwen3_vl_folder, tmp_path, capsys):
  from PIL import Image

  from jaxdream.cli import main

  _, path = qwen3_vl_folder
  Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / 'a.png')
  argv = ['ask', '--model', path, '--image', str(tmp_path / 'a.png'), '--max-new-tokens', '3']
  assert not main([*argv, '--int8', '--tensor-parallel', '2', '--json', str(tmp_path / 'out.json'), 'What is it?'])
  (record,) = json.loads((tmp_path / 'out.json').read_text())
  assert record['image'].endswith('a.png') and isinstance(record['text'], str) and record['entities'] == []
  assert f'{tmp_path / "a.png"}:' in capsys.readouterr().out


def _mapped_files() -> str:
  gc.collect()
  with open('/proc/self/maps') as f:
    return f.read()


def test_int8_weights_shrink_memory_and_keep_logits_close(qwen2_5_vl_folder, tmp_path):
  from jaxdream.io.weights import read_safetensors, write_safetensors
  from jaxdream.nn.adapters import state_bytes

  _, source = qwen2_5_vl_folder
  path = shutil.copytree(source, tmp_path / 'model')  # a file no other test's model maps
  file = str(path / 'model.safetensors')
  write_safetensors(file, {k: np.array(v) for k, v in read_safetensors(file).items()})  # 64-byte aligned data
  bundle = vlm.load(str(path))
  assert file in _mapped_files()  # the premise: loading aliased some arrays to the mapped file
  inputs = bundle.processor(_images()[:1], ['Describe this image.'])
  prepared = bundle.model.generation_inputs(
    inputs['pixel_values'], inputs['image_grid_thw'], inputs['input_ids'], inputs['attention_mask']
  )
  before, full = state_bytes(bundle.model), np.asarray(_forward(bundle.model, prepared))
  quantize_int8(bundle.model)
  # Every Linear is int8 (the tiny model's 32-wide layers carry a float32 scale per 32 weights, and its norms
  # stay float32: about half the bytes here, a quarter at real widths).
  assert not [m for _, m in nnx.iter_graph(bundle.model) if isinstance(m, Linear)]
  assert state_bytes(bundle.model) < 0.55 * before
  # Loading may map the weight file and alias the arrays to it; what quantizing keeps (norms, biases) must not
  # keep the whole file, and its full-precision weights' pages, mapped.
  assert file not in _mapped_files()
  assert rel_err(np.asarray(_forward(bundle.model, prepared)), full) < 0.05


def test_sharded_checkpoint_loads_the_same_weights_and_bad_inputs_are_named(qwen2_5_vl_folder, tmp_path):
  from jaxdream.io.weights import state_dict

  torch_model, path = qwen2_5_vl_folder
  bundle = vlm.load(path)
  # The 7B/8B folders are sharded (model-0000N-of-0000M.safetensors + index): the same tensors.
  torch_model.save_pretrained(tmp_path / 'sharded', max_shard_size='100KB')
  for name in os.listdir(path):
    if not name.startswith('model') and not os.path.exists(tmp_path / 'sharded' / name):
      os.symlink(os.path.join(path, name), tmp_path / 'sharded' / name)
  assert len([n for n in os.listdir(tmp_path / 'sharded') if n.endswith('.safetensors')]) > 1
  theirs, ours = state_dict(vlm.load(str(tmp_path / 'sharded')).model), state_dict(bundle.model)
  assert theirs.keys() == ours.keys() and all(np.array_equal(theirs[k], ours[k]) for k in ours)
  # vlm.load(int8=True) is the model's own conversion: the token embeddings (the tied head's too) are int8.
  from jaxdream.nn.adapters import Int8Embed

  assert isinstance(vlm.load(path, int8=True).model.model.language_model.embed_tokens, Int8Embed)
  with pytest.raises(ValueError, match='tensor_parallel=0'):
    vlm.load(path, tensor_parallel=0)
  inputs = bundle.processor(_images()[:1], ['Describe this image.'])
  ids = inputs['input_ids'].copy()
  ids[ids == bundle.processor.image_token_id] = bundle.pad_token_id  # placeholders not expanded
  with pytest.raises(ValueError, match='image tokens where image_grid_thw'):
    bundle.model.generation_inputs(inputs['pixel_values'], inputs['image_grid_thw'], ids)
  limit = bundle.model.max_position_embeddings
  with pytest.raises(ValueError, match=rf'{limit}'):
    vlm.ask(bundle, _images()[:1], ['word ' * limit], max_new_tokens=2)
  # Settings and ids that transformers refuses (or that gave NaN embeddings and token 0 under jit).
  inputs = bundle.processor(_images()[:1], ['Describe this image.'])
  bad = inputs['input_ids'].copy()
  bad[0, -1] = bundle.model.vocab_size
  with pytest.raises(ValueError, match=f'token id {bundle.model.vocab_size}, outside the vocabulary'):
    vlm.generate(bundle.model, inputs['pixel_values'], inputs['image_grid_thw'], bad, max_new_tokens=2)
  for setting in (dict(num_beams=0), dict(max_new_tokens=2.5)):
    with pytest.raises(ValueError, match=f'{next(iter(setting))} must be a whole number'):
      vlm.generate(bundle.model, inputs['pixel_values'], inputs['image_grid_thw'], inputs['input_ids'], **setting)
  with pytest.raises(ValueError, match='at least one pixel'):
    bundle.processor([np.zeros((0, 8, 3), np.uint8)], ['?'])
  for name, content, message in (
    ('preprocessor_config.json', dict(size={'min_pixels': 3136, 'max_pixels': 12544}), 'expected ..shortest_edge'),
    ('preprocessor_config.json', dict(min_pixels=0), 'min_pixels 0 must be a whole number'),
    ('preprocessor_config.json', dict(max_pixels=float('inf')), 'max_pixels inf must be a whole number'),
    ('preprocessor_config.json', dict(size={'longest_edge': 12544}), 'expected ..shortest_edge'),
    ('generation_config.json', '{"eos_token_id": ', 'not valid JSON'),
  ):
    folder = tmp_path / f'bad-{len(os.listdir(tmp_path))}'
    os.makedirs(folder)
    for other in os.listdir(path):
      if other != name:
        os.symlink(os.path.join(path, other), folder / other)
    if isinstance(content, dict):
      content = json.dumps(dict(json.load(open(os.path.join(path, name))), **content))
    (folder / name).write_text(content)
    with pytest.raises(Exception, match=f'{name}: .*{message}'):
      vlm.load(str(folder))
  # An unsupported model type in an otherwise Qwen-like folder names the supported ones.
  config = json.load(open(os.path.join(path, 'config.json')))
  os.makedirs(tmp_path / 'other')
  json.dump(dict(config, model_type='qwen2_vl'), open(tmp_path / 'other' / 'config.json', 'w'))
  with pytest.raises(Exception, match='qwen2_5_vl'):
    vlm.load(str(tmp_path / 'other'))


def test_parameter_count_of_qwen2_5_vl_3b_matches_transformers():
  """The published Qwen2.5-VL-3B-Instruct config (tied embeddings): 3,754,622,976 parameters, as transformers
  counts them (built on the meta device: no memory)."""
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

  from jaxdream.io.weights import abstract_model, count_params
  from jaxdream.models.presets import QWEN2_5_VL_3B

  with torch.device('meta'):
    ref = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN2_5_VL_3B))
  expected = sum(p.numel() for p in ref.parameters())
  ours = count_params(abstract_model(lambda rngs: QwenVLForConditionalGeneration(QWEN2_5_VL_3B, rngs=rngs)))
  assert ours == expected == 3_754_622_976


def test_bfloat16_loads_bfloat16_weights_and_computes_in_bfloat16(qwen2_5_vl_folder):
  _, path = qwen2_5_vl_folder
  bundle = vlm.load(path, dtype=jnp.bfloat16)
  inputs = bundle.processor(_images()[:1], ['Describe this image.'])
  prepared = bundle.model.generation_inputs(
    inputs['pixel_values'], inputs['image_grid_thw'], inputs['input_ids'], inputs['attention_mask']
  )
  assert prepared['image_embeds'].dtype == jnp.bfloat16
  logits = _forward(bundle.model, prepared)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
  # bfloat16 weights too (inference of the 7B/8B sizes): half of float32's memory.
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bundle.model))} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_keeps_weights_out_in_with_float32s_numbers_and_tensor_shardings(qwen2_5_vl_folder):
  """In half precision every Linear of the decoder and vision tower stores its kernel (out, in), as torch does
  (XLA:CPU's faster bfloat16 layout, nn.layers.LinearOutIn): the same weights in and out as the files, logits
  within bfloat16 rounding of float32's, and the tensor axis on the right dimension of each kernel."""
  from jaxdream.io.weights import state_dict
  from jaxdream.nn.layers import LinearOutIn

  torch_model, path = qwen2_5_vl_folder
  half, full = vlm.load(path, dtype=jnp.bfloat16), vlm.load(path)
  linears = [m for _, m in nnx.iter_graph(half.model) if isinstance(m, Linear)]
  assert linears and all(type(m) is LinearOutIn for m in linears)
  assert not [m for _, m in nnx.iter_graph(full.model) if isinstance(m, LinearOutIn)]
  mlp = half.model.model.language_model.layers[0].mlp
  assert mlp.gate_proj.kernel.shape == tuple(torch_model.model.language_model.layers[0].mlp.gate_proj.weight.shape)
  ours, files = state_dict(half.model), torch_model.state_dict()
  for k, v in ours.items():  # written back in torch's layout: the files' weights, rounded to bfloat16
    ref = files[k].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(v, np.float32), ref, err_msg=k)
  inputs = half.processor(_images()[:1], ['Describe this image.'])
  args = (inputs['pixel_values'], inputs['image_grid_thw'], inputs['input_ids'], inputs['attention_mask'])
  logits = [np.asarray(_forward(b.model, b.model.generation_inputs(*args))) for b in (half, full)]
  assert rel_err(*logits) < 0.02
  sharded = vlm.load(path, dtype=jnp.bfloat16, tensor_parallel=8).model.model.language_model.layers[0]
  assert sharded.mlp.gate_proj.kernel[...].sharding.spec[0] == 'tensor'  # (mlp, embed): column-parallel
  assert sharded.mlp.down_proj.kernel[...].sharding.spec[1] == 'tensor'  # (embed, mlp): row-parallel
  kw = dict(max_new_tokens=3, eos_token_id=half.eos_token_id, pad_token_id=half.pad_token_id)
  np.testing.assert_array_equal(
    vlm.generate(vlm.load(path, dtype=jnp.bfloat16, tensor_parallel=8).model, *args, **kw),
    vlm.generate(half.model, *args, **kw),
  )
