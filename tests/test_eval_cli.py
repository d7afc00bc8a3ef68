"""`jaxdream eval dreambench` and `jaxdream eval compare`, in-process through the CLI's main(argv): conftest's
tiny SD model, 2 DreamBench subjects, 2 prompts, 1 image each, 2 steps at 32 px, conftest's tiny scoring models.

One run generates and scores; every other command reuses its images and compiled programs (one CompileCache for
the module), so the file compiles one sampling loop and one program per scoring model and method.
"""

import copy
import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import torchvision_dino

from jaxdream.cli.main import main
from jaxdream.evaluation.dreambench import image_seed
from jaxdream.runtime import CompileCache

pytestmark = pytest.mark.reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DREAMBENCH = os.path.join(REPO, '..', 'shared', 'dreambench')
SUBJECTS = ('dog', 'backpack')
PROMPTS = {  # the first two prompts of each list, without the identifier
  'dog': ['a dog in the jungle', 'a dog in the snow'],
  'backpack': ['a backpack in the jungle', 'a backpack in the snow'],
}

if not os.path.isfile(os.path.join(DREAMBENCH, 'prompts_and_classes.txt')):
  pytest.skip(f'no DreamBench copy at {DREAMBENCH} (the shared/ folder beside the repository)', allow_module_level=True)


@pytest.fixture(scope='module')
def cache():
  return CompileCache()


@pytest.fixture(scope='module')
def setup(scoring_models, tiny_sd_folder, tmp_path_factory):
  # conftest's tiny SD folder (shared with the sampling tests), not create_tiny_pipeline: building that one
  # initialises every model through jitted programs, tens of seconds here.
  root = tmp_path_factory.mktemp('eval')
  return dict(root=root, model=tiny_sd_folder[1], clip=scoring_models['clip'][1], dino=scoring_models['dino'][1])


def _argv(setup, out, *extra, source=None):
  source = source or ['--model', setup['model'], '--steps', '2', '--height', '32', '--width', '32']
  return [
    'eval',
    'dreambench',
    '--dataset',
    DREAMBENCH,
    '--clip',
    setup['clip'],
    '--dino',
    setup['dino'],
    '--out',
    str(out),
    '--subjects',
    ','.join(SUBJECTS),
    '--num-prompts',
    '2',
    '--images-per-prompt',
    '1',
    '--devices',
    '1',
    '--batch-size',
    '8',
    *source,
    *extra,
  ]


@pytest.fixture(scope='module')
def first_run(setup, cache):
  out = setup['root'] / 'run_a'
  assert main(_argv(setup, out), cache=cache) == 0
  return out


def _load(path):
  with open(path) as f:
    return json.load(f)


def _without_timestamp(scores):
  scores = copy.deepcopy(scores)
  del scores['manifest']['created']
  return scores


def _reference(scoring_models, real, generated):
  """Per subject: the transformers models' DreamBench scores of these image files, computed directly."""
  from PIL import Image

  clip, _, processor, tokenizer = scoring_models['clip']
  dino = scoring_models['dino'][0]
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  out = {}
  with torch.no_grad():
    for s in SUBJECTS:
      e = {}
      for k, paths in (('real', real[s]), ('gen', generated[s])):
        ims = [Image.open(p).convert('RGB') for p in paths]
        e['clip_' + k] = unit(
          clip.get_image_features(**processor(images=ims, return_tensors='pt')).pooler_output.numpy()
        )
        e['dino_' + k] = unit(
          dino(torch.stack([torchvision_dino(im, 36) for im in ims])).last_hidden_state[:, 0].numpy()
        )
      text = unit(
        clip.get_text_features(**tokenizer(PROMPTS[s], padding=True, return_tensors='pt')).pooler_output.numpy()
      )
      k = len(real[s])
      out[s] = {
        'dino': (e['dino_gen'] @ e['dino_real'].T).mean(),
        'clip_i': (e['clip_gen'] @ e['clip_real'].T).mean(),
        'clip_t': np.sum(e['clip_gen'] * text, -1).mean(),
        'per_image_dino': (e['dino_gen'] @ e['dino_real'].T).mean(1),
        'real_dino': ((e['dino_real'] @ e['dino_real'].T).sum() - k) / (k * (k - 1)),
        'real_clip_i': ((e['clip_real'] @ e['clip_real'].T).sum() - k) / (k * (k - 1)),
      }
  return out


