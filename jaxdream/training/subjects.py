"""Per-subject LoRA: one adapter per subject, many subjects in one compiled step, each trained exactly as if
alone.

The step is the single-subject `StepFn` under `jax.vmap` over a leading subject axis of the state (adapters,
optimizer state, EMA, rng, step, bad_steps) and of the batch; the frozen base is broadcast (in_axes None).
Gradient clipping, AdamW, the learning-rate schedule, EMA and the NaN guard therefore act per subject by
construction, and each adapter gets exactly its own gradient. Under vmap an adapter matmul x A_s becomes one
dot_general batched over subjects, and a base matmul x W one matmul over every subject's rows: no loop.

Randomness depends on (seed, subject name) only, never on the other subjects or a subject's position in a
group: `subject_key` gives the adapter init (add_lora's key) and the step's rng, `subject_seed` the data
order, crops and flips (`data.make_iterator(seed=...)`; `subject_batches` stacks such iterators).

Groups: `subject_groups` splits the subjects into groups of `subjects_per_step`; a short last group is
padded with dummy subjects (copies of its first subject: finite, same shapes) whose results are dropped,
so every group runs the same compiled step. On a mesh the subject axis is split over as many of the batch
axes ('data', 'fsdp') as it divides, and each subject's examples over the rest (`subject_mesh_axes`).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdream.distributed.sharding import BATCH_AXES
from jaxdream.nn.adapters import LoRAParam
from jaxdream.runtime.compiler import compiler_options
from jaxdream.training.data import make_iterator
from jaxdream.training.params import flatten
from jaxdream.training.step import init_state, step_shardings


def _name_hash(name: str) -> int:
  # zlib.crc32, not hash(): Python salts str hashes per process, and a subject must draw the same numbers
  # in every run and on every host.
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def subject_key(seed: int, name: str) -> jax.Array:
  """The subject's root key: its adapter init and its step rng come from it."""
  return jax.random.fold_in(jax.random.key(seed), _name_hash(name))


def subject_seed(seed: int, name: str) -> int:
  """The subject's data seed (make_iterator's shuffle, crops and flips), a non-negative int32."""
  return int(np.random.SeedSequence([seed, _name_hash(name)]).generate_state(1)[0] & 0x7FFFFFFF)


# --- adapters and states ------------------------------------------------------------------------------


def adapted_copy(pipeline, adapt: Callable[[dict, jax.Array], object], key):
  """A copy of `pipeline` whose components `adapt(components, key)` has given adapters (it calls
  nn.adapters.add_lora on them in place). The copy shares the base's arrays: nothing is copied but the
  module graph."""
  components = {m: nnx.merge(*nnx.split(model)) for m, model in pipeline.components.items()}
  adapt(components, key)
  return dataclasses.replace(pipeline, components=components)


def adapter_params(pipeline) -> dict[str, jax.Array]:
  """The adapters (LoRAParam values) by the trainer's flat path: 'unet/.../to_q/lora_a'."""
  out = {}
  for m, model in pipeline.components.items():
    out.update(flatten(nnx.state(model, LoRAParam).to_pure_dict(), m + '/'))
  return out


def split_adapters(flat: dict) -> tuple[dict, dict]:
  """(adapters, base) of the trainer's flat parameters: the adapters are the only trainable ones."""
  is_adapter = lambda path: path.rsplit('/', 1)[-1] in ('lora_a', 'lora_b')
  return {k: v for k, v in flat.items() if is_adapter(k)}, {k: v for k, v in flat.items() if not is_adapter(k)}


def subject_adapters(pipeline, adapt, seed: int, name: str) -> dict[str, jax.Array]:
  """The adapters subject `name` starts from: `adapt` on a copy of the plain base, with its key."""
  return adapter_params(adapted_copy(pipeline, adapt, subject_key(seed, name)))


def subject_state(trainable: dict, tx, seed: int, name: str, ema: bool) -> dict:
  """init_state for one subject; its rng is the subject's key, so it trains the same alone or grouped."""
  return dict(init_state(trainable, tx, seed, ema), rng=jax.random.key_data(subject_key(seed, name)))


