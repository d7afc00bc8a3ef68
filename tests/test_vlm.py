"""Kosmos-2 captioning: prompts, pixels, generation and grounding parses are transformers' own."""

import dataclasses
import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
import test_kosmos2
import torch
from PIL import Image
from test_kosmos2 import make_processor, tiny_tokenizer

from jaxdream import vlm
from jaxdream.cli import main
from jaxdream.io.weights import WeightsError
from jaxdream.models import ConfigError
from jaxdream.runtime import CompileCache

kosmos2_folder = test_kosmos2.kosmos2_folder  # the session fixture, shared with test_kosmos2.py
MAX_NEW = 12
PROMPTS = ['<grounding>An image of', '<grounding> a red dog by the fire', 'sks']


@pytest.fixture(scope='module')
def bundle(kosmos2_folder):
  return vlm.load(kosmos2_folder[2])


@pytest.fixture(scope='module')
def cli_cache():
  """One cache for this module's CLI calls: they reuse the loaded model and its compiled generation."""
  return CompileCache()


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 50 - 5 * i, 3), dtype=np.uint8)) for i in range(3)]


def _torch_inputs(processor, prompt, image):
  enc = processor(text=prompt, images=image, return_tensors='pt')
  return {k: enc[k] for k in ('pixel_values', 'input_ids', 'attention_mask', 'image_embeds_position_mask')}


def _ours(bundle, prompts, images, **kwargs):
  """Generate with prompts left-padded to the caption bucket; returns rows without their left padding."""
  ids, attention, image_mask = bundle.processor.prompts(prompts, bucket=8)
  out = vlm.generate(
    bundle.model, bundle.processor.images(images), ids, attention, image_mask, max_new_tokens=MAX_NEW, **kwargs
  )
  pads = np.repeat((attention == 0).sum(1), len(out) // len(prompts))
  return [row[p:] for row, p in zip(out, pads)]


@pytest.fixture(scope='module')
def greedy_reference(kosmos2_folder, images):
  ref_model, processor, _ = kosmos2_folder
  with torch.no_grad():
    return [
      ref_model.generate(**_torch_inputs(processor, p, im), max_new_tokens=MAX_NEW)[0].numpy()
      for p, im in zip(PROMPTS, images)
    ]


# ----------------------------------------------------------------------------------------------- processor


def test_prompt_ids_and_image_mask_match_kosmos2_processor_with_left_padding(kosmos2_folder, bundle, images):
  processor = kosmos2_folder[1]
  processor.tokenizer.padding_side = 'left'
  enc = processor(text=PROMPTS, images=images, padding=True)
  ids, attention, image_mask = bundle.processor.prompts(PROMPTS)
  assert ids.tolist() == enc['input_ids']
  assert attention.tolist() == enc['attention_mask']
  assert image_mask.tolist() == enc['image_embeds_position_mask']
  assert len(set(map(len, (bundle.processor.encode_prompt(p) for p in PROMPTS)))) == 3  # really unequal


@pytest.mark.parametrize(
  'config',
  [
    dict(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}),
    dict(size={'shortest_edge': 24}, crop_size={'height': 28, 'width': 20}, resample=2),
    dict(use_square_size=True, size={'shortest_edge': 224}),
    dict(size={'shortest_edge': 30, 'longest_edge': 40}, crop_size={'height': 30, 'width': 30}),  # a capped long side
  ],
)
def test_pixel_values_match_clip_image_processor(config, images):
  from transformers import CLIPImageProcessorPil

  rgba = images[1].copy()
  rgba.putalpha(Image.fromarray(np.tile(np.arange(45, dtype=np.uint8) * 5, (49, 1))))  # a transparency ramp
  inputs = images + [images[0].convert('L'), rgba]
  ref = CLIPImageProcessorPil(**config)(inputs)['pixel_values']
  cfg = json.loads(CLIPImageProcessorPil(**config).to_json_string())
  ours = np.stack([vlm.preprocess_image(im, cfg) for im in inputs])
  assert ours.shape == np.stack(ref).transpose(0, 2, 3, 1).shape
  np.testing.assert_allclose(ours, np.stack(ref).transpose(0, 2, 3, 1), atol=1e-6)


def test_images_load_from_paths_and_arrays_as_transformers_reads_them(images, tmp_path):
  from transformers.image_utils import load_image

  rgba = images[1].copy()
  rgba.putalpha(Image.fromarray(np.tile(np.arange(45, dtype=np.uint8) * 5, (49, 1))))
  rgba.save(tmp_path / 'rgba.png')
  # A path: upright and RGB, the alpha dropped (not composited on white, as a PIL image given directly is).
  want = np.asarray(load_image(str(tmp_path / 'rgba.png')))
  np.testing.assert_array_equal(np.asarray(vlm.load_image(str(tmp_path / 'rgba.png'))), want)
  gray = np.asarray(images[0].convert('L'))
  np.testing.assert_array_equal(np.asarray(vlm.load_image(gray[..., None])), gray)  # (H, W, 1) is grayscale
  for shape in ((3, 40, 50), (40, 50, 5)):  # channels first, or 5 channels: named, not PIL's TypeError
    with pytest.raises(ValueError, match='channels last'):
      vlm.load_image(np.zeros(shape, np.uint8))


