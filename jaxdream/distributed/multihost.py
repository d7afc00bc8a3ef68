"""Multi-host runs: one process per host (`jax.distributed`), every process running the same program.

Every process executes every jitted computation (they hold the shards and run the collectives), feeds
only the batch rows its devices hold, and stops at the same step as the others. Only the primary
process writes files, logs and exports. The workdir must be one folder all hosts see (NFS, Filestore,
GCS FUSE): orbax writes each host's shards there, and the others read the class images and the
dataset that the primary process makes there. `check_shared_folder` says so before any work starts.
"""

from __future__ import annotations

import itertools
import os
import signal
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize():
  """Join a multi-host run: explicit JAXDREAM_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID (launch/
  slurm_gpu.sbatch sets them), or JAXDREAM_DISTRIBUTED=auto where JAX detects the cluster (TPU pods)."""
  env = os.environ
  if env.get('JAXDREAM_COORDINATOR'):
    jax.distributed.initialize(
      env['JAXDREAM_COORDINATOR'], int(env['JAXDREAM_NUM_PROCESSES']), int(env['JAXDREAM_PROCESS_ID'])
    )
  elif env.get('JAXDREAM_DISTRIBUTED') == 'auto':
    jax.distributed.initialize()


def is_primary() -> bool:
  return jax.process_index() == 0


def primary_first(make, name: str):
  """`make()` on the primary process, then on the others, which find and reuse what it made (the
  tiny base model, the dataset): one writer per shared folder."""
  out = make() if is_primary() else None
  barrier(name)
  return out if is_primary() else make()


_BARRIERS = itertools.count()  # every process passes the same barriers in the same order


def barrier(name: str, timeout_s: int = 3600):
  """Wait until every process gets here (a no-op with one process). A barrier of the coordination
  service, not a device collective: CPU (gloo) collectives give up after 30 s, and one process may well
  be busy longer than that (making the tiny model, writing the dataset) while the others wait."""
  if jax.process_count() > 1:
    from jax._src import distributed

    distributed.global_state.client.wait_at_barrier(f'jaxdream/{next(_BARRIERS)}/{name}', timeout_s * 1000)


def run_together(fn, *args):
  """`fn(*args)` for a jitted `fn` whose program holds collectives: with several processes it is compiled
  first and run only once every process has compiled it, so that no process waits in a collective while
  another one is still compiling (and no backend timeout fires)."""
  if jax.process_count() == 1:
    return fn(*args)
  compiled = fn.lower(*args).compile()
  barrier('compiled')
  return compiled(*args)


def to_host(tree):
  """NumPy copies of `tree`'s arrays. A sharded array spanning other hosts is gathered, which is a
  collective: with several processes, every process must call this on the same tree."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def to_global(tree, shardings):
  """Place host values that every process holds identically as arrays with `shardings` (a sharding or
  a matching tree of them); each process fills only its own devices."""

  def put(x, sharding):
    if sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def check_shared_folder(folder: str):
  """With several processes, make sure `folder` is one folder all hosts see (see the module doc)."""
  if jax.process_count() == 1:
    return
  path = os.path.join(folder, '.jaxdream_shared_check')
  token = multihost_utils.broadcast_one_to_all(np.frombuffer(uuid.uuid4().bytes, np.uint8))
  token = bytes(np.asarray(token, np.uint8)).hex()
  if is_primary():
    with open(path, 'w') as f:
      f.write(token)
  barrier('shared-folder-written')
  try:
    with open(path) as f:
      seen = f.read() == token
  except OSError:
    seen = False
  ok = multihost_utils.process_allgather(np.array(seen))
  barrier('shared-folder-read')
  if is_primary():
    os.remove(path)
  if not np.all(ok):
    raise OSError(
      f'{folder} is not the same folder on every host (processes {np.flatnonzero(~ok).tolist()} '
      'do not see what process 0 wrote there). Multi-host runs need a shared workdir (NFS, '
      'Filestore, GCS FUSE): checkpoints, class images and the dataset live there.'
    )


class Preemption:
  """SIGTERM (a preemption notice) or Ctrl-C (SIGINT) asks the loop to save and stop; a second Ctrl-C
  stops at once (KeyboardInterrupt). With one process a Python handler sets a flag; with several, JAX's
  preemption service (started by jax.distributed) catches SIGTERM on any host and all processes agree on the
  step to stop at, so none is left waiting in a collective (Ctrl-C there interrupts as usual)."""

  CAUSES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C (SIGINT)'}

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.cause = 'SIGTERM'  # what asked to stop, for the message
    self._requested = False
    self._previous = {}
    if not self.multi:
      self._previous = {s: signal.signal(s, self._handle) for s in self.CAUSES}

  def _handle(self, signum, frame):
    if self._requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self._requested, self.cause = True, self.CAUSES[signum]
    if signum == signal.SIGINT:
      print('\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again stops at once)', flush=True)

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; called by every process at every step."""
    if self.multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def stopped(self, step: int, what: str = 'the checkpoint'):
    """Say that the run saved `what` at `step` and stopped (after waiting for the save): how to resume."""
    log(f'\n{self.cause}: saved {what} at step {step}; run the same command to resume.')

  def restore(self):
    for s, previous in self._previous.items():
      signal.signal(s, previous)


def log(msg: str):
  """Print once per run: on the primary process only."""
  if is_primary():
    print(msg, flush=True)