def stack(trees: list):
  """Per-subject trees (states, batches) -> one tree with a leading subject axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree, n: int | None = None) -> list:
  """The first `n` (default all) subjects of a stacked tree: the real ones of a padded group."""
  size = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(size if n is None else n)]


def subject_batches(sources: dict, *, seed: int, **iterator_args):
  """Batches of several subjects, stacked on a leading subject axis (numpy, in the order of `sources`:
  {name: the subject's data source}). Each subject's own iterator is make_iterator with its
  subject_seed, so its data order, crops and flips are those it would have alone."""
  iterators = [make_iterator(src, seed=subject_seed(seed, name), **iterator_args) for name, src in sources.items()]
  while True:
    yield jax.tree.map(lambda *xs: np.stack(xs), *[next(it) for it in iterators])


# --- groups -------------------------------------------------------------------------------------------


def subject_groups(names: list[str], subjects_per_step: int) -> list[list[str]]:
  """Consecutive groups of `subjects_per_step` names; the last may be shorter (see `padded`)."""
  if subjects_per_step < 1:
    raise ValueError(f'subjects_per_step={subjects_per_step}: must be at least 1')
  if len(set(names)) != len(names):
    raise ValueError(f'subject names must be unique (they seed each subject): {sorted(names)}')
  return [list(names[i : i + subjects_per_step]) for i in range(0, len(names), subjects_per_step)]


def padded(items: list, size: int) -> list:
  """`items` (a group's states or batches) filled up to `size` with dummy copies of the first, so a short
  group runs the step compiled for full ones; `unstack(..., len(items))` drops the dummies' results."""
  if not items or len(items) > size:
    raise ValueError(f'a group of {len(items)} cannot be padded to {size}')
  return list(items) + [items[0]] * (size - len(items))


# --- the step and its shardings -----------------------------------------------------------------------


def subject_mesh_axes(num_subjects: int, examples: int, mesh) -> tuple[tuple, tuple]:
  """(mesh axes of the subject axis, mesh axes of each subject's examples): each batch axis ('data', then
  'fsdp') of size > 1 goes to the subjects if they still divide, else to the examples."""
  subjects, rows = [], []
  for axis in BATCH_AXES:
    n = mesh.shape.get(axis, 1)
    if n == 1:
      continue
    if num_subjects % (math.prod(mesh.shape[a] for a in subjects) * n) == 0:
      subjects.append(axis)
    elif examples % (math.prod(mesh.shape[a] for a in rows) * n) == 0:
      rows.append(axis)
    else:
      raise ValueError(
        f'{num_subjects} subjects x {examples} examples each do not divide over mesh axis {axis!r} ({n}): '
        'choose subjects_per_step or the batch size to fit the mesh'
      )
  return tuple(subjects), tuple(rows)


def group_size(num_subjects: int, subjects_per_step: int, examples: int, mesh) -> int:
  """Subjects per step: train.subjects_per_step, or (0) all of them, padded up to a multiple of the mesh's batch
  devices when neither they nor each subject's examples divide over it (30 subjects on 8 devices: 32). A set
  subjects_per_step that does not fit is a ValueError; either way checked from the mesh's shape, before anything
  loads."""
  size = subjects_per_step or num_subjects
  try:
    subject_mesh_axes(size, examples, mesh)
  except ValueError:
    if subjects_per_step:
      raise
    devices = math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)
    size = -(-size // devices) * devices
    subject_mesh_axes(size, examples, mesh)
  return size


def _with_subject_axis(sharding: NamedSharding, subjects: tuple) -> NamedSharding:
  """A per-subject leaf's sharding with a leading subject axis; the subject axis's mesh axes leave the
  inner dimensions (an adapter FSDP-sharded alone is split by subjects instead)."""

  def drop(entry):
    kept = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,)) if a is not None and a not in subjects)
    return kept[0] if len(kept) == 1 else (kept or None)

  return NamedSharding(sharding.mesh, P(subjects or None, *(drop(e) for e in sharding.spec)))


def subject_step_shardings(pipeline, trainable, frozen, tx, mesh, config, num_subjects: int, examples: int):
  """Shardings of (stacked state, frozen base, stacked batch) for `num_subjects` subjects of `examples`
  examples each; `trainable` is one subject's (may be abstract). The base is sharded as for one subject."""
  state_sh, frozen_sh, _ = step_shardings(pipeline, trainable, frozen, tx, mesh, config)
  subjects, rows = subject_mesh_axes(num_subjects, examples, mesh)
  state_sh = jax.tree.map(lambda s: _with_subject_axis(s, subjects), state_sh)
  return state_sh, frozen_sh, NamedSharding(mesh, P(subjects or None, rows or None))


def subject_step(step_fn):
  """The single-subject step over a leading subject axis of the state and batch; the base broadcast.
  Metrics come back per subject."""
  return jax.vmap(step_fn, in_axes=(0, None, 0))


def jit_subject_step(step_fn, shardings, mesh):
  """subject_step under jax.jit with in/out shardings; the old state's buffers are donated."""
  state_sh, frozen_sh, batch_sh = shardings
  return jax.jit(
    subject_step(step_fn),
    in_shardings=(state_sh, frozen_sh, batch_sh),
    out_shardings=(state_sh, NamedSharding(mesh, P())),
    donate_argnums=(0,),
    compiler_options=compiler_options(low_memory=True, backend=mesh.devices.flat[0].platform),
  )
