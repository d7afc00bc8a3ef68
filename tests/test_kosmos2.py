"""The Kosmos-2 port computes what transformers' Kosmos2ForConditionalGeneration computes.

The tiny model folders built here (random weights moved off their initialisation, an XLM-R style tokenizer
with a small vocabulary plus the processor's 1035 tag and patch-index tokens) are shared with test_vlm.py.
"""

import string

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, perturb_, rel_err
from flax import nnx

from jaxdream.io.weights import read_safetensors, write_safetensors
from jaxdream.models import ConfigError, WeightsError, abstract_model, count_params
from jaxdream.models.kosmos2 import Kosmos2ForConditionalGeneration, load_kosmos2

pytestmark = pytest.mark.reference

WORDS = [
  '▁a',
  '▁an',
  '▁An',
  '▁image',
  '▁of',
  '▁the',
  '▁dog',
  '▁cat',
  '▁snow',
  'man',
  '▁fire',
  '▁by',
  '▁warming',
  '▁him',
  'self',
  '.',
  ',',
  '▁on',
  '▁in',
  '▁red',
  '▁blue',
  '▁sks',
  '▁photo',
]


def tiny_tokenizer():
  """An XLM-R (unigram) tokenizer with a small vocabulary, laid out as Kosmos-2's: <s> <pad> </s> <unk> first."""
  from transformers import XLMRobertaTokenizer

  vocab = (
    [('<s>', 0.0), ('<pad>', 0.0), ('</s>', 0.0), ('<unk>', 0.0)]
    + [(f'▁img{i}', -20.0) for i in range(64)]  # the 64 ids the processor puts at the image slots
    + [(w, -1.0 - i / 10) for i, w in enumerate(WORDS)]
    + [(c, -10.0) for c in string.ascii_letters]
    + [('▁', -5.0), ('<mask>', 0.0)]
  )
  return XLMRobertaTokenizer(vocab=vocab)


def make_processor(image_size=32):
  """transformers' Kosmos2Processor over the tiny tokenizer (it adds the 11 tags and 1024 patch tokens)."""
  from transformers import CLIPImageProcessor, Kosmos2Processor

  image_processor = CLIPImageProcessor(
    size={'shortest_edge': image_size}, crop_size={'height': image_size, 'width': image_size}
  )
  return Kosmos2Processor(image_processor, tiny_tokenizer())


def make_kosmos2(path, *, tied=False, seed=0, image_size=32):
  """A tiny random Kosmos-2 folder (model, tokenizer, processor config) saved as transformers saves it."""
  from transformers import Kosmos2Config
  from transformers import Kosmos2ForConditionalGeneration as TorchKosmos2

  processor = make_processor(image_size)
  config = Kosmos2Config(
    text_config=dict(
      vocab_size=len(processor.tokenizer) + 2,
      embed_dim=32,
      layers=2,
      ffn_dim=64,
      attention_heads=4,
      max_position_embeddings=256,
      tie_word_embeddings=tied,
    ),
    vision_config=dict(
      hidden_size=48,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=image_size,
      patch_size=8,
    ),
    latent_query_num=64,
    tie_word_embeddings=tied,
  )
  torch.manual_seed(seed)
  # 0.1 noise: enough for varied (not repetitive) greedy generations from the untied model.
  model = perturb_(TorchKosmos2(config), scale=0.1, seed=seed)
  model.save_pretrained(path)
  processor.save_pretrained(path)
  return model, processor


@pytest.fixture(scope='session')
def kosmos2_folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('kosmos2'))
  model, processor = make_kosmos2(path)
  return model, processor, path


@pytest.fixture(scope='session')
def kosmos2_tied_folder(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('kosmos2_tied'))
  model, processor = make_kosmos2(path, tied=True, seed=1)
  return model, processor, path


