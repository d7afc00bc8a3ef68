"""What a newcomer meets in the first hour: the documented commands work as written, help and mistakes get
one clean line, bad data is reported before anything is built, and the outputs are readable."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxdream.cli import main
from jaxdream.training import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, 'jaxdream', 'assets', 'sample_subject', 'dog')
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')


def _documented_overrides() -> list[tuple[str, str]]:
  """(config file, --config.KEY) of every override the README and the config docstrings show."""
  found = []
  readme = open(os.path.join(ROOT, 'README.md')).read()
  for command in re.findall(r'jaxdream train --config (configs/\S+\.py)(.*?)(?:\n\S|```)', readme, re.S):
    found += [(command[0], key) for key in re.findall(r'(--config\.[\w.]+)=', command[1])]
  for name in os.listdir(os.path.join(ROOT, 'configs')):
    doc = open(os.path.join(ROOT, 'configs', name)).read()
    found += [(f'configs/{name}', key) for key in re.findall(r'(--config\.[\w.]+)=', doc.split('"""')[1])]
  return found


def test_every_override_the_readme_and_config_docstrings_show_is_accepted(tmp_path, capsys):
  documented = _documented_overrides()
  assert ('configs/dreambooth_sd15.py', '--config.concepts.0.instance_dir') in documented
  types = {k: type(v) for k, v in config_lib.config_keys(config_lib.base_config())}
  for config, key in documented:
    kind = types[re.sub(r'\.\d+\.', '.N.', key[len('--config.') :])]
    value = {int: '1', float: '1.0'}.get(kind, 'builtin:tiny' if key == '--config.model' else str(tmp_path / 'missing'))
    code = main(['train', '--config', os.path.join(ROOT, config), '--workdir', str(tmp_path / 'w'), f'{key}={value}'])
    err = capsys.readouterr().err
    # The override parsed and reached the config: what fails now is the run's own check of the values.
    assert code == 2 and 'the config has problems' in err, (config, key, err)
    assert 'Could not parse' not in err and 'Unknown command line flag' not in err, err


def test_list_element_override_sets_that_concepts_key(tmp_path, capsys):
  code = main(
    [
      'train',
      '--config',
      os.path.join(ROOT, 'configs', 'dreambooth_sd15.py'),
      '--workdir',
      str(tmp_path / 'w'),
      '--config.model=builtin:tiny',
      f'--config.concepts.0.instance_dir={tmp_path}/my photos',
      '--config.concepts.0.num_class_images=7',
    ]
  )
  err = capsys.readouterr().err
  assert code == 2 and f'concept 0 ({tmp_path}/my photos): instance_dir does not exist' in err, err
  code = main(['train', '--config', QUICKSTART, '--workdir', str(tmp_path / 'w'), '--config.concepts.3.identifier=x'])
  assert code == 2
  assert capsys.readouterr().err == (
    "jaxdream train: error: config key 'concepts.3.identifier': concepts has 1 element(s), numbered from 0\n"
  )


@pytest.mark.parametrize('flag', ['--help', '-h'])
def test_train_help_prints_usage_and_every_config_key_with_its_doc(flag, capsys):
  assert main(['train', flag]) == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: jaxdream train --config FILE --workdir DIR')
  for key, value in config_lib.config_keys(config_lib.base_config()):
    assert f'{key}={value!r}' in out and config_lib.KEY_DOCS[key] in out, key


def test_train_help_shows_the_config_files_values(capsys):
  assert main(['train', '--config', QUICKSTART, '--help']) == 0
  out = capsys.readouterr().out
  assert "model='builtin:tiny-base'" in out and 'resolution=64' in out and f'values of {QUICKSTART}' in out


def test_every_config_key_has_a_doc():
  keys = [k for k, _ in config_lib.config_keys(config_lib.base_config())]
  assert sorted(keys) == sorted(config_lib.KEY_DOCS)
  assert all(config_lib.KEY_DOCS[k].strip() for k in keys)


