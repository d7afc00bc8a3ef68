"""Per-subject LoRA runs (lora.per_subject=True) through the trainer: one adapter file per subject, each
equal to the file of that subject trained alone, and subjects with unusable photos skipped and listed."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import rel_err, tiny_base
from PIL import Image
from safetensors.numpy import load_file

from jaxdream.distributed.mesh import make_mesh
from jaxdream.training import config as config_lib
from jaxdream.training import subject_run
from jaxdream.training.loop import train


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """A tiny base model, three subjects of 3 random photos each and one ('bad') with a single photo."""
  root = tmp_path_factory.mktemp('subjects')
  rng = np.random.default_rng(0)
  out = {'model': tiny_base(str(root / 'model'))}
  for name, count in (('a', 3), ('b', 3), ('c', 3), ('bad', 1)):
    os.makedirs(root / name)
    for i in range(count):
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name / f'{i}.png')
    out[name] = str(root / name)
  return out


def _config(folders, names, **train):
  c = config_lib.base_config()
  c.model, c.resolution, c.seed = folders['model'], 32, 3
  c.concepts = [config_lib.concept(instance_dir=folders[n], instance_prompt=f'a photo of sks {n}') for n in names]
  c.prior.enabled = False
  c.lora.rank, c.lora.per_subject, c.lora.export_kohya = 4, True, True
  c.data.on_bad_subject = 'skip'
  c.train.update(dict(num_steps=2, learning_rate=1e-2, **train))
  c.checkpoint.async_save = False
  return c


def _weights(workdir, name):
  return load_file(os.path.join(workdir, 'loras', name, 'pytorch_lora_weights.safetensors'))


def _flat(weights):
  return np.concatenate([np.ravel(weights[k]) for k in sorted(weights)])


@pytest.fixture(scope='module', autouse=True)
def one_device():
  """Runs on one device: the cheapest (the mesh cases are test_subjects')."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(subject_run, 'make_mesh', lambda *sizes: make_mesh(*sizes, devices=jax.devices()[:1]))
    yield


@pytest.fixture(scope='module')
def together(folders, tmp_path_factory):
  """a, bad, b, c in groups of two: [a, b] and [c + a dummy copy of c]; bad is skipped."""
  workdir = str(tmp_path_factory.mktemp('together'))
  summary = train(_config(folders, ['a', 'bad', 'b', 'c'], subjects_per_step=2), workdir)
  return workdir, summary


def test_each_subject_gets_its_own_adapter_file_equal_to_its_run_alone(folders, together, tmp_path):
  workdir, summary = together
  assert sorted(summary['outputs']['loras']) == ['a', 'b', 'c']
  for n in 'abc':
    assert os.path.isfile(os.path.join(workdir, 'loras', n + '.safetensors'))  # the kohya layout too
  files = {n: _weights(workdir, n) for n in 'abc'}
  # The subjects trained (lora_B starts at zero) and differently (own data and init).
  ups = {n: _flat({k: v for k, v in f.items() if 'lora_B' in k or '.up.' in k}) for n, f in files.items()}
  assert all(np.any(u) for u in ups.values())
  assert min(rel_err(_flat(files[x]), _flat(files[y])) for x, y in ('ab', 'ac', 'bc')) > 1e-2
  # c trained in a padded group equals c trained alone (same config and seed).
  alone = str(tmp_path / 'alone')
  train(_config(folders, ['c']), alone)
  ref = _weights(alone, 'c')
  assert sorted(ref) == sorted(files['c'])
  # Measured 7.5e-6: float32 rounding of the batched matmuls, which Adam's sign-like first update amplifies
  # where a gradient is near eps (test_subjects bounds the updates alone at 1e-4 for that reason).
  assert rel_err(_flat(files['c']), _flat(ref)) <= 1e-5


def test_a_subject_with_too_few_photos_is_skipped_and_listed(together):
  workdir, summary = together
  assert summary['skipped'] == ['bad']
  with open(os.path.join(workdir, 'loras', 'skipped.json')) as f:
    skipped = json.load(f)
  assert [s['name'] for s in skipped] == ['bad'] and 'min_instance_images' in skipped[0]['problems'][0]
  assert not os.path.exists(os.path.join(workdir, 'loras', 'bad'))


def test_a_finished_per_subject_run_resumes_without_training(folders, together):
  workdir, _ = together
  before = {n: _flat(_weights(workdir, n)) for n in 'abc'}
  summary = train(_config(folders, ['a', 'bad', 'b', 'c'], subjects_per_step=2), workdir)
  assert summary['losses'] == {}  # every group restored at its last step
  for n in 'abc':
    np.testing.assert_array_equal(_flat(_weights(workdir, n)), before[n])


def test_bad_subjects_fail_the_run_by_default_and_per_subject_keys_need_per_subject(folders, tmp_path):
  c = _config(folders, ['a', 'bad'])
  c.data.on_bad_subject = 'fail'
  with pytest.raises(ValueError, match="on_bad_subject='skip'"):
    train(c, str(tmp_path / 'fail'))
  c = _config(folders, ['a'], subjects_per_step=2)
  c.lora.per_subject = False
  with pytest.raises(config_lib.RunConfigError) as e:
    config_lib.validate(c)
  assert 'train.subjects_per_step=2 needs lora.per_subject=True' in str(e.value)
  assert "data.on_bad_subject='skip' needs lora.per_subject=True" in str(e.value)
