"""jaxdream.evaluation computes what the reference pipelines compute: transformers' CLIPModel and ViTModel on
their reference preprocessing (CLIPImageProcessor; DINO's torchvision eval transform), and the DreamBench
scores from those embeddings.

Tiny random models saved with save_pretrained: a CLIPModel (30 px images, patch 4: a 7x7 grid with a
remainder, as torch's strided conv floors), a DINO-like ViTModel (36 px, patch 8) and a second ViT (quick_gelu,
no qkv bias, a pooler). Each scoring model compiles once: every test reuses the same batch shapes.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from conftest import rel_err, torchvision_dino

from jaxdream.evaluation import (
  ClipTransform,
  bootstrap_ci,
  clip_image_embed,
  clip_text_embed,
  dino_embed,
  dino_pixels,
  dreambench_scores,
  load_clip,
  load_dino,
)
from jaxdream.models import ConfigError, load_vit
from jaxdream.runtime import CompileCache

pytestmark = pytest.mark.reference

DREAMBENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'dreambench')
SUBJECTS = ('dog', 'backpack')
PROMPTS = {'dog': ['a dog in the jungle', 'a dog in the snow'], 'backpack': ['a backpack on the beach'] * 2}


def _images():
  """Per subject: 3 real images (DreamBench's, else random) and 2 generated ones of odd, non-square sizes."""
  from PIL import Image

  rng = np.random.default_rng(0)
  real, generated = {}, {}
  for k, s in enumerate(SUBJECTS):
    folder = os.path.join(DREAMBENCH, s)
    if os.path.isdir(folder):
      real[s] = [Image.open(os.path.join(folder, f)).convert('RGB') for f in sorted(os.listdir(folder))[:3]]
    else:
      real[s] = [Image.fromarray(rng.integers(0, 256, (48, 40, 3), np.uint8)) for _ in range(3)]
    generated[s] = [rng.integers(0, 256, (45 + k, 53, 3), np.uint8), rng.integers(0, 256, (61, 39 + k, 3), np.uint8)]
  return real, generated


@pytest.fixture(scope='module')
def models(scoring_models):
  return scoring_models


@pytest.fixture(scope='module')
def scorers(models):
  return load_clip(models['clip'][1]), load_dino(models['dino'][1])


def _pil(images):
  from PIL import Image

  return [im if isinstance(im, Image.Image) else Image.fromarray(im) for im in images]


def _reference(models, real, generated):
  """Per subject, the transformers models' unit embeddings: real and generated CLIP and DINO, and prompt text."""
  clip, _, processor, tokenizer = models['clip']
  dino = models['dino'][0]
  out = {}
  with torch.no_grad():
    for s in SUBJECTS:
      ims = {'real': _pil(real[s]), 'gen': _pil(generated[s])}
      e = {}
      for k, group in ims.items():
        pixels = processor(images=group, return_tensors='pt').pixel_values
        e['clip_' + k] = clip.get_image_features(pixel_values=pixels).pooler_output.numpy()
        pixels = torch.stack([torchvision_dino(im, 36) for im in group])
        e['dino_' + k] = dino(pixel_values=pixels).last_hidden_state[:, 0].numpy()
      ids = tokenizer(PROMPTS[s], padding=True, return_tensors='pt')
      e['text'] = clip.get_text_features(**ids).pooler_output.numpy()
      out[s] = {k: v / np.linalg.norm(v, axis=-1, keepdims=True) for k, v in e.items()}
  return out


def test_preprocessing_equals_clip_image_processor_and_torchvision_dino(models, scorers, tmp_path):
  from transformers import CLIPImageProcessor

  clip, dino = scorers
  real, generated = _images()
  images = real['dog'] + generated['dog']
  processor = models['clip'][2]
  want = processor(images=_pil(images), return_tensors='np').pixel_values.transpose(0, 2, 3, 1)
  got = clip.transform(images)
  assert got.shape == want.shape == (5, 30, 30, 3)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Older preprocessor files (openai/clip-vit-base-patch32) give the sizes as plain ints.
  legacy = dict(size=34, crop_size=30, image_processor_type='CLIPImageProcessor', resample=3, do_center_crop=True)
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps(legacy))
  want = CLIPImageProcessor.from_pretrained(str(tmp_path))(images=_pil(images), return_tensors='np').pixel_values
  np.testing.assert_allclose(ClipTransform(str(tmp_path), 30)(images), want.transpose(0, 2, 3, 1), atol=1e-5, rtol=0)
  for size in (36, 224):  # the tiny model's size, and DINO's own (shorter side 256, crop 224)
    want = np.stack([torchvision_dino(im, size).numpy().transpose(1, 2, 0) for im in _pil(images)])
    got = np.stack([dino_pixels(im, size) for im in _pil(images)])
    assert got.shape == want.shape == (5, size, size, 3)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(dino.transform(images), np.stack([dino_pixels(im, 36) for im in _pil(images)]))
  # A photo file with an EXIF orientation: CLIP's processor (transformers' load_image) turns it upright, DINO's
  # loader (torchvision's ImageFolder: Image.open + convert) does not.
  from PIL import Image, ImageOps

  path = str(tmp_path / 'rotated.jpg')
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
  Image.fromarray(np.asarray(_pil(real['dog'])[0])[:, 5:]).save(path, exif=exif)
  with Image.open(path) as im:
    stored, upright = im.convert('RGB'), ImageOps.exif_transpose(im).convert('RGB')
  assert stored.size != upright.size
  np.testing.assert_allclose(
    dino.transform([path])[0], torchvision_dino(stored, 36).numpy().transpose(1, 2, 0), atol=1e-5
  )
  want = processor(images=[upright], return_tensors='np').pixel_values.transpose(0, 2, 3, 1)
  np.testing.assert_allclose(clip.transform([path]), want, atol=1e-5, rtol=0)


