"""Orbax checkpoints of a run: state, data iterator positions and the run-defining config."""

from __future__ import annotations

import os

import jax

from jaxdream.distributed import multihost
from jaxdream.training import config as config_lib


def _checkpointer(workdir, config):
  import orbax.checkpoint as ocp

  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.checkpoint.keep, enable_async_checkpointing=config.checkpoint.async_save
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, 'checkpoints')), options=options, item_names=('state', 'data', 'config')
  )


def _save(mngr, step, state, iterators, config):
  import orbax.checkpoint as ocp

  data = {k: it.get_state() for k, it in iterators.items()}
  mngr.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data),
      config=ocp.args.JsonSave(config_lib.run_defining(config)),
    ),
  )


def _restore(mngr, state, iterators, config):
  """Restore the latest checkpoint into `state`'s structure; refuse a changed run unless overridden."""
  import orbax.checkpoint as ocp

  step = mngr.latest_step()
  if step is None:
    return state
  meta = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  diffs = config_lib.config_differences(meta['config'], config_lib.run_defining(config))
  if diffs and not config.resume_override:
    raise config_lib.RunConfigError(
      f'the workdir holds a checkpoint (step {step}) of a different run:\n  - '
      + '\n  - '.join(diffs)
      + '\nUse another --workdir, or pass --config.resume_override=True to continue anyway.'
    )
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = mngr.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
  )
  for k, it in iterators.items():
    it.set_state(restored['data'][k])
  multihost.log(f'resumed from the checkpoint at step {step}')
  return restored['state']