def test_dreambench_report_equals_reference_is_deterministic_and_resumes(
  setup, first_run, scoring_models, cache, capsys
):
  from jaxdream.io.images import list_images, parse_parameters, read_parameters

  out = first_run
  scores = _load(out / 'scores.json')
  generated = {s: [str(out / 'images' / s / f'{p}_0.png') for p in range(2)] for s in SUBJECTS}
  real = {s: list_images(os.path.join(DREAMBENCH, s)) for s in SUBJECTS}
  assert sorted(os.listdir(out / 'images' / 'dog')) == ['0_0.png', '1_0.png']
  ref = _reference(scoring_models, real, generated)
  close = dict(rtol=1e-5, atol=1e-6)
  for s in SUBJECTS:
    for m in ('dino', 'clip_i', 'clip_t'):
      np.testing.assert_allclose(scores['subjects'][s][m], ref[s][m], **close, err_msg=f'{s} {m}')
    np.testing.assert_allclose([im['dino'] for im in scores['images'][s]], ref[s]['per_image_dino'], **close)
    np.testing.assert_allclose(scores['real_subjects'][s]['dino'], ref[s]['real_dino'], **close)
    np.testing.assert_allclose(scores['real_subjects'][s]['clip_i'], ref[s]['real_clip_i'], **close)
    rows = scores['images'][s]
    assert [r['prompt'] for r in rows] == PROMPTS[s] and [r['file'] for r in rows] == [f'{s}/0_0.png', f'{s}/1_0.png']
    assert rows[1]['prompt_with_identifier'] == PROMPTS[s][1].replace('a ', 'a sks ', 1)
    assert [r['seed'] for r in rows] == [image_seed(0, s, p, 0) for p in range(2)]
    # The PNG says how it was made: its own seed and prompt (with the identifier).
    params = parse_parameters(read_parameters(generated[s][1]))
    assert params['Seed'] == str(rows[1]['seed']) and params['Steps'] == '2'
  for m in ('dino', 'clip_i', 'clip_t'):
    assert scores['overall'][m] == pytest.approx(np.mean([scores['subjects'][s][m] for s in SUBJECTS]), abs=1e-12)
    lo, hi = scores['ci'][m]
    assert lo <= scores['overall'][m] <= hi
  assert scores['real']['dino'] == pytest.approx(np.mean([ref[s]['real_dino'] for s in SUBJECTS]), rel=1e-5)
  assert len(set(image_seed(0, s, p, 0) for s in SUBJECTS for p in range(2))) == 4
  # sha256-derived: the same seeds on every machine and Python (these values are part of the protocol).
  assert (image_seed(0, 'dog', 0, 0), image_seed(7, 'dog', 1, 3)) == (694839686, 741488383)
  # The manifest: versions, settings, and the sha256 of every image used.
  manifest = scores['manifest']
  assert manifest['environment']['jax'] and manifest['environment']['device_kind']
  assert manifest['config']['num_prompts'] == 2 and manifest['config']['images_per_prompt'] == 1
  assert manifest['config']['steps'] == 2 and manifest['config']['scheduler']
  sha = lambda p: hashlib.sha256(open(p, 'rb').read()).hexdigest()
  assert manifest['files']['generated_images']['dog/1_0.png'] == sha(generated['dog'][1])
  assert manifest['files']['real_images'] == {os.path.relpath(p, DREAMBENCH): sha(p) for s in SUBJECTS for p in real[s]}
  assert set(manifest['files']['dino']) == {'config.json', 'model.safetensors'}
  # scores.csv and report.md: the same numbers, the anchor rows, one grid per subject.
  lines = (out / 'scores.csv').read_text().splitlines()
  assert lines[0].startswith('subject,class,images,dino,clip_i,clip_t') and len(lines) == 3
  assert float(lines[1].split(',')[3]) == scores['subjects']['dog']['dino']
  report = (out / 'report.md').read_text()
  assert '| DreamBooth, Stable Diffusion (paper) | 0.668 | 0.803 | 0.305 |' in report
  assert f'{scores["overall"]["clip_t"]:.3f}' in report and '![backpack](grids/backpack.png)' in report
  assert (out / 'grids' / 'dog.png').stat().st_size > 0

  # The same command again: nothing regenerated, the same scores.json but for its timestamp.
  mtimes = [os.stat(p).st_mtime_ns for s in SUBJECTS for p in generated[s]]
  capsys.readouterr()
  assert main(_argv(setup, out), cache=cache) == 0
  assert 'generated 0 image(s)' in capsys.readouterr().out
  assert [os.stat(p).st_mtime_ns for s in SUBJECTS for p in generated[s]] == mtimes
  again = _load(out / 'scores.json')
  assert 'created' in again['manifest'] and _without_timestamp(again) == _without_timestamp(scores)

  # --images: the same images scored from another folder give the same scores; compare sees no difference.
  out_c = setup['root'] / 'run_c'
  assert main(_argv(setup, out_c, source=['--images', str(out / 'images')]), cache=cache) == 0
  images_mode = _load(out_c / 'scores.json')
  assert images_mode['subjects'] == scores['subjects'] and images_mode['real'] == scores['real']
  assert images_mode['manifest']['config']['images'] == str(out / 'images')
  assert not (out_c / 'images').exists()
  capsys.readouterr()
  assert main(['eval', 'compare', str(out / 'scores.json'), str(out_c / 'scores.json')], cache=cache) == 0
  printed = capsys.readouterr()
  assert 'warning' not in printed.err and '| DINO | ' in printed.out and '| +0.0000 |' in printed.out


