"""Training data: bad images are named before training, odd image modes convert, configs fail fast with
every problem listed, and the data iterator replays exactly from a saved state."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from jaxdream.training import config as config_lib
from jaxdream.training.data import DataError, data_source, make_iterator, prepare_dataset, scan_images, to_rgb

SAMPLE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxdream', 'assets', 'sample_subject', 'dog'
)


def _save(path, array, mode=None, **kw):
  Image.fromarray(array, mode=mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)


@pytest.fixture
def image_folder(tmp_path):
  rng = np.random.default_rng(0)
  good = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
  _save(tmp_path / 'good.jpg', good)
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[..., 0] = 255  # red, fully transparent: must come out white
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'alpha.png')
  Image.fromarray(good).convert('CMYK').save(tmp_path / 'cmyk.jpg')
  Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(tmp_path / 'sixteen.png')
  Image.fromarray(good).convert('P').save(tmp_path / 'palette.png')
  (tmp_path / 'notes.jpg').write_text('this is not an image')
  data = (tmp_path / 'good.jpg').read_bytes()
  (tmp_path / 'truncated.jpg').write_bytes(data[: len(data) // 3])
  _save(tmp_path / 'tiny.png', good[:8, :8])
  return tmp_path


def test_bad_images_are_named_before_training(image_folder):
  with pytest.raises(DataError) as e:
    scan_images(str(image_folder), min_size=32, on_bad='fail')
  message = str(e.value)
  for name in ('notes.jpg', 'truncated.jpg', 'tiny.png'):
    assert name in message
  for name in ('good.jpg', 'alpha.png', 'cmyk.jpg', 'sixteen.png', 'palette.png'):
    assert name not in message
  assert "on_bad_image='skip'" in message


def test_skip_mode_warns_and_keeps_the_good_images(image_folder):
  with pytest.warns(UserWarning, match='truncated.jpg'):
    paths = scan_images(str(image_folder), min_size=32, on_bad='skip')
  assert sorted(os.path.basename(p) for p in paths) == [
    'alpha.png',
    'cmyk.jpg',
    'good.jpg',
    'palette.png',
    'sixteen.png',
  ]


def test_odd_modes_become_rgb(image_folder):
  with Image.open(image_folder / 'alpha.png') as im:
    rgb = np.asarray(to_rgb(im))
  assert rgb.shape == (40, 40, 3) and (rgb == 255).all()
  with Image.open(image_folder / 'sixteen.png') as im:
    rgb = np.asarray(to_rgb(im))
  assert rgb.dtype == np.uint8 and rgb.max() > 200 and rgb.min() == 0  # scaled from 16 bits
  for name in ('cmyk.jpg', 'palette.png'):
    with Image.open(image_folder / name) as im:
      assert to_rgb(im).mode == 'RGB'
      np.testing.assert_array_equal(np.asarray(to_rgb(im)), np.asarray(im.convert('RGB')))  # PIL's own conversion


def test_palette_transparency_becomes_white_and_opaque_entries_keep_their_colour(tmp_path):
  colours = [(200, 10, 30), (5, 120, 250), (40, 220, 90)]
  index = np.array([[0, 1, 2, 1], [2, 0, 1, 2], [1, 2, 0, 0]], np.uint8)
  im = Image.fromarray(index, 'P')
  im.putpalette([v for c in colours for v in c])
  im.save(tmp_path / 'p.png', transparency=1)  # entry 1 fully transparent
  with Image.open(tmp_path / 'p.png') as im:
    assert im.mode == 'P' and 'transparency' in im.info
    rgb = np.asarray(to_rgb(im))
  expected = np.array([(255, 255, 255) if i == 1 else colours[i] for i in index.ravel()], np.uint8).reshape(3, 4, 3)
  np.testing.assert_array_equal(rgb, expected)


def test_exif_orientation_is_applied(tmp_path):
  # 48x32 with four flat quadrants (flat so JPEG keeps their colours); Orientation=6 means
  # "rotate 90 degrees clockwise to display", so the upright image is 32x48.
  quadrants = {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255), (1, 1): (255, 255, 0)}
  stored = np.zeros((32, 48, 3), np.uint8)
  for (r, c), colour in quadrants.items():
    stored[r * 16 : (r + 1) * 16, c * 24 : (c + 1) * 24] = colour
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation
  Image.fromarray(stored).save(tmp_path / 'rotated.jpg', exif=exif, quality=95)
  with Image.open(tmp_path / 'rotated.jpg') as im:
    raw = np.asarray(im.convert('RGB'))  # the pixels as stored, not rotated
    upright = to_rgb(im)
  assert raw.shape == (32, 48, 3) and upright.size == (32, 48)  # width and height swap
  np.testing.assert_array_equal(np.asarray(upright), np.rot90(raw, k=-1))
  # Rotated clockwise: stored top-left (red) is now top-right, stored top-right (green) bottom-right,
  # stored bottom-left (blue) top-left, stored bottom-right (yellow) bottom-left.
  up = np.asarray(upright).astype(int)
  for (y, x), colour in {
    (4, 28): (255, 0, 0),
    (44, 28): (0, 255, 0),
    (4, 4): (0, 0, 255),
    (44, 4): (255, 255, 0),
  }.items():
    assert np.abs(up[y, x] - colour).max() <= 8, ((y, x), up[y, x], colour)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
  import jaxdream.training.data as data

  _save(tmp_path / 'big.png', np.zeros((64, 64, 3), np.uint8))
  monkeypatch.setattr(data, 'MAX_PIXELS', 1000)
  with pytest.raises(DataError, match='decompression bomb'):
    scan_images(str(tmp_path), min_size=8, on_bad='fail')


def _config(tmp_path, **concept):
  c = config_lib.base_config()
  c.model = config_lib.BUILTIN_TINY
  c.concepts = [config_lib.concept(**concept)]
  return c


def test_config_problems_are_all_listed_in_one_message(tmp_path):
  c = _config(
    tmp_path,
    instance_dir=str(tmp_path / 'missing'),
    instance_prompt='a photo of a dog',
    class_prompt='a photo of sks dog',
    class_dir='',
  )
  c.train.lr_schedule = 'linear'
  c.train.cache_latents = True
  c.data.flip_p = 0.5
  with pytest.raises(config_lib.RunConfigError) as e:
    config_lib.validate(c)
  message = str(e.value)
  for needle in (
    'instance_dir does not exist',
    "must contain the identifier 'sks'",
    'must not contain the identifier',
    'class_dir is empty',
    "train.lr_schedule='linear'",
    'cache_latents needs',
  ):
    assert needle in message


def test_nan_and_out_of_range_numbers_are_config_problems(tmp_path):
  # NaN passes any `x < 0` test: a NaN max_grad_norm would turn clipping off, a NaN learning rate fail at step 2.
  c = _config(tmp_path, instance_dir=SAMPLE, instance_prompt='a photo of sks dog', class_prompt='', class_dir='')
  c.train.learning_rate, c.train.max_grad_norm = float('nan'), float('nan')
  c.data.flip_p, c.resolution = 2.0, 100_000
  c.train.adam_b1, c.train.adam_eps = 1.5, -1.0
  c.concepts[0].name = 'skipped.json'  # per-subject runs' list of skipped subjects
  # Settings used only after the steps (validation) or after the model loads (class images): checked up front too.
  c.train.weight_decay, c.validation.scheduler, c.prior.scheduler = float('inf'), 'eulr', 'ddmi'
  c.validation.steps, c.prior.batch_size, c.prior.sample_steps = 0, 0, 0
  c.train.grad_accum_steps, c.train.num_steps = 4, 6  # the last 2 steps would never be applied
  c.data.min_instance_images = 0
  with pytest.raises(config_lib.RunConfigError) as e:
    config_lib.validate(c)
  for needle in (
    'train.learning_rate must be a finite number',
    'train.max_grad_norm must be a finite number',
    'train.weight_decay must be a finite number',
    "validation.scheduler='eulr': choose one of",
    "prior.scheduler='ddmi'",
    'validation.steps must be at least 1',
    'prior.batch_size must be at least 1',
    'prior.sample_steps must be at least 1',
    'train.num_steps=6 must be a multiple of train.grad_accum_steps=4',
    'data.min_instance_images must be at least 1',
    'data.flip_p',
    '100000',
    'train.adam_b1 is a decay rate',
    'train.adam_eps must be above 0',
    'the name skipped.json is taken',
  ):
    assert needle in str(e.value)


def test_unreadable_caption_and_concepts_files_are_named(tmp_path):
  from jaxdream.training.data import instance_prompt

  photo = tmp_path / 'a.png'
  _save(photo, np.zeros((8, 8, 3), np.uint8))
  (tmp_path / 'a.txt').write_bytes(b'a \xff caption')  # not UTF-8
  with pytest.raises(DataError, match=f'{tmp_path}/a.txt: not a readable UTF-8 caption file'):
    instance_prompt(str(photo), {'instance_prompt': 'sks dog'}, '.txt', 'append')
  c = _config(tmp_path, instance_dir=SAMPLE, instance_prompt='a photo of sks dog', class_prompt='', class_dir='')
  c.data.concepts_file = str(photo)  # an image, not JSON
  with pytest.raises(config_lib.RunConfigError, match=f'data.concepts_file {photo}: not a readable JSON file'):
    config_lib.validate(c)


def test_validation_metrics_without_or_with_the_wrong_scoring_models_is_a_config_problem(tmp_path, scoring_models):
  c = _config(tmp_path, instance_dir=SAMPLE, instance_prompt='a photo of sks dog', class_prompt='', class_dir='')
  c.prior.enabled = False
  c.validation.metrics = True
  with pytest.raises(config_lib.RunConfigError) as e:
    config_lib.validate(c)
  assert 'validation.metrics needs validation.clip_model' in str(e.value)
  assert 'validation.metrics needs validation.dino_model' in str(e.value)
  # swapped folders: each named with what it is not, before anything is loaded or compiled
  c.validation.clip_model, c.validation.dino_model = scoring_models['dino'][1], scoring_models['clip'][1]
  with pytest.raises(config_lib.RunConfigError) as e:
    config_lib.validate(c)
  assert 'validation.clip_model: ' in str(e.value) and 'not a CLIPModel config' in str(e.value)
  assert 'validation.dino_model: ' in str(e.value) and 'not a ViTModel config' in str(e.value)
  c.validation.clip_model, c.validation.dino_model = scoring_models['clip'][1], scoring_models['dino'][1]
  config_lib.validate(c)
  c.validation.num_images = 0
  with pytest.raises(config_lib.RunConfigError, match='validation.num_images > 0'):
    config_lib.validate(c)


def test_validation_metrics_that_would_score_nothing_stop_the_run_before_its_first_step():
  from jaxdream.models import WeightsError
  from jaxdream.training.validation import ValidationMetrics

  c = config_lib.base_config()
  c.validation.metrics = True
  # Two concepts with the default identifier: every prompt names both, so none could be scored.
  both = [
    dict(name=n, identifier='sks', instance_prompt=f'a photo of sks {n}', class_prompt=f'a photo of {n}')
    for n in ('dog', 'cat')
  ]
  with pytest.raises(config_lib.RunConfigError, match="no validation prompt names exactly one concept's identifier"):
    ValidationMetrics(c, both, None)
  c.lora.per_subject = True  # each subject's own prompts name only its identifier: scored, so the models load
  with pytest.raises(WeightsError, match='missing config.json'):  # (here: no scoring folders configured)
    ValidationMetrics(c, both, None)


def test_misspelt_or_mistyped_override_is_an_error_before_anything_runs(capsys):
  from jaxdream.cli import main

  assert (
    main(['train', '--config', 'configs/quickstart.py', '--workdir', '/nonexistent/x', '--config.train.num_stepz=3'])
    == 2
  )
  assert 'num_stepz' in capsys.readouterr().err
  assert (
    main(['train', '--config', 'configs/quickstart.py', '--workdir', '/nonexistent/x', '--config.train.num_steps=lots'])
    == 2
  )
  assert 'num_steps' in capsys.readouterr().err


def test_many_subjects_load_from_a_concepts_file(tmp_path):
  folders = []
  for i in range(3):
    d = tmp_path / f's{i}'
    d.mkdir()
    folders.append(
      {
        'instance_dir': str(d),
        'instance_prompt': f'a photo of zq{i} toy',
        'identifier': f'zq{i}',
        'class_prompt': 'a photo of toy',
        'class_dir': str(tmp_path / 'cls'),
      }
    )
  (tmp_path / 'concepts.json').write_text(json.dumps(folders))
  c = _config(tmp_path)
  c.concepts = []
  c.data.concepts_file = str(tmp_path / 'concepts.json')
  concepts = config_lib.validate(c)
  assert [x['identifier'] for x in concepts] == ['zq0', 'zq1', 'zq2']
  # The file's concepts, not only its path, define the run: an edited file refuses a resume.
  saved = config_lib.run_defining(c)
  folders[0]['instance_dir'] = str(tmp_path / 's2')
  (tmp_path / 'concepts.json').write_text(json.dumps(folders))
  diffs = config_lib.config_differences(saved, config_lib.run_defining(c))
  assert len(diffs) == 1 and diffs[0].startswith('data.concepts_file (its concepts)') and 's2' in diffs[0]
  saved.pop(config_lib.CONCEPTS_FILE_KEY)  # a checkpoint from before they were recorded still resumes
  assert not config_lib.config_differences(saved, config_lib.run_defining(c))


def test_concepts_file_values_of_the_wrong_type_and_changed_photos_are_named(tmp_path):
  c = _config(tmp_path, instance_dir=SAMPLE, instance_prompt='a photo of sks dog', class_prompt='', class_dir='')
  c.concepts = []
  base = {'instance_dir': str(tmp_path), 'instance_prompt': 'a photo of zq toy', 'identifier': 'zq'}
  c.data.concepts_file = str(tmp_path / 'concepts.json')
  for key, value, want in (
    ('num_class_images', '2', 'int'),
    ('num_class_images', 2.5, 'int'),
    ('instance_dir', 5, 'str'),
    ('identifier', None, 'str'),
  ):
    (tmp_path / 'concepts.json').write_text(json.dumps([{**base, key: value}]))
    with pytest.raises(config_lib.RunConfigError, match=f'concept 0 {key}={value!r} must be a {want}'):
      config_lib.validate(c)
  # The photos define the run: one added, or an edited caption, refuses a resume (sizes, not times).
  (tmp_path / 'concepts.json').write_text(json.dumps([base]))
  _save(tmp_path / 'a.png', np.zeros((8, 8, 3), np.uint8))
  saved = config_lib.run_defining(c)
  os.utime(tmp_path / 'a.png', ns=(1, 1))
  assert not config_lib.config_differences(saved, config_lib.run_defining(c))
  _save(tmp_path / 'b.png', np.zeros((8, 8, 3), np.uint8))
  (diff,) = config_lib.config_differences(saved, config_lib.run_defining(c))
  assert diff.startswith(config_lib.PHOTOS_KEY) and 'b.png' in diff
  saved = config_lib.run_defining(c)
  (tmp_path / 'b.txt').write_text('a caption')
  assert config_lib.config_differences(saved, config_lib.run_defining(c))
  saved.pop(config_lib.PHOTOS_KEY)  # a checkpoint from before photos were recorded still resumes
  assert not config_lib.config_differences(saved, config_lib.run_defining(c))


def test_skipped_class_images_are_left_out_and_elongated_and_deep_images_read_right(tmp_path, monkeypatch):
  from jaxdream.training.inputs import _usable_images

  rng = np.random.default_rng(1)
  for i in range(2):
    _save(tmp_path / f'good{i}.png', rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
  data = (tmp_path / 'good0.png').read_bytes()
  (tmp_path / 'truncated.png').write_bytes(data[: len(data) // 2])
  _save(tmp_path / 'tiny.png', np.zeros((1, 1, 3), np.uint8))
  _save(tmp_path / 'strip.png', np.zeros((8, 200, 3), np.uint8))  # 25:1: its shorter side scaled up would be huge
  c = _config(tmp_path)
  c.data.min_image_size = 8
  assert [os.path.basename(p) for p in _usable_images(c, str(tmp_path))] == ['good0.png', 'good1.png']
  # As class images (data.on_bad_image='skip'): the bad ones are neither used nor counted, the shortfall is made.
  import jaxdream.diffusion.sampling as sampling
  from jaxdream.training.class_images import ensure_class_images

  made = []
  monkeypatch.setattr(
    sampling,
    'txt2img',
    lambda pipe, prompts, **kw: made.append(len(prompts)) or np.zeros((len(prompts), 16, 16, 3), np.uint8),
  )
  concept = {'class_dir': str(tmp_path), 'class_prompt': 'a photo of toy', 'num_class_images': 3}
  kw = dict(seed=0, steps=1, guidance_scale=1.0, scheduler=None, batch_size=4, resolution=16, log=lambda *a: None)
  paths = ensure_class_images(None, concept, usable=lambda f: _usable_images(c, f), **kw)
  assert made == [1] and [os.path.basename(p) for p in paths] == ['class_00000.png', 'good0.png', 'good1.png']
  with pytest.raises(DataError, match='strip.png: 200x8 is more elongated than 16:1'):
    scan_images(str(tmp_path / 'strip.png'), min_size=8, on_bad='fail')
  # 16-bit and float images by their mode's range, not their own maximum: a dark 16-bit photo stays dark.
  dark = np.full((8, 8), 200, np.uint16)
  assert np.asarray(to_rgb(Image.fromarray(dark))).max() == 1  # 200 / 65535 * 255
  unit = np.full((8, 8), 0.5, np.float32)
  assert np.asarray(to_rgb(Image.fromarray(unit, mode='F'))).max() == 128


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('prep')
  rng = np.random.default_rng(1)
  examples = {'instance': [], 'class': []}
  for i in range(12):
    path = root / (os.fsdecode(b'00 \xff.png') if i == 0 else f'{i:02d}.png')  # a name that is not UTF-8
    _save(path, rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    examples['instance'].append({'file': str(path), 'prompt': f'a photo of s{i % 3} dog', 'concept': i % 3})
  return prepare_dataset(str(root / 'data'), examples, 32), examples, root


def _iterator(folder, **kw):
  return make_iterator(
    data_source(folder, 'instance'),
    batch_size=4,
    seed=3,
    resolution=32,
    center_crop=False,
    flip_p=0.5,
    tokenize=lambda p: np.array([[len(x)] for x in p], np.int32),
    **kw,
  )


def test_iterator_replays_exactly_from_a_saved_state(prepared):
  prepared = prepared[0]
  it = _iterator(prepared)
  for _ in range(4):  # past the end of the first epoch
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  again = _iterator(prepared)
  again.set_state(state)
  for want in expected:
    got = next(again)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_batches_mix_subjects_and_hosts_reading_their_rows_make_the_one_host_batch(prepared):
  prepared = prepared[0]
  it = _iterator(prepared)
  batch = next(it)
  assert batch['pixels'].shape == (4, 32, 32, 3) and batch['pixels'].min() >= -1
  seen = np.concatenate([next(it)['concept'] for _ in range(3)])
  assert len(set(seen.tolist())) == 3
  # Two hosts each reading half of every batch (three hosts: 2+2+0 rows) see exactly the rows one
  # host sees: same examples, same crops and flips, also past the first epoch.
  whole = [b for b, _ in zip(_iterator(prepared), range(5))]
  for parts in ([slice(0, 2), slice(2, 4)], [slice(0, 2), slice(2, 4), slice(4, 6)]):
    iters = [_iterator(prepared, rows=r) for r in parts]
    for want in whole:
      got = [next(i) for i in iters]
      for k in want:
        np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])
    assert next(iters[-1])['pixels'].shape[0] == (0 if len(parts) == 3 else 2)


def test_a_photo_whose_name_is_not_utf8_is_prepared_its_name_escaped(prepared):
  folder, _, root = prepared
  names = {bytes(r['file']) for r in data_source(folder, 'instance')}
  assert str(root).encode() + b'/00 \\xff.png' in names


def test_prepared_dataset_is_reused_until_an_input_changes(prepared):
  folder, examples, root = prepared
  assert prepare_dataset(str(root / 'data'), examples, 32) == folder
  first = examples['instance'][0]['file']
  os.utime(first, ns=(1, 1))  # an edited file (new mtime) means new data
  assert prepare_dataset(str(root / 'data'), examples, 32) != folder


def test_run_config_attention_choices_are_the_attention_functions(tmp_path):
  from jaxdream.nn.attention import IMPLEMENTATIONS

  c = _config(tmp_path)
  for ok in IMPLEMENTATIONS:
    c.attention = ok
    with pytest.raises(config_lib.RunConfigError) as e:  # the empty concept is a problem; the attention is not
      config_lib.validate(c)
    assert 'attention=' not in str(e.value)
  c.attention = 'flash3'
  with pytest.raises(
    config_lib.RunConfigError, match=re.escape(f"attention='flash3': choose one of {IMPLEMENTATIONS}")
  ):
    config_lib.validate(c)


@pytest.mark.parametrize(
  'name',
  [
    'quickstart',
    'dreambooth_sd15',
    'dreambooth_sd21',
    'dreambooth_sdxl',
    'multi_subject',
    'lora_quickstart',
    'lora_sd15',
    'lora_sdxl',
  ],
)
def test_shipped_configs_load_and_validate(name, tmp_path):
  c = config_lib.config_file(os.path.join(os.path.dirname(__file__), '..', 'configs', f'{name}.py'))
  if name not in ('quickstart', 'lora_quickstart'):
    (tmp_path / 'model_index.json').write_text('{}')
    c.model = str(tmp_path)
    photos = tmp_path / 'photos'
    photos.mkdir()
    if name == 'multi_subject':
      (tmp_path / 's.json').write_text(
        json.dumps(
          [
            {
              'instance_dir': str(photos),
              'instance_prompt': 'a zwx dog',
              'identifier': 'zwx',
              'class_prompt': 'a dog',
              'class_dir': str(tmp_path / 'c'),
            }
          ]
        )
      )
      c.data.concepts_file = str(tmp_path / 's.json')
    else:
      c.concepts[0].instance_dir = str(photos)
  assert config_lib.validate(c)