def _inputs(seed=0, vocab=1000):
  """Two rows: one full, one with 5 tokens of left padding; image slots after <s><image>."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (2, 80))
  ids[:, 0] = 0
  attention, image_mask = np.ones((2, 80), np.int64), np.zeros((2, 80), np.int64)
  ids[1, :5], attention[1, :5] = 1, 0
  image_mask[0, 2:66], image_mask[1, 7:71] = 1, 1
  pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  return pixels, ids, attention, image_mask


@pytest.mark.parametrize('folder', ['kosmos2_folder', 'kosmos2_tied_folder'])
def test_logits_and_image_embeds_match_transformers(folder, request):
  ref_model, _, path = request.getfixturevalue(folder)
  model = load_kosmos2(path)
  assert (model.text_model.lm_head is None) == ('tied' in folder)
  pixels, ids, attention, image_mask = _inputs()
  with torch.no_grad():
    ref = ref_model(
      pixel_values=torch.from_numpy(pixels),
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(attention),
      image_embeds_position_mask=torch.from_numpy(image_mask),
    )
  px = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  logits = np.asarray(jit_call(model)(px, jnp.asarray(ids), jnp.asarray(image_mask), jnp.asarray(attention)))
  ref_logits = ref.logits.numpy()
  assert rel_err(logits[0], ref_logits[0]) <= 1e-5
  assert rel_err(logits[1, 5:], ref_logits[1, 5:]) <= 1e-5  # left padding itself is garbage on both sides
  assert rel_err(jit_call(model, 'image_embeds')(px), ref.image_embeds.numpy()) <= 1e-5


def test_bfloat16_compute_stays_close(kosmos2_folder):
  ref_model, _, path = kosmos2_folder
  pixels, ids, attention, image_mask = _inputs(seed=1)
  with torch.no_grad():
    ref = ref_model(
      pixel_values=torch.from_numpy(pixels[:1]),
      input_ids=torch.from_numpy(ids[:1]),
      image_embeds_position_mask=torch.from_numpy(image_mask[:1]),
    ).logits.numpy()
  out = jit_call(load_kosmos2(path, dtype=jnp.bfloat16))(
    jnp.asarray(pixels[:1].transpose(0, 2, 3, 1)), jnp.asarray(ids[:1]), jnp.asarray(image_mask[:1])
  )
  assert out.dtype == jnp.float32  # logits are always float32
  assert rel_err(out, ref) <= 3e-2


def test_parameter_count_of_kosmos2_patch14_224_matches_transformers():
  from transformers import Kosmos2Config
  from transformers import Kosmos2ForConditionalGeneration as TorchKosmos2

  with torch.device('meta'):
    ref = sum(p.numel() for p in TorchKosmos2(Kosmos2Config()).parameters())  # tied head counted once
  config = Kosmos2Config().to_dict()
  ours = count_params(abstract_model(lambda rngs: Kosmos2ForConditionalGeneration(config, rngs=rngs)))
  assert ours == ref == 1_664_485_376


def test_separate_head_in_file_unties_a_tied_config_like_transformers(kosmos2_tied_folder, tmp_path):
  import shutil

  _, _, path = kosmos2_tied_folder
  shutil.copytree(path, tmp_path / 'k', dirs_exist_ok=True)
  weights = {k: np.array(v) for k, v in read_safetensors(str(tmp_path / 'k' / 'model.safetensors')).items()}
  embed = weights['text_model.model.embed_tokens.weight']
  weights['text_model.lm_head.weight'] = embed * 2
  write_safetensors(str(tmp_path / 'k' / 'model.safetensors'), weights)
  model = load_kosmos2(str(tmp_path / 'k'))
  np.testing.assert_array_equal(np.asarray(model.text_model.lm_head.kernel[...]), 2 * embed.T)
  weights['text_model.lm_head.weight'] = embed  # an identical copy stays tied
  write_safetensors(str(tmp_path / 'k' / 'model.safetensors'), weights)
  assert load_kosmos2(str(tmp_path / 'k')).text_model.lm_head is None


def test_missing_tensor_is_named(kosmos2_folder, tmp_path):
  import shutil

  shutil.copytree(kosmos2_folder[2], tmp_path / 'k', dirs_exist_ok=True)
  weights = {k: np.array(v) for k, v in read_safetensors(str(tmp_path / 'k' / 'model.safetensors')).items()}
  weights.pop('image_to_text_projection.latent_query')
  write_safetensors(str(tmp_path / 'k' / 'model.safetensors'), weights)
  with pytest.raises(WeightsError, match=r'missing tensor.*image_to_text_projection\.latent_query'):
    load_kosmos2(str(tmp_path / 'k'))


@pytest.mark.parametrize(
  'sub, key, value',
  [
    ('text_config', 'add_cross_attention', True),
    ('vision_config', 'hidden_act', 'tanh'),
    ('vision_config', 'image_size', [224, 160]),
  ],
)
def test_unsupported_config_is_an_error_naming_the_key(sub, key, value):
  with pytest.raises(ConfigError, match=key):
    Kosmos2ForConditionalGeneration.resolve_config({sub: {key: value}})


def test_wrong_image_size_is_an_error(kosmos2_folder):
  model = load_kosmos2(kosmos2_folder[2])
  with pytest.raises(ValueError, match='32x32'):
    model.image_embeds(jnp.zeros((1, 48, 48, 3)))


def test_attention_maps_match_transformers_output_attentions(kosmos2_folder):
  from transformers import Kosmos2ForConditionalGeneration as TorchKosmos2

  path = kosmos2_folder[2]
  ref_model = TorchKosmos2.from_pretrained(path, attn_implementation='eager').eval()  # eager returns them
  pixels, ids, attention, image_mask = _inputs(seed=2)
  with torch.no_grad():
    ref = ref_model(
      pixel_values=torch.from_numpy(pixels),
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(attention),
      image_embeds_position_mask=torch.from_numpy(image_mask),
      output_attentions=True,
    )
  maps = jit_call(load_kosmos2(path), 'attention_maps')(
    jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), jnp.asarray(image_mask), jnp.asarray(attention)
  )
  assert len(maps['text']) == len(ref.attentions) == 2
  for ours, theirs in zip(maps['text'], ref.attentions):
    assert rel_err(ours[0], theirs[0].numpy()) <= 1e-5
    assert rel_err(np.asarray(ours)[1, :, 5:, 5:], theirs[1, :, 5:, 5:].numpy()) <= 1e-5
  assert rel_err(maps['projection'], ref.projection_attentions.numpy()) <= 1e-5


def test_int8_weights_shrink_memory_and_keep_logits_close(kosmos2_folder):
  from jaxdream.models.kosmos2 import Int8Embed, Int8Linear, quantize_int8, state_bytes
  from jaxdream.nn.layers import Linear

  model = load_kosmos2(kosmos2_folder[2])
  pixels, ids, attention, image_mask = _inputs(seed=3)
  args = (jnp.asarray(pixels.transpose(0, 2, 3, 1)), jnp.asarray(ids), jnp.asarray(image_mask), jnp.asarray(attention))
  ref = np.asarray(jit_call(model)(*args))
  before = state_bytes(model)
  quantize_int8(model)
  kinds = {type(m) for _, m in nnx.iter_modules(model)}
  assert Int8Linear in kinds and Int8Embed in kinds and Linear not in kinds
  assert state_bytes(model) < 0.4 * before  # this tiny model keeps float32 norms and biases; 1.66B: ~0.26
  out = np.asarray(jit_call(model)(*args))
  assert rel_err(out[0], ref[0]) <= 3e-2
  assert (out[0].argmax(-1) == ref[0].argmax(-1)).mean() >= 0.9