def test_compare_gives_paired_differences_with_ci_p_value_and_warns_on_other_settings(first_run, tmp_path, capsys):
  from jaxdream.evaluation import bootstrap_ci

  a = _load(first_run / 'scores.json')
  b = copy.deepcopy(a)
  shift = {'dog': 0.02, 'backpack': 0.04}
  for s, d in shift.items():
    b['subjects'][s]['dino'] += d
  b['manifest']['config']['num_prompts'] = 3  # other prompts: not a fair comparison
  b['manifest']['config']['model'] = 'another-model'  # allowed to differ
  path_b = tmp_path / 'b.json'
  path_b.write_text(json.dumps(b))
  md = tmp_path / 'cmp.md'
  assert main(['eval', 'compare', str(first_run / 'scores.json'), str(path_b), '--out', str(md), '--seed', '1']) == 0
  printed = capsys.readouterr()
  assert 'warning' in printed.err and 'config.num_prompts' in printed.err and 'config.model' not in printed.err
  lo, hi = bootstrap_ci([0.02, 0.04], 1)
  row = next(line for line in md.read_text().splitlines() if line.startswith('| DINO |'))
  # Two subjects, both better: the exact two-sided signed-rank p-value is 2 * (1/4).
  assert row.endswith(f'| +0.0300 | [{lo:+.4f}, {hi:+.4f}] | 0.5 |'), row
  assert '| CLIP-T |' in printed.out and md.read_text() == printed.out.split('wrote')[0]
  b['subjects']['dog']['clip_t'] = None  # a hand-edited file: an error naming the score, not a traceback
  path_b.write_text(json.dumps(b))
  assert main(['eval', 'compare', str(first_run / 'scores.json'), str(path_b)]) == 2
  assert 'subjects.dog.clip_t is None, not a score' in capsys.readouterr().err
  b['subjects']['dog']['clip_t'] = 0.3
  for damage, message in (
    (dict(manifest=[]), 'manifest is a list, not a mapping'),
    (dict(manifest=dict(b['manifest'], config=[])), 'manifest.config is not a mapping'),
    (dict(overall=dict(b['overall'], vlm=0.5)), r'subjects.\w+.vlm is None, not a score'),
  ):
    path_b.write_text(json.dumps(dict(b, **damage)))
    assert main(['eval', 'compare', str(first_run / 'scores.json'), str(path_b)]) == 2
    assert re.search(message, capsys.readouterr().err), message