def test_embeddings_equal_transformers_clip_and_dino(models, scorers):
  """get_image_features / get_text_features of CLIPModel (gelu vision, quick_gelu text, 30 px with patch 4),
  ViTModel's last_hidden_state[:, 0] (gelu, 36 px with patch 8), from images through preprocessing."""
  clip_t, _, processor, tokenizer = models['clip']
  clip, dino = scorers
  real, generated = _images()
  images = real['dog'] + generated['dog'] + real['backpack'] + generated['backpack']  # 10: the scores' batch
  with torch.no_grad():
    pixels = processor(images=_pil(images), return_tensors='pt').pixel_values
    want_clip = clip_t.get_image_features(pixel_values=pixels).pooler_output.numpy()
    want_dino = models['dino'][0](torch.stack([torchvision_dino(im, 36) for im in _pil(images)]))
    texts = sorted(set(PROMPTS['dog'] + PROMPTS['backpack']))
    want_text = clip_t.get_text_features(**tokenizer(texts, padding=True, return_tensors='pt')).pooler_output.numpy()
  assert rel_err(clip_image_embed(clip, images), want_clip) <= 1e-5
  got_dino = dino_embed(dino, images)
  assert rel_err(got_dino, want_dino.last_hidden_state[:, 0].numpy()) <= 1e-5
  # Smaller batches, the last one padded: the same embeddings; progress hears of each batch.
  sizes = []
  small = dataclasses.replace(dino, batch_size=4, compile_cache=CompileCache())
  assert rel_err(dino_embed(small, images, progress=sizes.append), got_dino) <= 1e-6
  assert sizes == [4, 4, 2] and _compiles(small) == [1]
  assert rel_err(clip_text_embed(clip, None, texts), want_text) <= 1e-5
  assert _compiles(clip) == [1, 1] and _compiles(dino) == [1]


def _compiles(scorer):
  """How many programs each of the scorer's jitted functions has compiled (one per input shape)."""
  return [fn._cache_size() for fn in scorer.compile_cache.values()]