def test_bare_xlmr_tokenizer_and_preprocessor_config_folder_works_like_the_processor(tmp_path, images):
  """The hub layout: a tokenizer saved without the processor's tags, and preprocessor_config.json."""
  from transformers import CLIPImageProcessorPil

  reference = make_processor()
  tiny_tokenizer().save_pretrained(tmp_path)
  config = dict(size={'shortest_edge': 224}, use_square_size=True, image_processor_type='CLIPImageProcessor')
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps(config))
  ours = vlm.Kosmos2Processor(str(tmp_path))
  enc = reference(text=PROMPTS[1], images=images[0])
  assert ours.prompts([PROMPTS[1]])[0][0].tolist() == enc['input_ids']
  assert ours.images(images[:1]).shape == (1, 224, 224, 3)  # square resize, then the 224 crop
  ref = CLIPImageProcessorPil(**config)(images[:1])['pixel_values'][0]
  np.testing.assert_allclose(ours.images(images[:1])[0], ref.transpose(1, 2, 0), atol=1e-6)


# ----------------------------------------------------------------------------------------------- generation


def test_greedy_generation_is_token_identical_to_transformers(bundle, images, greedy_reference):
  for prompt, image, ref in zip(PROMPTS, images, greedy_reference):
    (out,) = _ours(bundle, [prompt], [image])
    np.testing.assert_array_equal(out, ref)
  assert len({tuple(r[-MAX_NEW:]) for r in greedy_reference}) == 3  # varied, not one repeated token


def test_generation_stops_at_eos_like_transformers(kosmos2_folder, bundle, images, greedy_reference):
  ref_model, processor, _ = kosmos2_folder
  eos = int(greedy_reference[1][-MAX_NEW + 4])  # a token the model emits 5th: it must stop there
  with torch.no_grad():
    ref = ref_model.generate(
      **_torch_inputs(processor, PROMPTS[1], images[1]), max_new_tokens=MAX_NEW, eos_token_id=eos
    )[0].numpy()
  (out,) = _ours(bundle, [PROMPTS[1]], [images[1]], eos_token_id=eos)
  np.testing.assert_array_equal(out, ref)
  assert len(out) < len(greedy_reference[1]) and out[-1] == eos


def test_batch_of_unequal_prompts_equals_one_prompt_at_a_time(bundle, images, greedy_reference):
  eos = int(greedy_reference[0][-MAX_NEW + 2])  # row 0 stops early; the others run on
  singles = [_ours(bundle, [p], [im], eos_token_id=eos)[0] for p, im in zip(PROMPTS, images)]
  batch = _ours(bundle, PROMPTS, images, eos_token_id=eos)
  assert len({len(s) for s in singles}) > 1
  for single, row in zip(singles, batch):
    np.testing.assert_array_equal(row[: len(single)], single)
    assert np.all(row[len(single) :] == bundle.pad_token_id)  # finished rows are padded


def test_beam_search_matches_transformers(kosmos2_folder, bundle, images):
  ref_model, processor, _ = kosmos2_folder
  with torch.no_grad():
    ref = ref_model.generate(
      **_torch_inputs(processor, PROMPTS[0], images[0]), max_new_tokens=MAX_NEW, num_beams=3, num_return_sequences=2
    ).numpy()
  out = _ours(bundle, PROMPTS[:1], images[:1], num_beams=3, num_return_sequences=2)
  np.testing.assert_array_equal(np.stack(out), ref)
  assert not np.array_equal(ref[0], ref[1])
  batch = _ours(bundle, PROMPTS[:2], images[:2], num_beams=3, num_return_sequences=2)
  np.testing.assert_array_equal(np.stack(batch[:2]), ref)  # the left-padded batch row gives the same beams


def test_sampling_warpers_match_transformers():
  from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
  )

  logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
  for temperature, top_k, top_p in [(0.7, 10, 0.8), (1.0, 0, 0.5), (1.5, 5, 1.0)]:
    warpers = LogitsProcessorList(
      ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
      + ([TopKLogitsWarper(top_k)] if top_k else [])
      + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else [])
    )
    ref = warpers(None, torch.from_numpy(logits)).numpy()
    ours = np.asarray(vlm.warp_logits(jnp.asarray(logits), temperature, top_k, top_p))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    assert 0 < np.isfinite(ref).sum() < ref.size
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_sampling_is_seeded_and_cold_sampling_is_greedy(bundle, images, greedy_reference):
  sample = lambda seed, t: _ours(bundle, PROMPTS[:1], images[:1], do_sample=True, top_k=0, temperature=t, seed=seed)[0]
  np.testing.assert_array_equal(sample(0, 3.0), sample(0, 3.0))
  assert not np.array_equal(sample(0, 3.0), sample(1, 3.0))
  np.testing.assert_array_equal(sample(2, 1e-4), greedy_reference[0])