def test_bad_input_is_one_clear_line_and_exit_2_before_anything_loads(setup, first_run, tmp_path, capsys):
  from PIL import Image

  def error(argv):
    cache = CompileCache()
    assert main(argv, cache=cache) == 2
    assert len(cache) == 0  # nothing loaded or compiled
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('jaxdream eval: error: '), err
    return err

  # A subject the dataset lacks, and a dataset whose subject folder is missing.
  argv = _argv(setup, tmp_path / 'x')
  argv[argv.index('--subjects') + 1] = 'dog,nosuch'
  assert 'no subject nosuch' in error(argv)
  argv[argv.index('--subjects') + 1] = ',,'  # not all 30 subjects: a slip
  assert "--subjects ',,': no subject named" in error(argv)
  partial = tmp_path / 'partial'
  partial.mkdir()
  shutil.copy(os.path.join(DREAMBENCH, 'prompts_and_classes.txt'), partial)
  os.symlink(os.path.abspath(os.path.join(DREAMBENCH, 'dog')), partial / 'dog')
  argv = _argv(setup, tmp_path / 'x')
  argv[argv.index('--dataset') + 1] = str(partial)
  assert "no folder for ['backpack'" in error(argv)
  # Generated images: one missing, one extra; then one unreadable.
  gen = tmp_path / 'gen'
  shutil.copytree(first_run / 'images', gen)
  os.remove(gen / 'dog' / '1_0.png')
  Image.new('RGB', (8, 8)).save(gen / 'dog' / '5_0.png')
  msg = error(_argv(setup, tmp_path / 'x', source=['--images', str(gen)]))
  assert 'dog/: missing 1_0.png; unexpected 5_0.png' in msg and 'backpack' not in msg
  os.remove(gen / 'dog' / '5_0.png')
  shutil.copy(first_run / 'images' / 'dog' / '1_0.png', gen / 'dog' / '1_0.png')
  (gen / 'backpack' / '0_0.png').write_bytes(b'not a png')
  msg = error(_argv(setup, tmp_path / 'x', source=['--images', str(gen)]))
  assert f'{gen / "backpack" / "0_0.png"}: not a readable image' in msg
  # A CLIP folder passed as --dino, and the reverse.
  argv = _argv(setup, tmp_path / 'x')
  argv[argv.index('--dino') + 1] = setup['clip']
  assert f"--dino {setup['clip']}: not a ViTModel config: model_type='clip'" in error(argv)
  argv[argv.index('--clip') + 1] = setup['dino']
  assert f'--clip {setup["dino"]}: not a CLIPModel config' in error(argv)
  # A CLIP folder without tokenizer files (CLIP-T needs them), or with a broken one: named before any work.
  clip = tmp_path / 'clip'
  shutil.copytree(setup['clip'], clip)
  for name in ('vocab.json', 'merges.txt', 'tokenizer.json'):
    if (clip / name).exists():
      os.rename(clip / name, tmp_path / name)
  argv = _argv(setup, tmp_path / 'x')
  argv[argv.index('--clip') + 1] = str(clip)
  assert f'--clip {clip}: no tokenizer files' in error(argv)
  for name in ('vocab.json', 'merges.txt'):
    shutil.copy(tmp_path / name, clip / name)
  (clip / 'vocab.json').write_text('{bad')
  assert f'--clip {clip}: cannot read the tokenizer files' in error(argv)
  shutil.copy(tmp_path / 'vocab.json', clip / 'vocab.json')
  (clip / 'preprocessor_config.json').write_text('{bad')
  assert f'--clip {clip / "preprocessor_config.json"}: not a readable JSON file' in error(argv)
  # LoRAs without a model, a missing adapter file; compare needs two readable score files.
  argv = _argv(setup, tmp_path / 'x', '--loras', str(tmp_path), source=['--images', str(gen)])
  assert '--loras needs --model' in error(argv)
  argv = _argv(setup, tmp_path / 'x', '--config-dir', str(tmp_path), source=['--images', str(gen)])
  assert '--config-dir: options of a --model single file, not of --images' in error(argv)
  assert f'no adapter file {tmp_path}/loras/dog/pytorch_lora_weights.safetensors' in error(
    _argv(setup, tmp_path / 'x', '--loras', str(tmp_path))
  )
  assert 'at least two scores.json files' in error(['eval', 'compare', str(first_run / 'scores.json')])
  # Images kept in --out from a run with other settings are not reused.
  argv = _argv(setup, first_run)
  argv[argv.index('--steps') + 1] = '3'
  assert f'{first_run}/images holds images generated with other settings (steps differ)' in error(argv)
  assert 'not a scores.json file' in error(
    ['eval', 'compare', str(first_run / 'scores.json'), str(gen / 'dog' / '0_0.png')]
  )


