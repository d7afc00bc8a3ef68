"""Per-subject LoRA runs (lora.per_subject=True) through the trainer: one adapter file per subject, each
equal to the file of that subject trained alone, and subjects with unusable photos skipped and listed."""

import glob
import json
import os
import runpy
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import rel_err, tiny_base
from PIL import Image
from safetensors.numpy import load_file

from jaxdream.distributed.mesh import make_mesh
from jaxdream.training import config as config_lib
from jaxdream.training import subject_run
from jaxdream.training.lock import LOCK_FILE
from jaxdream.training.loop import train
from jaxdream.training.lora import lora_paths
from jaxdream.training.params import lr_schedule

pytestmark = pytest.mark.slow  # whole per-subject training runs


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
  c.validation.num_images = 0  # no samples (the runs that check them ask for them)
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
  # every group restored at its last step: nothing trained, each subject's losses those of the run
  assert summary['losses'] == {n: [tuple(x) for x in v] for n, v in together[1]['losses'].items()}
  for n in 'abc':
    np.testing.assert_array_equal(_flat(_weights(workdir, n)), before[n])


def test_a_per_subject_run_resumes_on_a_mesh_that_pads_its_group_otherwise(folders, tmp_path, monkeypatch):
  """Three subjects on two devices train as a group padded to four; the checkpoint keeps the three real rows, so
  the run goes on on one device (a group of three)."""
  workdir = str(tmp_path / 'run')
  c = _config(folders, ['a', 'b', 'c'])
  c.mesh.data = 2
  with monkeypatch.context() as mp:
    mp.setattr(subject_run, 'make_mesh', lambda *sizes: make_mesh(*sizes, devices=jax.devices()[:2]))
    train(c, workdir)
  c.mesh.data, c.train.num_steps = 1, 3
  summary = train(c, workdir)
  assert {n: [s for s, _ in v] for n, v in summary['losses'].items()} == {n: [1, 2, 3] for n in 'abc'}


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