def test_vit_quick_gelu_without_qkv_bias_and_pooler_equals_transformers(models):
  """The whole last hidden state and the pooler (dense + tanh), on 30 px images with patch 4 (floored 7x7)."""
  from conftest import jit_call

  vit_t, path = models['vit']
  vit = load_vit(path)
  assert vit.pooler is not None and vit.embeddings.patch_embeddings.projection.kernel.shape == (4, 4, 3, 16)
  x = np.random.default_rng(1).standard_normal((2, 30, 30, 3)).astype(np.float32)
  with torch.no_grad():
    want = vit_t(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
  got = jit_call(vit)(x)
  assert rel_err(got['last_hidden_state'], want.last_hidden_state.numpy()) <= 1e-5
  assert rel_err(got['pooler_output'], want.pooler_output.numpy()) <= 1e-5
  with pytest.raises(ValueError, match='ViT expects 30x30 images, got 32x32'):
    vit(np.zeros((1, 32, 32, 3), np.float32))


def test_dreambench_scores_equal_a_direct_computation_on_transformers_embeddings(models, scorers):
  clip, dino = scorers
  real, generated = _images()
  scores = dreambench_scores(real, generated, PROMPTS, clip, dino, seed=3)
  ref = _reference(models, real, generated)
  close = dict(rtol=1e-5, atol=1e-6)
  for s in SUBJECTS:
    e = ref[s]
    want = {
      'dino': (e['dino_gen'] @ e['dino_real'].T).mean(),
      'clip_i': (e['clip_gen'] @ e['clip_real'].T).mean(),
      'clip_t': np.mean(np.sum(e['clip_gen'] * e['text'], -1)),
    }
    for m, v in want.items():
      np.testing.assert_allclose(scores['subjects'][s][m], v, **close, err_msg=f'{s} {m}')
    for m in ('dino', 'clip_i'):  # each real image against the other two
      r = e[m.replace('_i', '') + '_real']
      pairs = [r[i] @ r[j] for i in range(3) for j in range(3) if i != j]
      np.testing.assert_allclose(scores['real_subjects'][s][m], np.mean(pairs), **close, err_msg=f'real {s} {m}')
    per_image = [im['dino'] for im in scores['images'][s]]
    np.testing.assert_allclose(per_image, (e['dino_gen'] @ e['dino_real'].T).mean(1), **close)
    assert [im['prompt'] for im in scores['images'][s]] == PROMPTS[s]
  for m in ('dino', 'clip_i', 'clip_t'):
    per = [scores['subjects'][s][m] for s in SUBJECTS]
    assert scores['overall'][m] == pytest.approx(np.mean(per), abs=1e-12)
    assert scores['ci'][m] == list(bootstrap_ci(per, 3))
    assert all(isinstance(v, float) for v in [scores['overall'][m], *scores['ci'][m]])
  assert scores['real']['dino'] == pytest.approx(np.mean([scores['real_subjects'][s]['dino'] for s in SUBJECTS]))
  assert _compiles(clip) == [1, 1] and _compiles(dino) == [1]  # the embedding tests' programs, reused


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
  values = np.random.default_rng(0).normal(0.7, 0.05, 30)
  lo, hi = bootstrap_ci(values, seed=5)
  assert (lo, hi) == bootstrap_ci(values, seed=5) and (lo, hi) != bootstrap_ci(values, seed=6)
  assert lo < values.mean() < hi
  half = 1.96 * values.std() / np.sqrt(len(values))  # the normal approximation's half width
  assert (hi - lo) / 2 == pytest.approx(half, rel=0.2)
  assert bootstrap_ci([0.5], seed=0) == (0.5, 0.5)
  with pytest.raises(ValueError, match='no values'):
    bootstrap_ci([], seed=0)


def test_bad_inputs_are_errors_naming_them_before_any_compile(models, scorers):
  clip, dino = scorers
  clip_dir, dino_dir = models['clip'][1], models['dino'][1]
  with pytest.raises(ConfigError, match=f"{dino_dir}: not a CLIPModel config .*model_type='vit'"):
    load_clip(dino_dir)
  with pytest.raises(ConfigError, match=f"{clip_dir}: not a ViTModel config: model_type='clip'"):
    load_dino(clip_dir)
  with pytest.raises(TypeError, match='dino_embed takes a scorer from load_dino'):
    dino_embed(clip, [])
  real, generated = _images()
  with pytest.raises(ValueError, match=r'backpack: 2 generated image\(s\) but 1 prompt\(s\)'):
    dreambench_scores(real, generated, dict(PROMPTS, backpack=['a backpack']), clip, dino)
  with pytest.raises(ValueError, match='dog: no real images'):
    dreambench_scores(dict(real, dog=[]), generated, PROMPTS, clip, dino)
  with pytest.raises(ValueError, match='uint8'):
    dino_embed(dino, [np.zeros((8, 8, 3), np.float32)])


def test_scoring_folders_the_preprocessing_cannot_follow_fail_at_load(models, tmp_path):
  """Image processor settings were read only when the first image was scored, after a run had generated its
  images: a size form or resampling the processor cannot follow, a crop size without height and width, or
  no center crop (images of other shapes than the model's) are errors naming the folder at load, and so is a
  tower that does not take RGB images."""
  from jaxdream.evaluation.preprocess import ClipTransform

  clip_dir = models['clip'][1]
  config = json.load(open(os.path.join(clip_dir, 'preprocessor_config.json')))
  size = load_clip(clip_dir).model.image_size
  for i, (change, message) in enumerate(
    (
      (dict(size={'max_height': 40, 'max_width': 40}), 'image processor settings'),
      (dict(resample='bicubic'), 'image processor settings'),
      (dict(crop_size={'shortest_edge': size}), 'crop_size'),
      (dict(do_center_crop=False), 'do_center_crop'),
    )
  ):
    folder = tmp_path / f'clip{i}'
    os.makedirs(folder)
    json.dump(dict(config, **change), open(folder / 'preprocessor_config.json', 'w'))
    with pytest.raises(ValueError, match=f'{folder}: .*{message}'):
      ClipTransform(str(folder), size)
  vit = json.load(open(os.path.join(models['dino'][1], 'config.json')))
  os.makedirs(tmp_path / 'gray')
  for name in os.listdir(models['dino'][1]):
    if name != 'config.json':
      os.symlink(os.path.join(models['dino'][1], name), tmp_path / 'gray' / name)
  json.dump(dict(vit, num_channels=1), open(tmp_path / 'gray' / 'config.json', 'w'))
  with pytest.raises(ConfigError, match='num_channels=1'):
    load_dino(str(tmp_path / 'gray'))


def _numbers(scores) -> np.ndarray:
  """Every score of a dreambench_scores result, in a fixed order: per image, per subject, overall, CIs, real."""
  out = [im[m] for s in SUBJECTS for im in scores['images'][s] for m in ('dino', 'clip_i', 'clip_t')]
  out += [scores[k][s][m] for k in ('subjects', 'real_subjects') for s in SUBJECTS for m in scores[k][s]]
  out += [v for m in scores['ci'] for v in scores['ci'][m]] + list(scores['overall'].values())
  return np.array(out + list(scores['real'].values()), np.float64)


def test_scores_agree_on_one_device_and_with_the_batch_split_over_an_8_device_mesh(scorers, monkeypatch):
  """#14 item 3: the same images scored on one device and with every batch split over a ('data', 'fsdp') mesh of
  8 devices give the same DINO, CLIP-I and CLIP-T numbers to relative error 1e-5."""
  import jax

  from jaxdream.distributed.mesh import make_mesh
  from jaxdream.evaluation import scorers as scorers_module

  assert jax.device_count() == 8
  clip, dino = scorers
  real, generated = _images()
  one = dreambench_scores(real, generated, PROMPTS, clip, dino, seed=3)
  # The embeddings come back split over the 8 devices: 10 images padded to 16, 2 per device.
  outputs = []
  to_host = scorers_module.to_host
  monkeypatch.setattr(scorers_module, 'to_host', lambda x: (outputs.append(x), to_host(x))[1])
  mesh = make_mesh(data=4, fsdp=2)
  fresh = lambda s: dataclasses.replace(s, compile_cache=CompileCache())
  clip8, dino8 = fresh(clip), fresh(dino)
  many = dreambench_scores(real, generated, PROMPTS, clip8, dino8, seed=3, mesh=mesh)
  assert [x.shape[0] for x in outputs] == [16, 16, 8]  # DINO and CLIP images (10), the 3 prompts
  assert all(x.sharding.shard_shape(x.shape)[0] == x.shape[0] // 8 for x in outputs)
  assert [im['prompt'] for s in SUBJECTS for im in many['images'][s]] == [p for s in SUBJECTS for p in PROMPTS[s]]
  a, b = _numbers(one), _numbers(many)
  assert a.shape == b.shape == (33,)
  assert rel_err(b, a) <= 1e-5
  assert np.abs(b - a).max() <= 1e-5
  assert _compiles(clip8) == [1, 1] and _compiles(dino8) == [1]


def test_float32_programs_compile_their_cpu_matmuls_off_ynnpack_with_the_same_numbers():
  """The scoring models (and every float32 program of jaxdream's: runtime.compiler) compile with these
  options: on CPU no float32 matmul is left to a YNNPACK fusion, and the result is the default compilation's
  to float32 rounding; bfloat16 programs keep YNNPACK's kernels, other backends their defaults."""
  import jax
  import jax.numpy as jnp

  from jaxdream.runtime import compiler_options

  rng = np.random.default_rng(0)
  x, w = rng.standard_normal((64, 96), np.float32), rng.standard_normal((96, 128), np.float32)
  f = lambda x, w: jax.nn.gelu(x @ w)
  default = jax.jit(f).lower(x, w).compile()
  encoder = jax.jit(f, compiler_options=compiler_options(jnp.float32, xla_kernels=True)).lower(x, w).compile()
  if jax.default_backend() == 'cpu':
    assert 'ynn_fusion' in default.as_text() and 'ynn_fusion' not in encoder.as_text()
    assert compiler_options(jnp.bfloat16, xla_kernels=True) is None and compiler_options(jnp.float32) is None
  assert rel_err(encoder(x, w), default(x, w)) <= 1e-6
  assert compiler_options(jnp.float32, xla_kernels=True, backend='gpu') is None
  assert compiler_options(xla_kernels=True, backend='tpu') is None


@pytest.mark.parametrize('layers', [0, 1])
def test_class_token_embeddings_of_zero_and_one_layer_towers_equal_transformers(layers, tmp_path):
  """The last encoder layer runs for the class token only (`first_token`); a tower with one layer has only that
  one, and a tower with none (transformers builds it) has none to skip."""
  from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

  from jaxdream.models import load_clip_model

  torch.manual_seed(0)
  vision = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=layers)
  clip_t = CLIPModel(
    CLIPConfig(
      text_config=dict(vision, vocab_size=99, max_position_embeddings=16),
      vision_config=dict(vision, image_size=16, patch_size=4),
      projection_dim=8,
    )
  ).eval()
  vit_t = ViTModel(ViTConfig(**vision, image_size=16, patch_size=4), add_pooling_layer=False).eval()
  clip_t.save_pretrained(tmp_path / 'clip')
  vit_t.save_pretrained(tmp_path / 'vit')
  x = np.random.default_rng(layers).standard_normal((2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    pixels = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want_clip = clip_t.get_image_features(pixel_values=pixels).pooler_output.numpy()
    want_vit = vit_t(pixel_values=pixels).last_hidden_state[:, 0].numpy()
  assert rel_err(load_clip_model(str(tmp_path / 'clip')).get_image_features(x), want_clip) <= 1e-5
  assert rel_err(load_vit(str(tmp_path / 'vit')).cls_embedding(x), want_vit) <= 1e-5