def test_loras_sample_each_subject_with_its_own_adapter(setup, first_run, cache):
  import jax
  from flax import nnx
  from PIL import Image

  from jaxdream.cli.sample import SampleSession
  from jaxdream.lora import save_lora
  from jaxdream.nn.adapters import add_lora, lora_layers

  pipe = cache.get(('sample-session',), SampleSession).pipeline(setup['model'], False)  # the first run's
  run = setup['root'] / 'subject_run'
  for s, scale in (('dog', 1.0), ('backpack', 0.0)):  # backpack's adapter adds nothing: the base model's images
    unet = nnx.clone(pipe.unet)
    add_lora(unet, targets=('to_q',), rank=2, key=jax.random.key(0))  # one target: few eager ops to compile
    for i, layer in enumerate(lora_layers(unet).values()):
      layer.lora_b.set_value(scale * np.random.default_rng(i).standard_normal(layer.lora_b.shape, np.float32))
    os.makedirs(run / 'loras' / s)
    save_lora(str(run / 'loras' / s / 'pytorch_lora_weights.safetensors'), {'unet': unet})
  out = setup['root'] / 'run_lora'
  assert main(_argv(setup, out, '--loras', str(run)), cache=cache) == 0
  pixels = lambda folder, s, p: np.asarray(Image.open(folder / s / f'{p}_0.png'))
  for p in range(2):
    assert np.array_equal(pixels(out / 'images', 'backpack', p), pixels(first_run / 'images', 'backpack', p))
    assert not np.array_equal(pixels(out / 'images', 'dog', p), pixels(first_run / 'images', 'dog', p))
  manifest = _load(out / 'scores.json')['manifest']
  assert set(manifest['files']['loras']) == set(SUBJECTS) and manifest['config']['loras'] == str(run)


def test_vlm_column_is_the_grounded_fraction_per_subject(setup, first_run, cache, monkeypatch, tmp_path):
  """--vlm's plumbing, with Kosmos-2 itself replaced (its port has its own tests): each image asked about its
  subject's class noun, the fractions per subject, their mean and CI, and the report's column."""
  import jaxdream.vlm.api as vlm_api

  asked = []

  def check_subject(bundle, images, phrase):
    asked.append((bundle, [os.path.relpath(p, first_run / 'images') for p in images], phrase))
    return {'images': [{'grounded': phrase == 'dog' or i == 0} for i, _ in enumerate(images)]}

  monkeypatch.setattr(vlm_api, 'load', lambda path: 'kosmos-2 bundle')
  monkeypatch.setattr(vlm_api, 'check_subject', check_subject)
  kosmos = tmp_path / 'kosmos2'
  kosmos.mkdir()
  (kosmos / 'config.json').write_text(json.dumps({'model_type': 'kosmos-2'}))
  out = tmp_path / 'run_vlm'
  assert main(_argv(setup, out, '--vlm', str(kosmos), source=['--images', str(first_run / 'images')]), cache=cache) == 0
  assert asked == [
    ('kosmos-2 bundle', ['dog/0_0.png', 'dog/1_0.png'], 'dog'),
    ('kosmos-2 bundle', ['backpack/0_0.png', 'backpack/1_0.png'], 'backpack'),
  ]
  scores = _load(out / 'scores.json')
  assert scores['subjects']['dog']['vlm'] == 1.0 and scores['subjects']['backpack']['vlm'] == 0.5
  assert scores['overall']['vlm'] == 0.75 and [r['grounded'] for r in scores['images']['backpack']] == [True, False]
  assert '| DINO | CLIP-I | CLIP-T | Kosmos-2 grounded |' in (out / 'report.md').read_text()
  assert (out / 'scores.csv').read_text().splitlines()[0].split(',')[6] == 'vlm'
  (kosmos / 'config.json').write_text(json.dumps({'model_type': 'clip'}))
  assert main(_argv(setup, out, '--vlm', str(kosmos), source=['--images', str(first_run / 'images')])) == 2
