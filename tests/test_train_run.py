"""Whole DreamBooth runs on the tiny model: the exported model loads in diffusers and jaxdream, a run killed
at any moment (or stopped by Ctrl-C, or with a damaged checkpoint) resumes to bitwise-identical weights,
changed runs and NaN losses are refused."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import tiny_base

import jaxdream
from jaxdream.io.weights import read_safetensors
from jaxdream.training import config as config_lib

pytestmark = pytest.mark.slow  # whole training runs

SAMPLE = os.path.join(os.path.dirname(jaxdream.__file__), 'assets', 'sample_subject', 'dog')
UNET_FILE = os.path.join('model', 'unet', 'diffusion_pytorch_model.safetensors')
TE_FILE = os.path.join('model', 'text_encoder', 'model.safetensors')


@pytest.fixture(scope='module')
def shared(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  return {'base': tiny_base(str(root / 'base')), 'class_dir': str(root / 'class_images'), 'root': root}


def _config(shared, **train):
  c = config_lib.base_config()
  c.model = shared['base']
  c.resolution = 64
  c.concepts = [
    config_lib.concept(
      instance_dir=SAMPLE,
      instance_prompt='a photo of sks dog',
      class_prompt='a photo of dog',
      class_dir=shared['class_dir'],
      num_class_images=2,
    )
  ]
  c.prior.sample_steps, c.prior.batch_size = 2, 2
  c.train.num_steps, c.train.learning_rate = 4, 1e-4
  c.train.train_text_encoder = True
  c.train.ema_decay = 0.9  # the exported weights are the EMA ones
  c.checkpoint.every_steps, c.checkpoint.async_save = 2, True
  c.logging.every_steps = 2
  c.validation.prompts, c.validation.num_images, c.validation.steps = ['a photo of sks dog'], 1, 2
  c.data.flip_p = 0.5
  c.mesh.data, c.mesh.tensor = 2, 4  # 8 simulated devices: the batch of 1 + 1 splits over 'data'
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.fixture(scope='module')
def finished(shared, scoring_models):
  from jaxdream.training.loop import train

  workdir = str(shared['root'] / 'finished')
  c = _config(shared)
  c.validation.metrics = True  # DreamBench scores of the samples, the scoring models' batches split over the mesh
  c.validation.clip_model, c.validation.dino_model = scoring_models['clip'][1], scoring_models['dino'][1]
  summary = train(c, workdir)
  return workdir, summary


def _tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value)]} of the event files' scalars (TFRecord framing: length, crc, Event proto, crc)."""
  import struct

  from tensorboardX.proto.event_pb2 import Event

  out = {}
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), 'rb').read()
    i = 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i : i + 8])
      event = Event.FromString(data[i + 12 : i + 12 + n])
      i += 16 + n
      for v in event.summary.value:
        if v.HasField('simple_value'):
          out.setdefault(v.tag, []).append((event.step, v.simple_value))
  return out


def test_validation_metrics_are_the_dreambench_scores_of_the_samples_against_the_photos(finished, scoring_models):
  from PIL import Image

  from jaxdream.evaluation import dreambench_scores, load_clip, load_dino
  from jaxdream.io.images import list_images

  workdir, summary = finished
  saved = json.load(open(os.path.join(workdir, 'samples', 'metrics.json')))
  assert saved['step'] == 4 and saved['overall'] == summary['metrics']['overall']
  sample = np.asarray(Image.open(summary['outputs']['samples']['a photo of sks dog']))  # one image: lossless PNG
  clip, dino = load_clip(scoring_models['clip'][1]), load_dino(scoring_models['dino'][1])
  photos = {'dog': list_images(SAMPLE)}
  ref = dreambench_scores(photos, {'dog': [sample]}, {'dog': ['a photo of dog']}, clip, dino)
  for m in ('dino', 'clip_i', 'clip_t'):
    np.testing.assert_allclose(saved['subjects']['dog'][m], ref['subjects']['dog'][m], rtol=1e-5, atol=1e-6)
  # CLIP-T reads the prompt without the identifier, as the DreamBooth paper's protocol does
  with_identifier = dreambench_scores(photos, {'dog': [sample]}, {'dog': ['a photo of sks dog']}, clip, dino)
  assert abs(with_identifier['subjects']['dog']['clip_t'] - saved['subjects']['dog']['clip_t']) > 1e-4
  scalars = _tensorboard_scalars(os.path.join(workdir, 'tensorboard'))
  for m in ('dino', 'clip_i', 'clip_t'):
    step, value = scalars[f'validation/{m}'][-1]
    assert step == 4 and value == pytest.approx(saved['overall'][m], rel=1e-6)