def _scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """The TensorBoard scalars of a run's event files, {tag: [(step, value), ...]} in the order written."""
  from tensorboardX.proto import event_pb2

  folder, out = os.path.join(workdir, 'tensorboard'), {}
  for name in sorted(os.listdir(folder), key=lambda f: os.path.getmtime(os.path.join(folder, f))):
    with open(os.path.join(folder, name), 'rb') as f:
      data = f.read()
    i = 0
    while i < len(data):  # TFRecords: length (u64), its crc, the Event, its crc
      (n,) = struct.unpack('<Q', data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
      i += 16 + n
      for v in event.summary.value:
        if v.HasField('simple_value'):
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def _png(path):
  with Image.open(path) as im:
    return np.asarray(im)


def test_sigterm_mid_group_saves_it_and_the_resumed_run_ends_with_the_uninterrupted_adapters(
  folders, together, tmp_path, capsys, scoring_models
):
  """SIGTERM after step 1 of group [a, b] (of 2 steps; then group [c]): the run saves the group's checkpoint
  and stops cleanly, and the same command then ends with the adapter files of the run never stopped
  (`together`), bit for bit. On the way, as a single run does: each subject's validation samples with its own
  adapter, their DreamBench scores (validation.metrics), and its loss in TensorBoard."""
  c = _config(folders, ['a', 'bad', 'b', 'c'], subjects_per_step=2)
  # One prompt for every subject (naming the identifier, so it is scored): their samples differ by their adapters only.
  c.validation.every_steps, c.validation.prompts, c.validation.num_images = 1, ['a photo of sks'], 1
  c.validation.steps, c.validation.metrics = 2, True
  c.validation.clip_model, c.validation.dino_model = scoring_models['clip'][1], scoring_models['dino'][1]
  c.logging.every_steps = 1
  workdir = str(tmp_path / 'run')
  handler = signal.getsignal(signal.SIGTERM)
  real = subject_run.jit_subject_step

  def preempted_after_each_step(*args):
    step = real(*args)

    def call(*a):
      out = step(*a)
      os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice, to this very process
      return out

    return call

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(subject_run, 'jit_subject_step', preempted_after_each_step)
    first = train(c, workdir)
  assert (first['preempted'], first['step'], first['group']) == (True, 1, ['a', 'b'])
  out = capsys.readouterr().out
  assert 'SIGTERM: saved the checkpoint of subject(s) a, b at step 1; run the same command to resume.' in out
  assert signal.getsignal(signal.SIGTERM) == handler and not os.path.exists(os.path.join(workdir, LOCK_FILE))
  assert not any(os.path.exists(p) for n in 'abc' for p in lora_paths(workdir, n, kohya=True).values())
  assert sorted(os.listdir(os.path.join(workdir, 'samples'))) == ['a', 'b']

  second = train(c, workdir)
  assert 'resumed from the checkpoint at step 1' in capsys.readouterr().out
  # each subject's whole history, the steps before the resume included, as a single run's summary
  assert [s for s, _ in second['losses']['a']] == [1, 2] and [s for s, _ in second['losses']['c']] == [1, 2]
  assert second['losses']['a'][0] == first['losses']['a'][0]
  for n in 'abc':
    ours, ref = _weights(workdir, n), _weights(together[0], n)
    assert sorted(ours) == sorted(ref)
    for k in ref:
      np.testing.assert_array_equal(ours[k], ref[k], err_msg=f'{n}: {k}')

  samples = {(n, s): _png(os.path.join(workdir, 'samples', n, f'step_{s}.png')) for n in 'abc' for s in (1, 2)}
  assert second['outputs']['samples'] == {n: os.path.join(workdir, 'samples', n, 'step_2.png') for n in 'abc'}
  assert {im.shape for im in samples.values()} == {(32, 32, 3)}  # one prompt, validation.num_images=1
  assert not np.array_equal(samples['a', 2], samples['b', 2])  # same prompt and seed, their own adapters
  assert not np.array_equal(samples['c', 1], samples['c', 2])  # c's adapter moved between its steps

  scalars = _scalars(workdir)
  for n in 'abc':
    (steps, losses), ref = zip(*scalars[f'train/loss/{n}']), together[1]['losses'][n]
    assert steps == (1, 2) and losses == pytest.approx([v for _, v in ref], rel=1e-6)
    assert [s for s, _ in scalars[f'train/grad_norm/{n}']] == [1, 2]
  lr = lr_schedule(c, c.train.learning_rate)
  assert scalars['train/learning_rate'] == [(s, pytest.approx(float(lr(s)))) for s in (1, 2, 1, 2)]  # per group
  for n in 'abc':  # each subject's scores of its own samples, at each validation
    for m in ('dino', 'clip_i', 'clip_t'):
      assert [s for s, _ in scalars[f'validation/{m}/{n}']] in ([1, 2], [1, 1, 2]), (m, n)  # a's step 1 twice: resumed
    saved = json.load(open(os.path.join(workdir, 'samples', n, 'metrics_step_2.json')))
    assert saved.keys() == {'dino', 'clip_i', 'clip_t'} and all(np.isfinite(list(saved.values())))
    assert scalars[f'validation/dino/{n}'][-1][1] == pytest.approx(saved['dino'], rel=1e-6)


MESH_CONFIG = """
from jaxdream.training.config import base_config, concept


def get_config():
  c = base_config()
  c.model, c.resolution, c.seed = {model!r}, 32, 3
  c.concepts = [concept(instance_dir=d, instance_prompt='a photo of sks ' + n) for n, d in {subjects!r}]
  c.prior.enabled = False
  c.lora.rank, c.lora.per_subject = 4, True
  c.train.num_steps, c.train.learning_rate, c.train.subjects_per_step = 3, 1e-2, 4  # a, b, c and a dummy
  c.checkpoint.every_steps, c.checkpoint.async_save = 1, False
  c.validation.num_images = 0  # no samples
  c.mesh.data, c.mesh.tensor = 4, 2  # 8 devices: the subjects over 'data', the base's layers over 'tensor'
  return c
"""


@pytest.mark.parametrize('devices', [8, 1], ids=['8_devices', '1_device'])
def test_a_per_subject_run_killed_resumes_to_identical_adapters(devices, folders, tmp_path, monkeypatch, capsys):
  """`jaxdream train` on an 8-device mesh (or one device), SIGKILLed once its first checkpoint is written, then
  run again: its adapters equal those of the run never killed, bit for bit. The killed run is a subprocess with
  the session's XLA flags (8 host devices; one for the one-device case), so that every run computes with the
  same compiled programs."""
  text = MESH_CONFIG.format(model=folders['model'], subjects=[(n, folders[n]) for n in 'abc'])
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  if devices == 8:
    monkeypatch.setattr(subject_run, 'make_mesh', make_mesh)  # the config's mesh, not the module's one device
  else:
    text = text.replace('c.mesh.data, c.mesh.tensor = 4, 2', 'c.mesh.data, c.mesh.tensor = 1, 1')
    flags = env.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=8', '')
    env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1 ' + flags
  path = tmp_path / 'config.py'
  path.write_text(text)
  config = runpy.run_path(str(path))['get_config']()
  straight = str(tmp_path / 'straight')
  straight_config = config.copy_and_resolve_references()
  straight_config.checkpoint.every_steps = 100  # its checkpoints are not needed (not run-defining)
  train(straight_config, straight)

  killed = str(tmp_path / 'killed')
  cmd = [sys.executable, '-m', 'jaxdream.cli', 'train', '--config', str(path), '--workdir', killed]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  t0 = time.time()
  while not glob.glob(os.path.join(killed, 'groups', '*', 'checkpoints', '1')):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() - t0 < 600, 'no checkpoint in time'
    time.sleep(0.005)
  proc.kill()
  output = proc.communicate(timeout=60)[0]
  assert proc.returncode == -signal.SIGKILL, output
  assert not os.path.exists(lora_paths(killed, 'a')['lora'])  # killed mid-run

  capsys.readouterr()
  summary = train(config, killed)
  resumed = int(capsys.readouterr().out.split('resumed from the checkpoint at step ')[1].split()[0])
  steps = [s for s, _ in summary['losses']['a']]  # the history saved with the checkpoints, then the new steps
  assert 1 <= resumed < 3 and steps == sorted(set(steps)) and steps[-(3 - resumed) :] == list(range(resumed + 1, 4))
  for n in 'abc':
    ours, ref = _weights(killed, n), _weights(straight, n)
    assert sorted(ours) == sorted(ref)
    for k in ref:
      np.testing.assert_array_equal(ours[k], ref[k], err_msg=f'{n}: {k}')
