"""Orbax checkpoints of a run: state, data iterator positions and the run-defining config."""

from __future__ import annotations

import os
import time

import jax

from jaxdream.distributed import multihost
from jaxdream.training import config as config_lib

# Orbax splits each replicated array over its replicas and saves one slice per device ("replica
# parallel"): one device dispatch per slice, about 1 ms each, so for small arrays the split costs far more
# than the write it shares (a tiny model's checkpoint: 8.5 s of 9.5 s on 8 CPU devices). Only slices of
# at least this many bytes are worth it.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _register_array_handler():
  import orbax.checkpoint as ocp

  try:
    from orbax.checkpoint._src.metadata import array_metadata_store

    handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES, array_metadata_store=array_metadata_store.Store()
    )
  except (ImportError, TypeError):  # another orbax layout: keep its default handler (slower, as correct)
    return
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def _checkpointer(workdir, config):
  import orbax.checkpoint as ocp

  _register_array_handler()

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


def _reason(error: BaseException) -> str:
  """The innermost cause of a failed restore, on one line (TensorStore wraps it in pages of spec)."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  text = ' '.join(str(error).split()) or type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def _is_mismatch(error: BaseException) -> bool:
  """A readable checkpoint of another shape of state (a changed model resumed with resume_override)."""
  text = str(error)
  return isinstance(error, ValueError) and ('tree structures do not match' in text or 'stored shape' in text)


def _move_aside(mngr, step: int, why: str) -> str:
  """Rename checkpoints/STEP to checkpoints/STEP.WHY-TIME (orbax lists only numbered folders): nothing is
  deleted, and the run goes on from the others."""
  src = os.path.join(str(mngr.directory), str(step))
  dst = f'{src}.{why}-{time.strftime("%Y%m%d-%H%M%S")}'
  if multihost.is_primary():
    os.replace(src, dst)
  multihost.barrier(f'checkpoint-{step}-{why}')
  mngr.reload()
  return dst


def _steps_to_try(mngr, config) -> list[int]:
  """Saved steps, newest first; with checkpoint.resume_step only that one, newer ones moved aside (a later
  save of the same step number must not collide with them)."""
  steps = sorted(mngr.all_steps(), reverse=True)
  want = config.checkpoint.resume_step
  if not want:
    return steps
  if want not in steps:
    raise config_lib.RunConfigError(
      f'checkpoint.resume_step={want}: no such checkpoint in {mngr.directory} (saved steps: {sorted(steps) or "none"})'
    )
  for step in steps:
    if step > want:
      multihost.log(
        f'checkpoint.resume_step={want}: moved the newer step {step} to {_move_aside(mngr, step, "skipped")}'
      )
  return [want]


def _restore(mngr, state, iterators, config):
  """Restore the newest readable checkpoint (or checkpoint.resume_step) into `state`'s structure; refuse a
  changed run unless overridden. An unreadable step (a truncated or missing file) is named, moved aside and
  the next older one tried."""
  for step in _steps_to_try(mngr, config):
    try:
      restored = _restore_step(mngr, step, state, config)
    except config_lib.RunConfigError:
      raise
    except Exception as e:  # noqa: BLE001 - orbax and TensorStore raise plain Exceptions for unreadable data
      if _is_mismatch(e):
        raise config_lib.RunConfigError(
          f'the checkpoint at step {step} does not fit this model: {_reason(e)}'
        ) from None
      where = _move_aside(mngr, step, 'damaged')
      multihost.log(f'checkpoint step {step} is unreadable ({_reason(e)}); moved it to {where}')
      if config.checkpoint.resume_step:
        raise config_lib.RunConfigError(
          f'checkpoint.resume_step={step} is unreadable; choose another step or drop checkpoint.resume_step'
        ) from None
      continue
    for k, it in iterators.items():
      it.set_state(restored['data'][k])
    multihost.log(f'resumed from the checkpoint at step {step}')
    return restored['state']
  return state


def check_resumable(workdir: str, config) -> None:
  """Refuse a workdir whose checkpoint to resume from is of another run, before anything is loaded, generated or
  written there (the restore checks each step again; an unreadable one is left to it)."""
  import orbax.checkpoint as ocp

  folder = os.path.join(workdir, 'checkpoints')
  if config.resume_override or not os.path.isdir(folder):
    return
  steps = sorted(int(n) for n in os.listdir(folder) if n.isdigit())
  step = config.checkpoint.resume_step or (steps[-1] if steps else 0)
  if step not in steps:
    return
  mngr = _checkpointer(workdir, config)
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  except Exception:  # noqa: BLE001 - unreadable: the restore names it and moves it aside
    return
  finally:
    mngr.close()  # its background threads would outlive the run otherwise
  _refuse_other_run(meta['config'], config, step)


def _refuse_other_run(saved: dict, config, step: int) -> None:
  diffs = config_lib.config_differences(saved, config_lib.run_defining(config))
  if diffs and not config.resume_override:
    raise config_lib.RunConfigError(
      f'the workdir holds a checkpoint (step {step}) of a different run:\n  - '
      + '\n  - '.join(diffs)
      + '\nUse another --workdir, or pass --config.resume_override=True to continue anyway.'
    )


def _restore_step(mngr, step, state, config):
  import orbax.checkpoint as ocp

  meta = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  _refuse_other_run(meta['config'], config, step)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  return mngr.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
  )
