"""The training loop reads each step's metrics one step late (so the host never waits for a step to finish
before dispatching the next), and still stops on a non-finite step before that step can be saved."""

import numpy as np
import pytest

from jaxdream.training import config as config_lib
from jaxdream.training.runner import _StepLog
from jaxdream.training.step import TrainingError


class _Metric:
  """A device value whose reading to the host is recorded (jax.device_get reads it through __array__)."""

  def __init__(self, value, step, reads):
    self.value, self.step, self.reads = value, step, reads

  def __array__(self, dtype=None, copy=None):
    self.reads.append(self.step)
    return np.asarray(self.value, dtype)


class _Bar:
  def __init__(self):
    self.n = 0

  def set_postfix(self, **_):
    pass

  def update(self, n):
    self.n += n


def _log(nan_policy='stop'):
  config = config_lib.base_config()
  config.train.num_steps, config.train.nan_policy = 10, nan_policy
  reads, losses, bar = [], [], _Bar()
  log = _StepLog(config, '/workdir', None, bar, losses, lambda n: 1e-4, 0)

  def push(step, loss):
    names = ('loss', 'instance_loss', 'prior_loss', 'grad_norm')
    metrics = {k: _Metric(loss, step, reads) for k in names} | {'finite': _Metric(np.isfinite(loss), step, reads)}
    log.push(step, metrics)

  return log, push, reads, losses, bar


def test_metrics_are_read_after_the_next_step_is_dispatched_and_a_flush_reads_them_at_once():
  log, push, reads, losses, bar = _log()
  push(1, 0.5)
  assert reads == [] and losses == [] and bar.n == 0  # step 1 runs; nothing waited for it
  push(2, 0.25)
  assert set(reads) == {1} and losses == [(1, 0.5)] and bar.n == 1
  log.flush()  # before a checkpoint: step 2 is read now
  assert set(reads) == {1, 2} and losses == [(1, 0.5), (2, 0.25)] and bar.n == 2
  log.flush()  # nothing pending: nothing read twice
  assert len(reads) == 10 and bar.n == 2


def test_a_non_finite_step_stops_the_run_naming_its_step_before_the_next_save():
  log, push, _, losses, _ = _log()
  push(3, np.nan)  # step 3 is bad; it is only known once read
  with pytest.raises(TrainingError, match=r'non-finite loss.*step 3 \(loss=nan\).*/workdir/checkpoints'):
    push(4, 0.1)  # dispatched: step 3 is read and stops the run, naming step 3 (not 4)
  log, push, _, losses, _ = _log()
  push(3, np.nan)
  with pytest.raises(TrainingError, match='at step 3 '):  # a checkpoint of step 3 is due: read before saving
    log.flush()
  assert losses == []


def test_skipped_non_finite_steps_warn_and_are_recorded_one_step_late():
  log, push, _, losses, _ = _log('skip')
  push(1, np.inf)
  with pytest.warns(UserWarning, match='at step 1 .*step skipped'):
    push(2, 0.3)
  log.flush()
  assert [s for s, _ in losses] == [1, 2] and losses[1][1] == pytest.approx(0.3)