@pytest.mark.parametrize(
  'override, message',
  [
    ('--config.train.num_step=3', "unknown config key 'train.num_step'; did you mean 'train.num_steps'?"),
    ('--config.trian.num_steps=3', "unknown config key 'trian.num_steps'; did you mean 'train.num_steps'?"),
    (
      '--config.concepts.0.instance_dri=x',
      "unknown config key 'concepts.0.instance_dri'; did you mean 'concepts.0.instance_dir'?",
    ),
    (
      '--config.train.num_steps=abc',
      "flag --config.train.num_steps=abc: invalid literal for int() with base 10: 'abc'",
    ),
  ],
)
def test_a_bad_override_is_one_clean_line(override, message, tmp_path, capsys):
  assert main(['train', '--config', QUICKSTART, '--workdir', str(tmp_path), override]) == 2
  assert capsys.readouterr().err == f'jaxdream train: error: {message}\n'


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
  (tmp_path / 'w').write_text('not a folder')
  assert main(['train', '--config', QUICKSTART, '--workdir', str(tmp_path / 'w')]) == 2
  assert capsys.readouterr().err == f'jaxdream train: error: --workdir {tmp_path}/w: exists and is not a folder\n'


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
  assert main(['train', '--config', str(tmp_path / 'nope.py'), '--workdir', str(tmp_path)]) == 2
  assert (
    capsys.readouterr().err
    == f'jaxdream train: error: config file {tmp_path}/nope.py does not exist (see configs/ for examples)\n'
  )


def test_an_empty_instance_folder_is_reported_before_anything_is_built_or_written(tmp_path, capsys):
  import time

  empty = tmp_path / 'photos'
  empty.mkdir()
  workdir = tmp_path / 'run'
  t0 = time.perf_counter()
  code = main(['train', '--config', QUICKSTART, '--workdir', str(workdir), f'--config.concepts.0.instance_dir={empty}'])
  assert code == 2 and time.perf_counter() - t0 < 10  # no tiny model was made first (~16 s)
  assert f'{empty}: 0 usable image(s)' in capsys.readouterr().err
  assert not workdir.exists()