# ----------------------------------------------------------------------------------------------- grounding

GROUNDED = [
  '<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> '
  'warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.',
  '<image> img0 img1</image><grounding>  two<phrase> dogs </phrase><object><patch_index_0001><patch_index_0100>'
  '</delimiter_of_multi_objects/><patch_index_0200><patch_index_1023></delimiter_of_multi_objects/>'
  '<patch_index_0033><patch_index_0033></object> play ',
  'An image<object><patch_index_0044><patch_index_0863></delimiter_of_multi_objects/><patch_index_0005>'
  '<patch_index_0037></object> of <phrase>x</phrase><object><patch_index_0031><patch_index_0991></object>',
  # malformed: no <object>, odd patch count, unclosed object, '<' inside a phrase, huge index, stray tags
  '<phrase> a cat</phrase> sits<object><patch_index_0001></object> on<phrase> a mat</phrase><object>'
  '<patch_index_0002><patch_index_0040>',
  '<phrase>a <b> dog</phrase><object><patch_index_0002><patch_index_0040></object> and <patch_index_99999>'
  '<phrase>sky</phrase><object><patch_index_0001><patch_index_99999></object></chunk>',
  '</image></image><phrase>   </phrase><object><patch_index_0010><patch_index_0012></object><unk>',
  '',
  'no tags at all',
  '<object></object><phrase></phrase>',
]


@pytest.mark.parametrize('text', GROUNDED)
def test_parse_grounding_matches_post_process_generation(text):
  assert vlm.parse_grounding(text) == make_processor().post_process_generation(text)


def test_parse_grounding_reads_several_boxes_per_phrase():
  text, entities = vlm.parse_grounding(GROUNDED[1])
  assert text == 'two dogs  play'  # the phrase's own trailing space stays in the caption
  ((name, span, boxes),) = entities
  assert name == 'dogs' and text[slice(*span)] == 'dogs' and len(boxes) == 3
  assert boxes[2] == (1 / 32, 1 / 32, 2 / 32, 2 / 32)  # one cell: its edges


def test_phrase_heatmaps_follow_transformers_attentions(kosmos2_folder, bundle, images):
  from transformers import Kosmos2ForConditionalGeneration as TorchKosmos2

  tok = bundle.processor.tokenizer
  ids, attention, image_mask = bundle.processor.prompts(PROMPTS[:1], bucket=8)  # with left padding
  tail = tok.convert_tokens_to_ids(
    ['<phrase>', '▁a', '▁dog', '</phrase>', '<object>', '<patch_index_0005>', '<patch_index_0990>', '</object>', '▁by']
  )
  full = np.concatenate([ids, [tail]], 1)
  pixels = bundle.processor.images(images[:1])
  (maps,) = vlm.phrase_heatmaps(bundle, pixels, full, attention, image_mask)
  ((phrase, heat),) = maps
  assert phrase == 'a dog' and heat.shape == (4, 4) and heat.max() == 1.0
  # The same summary from transformers' own attentions.
  ref_model = TorchKosmos2.from_pretrained(kosmos2_folder[2], attn_implementation='eager').eval()
  pad = lambda m, v: np.concatenate([m, np.full((1, len(tail)), v)], 1)
  with torch.no_grad():
    ref = ref_model(
      pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
      input_ids=torch.from_numpy(full),
      attention_mask=torch.from_numpy(pad(attention, 1)),
      image_embeds_position_mask=torch.from_numpy(pad(image_mask, 0)),
      output_attentions=True,
    )
  text = torch.stack(ref.attentions).mean((0, 2))[0].numpy()  # layers, heads
  start = ids.shape[1] + 1
  weights = text[start : start + 2][:, pad(image_mask, 0)[0].astype(bool)].mean(0)
  expected = (weights @ ref.projection_attentions.mean(1)[0, :, 1:17].numpy()).reshape(4, 4)
  np.testing.assert_allclose(heat, expected / expected.max(), rtol=1e-4, atol=1e-6)
  drawn = vlm.draw_heatmap(images[0], heat)
  assert drawn.size == images[0].size and np.asarray(drawn)[..., 0].mean() > np.asarray(images[0])[..., 0].mean()


# ----------------------------------------------------------------------------------------------- API and CLI


def test_caption_matches_transformers_decode_and_post_processing(
  kosmos2_folder, bundle, images, tmp_path, greedy_reference
):
  processor = kosmos2_folder[1]
  images[0].save(tmp_path / 'a.png')
  inputs = [str(tmp_path / 'a.png'), images[1], np.asarray(images[2])]  # a path, a PIL image, an array
  results = vlm.caption(bundle, inputs, prompt=PROMPTS, max_new_tokens=MAX_NEW)
  for result, ref in zip(results, greedy_reference):
    generated_text = processor.batch_decode([ref], skip_special_tokens=True)[0]
    assert result['generated_text'] == generated_text
    assert (result['text'], result['entities']) == processor.post_process_generation(generated_text)


