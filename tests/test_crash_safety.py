"""What a fault probe hits: a damaged newest checkpoint, two runs on one workdir, Ctrl-C during training.
Checkpoint tests use a tiny state and the checkpoint functions directly; real runs interrupted by Ctrl-C
and resumed from a damaged checkpoint: tests/test_train_run.py."""

import glob
import json
import os
import signal
import socket
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdream.cli import main
from jaxdream.training import config as config_lib
from jaxdream.training.checkpoint import _checkpointer, _restore, _save
from jaxdream.training.lock import LOCK_FILE, acquire, release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')


def _state(step):
  return {'w': jnp.arange(1000.0) + step, 'step': jnp.array(step)}


@pytest.fixture
def saved(tmp_path):
  """A workdir with synchronous checkpoints of steps 1, 2 and 3 of a tiny state."""
  config = config_lib.base_config()
  config.checkpoint.async_save = False
  mngr = _checkpointer(str(tmp_path), config)
  for step in (1, 2, 3):
    _save(mngr, step, _state(step), {}, config)
  mngr.wait_until_finished()
  return str(tmp_path), config


def _largest_data_file(workdir, step):
  files = glob.glob(os.path.join(workdir, 'checkpoints', str(step), 'state', '**', 'd', '*'), recursive=True)
  return max(files, key=os.path.getsize)


def _damage(path, how):
  if how == 'truncated':
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 3)
  else:
    os.remove(path)


@pytest.mark.parametrize('how', ['truncated', 'missing'])
def test_an_unreadable_newest_checkpoint_is_named_moved_aside_and_the_previous_one_resumed(saved, how, capsys):
  workdir, config = saved
  _damage(_largest_data_file(workdir, 3), how)
  restored = _restore(_checkpointer(workdir, config), _state(0), {}, config)
  assert int(restored['step']) == 2
  np.testing.assert_array_equal(restored['w'], _state(2)['w'])
  out = capsys.readouterr().out
  line = next(line for line in out.splitlines() if 'unreadable' in line)
  assert line.startswith('checkpoint step 3 is unreadable (') and 'TensorStore details' not in line, line
  assert 'resumed from the checkpoint at step 2' in out
  folder = os.path.join(workdir, 'checkpoints')
  aside = [f for f in os.listdir(folder) if f.startswith('3.damaged-')]
  assert len(aside) == 1 and not os.path.exists(os.path.join(folder, '3'))  # moved, never deleted
  assert aside[0] in line
  assert _checkpointer(workdir, config).all_steps() == [1, 2]


def test_resume_step_chooses_an_older_checkpoint_and_moves_the_newer_ones_aside(saved, capsys):
  workdir, config = saved
  config.checkpoint.resume_step = 1
  restored = _restore(_checkpointer(workdir, config), _state(0), {}, config)
  assert int(restored['step']) == 1
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  assert sorted(n.split('.')[0] for n in names if '.skipped-' in n) == ['2', '3']
  assert 'resumed from the checkpoint at step 1' in capsys.readouterr().out
  config.checkpoint.resume_step = 5
  with pytest.raises(config_lib.RunConfigError, match=r'resume_step=5: no such checkpoint .*saved steps: \[1\]'):
    _restore(_checkpointer(workdir, config), _state(0), {}, config)


def test_a_checkpoint_of_another_shape_is_refused_not_moved_aside(saved):
  workdir, config = saved
  with pytest.raises(config_lib.RunConfigError, match='step 3 does not fit this model'):
    _restore(_checkpointer(workdir, config), {'w': jnp.arange(10.0), 'step': jnp.array(0)}, {}, config)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2', '3']


def _hold_lock(workdir, pid, host=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, LOCK_FILE), 'w') as f:
    json.dump({'pid': pid, 'host': host or socket.gethostname()}, f)


def test_a_second_run_on_a_workdir_in_use_is_refused_at_once(tmp_path, capsys):
  holder = subprocess.Popen(['sleep', '120'])
  try:
    workdir = str(tmp_path / 'run')
    _hold_lock(workdir, holder.pid)
    assert main(['train', '--config', QUICKSTART, '--workdir', workdir]) == 2
    host = socket.gethostname()
    assert (
      capsys.readouterr().err == f'jaxdream train: error: workdir {workdir} is in use by pid {holder.pid} on {host}\n'
    )
    assert os.listdir(workdir) == [LOCK_FILE]  # nothing was made
  finally:
    holder.kill()
    holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
  dead = subprocess.Popen(['true'])
  dead.wait()
  _hold_lock(str(tmp_path), dead.pid)
  path = acquire(str(tmp_path))
  with open(path) as f:
    assert json.load(f) == {'pid': os.getpid(), 'host': socket.gethostname()}
  release(path)
  assert not os.path.exists(path)


def test_a_lock_from_another_host_names_the_file_to_delete(tmp_path):
  from jaxdream.training.lock import WorkdirInUse

  _hold_lock(str(tmp_path), 1, host='elsewhere')
  with pytest.raises(WorkdirInUse, match=f'in use by pid 1 on elsewhere .*delete {tmp_path}/{LOCK_FILE}'):
    acquire(str(tmp_path))


def test_first_ctrl_c_asks_to_save_and_second_stops_at_once(capsys):
  from jaxdream.distributed.multihost import Preemption

  preempt = Preemption()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert preempt.reached(1) and preempt.cause == 'Ctrl-C (SIGINT)'
    assert 'Ctrl-C again stops at once' in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    preempt.restore()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
