"""Kosmos-2 captioning: prompts, pixels, generation and grounding parses are transformers' own."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import test_kosmos2
import torch
from PIL import Image
from test_kosmos2 import make_processor, tiny_tokenizer

from jaxdream import vlm
from jaxdream.cli import main
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