def test_draw_entities_outlines_the_box():
  image = np.zeros((64, 64, 3), np.uint8)
  drawn = np.asarray(vlm.draw_entities(image, [('a dog', (0, 5), [(0.25, 0.25, 0.75, 0.75)])]))
  assert drawn.shape == image.shape
  assert drawn[40, 16].any() and not drawn[40, 40].any() and not drawn[4, 4].any()


def test_caption_cli_writes_json_drawings_and_caption_sidecars(kosmos2_folder, images, tmp_path, capsys, cli_cache):
  for i, im in enumerate(images[:2]):
    im.save(tmp_path / f'img{i}.png')
  paths = [str(tmp_path / f'img{i}.png') for i in range(2)]
  assert not main(
    [
      'caption',
      '--model',
      kosmos2_folder[2],
      *paths,
      '--max-new-tokens',
      str(MAX_NEW),
      '--json',
      str(tmp_path / 'out.json'),
      '--draw',
      str(tmp_path / 'drawn'),
      '--write-captions',
      str(tmp_path / 'captions'),
      '--heatmaps',
      str(tmp_path / 'heat'),
    ],
    cache=cli_cache,
  )
  results = json.loads((tmp_path / 'out.json').read_text())
  assert [r['image'] for r in results] == paths
  for i, r in enumerate(results):
    assert (tmp_path / 'captions' / f'img{i}.txt').read_text() == r['text']
    assert Image.open(tmp_path / 'drawn' / f'img{i}.png').size == images[i].size
  assert results[0]['text'] in capsys.readouterr().out


def test_check_subject_cli_reports_grounded_fraction(kosmos2_folder, images, tmp_path, capsys, cli_cache):
  (tmp_path / 'imgs').mkdir()
  for i, im in enumerate(images[:2]):
    im.save(tmp_path / 'imgs' / f'{i}.png')
  assert not main(
    [
      'check-subject',
      '--model',
      kosmos2_folder[2],
      '--images',
      str(tmp_path / 'imgs'),
      '--phrase',
      'dog',
      '--max-new-tokens',
      str(MAX_NEW),
    ],
    cache=cli_cache,
  )
  summary = json.loads(capsys.readouterr().out)
  assert summary['phrase'] == 'dog' and len(summary['images']) == 2
  assert summary['grounded_fraction'] == sum(r['grounded'] for r in summary['images']) / 2
  assert all(set(r) >= {'image', 'grounded', 'boxes', 'text'} for r in summary['images'])


def test_cli_calls_given_one_cache_load_the_model_once_and_reuse_its_compiled_generation(
  kosmos2_folder, images, tmp_path, monkeypatch
):
  images[0].save(tmp_path / 'a.png')
  loads, load = [], vlm.load
  monkeypatch.setattr(vlm, 'load', lambda *a, **k: loads.append(load(*a, **k)) or loads[-1])
  cache, argv = CompileCache(), ['--model', kosmos2_folder[2], '--max-new-tokens', str(MAX_NEW)]
  assert not main(['caption', *argv, str(tmp_path / 'a.png')], cache=cache)
  bundle = loads[0]
  compiled = len(bundle.model.compile_cache)
  assert not main(['check-subject', *argv, '--images', str(tmp_path), '--phrase', 'dog'], cache=cache)
  assert len(loads) == 1 and len(cache) == 1
  assert len(bundle.model.compile_cache) == compiled == 1  # check-subject ran caption's compiled generation
  assert not main(['caption', *argv, str(tmp_path / 'a.png')])  # no cache given: a fresh load
  assert len(loads) == 2


def test_check_subject_finds_the_phrase_among_entities():
  results = [
    dict(
      text='a dog and a cat',
      entities=[('a dog', (0, 5), [(0.1, 0.1, 0.5, 0.5)]), ('a cat', (10, 15), [(0.5, 0.5, 0.9, 0.9)])],
    ),
    dict(text='a hotdog', entities=[('a hotdog', (0, 8), [(0.0, 0.0, 1.0, 1.0)])]),
    dict(text='a dog', entities=[]),
  ]
  found = [vlm.subject_boxes(r['entities'], 'Dog') for r in results]
  assert found == [[(0.1, 0.1, 0.5, 0.5)], [], []]


# Stubbed captions, so that what check-subject concludes from a caption is what is tested: 'a dog' grounded
# with a box; 'dog' in the text but only 'a cat' grounded; 'a hotdog' grounded.
_STUB_CAPTIONS = {
  'grounded': dict(text='a dog on the grass', entities=[('a dog', (0, 5), [(0.125, 0.25, 0.5, 0.75)])]),
  'ungrounded': dict(text='a dog next to a cat', entities=[('a cat', (12, 19), [(0.5, 0.5, 0.875, 0.875)])]),
  'hotdog': dict(text='a hotdog', entities=[('a hotdog', (0, 8), [(0.0, 0.0, 1.0, 1.0)])]),
}


