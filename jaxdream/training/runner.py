"""The steps of a training run, shared by DreamBooth (loop.py) and VAE runs (vae.py): resume from the newest
checkpoint, step, log, checkpoint, and stop cleanly on preemption."""

from __future__ import annotations

import time
import warnings

from jaxdream.distributed import multihost
from jaxdream.training.checkpoint import _checkpointer, _restore, _save
from jaxdream.training.step import TrainingError
from jaxdream.training.writers import _load_losses, _save_losses, _Writer


def run_steps(config, workdir, state, frozen, jstep, next_batch, iterators, learning_rate, visit):
  """The steps of a run (DreamBooth's, a VAE's) from its newest checkpoint (restored into `state` and the
  `iterators`' positions) to train.num_steps, each on `next_batch()`: checkpoints every
  checkpoint.every_steps, the loss history, logged scalars (`learning_rate(update)`: the first group's), and
  `visit(step, state, writer)` every validation.every_steps (validation images). Returns (state, the loss
  history, the step a preemption stopped the run at or None, the primary process's writer or None)."""
  mngr = _checkpointer(workdir, config)
  state = _restore(mngr, state, iterators, config)
  start = int(state['step'])
  writer = _Writer(workdir, config) if multihost.is_primary() else None
  preempt = multihost.Preemption()
  # Losses past the restored checkpoint are of steps that will be redone (a kill mid-save, or an older
  # resume_step): drop them.
  losses = [x for x in _load_losses(workdir) if x[0] <= start]
  try:
    from tqdm import tqdm

    bar = tqdm(total=config.train.num_steps, initial=start, desc='train', disable=not multihost.is_primary())
    log = _StepLog(config, workdir, writer, bar, losses, learning_rate, start)
    for step in range(start, config.train.num_steps):
      batch = next_batch()
      if step == start:  # compiled ahead, so that no host waits in a collective while another compiles
        jstep = jstep.lower(state, frozen, batch).compile()
        multihost.barrier('train step compiled')
      state, metrics = jstep(state, frozen, batch)
      done = step + 1
      stop = preempt.reached(done)
      log.push(done, metrics)  # reads the previous step's metrics while this one runs
      save = done % config.checkpoint.every_steps == 0 or done == config.train.num_steps or stop
      due = config.validation.every_steps and done % config.validation.every_steps == 0
      if save or due:
        log.flush()  # a non-finite step stops the run here, before it is saved
      if save:
        _save(mngr, done, state, iterators, config)
        if multihost.is_primary():
          _save_losses(workdir, losses)
      if due:
        visit(done, state, writer)
      if stop:
        mngr.wait_until_finished()
        preempt.stopped(done)
        return state, losses, done, writer
    bar.close()
  finally:
    preempt.restore()
    mngr.wait_until_finished()
  return state, losses, None, writer


class _StepLog:
  """The steps' metrics (the non-finite check, the loss history, the progress bar, the logged scalars),
  read to the host one step late: step N's after step N+1 is dispatched, so the host prepares the next
  batch while a step runs instead of waiting for each to finish. `flush` reads the pending step's at once:
  before a checkpoint is saved, so that a non-finite step's state is never saved under nan_policy='stop'."""

  def __init__(self, config, workdir, writer, bar, losses, learning_rate, start):
    self.config, self.workdir, self.writer, self.bar, self.losses = config, workdir, writer, bar, losses
    self.learning_rate = learning_rate  # of the first group, by optimizer update
    self.pending = None
    self.t_last, self.s_last = time.perf_counter(), start

  def push(self, done: int, metrics):
    """Step `done` was dispatched: read the step before it, and keep this one's for later."""
    self.flush()
    self.pending = (done, metrics)

  def flush(self):
    if self.pending is None:
      return
    (done, metrics), self.pending = self.pending, None
    m = multihost.to_host(metrics)
    t = self.config.train
    if not m['finite']:
      msg = f'non-finite loss or gradient at step {done} (loss={float(m["loss"])})'
      if t.nan_policy == 'stop':
        raise TrainingError(
          msg + '; the step was not applied and the run stopped. The last good '
          f'checkpoint is in {self.workdir}/checkpoints. Lower the learning rate, or set '
          "train.nan_policy='skip' to skip such steps."
        )
      warnings.warn(msg + '; step skipped')
    self.losses.append((done, float(m['loss'])))
    self.bar.set_postfix(loss=f'{float(m["loss"]):.4f}')
    self.bar.update(1)
    if self.writer and (done % self.config.logging.every_steps == 0 or done == t.num_steps):
      now = time.perf_counter()
      self.writer.scalars(
        done,
        **{k: v for k, v in m.items() if k != 'finite'},  # the loss, its parts and the gradient norm
        learning_rate=self.learning_rate(done // t.grad_accum_steps),
        steps_per_second=(done - self.s_last) / max(now - self.t_last, 1e-9),
      )
      self.t_last, self.s_last = now, done