def test_caption_on_a_non_image_file_is_one_line_before_any_model_is_loaded(tmp_path):
  note = tmp_path / 'notes.txt'
  note.write_text('not a picture')
  proc = subprocess.run(
    [sys.executable, '-m', 'jaxdream.cli', 'caption', '--model', str(tmp_path / 'kosmos2'), str(note)],
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert (
    proc.stderr.startswith(f'jaxdream caption: error: {note}: not a readable image') and proc.stderr.count('\n') == 1
  )


@pytest.mark.parametrize('kind', ['missing', 'empty', 'unet'])
def test_caption_with_a_folder_that_is_not_kosmos2_says_how_to_get_one(kind, tmp_path, capsys):
  from PIL import Image

  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'a.png')
  model = tmp_path / 'model'
  if kind != 'missing':
    model.mkdir()
  if kind == 'unet':
    (model / 'config.json').write_text(json.dumps({'_class_name': 'UNet2DConditionModel'}))
  assert main(['caption', '--model', str(model), str(tmp_path / 'a.png')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'jaxdream caption: error: --model {model}: ') and err.count('\n') == 1
  assert 'huggingface-cli download microsoft/kosmos-2-patch14-224' in err and 'model component' not in err


def test_xy_grid_column_labels_wider_than_a_cell_do_not_run_into_each_other():
  from jaxdream.io.images import labelled_grid

  def label_columns(labels):  # the columns where a label's text lies, above the (black) cells
    grid = labelled_grid(np.zeros((1, 2, 64, 64, 3), np.uint8), labels, ['seed: 1'])
    dark = grid.min(axis=2) < 128
    cells_top = np.flatnonzero(dark.sum(axis=1) >= 100)[0]
    left = np.flatnonzero(dark[cells_top])[0]
    return left + np.flatnonzero(dark[:cells_top, left:].any(axis=0))

  first, second = label_columns(['guidance: 5', '']), label_columns(['', 'guidance: 5'])
  assert first.max() + 4 <= second.min(), (first.max(), second.min())


def test_loss_curve_has_labelled_y_ticks():
  from jaxdream.training.writers import loss_curve_image

  image = loss_curve_image([(i, 1.0 / i) for i in range(1, 50)])
  margin = image[50:310, :40].min(axis=2) < 128  # left of the plot, between the title and the step labels
  assert margin.any(axis=1).sum() >= 20  # text of several tick values


def test_class_image_generation_shows_a_progress_bar(tmp_path, monkeypatch, capsys):
  from jaxdream.diffusion import sampling
  from jaxdream.training.class_images import ensure_class_images

  monkeypatch.setattr(sampling, 'txt2img', lambda pipe, prompts, **kw: np.zeros((len(prompts), 8, 8, 3), np.uint8))
  concept = dict(class_dir=str(tmp_path / 'class'), class_prompt='a photo of dog', num_class_images=3)
  kw = dict(seed=0, steps=2, guidance_scale=7.5, scheduler=None, batch_size=2, resolution=8, log=print)
  assert len(ensure_class_images(None, concept, **kw)) == 3
  err = capsys.readouterr().err
  assert 'class images' in err and '3/3' in err


def test_plms_bar_counts_the_unet_evaluations_diffusers_makes_too():
  # `--steps 20` shows 21 on the bar with PLMS: its first step evaluates the UNet twice (in diffusers as well).
  from diffusers import PNDMScheduler

  from jaxdream.schedulers import make_scheduler

  config = {'skip_prk_steps': True, 'steps_offset': 1, 'set_alpha_to_one': False}
  for steps in (2, 20):
    ref = PNDMScheduler(**config)
    ref.set_timesteps(steps)
    sch = make_scheduler('pndm', config, steps)
    assert sch.num_steps == len(ref.timesteps) == steps + 1
    np.testing.assert_array_equal(np.asarray(sch.timesteps), ref.timesteps.numpy())
  assert make_scheduler('euler', config, 20).num_steps == 20


def test_after_the_cli_starts_transformers_imports_quietly_without_torch():
  code = (
    "import sys; sys.modules['torch'] = None\n"
    "from jaxdream.cli import main; assert main(['train', '--help']) == 0\n"
    'import transformers'
  )
  env = {k: v for k, v in os.environ.items() if not k.startswith('TRANSFORMERS_')}
  proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
  assert proc.returncode == 0 and 'usage: jaxdream train' in proc.stdout, proc.stderr
  assert 'PyTorch was not found' not in proc.stdout + proc.stderr


def test_preparing_the_dataset_does_not_announce_a_download(tmp_path, capfd):
  from PIL import Image

  from jaxdream.training.data import prepare_dataset

  Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / 'a.png')
  examples = {'instance': [{'file': str(tmp_path / 'a.png'), 'prompt': 'a photo of sks dog', 'concept': 0}]}
  prepare_dataset(str(tmp_path / 'data'), examples, 32)
  out, err = capfd.readouterr()
  assert 'Downloading and preparing' not in out + err and 'downloaded and prepared' not in out + err


def test_caption_output_paths_are_checked_before_the_model_loads(tmp_path, capsys):
  from PIL import Image

  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / 'a.png')
  (tmp_path / 'out').mkdir()  # where the JSON file would go: the captions would be lost after the work
  argv = ['--model', str(tmp_path / 'missing'), '--json', str(tmp_path / 'out'), str(tmp_path / 'a.png')]
  assert main(['caption', *argv]) == 2
  assert f'--json {tmp_path / "out"}: exists and is a folder' in capsys.readouterr().err


def test_out_of_memory_is_reported_in_one_line(tmp_path, capsys, monkeypatch):
  import jax

  from jaxdream.cli import vlm

  def exhausted(args):
    raise jax.errors.JaxRuntimeError('RESOURCE_EXHAUSTED: Out of memory allocating 250000000000 bytes.\nmore')

  monkeypatch.setattr(vlm, '_caption', exhausted)
  assert main(['caption', '--model', str(tmp_path), str(tmp_path / 'a.png')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('jaxdream caption: error: out of memory (RESOURCE_EXHAUSTED') and err.count('\n') == 1