@pytest.fixture
def stub_captions(monkeypatch):
  """vlm.check_subject captions with these stubs, keyed by the image's file stem."""
  from jaxdream.vlm import api

  def caption(model, images, **kwargs):
    stems = [os.path.splitext(os.path.basename(str(i)))[0] for i in images]
    return [dict(generated_text=_STUB_CAPTIONS[s]['text'], **_STUB_CAPTIONS[s]) for s in stems]

  monkeypatch.setattr(api, 'caption', caption)


def test_check_subject_counts_only_images_where_the_subject_is_grounded(stub_captions):
  found = vlm.check_subject(None, ['grounded.png'], 'dog')
  assert found['grounded_fraction'] == 1.0
  assert found['images'] == [
    dict(image='grounded.png', grounded=True, boxes=[[0.125, 0.25, 0.5, 0.75]], text='a dog on the grass')
  ]
  for name in ('ungrounded', 'hotdog'):
    found = vlm.check_subject(None, [f'{name}.png'], 'dog')
    assert found['grounded_fraction'] == 0.0 and found['images'][0]['boxes'] == [], name
  found = vlm.check_subject(None, ['grounded.png', 'ungrounded.png', 'hotdog.png', 'grounded.png'], 'dog')
  assert found['grounded_fraction'] == 0.5
  assert [r['grounded'] for r in found['images']] == [True, False, False, True]


def test_check_subject_cli_prints_and_writes_the_summary(stub_captions, tmp_path, capsys, monkeypatch):
  from jaxdream.cli import vlm as cli_vlm

  monkeypatch.setattr(cli_vlm, '_load_vlm', lambda args: None)  # the stub captions need no model
  (tmp_path / 'imgs').mkdir()
  for name in ('grounded', 'ungrounded'):
    Image.new('RGB', (8, 8)).save(tmp_path / 'imgs' / f'{name}.png')
  argv = ['check-subject', '--model', str(tmp_path), '--images', str(tmp_path / 'imgs'), '--phrase', 'dog']
  assert not main([*argv, '--json', str(tmp_path / 'out.json')])
  printed = json.loads(capsys.readouterr().out)
  assert printed == json.loads((tmp_path / 'out.json').read_text())
  assert printed['phrase'] == 'dog' and printed['mode'] == 'caption' and printed['grounded_fraction'] == 0.5
  assert [(os.path.basename(r['image']), r['grounded'], r['boxes']) for r in printed['images']] == [
    ('grounded.png', True, [[0.125, 0.25, 0.5, 0.75]]),
    ('ungrounded.png', False, []),
  ]


def test_caption_errors_are_reported(bundle):
  with pytest.raises(ValueError, match='2 prompts for 1 images'):
    vlm.caption(bundle, [np.zeros((8, 8, 3), np.uint8)], prompt=['a', 'b'])
  with pytest.raises(ValueError, match='uint8'):
    vlm.caption(bundle, [np.zeros((8, 8, 3), np.float32)])
  image = [np.zeros((8, 8, 3), np.uint8)]
  # settings transformers refuses: a zero temperature divides by zero, a negative top_p keeps no token
  for bad, match in (({'temperature': 0.0}, 'temperature'), ({'temperature': -1}, 'temperature'),
                     ({'top_p': -0.5}, 'top_p'), ({'top_p': 1.5}, 'top_p'), ({'top_k': -1}, 'top_k')):  # fmt: skip
    with pytest.raises(ValueError, match=match):
      vlm.caption(bundle, image, do_sample=True, max_new_tokens=2, **bad)
  with pytest.raises(ValueError, match='empty'):  # an empty phrase would match every grounded entity
    vlm.check_subject(bundle, image, '  ')