def test_run_writes_samples_logs_and_a_model_that_diffusers_and_jaxdream_load(finished):
  import torch
  from diffusers import StableDiffusionPipeline

  from jaxdream import load_pipeline
  from jaxdream.diffusion.sampling import txt2img

  workdir, summary = finished
  assert summary['step'] == 4 and len(summary['losses']) == 4
  out = summary['outputs']
  assert os.path.exists(out['loss_curve']) and all(os.path.exists(p) for p in out['samples'].values())
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  ref = StableDiffusionPipeline.from_pretrained(out['model'], safety_checker=None)
  with torch.no_grad():
    image = ref('a photo of sks dog', num_inference_steps=2, output_type='np').images
  assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
  ours = txt2img(load_pipeline(out['model']), 'a photo of sks dog', num_inference_steps=2)
  assert ours.shape == (1, 64, 64, 3)


def test_exported_model_is_the_last_checkpoints_ema_and_diffusers_runs_it_as_jaxdream_does(finished, shared):
  import jax
  import orbax.checkpoint as ocp
  import torch
  from conftest import jit_call, nchw, nhwc, rel_err
  from diffusers import UNet2DConditionModel
  from transformers import CLIPTextModel

  from jaxdream import load_pipeline
  from jaxdream.training.params import param_groups, split_models, split_trainable

  workdir, _ = finished
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'data', 'config'))
  assert mngr.latest_step() == 4
  state = jax.tree.map(np.asarray, mngr.restore(4, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state'])
  assert int(state['step']) == 4
  exported_pipe = load_pipeline(os.path.join(workdir, 'model'))
  exported = split_models(exported_pipe)[2]
  trained, frozen, _ = split_trainable(split_models(load_pipeline(shared['base']))[2], param_groups(_config(shared)))
  assert set(trained) == set(state['ema']) and set(exported) == set(trained) | set(frozen)
  for k in trained:  # the EMA weights of the last step, exactly
    np.testing.assert_array_equal(exported[k], state['ema'][k], err_msg=k)
  for k in frozen:
    np.testing.assert_array_equal(exported[k], frozen[k], err_msg=k)
  assert any(not np.array_equal(state['ema'][k], state['trainable'][k]) for k in trained)  # EMA: not the raw weights

  # The exported files mean the same model to diffusers/transformers as to jaxdream.
  ids = np.asarray(exported_pipe.tokenize(['a photo of sks dog', 'a dog'])['text_encoder'])
  ours_context = np.asarray(jit_call(exported_pipe.text_encoder)(ids))
  with torch.no_grad():
    ref_context = CLIPTextModel.from_pretrained(os.path.join(workdir, 'model', 'text_encoder'))(
      torch.from_numpy(ids.astype(np.int64))
    ).last_hidden_state.numpy()
  assert rel_err(ours_context, ref_context) <= 1e-5
  x = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
  t = np.array([10, 700])
  with torch.no_grad():
    ref = UNet2DConditionModel.from_pretrained(os.path.join(workdir, 'model', 'unet'))(
      torch.from_numpy(nchw(x)), torch.from_numpy(t), torch.from_numpy(ref_context)
    ).sample.numpy()
  assert rel_err(jit_call(exported_pipe.unet)(x, t, ref_context), nhwc(ref)) <= 1e-5


def test_trained_weights_moved_and_the_vae_did_not(finished, shared):
  workdir, _ = finished
  for rel, changed in (
    (UNET_FILE, True),
    (TE_FILE, True),
    (os.path.join('model', 'vae', 'diffusion_pytorch_model.safetensors'), False),
  ):
    new = read_safetensors(os.path.join(workdir, rel))
    old = read_safetensors(os.path.join(shared['base'], rel.split(os.sep, 1)[1]))
    same = all(np.array_equal(new[k], old[k]) for k in old)
    assert same != changed, rel


def test_resuming_with_a_changed_run_is_refused_with_the_differences(finished, shared, monkeypatch):
  import jaxdream.training.loop as loop

  workdir = shutil.copytree(finished[0], str(shared['root'] / 'changed'))
  listed = sorted(os.listdir(workdir))

  def not_loaded(*args):
    raise AssertionError('the model was loaded before the checkpoint was compared')

  monkeypatch.setattr(loop, '_load_base', not_loaded)  # refused before anything is loaded, generated or written
  with pytest.raises(config_lib.RunConfigError, match=r'train\.learning_rate.*0\.0001.*0\.001'):
    loop.train(_config(shared, learning_rate=1e-3, num_steps=6), workdir)
  assert sorted(os.listdir(workdir)) == listed


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(finished, shared, monkeypatch):
  from jaxdream.training import config as config_lib
  from jaxdream.training.loop import TrainingError, train

  workdir = shutil.copytree(finished[0], str(shared['root'] / 'nan'))
  c = _config(shared, num_steps=6, offset_noise=0.1)
  c.resume_override = True
  checked = config_lib.validate

  def nan_after_the_checks(config):  # a NaN offset noise is refused up front: set past the checks, every loss is NaN
    config.train.offset_noise = 0.1
    concepts = checked(config)
    config.train.offset_noise = float('nan')
    return concepts

  monkeypatch.setattr(config_lib, 'validate', nan_after_the_checks)
  with pytest.raises(TrainingError, match='non-finite loss.*step 5'):
    train(c, workdir)
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())[-1] == 4
  c.train.nan_policy = 'skip'
  with pytest.warns(UserWarning, match='step skipped'):
    summary = train(c, workdir)
  assert summary['step'] == 6 and summary['bad_steps'] == 2
  for rel in (UNET_FILE, TE_FILE):  # the skipped steps left the step-4 weights untouched
    a, b = read_safetensors(os.path.join(workdir, rel)), read_safetensors(os.path.join(finished[0], rel))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_steps_redone_after_a_lost_checkpoint_replace_their_losses(finished, shared):
  from jaxdream.training.loop import train

  workdir = shutil.copytree(finished[0], str(shared['root'] / 'lost_save'))
  # Killed after the step-4 loss was recorded but before its (asynchronous) checkpoint was complete.
  shutil.rmtree(os.path.join(workdir, 'checkpoints', '4'))
  shutil.rmtree(os.path.join(workdir, 'model'))
  summary = train(_config(shared), workdir)
  assert summary['losses'] == finished[1]['losses'] and [s for s, _ in summary['losses']] == [1, 2, 3, 4]


def _write_config(shared, path, num_steps):
  path.write_text(
    textwrap.dedent(f"""
      from jaxdream.training.config import base_config, concept
      def get_config():
        c = base_config()
        c.model = {shared['base']!r}
        c.resolution = 64
        c.concepts = [concept(instance_dir={SAMPLE!r}, instance_prompt='a photo of sks dog',
                              class_prompt='a photo of dog', class_dir={shared['class_dir']!r}, num_class_images=2)]
        c.prior.sample_steps, c.prior.batch_size = 2, 2
        c.train.num_steps, c.train.learning_rate, c.train.train_text_encoder = {num_steps}, 1e-4, True
        c.train.ema_decay = 0.9
        c.checkpoint.every_steps = 1
        c.validation.num_images = 0  # no samples: the runs' weights and losses are compared
        c.data.flip_p = 0.5
        c.mesh.data, c.mesh.tensor = 2, 4
        return c
  """)
  )
  return str(path)


# These runs use XLA's default (optimising) CPU backend, unlike the in-process tests: the several runs of
# a test load their programs from the session's compilation cache and spend their time computing steps,
# where unoptimised code costs more CPU than the one cold compile saves (measured on a 10-step run: 78 s
# of CPU warm and 160 s cold, against 105 s and 149 s with the cheap flags).


def _start(config, workdir, *overrides, devices=8, xla_flags='', **env):
  """`jaxdream train` in a subprocess on `devices` simulated devices (sharing the session's compilation
  cache), with XLA's default CPU backend unless `xla_flags` are given."""
  env = dict(
    os.environ,
    PYTHONUNBUFFERED='1',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {xla_flags}'.strip(),
    **env,
  )
  return subprocess.Popen(
    [sys.executable, '-m', 'jaxdream.cli', 'train', '--config', config, '--workdir', workdir, *overrides],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _wait_for_checkpoint(proc, workdir, step, timeout=1800):
  folder = os.path.join(workdir, 'checkpoints', str(step))
  t0 = time.time()
  while not os.path.isdir(folder):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() - t0 < timeout, 'no checkpoint in time'
    time.sleep(0.2)


def _checkpoints(workdir) -> tuple[list[int], list[str]]:
  """(the complete checkpoints' steps, orbax's temporary folders of unfinished saves)."""
  folder = os.path.join(workdir, 'checkpoints')
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if '.orbax-checkpoint-tmp' in n]


def _kill_when(proc, workdir, ready, timeout=1800) -> list[int]:
  """SIGKILL the run as soon as `ready(steps, temporary_folders)` holds, and check that it was killed
  mid-run: by the signal, with no exported model and its last checkpoint before the end. Returns
  the complete checkpoints it left."""
  t0 = time.time()
  while not ready(*_checkpoints(workdir)):
    assert proc.poll() is None, 'the run ended before its kill point:\n' + proc.stdout.read()
    assert time.time() - t0 < timeout, 'kill point not reached in time'
    time.sleep(0.005)
  proc.kill()
  output = proc.communicate(timeout=60)[0]
  assert proc.returncode == -signal.SIGKILL, output
  steps, _ = _checkpoints(workdir)
  assert steps and steps[-1] < KILL_RUN_STEPS and not os.path.exists(os.path.join(workdir, 'model')), steps
  return steps


KILL_RUN_STEPS = 10


def test_ctrl_c_saves_sigkill_at_any_moment_and_a_damaged_checkpoint_resume_to_identical_weights(shared, tmp_path):
  """One interrupted run, resumed after each fault, ends with the weights and loss history of a straight
  run: Ctrl-C (save and exit cleanly), SIGKILL while starting, mid-save and after a save, then its newest
  checkpoint damaged (moved aside, the one before resumed). SIGTERM's save: tests/test_multihost.py."""
  from PIL import Image
  from test_crash_safety import _damage, _largest_data_file

  from jaxdream.training.lock import LOCK_FILE

  # Its own two class images, made beforehand (any images do): no run of this test compiles the 8-device
  # sampler (XLA's default backend) to make them, whatever ran before it; the finished run makes its own.
  class_dir = tmp_path / 'class_images'
  class_dir.mkdir()
  rng = np.random.default_rng(0)
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(class_dir / f'{i}.png')
  config = _write_config(dict(shared, class_dir=str(class_dir)), tmp_path / 'cfg.py', num_steps=KILL_RUN_STEPS)
  straight = str(tmp_path / 'straight')
  # Checkpoints change nothing in what a run computes: the straight run saves only at its end (each save
  # of the 8-device state costs seconds).
  proc = _start(config, straight, f'--config.checkpoint.every_steps={KILL_RUN_STEPS}')
  assert proc.wait(timeout=1800) == 0, proc.stdout.read()

  interrupted = str(tmp_path / 'interrupted')
  proc = _start(config, interrupted)
  _wait_for_checkpoint(proc, interrupted, 2)
  proc.send_signal(signal.SIGINT)  # Ctrl-C: save and exit cleanly, with the status of a run not done
  output = proc.communicate(timeout=900)[0]
  assert proc.returncode == 75 and 'Traceback' not in output, output
  step = int(output.split('Ctrl-C (SIGINT): saved the checkpoint at step ')[1].split(';')[0])
  assert step in _checkpoints(interrupted)[0] and 'run the same command' in output
  assert not os.path.exists(os.path.join(interrupted, LOCK_FILE))
  # SIGKILL at several moments, each resumed by the next run: while starting, mid-save (an orbax
  # temporary folder is there, and still there after the kill; retried if the save won the race) and
  # just after a checkpoint is complete.
  t0 = time.time()
  steps = _kill_when(_start(config, interrupted), interrupted, lambda s, tmp: time.time() > t0 + 3)
  for _ in range(3):
    steps = _kill_when(_start(config, interrupted), interrupted, lambda s, tmp: bool(tmp) and s[-1] >= 3)
    if _checkpoints(interrupted)[1]:
      break
  else:
    pytest.fail('every save finished before its kill')
  last = steps[-1]
  steps = _kill_when(_start(config, interrupted), interrupted, lambda s, tmp: s[-1] >= last + 2)
  # The newest checkpoint damaged (a disk fault): named, moved aside, and the one before resumed.
  damaged = steps[-1]
  assert damaged - 1 in steps
  _damage(_largest_data_file(interrupted, damaged), 'truncated')
  # The last run is not interrupted: like the straight run, it saves only at its end (not run-defining).
  proc = _start(config, interrupted, f'--config.checkpoint.every_steps={KILL_RUN_STEPS}')
  output = proc.communicate(timeout=1800)[0]
  assert proc.returncode == 0 and 'Traceback' not in output, output
  assert f'checkpoint step {damaged} is unreadable' in output, output
  assert f'resumed from the checkpoint at step {damaged - 1}' in output, output
  assert any(n.startswith(f'{damaged}.damaged-') for n in os.listdir(os.path.join(interrupted, 'checkpoints')))
  for rel in (UNET_FILE, TE_FILE):
    a = read_safetensors(os.path.join(straight, rel))
    b = read_safetensors(os.path.join(interrupted, rel))
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The loss history too: the steps redone after a kill replace the lost ones instead of repeating them.
  with open(os.path.join(straight, 'losses.json')) as f, open(os.path.join(interrupted, 'losses.json')) as g:
    assert json.load(g) == json.load(f)


def test_cached_latents_are_each_examples_own(finished):
  import glob

  import jax
  from conftest import jit_call

  from jaxdream import load_pipeline
  from jaxdream.training.data import data_source, make_iterator
  from jaxdream.training.loop import _cache_latents, _next_batch

  workdir, _ = finished
  folder = os.path.dirname(os.path.dirname(glob.glob(os.path.join(workdir, 'data', '*', '*', '1.0.0'))[0]))
  pipe = load_pipeline(
    os.path.join(workdir, 'base_model')
    if os.path.isdir(os.path.join(workdir, 'base_model'))
    else os.path.join(workdir, 'model')
  )
  cache = _cache_latents(pipe, folder, ['instance'], 64)
  it = make_iterator(
    data_source(folder, 'instance'),
    batch_size=2,
    seed=5,
    resolution=64,
    center_crop=True,
    flip_p=0.0,
    tokenize=pipe.tokenize,
  )
  ex = next(it)
  dist = jit_call(pipe.vae, 'encode')(ex['pixels'])
  np.testing.assert_allclose(cache['instance'][0][ex['index']], dist.mean * pipe.vae.scaling_factor, atol=1e-5)
  batch = _next_batch(
    {
      'instance': make_iterator(
        data_source(folder, 'instance'),
        batch_size=2,
        seed=5,
        resolution=64,
        center_crop=True,
        flip_p=0.0,
        tokenize=pipe.tokenize,
      )
    },
    False,
    cache,
  )
  assert set(batch) == {'latent_mean', 'latent_std', 'input_ids'} and batch['latent_mean'].shape == (2, 16, 16, 4)
  jax.block_until_ready(dist.mean)


CAPTIONS = ('running on grass', 'in a red hat', 'asleep on a sofa', 'by the sea', 'under a tree')


def test_cached_text_embeddings_are_each_examples_own_caption(shared, tmp_path):
  from conftest import jit_call

  from jaxdream import load_pipeline
  from jaxdream.io.images import list_images
  from jaxdream.training.data import data_source, instance_prompt, make_iterator, prepare_dataset
  from jaxdream.training.loop import _cache_text_embeddings, _next_batch

  subject = shutil.copytree(SAMPLE, str(tmp_path / 'subject'))
  files = list_images(subject)
  assert len(files) == len(CAPTIONS)
  for file, caption in zip(files, CAPTIONS):  # photo.jpg + photo.txt
    with open(os.path.splitext(file)[0] + '.txt', 'w') as f:
      f.write(caption)
  concept = _config(shared).concepts[0]
  prompts = {file: instance_prompt(file, concept, '.txt', 'append') for file in files}
  assert len(set(prompts.values())) == len(files) and all(c in prompts[f] for f, c in zip(files, CAPTIONS))
  folder = prepare_dataset(
    str(tmp_path / 'data'), {'instance': [{'file': f, 'prompt': prompts[f], 'concept': 0} for f in files]}, 64
  )
  pipe = load_pipeline(shared['base'])
  encode = jit_call(pipe.text_encoder)
  source = data_source(folder, 'instance')
  # What each example index must get: the encoder run on its own image's caption, found from the file.
  expected = {}
  for j in range(len(source)):
    file = source[j]['file']
    file = file.decode() if isinstance(file, bytes) else str(file)
    expected[int(source[j]['index'])] = np.asarray(encode(pipe.tokenize([prompts[file]])['text_encoder']))[0]
  assert sorted(expected) == list(range(len(files)))

  contexts = _cache_text_embeddings(pipe, folder, ['instance'])
  assert contexts['instance']['context'].shape[0] == len(files)
  for i, e in expected.items():
    np.testing.assert_allclose(contexts['instance']['context'][i], e, atol=1e-5, err_msg=f'example {i}')

  kw = dict(batch_size=2, seed=5, resolution=64, center_crop=True, flip_p=0.0, tokenize=pipe.tokenize)
  batches, order = make_iterator(source, **kw), make_iterator(source, **kw)
  seen = set()
  for _ in range(4):  # 8 examples from a shuffled stream of 5: every one at least once
    batch = _next_batch({'instance': batches}, False, None, contexts)
    assert set(batch) == {'pixels', 'context', 'extra'}  # extra: SD 1.x/2.x has no further UNet inputs
    for row, i in enumerate(next(order)['index']):
      np.testing.assert_allclose(batch['context'][row], expected[int(i)], atol=1e-5, err_msg=f'example {i}')
      seen.add(int(i))
  assert seen == set(expected)