def test_cli_names_a_truncated_jpeg_and_a_folder_without_tokenizer(kosmos2_folder, images, tmp_path, capsys):
  import shutil

  good = tmp_path / 'good.jpg'
  images[0].save(good, quality=90)
  data = good.read_bytes()
  cut = tmp_path / 'cut.jpg'
  cut.write_bytes(data[: len(data) * 2 // 3])  # PIL's verify() passes it; decoding fails
  model = kosmos2_folder[2]
  for argv in (
    ['caption', '--model', model, str(cut)],
    ['check-subject', '--model', model, '--images', str(cut), '--phrase', 'dog'],
    ['ask', '--model', model, '--image', str(cut), 'What is it?'],
  ):
    assert main(argv) == 2
    assert 'cut.jpg: not a readable image' in capsys.readouterr().err
  bare = tmp_path / 'model'
  shutil.copytree(model, bare)
  for name in ('tokenizer.json', 'sentencepiece.bpe.model'):
    if (bare / name).exists():
      (bare / name).unlink()
  with pytest.raises(WeightsError, match='no tokenizer'):
    vlm.load(str(bare))


# ----------------------------------------------------------------------------------------------- one interface

FENCED = (
  'Here they are:\n```json\n[\n  {"bbox_2d": [10, 5, 50, 25], "label": "dog"},\n  {"bbox_2d": [60, 0, 100, 50], '
  '"label": "dog"},\n  {"bbox_2d": [0, 0, 20, 20], "label": "cat"}\n]\n```'
)
# (answer, model_type, expected entities as (phrase, [boxes]); spans are checked apart)
QWEN_ANSWERS = [
  (FENCED, 'qwen2_5_vl', [('dog', [(0.1, 0.1, 0.5, 0.5), (0.6, 0.0, 1.0, 1.0)]), ('cat', [(0.0, 0.0, 0.2, 0.4)])]),
  (
    FENCED,
    'qwen3_vl',
    [('dog', [(0.01, 0.005, 0.05, 0.025), (0.06, 0.0, 0.1, 0.05)]), ('cat', [(0.0, 0.0, 0.02, 0.02)])],
  ),
  ('The dog: {"bbox_2d": [100, 200, 300, 400], "label": "dog"}', 'qwen3_vl', [('dog', [(0.1, 0.2, 0.3, 0.4)])]),
  (
    '```json\n[{"bbox_2d": [100, 200, 300, 400], "label": " dog "}, {"bbox_2d": [5',
    'qwen3_vl',
    [('dog', [(0.1, 0.2, 0.3, 0.4)])],
  ),
  ('[{"bbox_2d": [1, 2, 3, 4], "label": "dog",}]', 'qwen3_vl', []),  # broken JSON in the only object
  (
    '[{"bbox_2d": [-50, 900, 1200, 1100], "label": "a"}, {"point_2d": [500, 250], "label": "b"}]',
    'qwen3_vl',
    [('a', [(0.0, 0.9, 1.0, 1.0)]), ('b', [(0.5, 0.25, 0.5, 0.25)])],
  ),
  (
    '[{"bbox_2d": [300, 0, 100, 10], "label": "inverted"}, {"bbox_2d": [1100, 0, 1200, 10], "label": "outside"},'
    ' {"bbox_2d": ["1", 2, 3, 4], "label": "string"}, {"bbox_2d": [true, 0, 1, 1], "label": "bool"},'
    ' {"bbox_2d": [NaN, 0, 1, 1], "label": "nan"}, {"bbox_2d": [0, 0, Infinity, 1], "label": "inf"},'
    ' {"bbox_2d": [0, 0, 1], "label": "three"}, {"bbox_2d": [0, 0, 1, 1], "label": 5},'
    ' {"bbox_2d": [0, 0, 1e999, 1], "label": "huge"}, {"bbox_2d": [0, 0, 10, 10]}, {"label": "no box"}]',
    'qwen3_vl',
    [('', [(0.0, 0.0, 0.01, 0.01)])],
  ),
  (
    '```json\n{"bbox_2d": [0, 0, 10, 10], "label": "x"}\n```\nand\n```\n[{"bbox_2d": [0, 0, 20, 20], "label": "x"}]\n```',
    'qwen3_vl',
    [('x', [(0.0, 0.0, 0.01, 0.01), (0.0, 0.0, 0.02, 0.02)])],
  ),
  *[
    (text, 'qwen2_5_vl', [])
    for text in [
      '',
      'A dog on the grass.',
      '"dog"',
      '42',
      '[1, 2, 3, 4]',
      '```json\n```',
      '{"bbox_2d": "0,0,1,1"}',
      '[{"bbox_2d": {"x": 1}}]',
      'null',
      '{{{',
    ]
  ],
]


def test_parse_qwen_grounding_reads_json_boxes_and_survives_malformed_answers():
  for text, kind, expected in QWEN_ANSWERS:
    entities = vlm.parse_qwen_grounding(text, kind, (100, 50))
    assert [(p, [tuple(round(v, 9) for v in b) for b in bs]) for p, _, bs in entities] == expected, text
    for phrase, (start, end), _ in entities:  # the span: the label's first occurrence, else (0, 0)
      assert (start, end) == ((text.index(phrase), text.index(phrase) + len(phrase)) if phrase else (0, 0))
  for deep in ('[' * 5000, '[' * 5000 + ']' * 5000, '```json\n' + '{"a":' * 5000):  # past the JSON parser's recursion
    assert vlm.parse_qwen_grounding(deep, 'qwen2_5_vl', (100, 50)) == []
  with pytest.raises(ValueError, match='input_size'):
    vlm.parse_qwen_grounding(FENCED, 'qwen2_5_vl', None)
  with pytest.raises(ValueError, match='qwen3_vl'):
    vlm.parse_qwen_grounding(FENCED, 'kosmos-2', (100, 50))


def test_ask_uses_kosmos2_question_prompt_and_returns_the_answer_like_transformers(kosmos2_folder, bundle, images):
  ref_model, processor, _ = kosmos2_folder
  question = 'what is the dog by'
  enc = _torch_inputs(processor, f'<grounding> Question: {question} Answer:', images[2])  # the model card's
  prompt = vlm.api.KOSMOS2_QUESTION_PROMPT.format(question=question)
  assert bundle.processor.prompts([prompt])[0].tolist() == enc['input_ids'].tolist()
  with torch.no_grad():
    ref = ref_model.generate(**enc, max_new_tokens=MAX_NEW)[0].numpy()
  generated_text = processor.batch_decode([ref], skip_special_tokens=True)[0]
  whole = processor.post_process_generation(generated_text)[0]
  # The question as the tiny tokenizer round-trips it (it has no ':'), then the answer.
  asked = processor.post_process_generation(processor.batch_decode(enc['input_ids'], skip_special_tokens=True)[0])[0]
  assert asked == 'Question what is the dog by Answer' and whole.startswith(asked) and len(whole) > len(asked)
  (result,) = vlm.ask(bundle, images[2:], question, max_new_tokens=MAX_NEW)
  assert result['generated_text'] == generated_text and result['text'] == whole[len(asked) :].strip()
  # A grounded answer: the entities of the answer only, their spans into it.
  prompt_text = processor.batch_decode(enc['input_ids'], skip_special_tokens=True)[0]
  grounded = (
    f'{prompt_text}<phrase> a dog</phrase><object><patch_index_0044><patch_index_0863></object> by<phrase> the '
    'fire</phrase><object><patch_index_0005><patch_index_0911></object>'
  )
  text, entities = processor.post_process_generation(grounded)
  answer = vlm.api._after_prompt(bundle.processor, dict(text=text, entities=entities), prompt)
  assert answer['text'] == 'a dog by the fire'
  assert [(p, answer['text'][slice(*span)], b) for p, span, b in answer['entities']] == [
    ('a dog', 'a dog', entities[0][2]),
    ('the fire', 'the fire', entities[1][2]),
  ]


def test_ask_cli_prints_and_writes_the_answers(kosmos2_folder, bundle, images, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(vlm, 'load', lambda *a, **k: bundle)  # the module's model: its ask program is compiled
  images[2].save(tmp_path / 'a.png')
  argv = ['ask', '--model', kosmos2_folder[2], '--image', str(tmp_path / 'a.png'), '--max-new-tokens', str(MAX_NEW)]
  assert not main([*argv, '--json', str(tmp_path / 'out.json'), 'what is the dog by'])
  (record,) = json.loads((tmp_path / 'out.json').read_text())
  (expected,) = vlm.ask(bundle, images[2:], 'what is the dog by', max_new_tokens=MAX_NEW)
  assert record['image'] == str(tmp_path / 'a.png') and record['question'] == 'what is the dog by'
  assert record['text'] == expected['text'] != '' and record['generated_text'] == expected['generated_text']
  assert capsys.readouterr().out.startswith(f'{tmp_path / "a.png"}: {expected["text"]}\n')
  # Bad input: one line naming the problem, exit status 2, before any model is loaded.
  (tmp_path / 'clip').mkdir()
  (tmp_path / 'clip' / 'config.json').write_text(json.dumps({'model_type': 'clip'}))
  for bad, message in [
    (['--image', str(tmp_path / 'missing.png')], f'{tmp_path / "missing.png"}: no such image or folder'),
    (['--model', str(tmp_path / 'clip')], "model_type 'clip' is not a supported vision-language model; supported:"),
  ]:
    assert main([*argv, *bad, 'q']) == 2
    err = capsys.readouterr().err
    assert err.startswith('jaxdream ask: error: ') and message in err and err.count('\n') == 1, err
  with pytest.raises(SystemExit) as e:  # argparse's own check, before loading
    main([*argv, '--repetition-penalty', '0', 'q'])
  assert (
    e.value.code == 2 and 'argument --repetition-penalty: 0 is not a positive finite number' in capsys.readouterr().err
  )


def test_load_dispatches_on_model_type_and_names_the_supported_types(kosmos2_folder, tmp_path):
  assert isinstance(vlm.load(kosmos2_folder[2]), vlm.Kosmos2Bundle)
  (tmp_path / 'unet').mkdir()
  (tmp_path / 'unet' / 'config.json').write_text(json.dumps({'_class_name': 'UNet2DConditionModel'}))
  (tmp_path / 'empty').mkdir()
  supported = "Kosmos-2 ('kosmos-2'), Qwen2.5-VL ('qwen2_5_vl') and Qwen3-VL ('qwen3_vl')"
  for folder, error in [('unet', ConfigError), ('empty', WeightsError), ('missing', FileNotFoundError)]:
    with pytest.raises(error, match=re.escape(supported)):
      vlm.load(str(tmp_path / folder))


@dataclasses.dataclass
class StubQwenBundle:
  """The interface of jaxdream.vlm.qwen.QwenVLBundle that the API relies on."""

  model_type: str
  path: str | None = None
  asked: list = dataclasses.field(default_factory=list)


def _stub_qwen_generate(bundle, images, texts, *, max_new_tokens=64, batch_size=8, **kwargs):
  """Canned answers: a grounding answer (boxes in the model's own coordinates) when asked to locate."""
  bundle.asked.append((len(images), list(texts), max_new_tokens, kwargs))
  box = [16, 8, 48, 40] if bundle.model_type == 'qwen2_5_vl' else [250, 125, 750, 625]  # the same box
  located = f'```json\n[{{"bbox_2d": {box}, "label": "dog"}}, {{"bbox_2d": [1, 2, 3], "label": "dog"}}]\n```'
  answer = lambda t: located if t.startswith('Locate') else f'A dog. ({t})'
  return [dict(text=answer(t), input_size=(64, 64)) for t in texts]


@pytest.fixture
def stub_qwen(monkeypatch, tmp_path):
  """jaxdream.vlm.qwen replaced by a stand-in with the lead's interface; returns {model_type: folder}."""
  import sys
  import types

  loaded = []
  qwen = types.ModuleType('jaxdream.vlm.qwen')
  qwen.load_qwen = lambda path, **kw: loaded.append((path, kw)) or StubQwenBundle(vlm.model_type(path), path)
  qwen.qwen_generate = _stub_qwen_generate
  qwen.loaded = loaded
  monkeypatch.setitem(sys.modules, 'jaxdream.vlm.qwen', qwen)
  folders = {}
  for kind in ('qwen2_5_vl', 'qwen3_vl'):
    (tmp_path / kind).mkdir()
    (tmp_path / kind / 'config.json').write_text(json.dumps({'model_type': kind}))
    folders[kind] = str(tmp_path / kind)
  return folders, loaded


@pytest.mark.parametrize('kind', ['qwen2_5_vl', 'qwen3_vl'])
def test_qwen_caption_ask_and_check_subject_go_through_qwen_generate(kind, stub_qwen, images):
  folders, loaded = stub_qwen
  qwen = vlm.load(folders[kind], dtype=jnp.bfloat16)
  assert qwen.model_type == kind and loaded == [
    (folders[kind], dict(dtype=jnp.bfloat16, attention_impl='auto', allow_pickle=False))
  ]
  results = vlm.caption(qwen, images[:2], max_new_tokens=5)
  assert results == [dict(text=f'A dog. ({vlm.QWEN_CAPTION_PROMPT})', entities=[])] * 2
  assert qwen.asked[-1] == (2, [vlm.QWEN_CAPTION_PROMPT] * 2, 5, {})
  (answer,) = vlm.ask(qwen, images[:1], 'Locate the dog.', num_beams=2)
  assert qwen.asked[-1] == (1, ['Locate the dog.'], 64, dict(num_beams=2))
  start = answer['text'].index('dog')  # the second, malformed box is dropped
  assert answer['entities'] == [('dog', (start, start + 3), [(0.25, 0.125, 0.75, 0.625)])]
  summary = vlm.check_subject(qwen, images[:2], 'Dog')
  assert qwen.asked[-1][1] == [vlm.QWEN_LOCATE_PROMPT.format(phrase='Dog')] * 2
  assert summary['grounded_fraction'] == 1.0 and summary['images'][0]['boxes'] == [[0.25, 0.125, 0.75, 0.625]]
  assert vlm.caption(folders[kind], images[:1])[0]['text'].startswith('A dog.')  # a folder is loaded
  with pytest.raises(ValueError, match='Kosmos-2 only'):
    vlm.caption(qwen, images[:1], heatmaps=True)


def test_qwen_cli_ask_caption_sidecars_and_check_subject(stub_qwen, images, tmp_path, capsys):
  folders, _ = stub_qwen
  images[0].save(tmp_path / 'a.png')
  model = ['--model', folders['qwen3_vl']]
  assert not main(
    ['ask', *model, '--image', str(tmp_path / 'a.png'), 'Locate the dog.', '--json', str(tmp_path / 'a.json')]
  )
  (record,) = json.loads((tmp_path / 'a.json').read_text())
  assert record['entities'] == [
    dict(
      phrase='dog',
      span=[record['text'].index('dog'), record['text'].index('dog') + 3],
      boxes=[[0.25, 0.125, 0.75, 0.625]],
    )
  ]
  assert 'generated_text' not in record and '  dog: (0.250, 0.125, 0.750, 0.625)' in capsys.readouterr().out
  assert not main(['caption', *model, str(tmp_path / 'a.png'), '--write-captions', str(tmp_path / 'captions')])
  assert (tmp_path / 'captions' / 'a.txt').read_text() == f'A dog. ({vlm.QWEN_CAPTION_PROMPT})'
  capsys.readouterr()
  assert not main(['check-subject', *model, '--images', str(tmp_path / 'a.png'), '--phrase', 'dog'])
  assert json.loads(capsys.readouterr().out)['grounded_fraction'] == 1.0
