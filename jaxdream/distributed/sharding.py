"""Parameter and batch shardings over the ('data', 'fsdp', 'tensor') mesh.

Models only name logical axes (each layer instance's `axes`: 'embed', 'heads', 'mlp', 'conv_mid', ...). The
config's rules map logical axes to mesh axes (tensor parallelism); then FSDP shards each parameter's
largest remaining dimension that divides over 'fsdp', or, for a parameter a rule sharded, that
dimension further. A dimension that does not divide stays whole, so any model runs on any mesh. The
batch is split over ('data', 'fsdp').
"""

from __future__ import annotations

import math

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Megatron-style tensor parallelism, not the default. Layers come in pairs: a column-parallel one (q/k/v
# -> 'heads', FF up -> 'mlp' (GEGLU interleaves value and gate features for this), ResNet conv1 and time
# embedding -> 'conv_mid') whose output stays split over
# 'tensor' into the row-parallel one that takes it back to the model width (attention out, FF down,
# conv2), the only place partial sums are reduced. 'embed' and the other conv channels stay whole, so the
# residual stream is replicated over 'tensor'. The vocabulary is split too (embedding rows, LM head).
# (Its gradients used to disagree with the single-device step: an XLA bug, see partition_spec.)
# XLA's SPMD partitioner logs no "involuntary full rematerialization" compiling the UNet + text encoder
# step under these rules on a (2, 2, 2) mesh (tests/test_sharding.py asserts it). The old per-class rules,
# which split every Linear's output, logged 83: each attention, FF and time-embedding kernel, stored split
# on its output, was wanted split on its input by the layer after it, and was gathered whole to get there.
# The split stays local only where it falls between whole heads (and whole GroupNorm groups): their counts
# should divide by the 'tensor' size. Otherwise the step is still exact, but XLA gathers q/k/v around the
# attention (SD 2.x's first block has 5 heads: at tensor=2, 4 all-gathers per attention).
TENSOR_RULES = (('heads', 'tensor'), ('mlp', 'tensor'), ('conv_mid', 'tensor'), ('vocab', 'tensor'))
DEFAULT_RULES = ()
BATCH_AXES = ('data', 'fsdp')


def logical_axes(model: nnx.Module, prefix: str = '') -> dict[str, tuple]:
  """{flat parameter path: logical axis names} for every parameter of `model`: each module that holds
  parameters names their axes in `param_axes()` (layers per instance, from their constructor's `axes`)."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Module) or not hasattr(node, 'param_axes'):
      continue
    for attr, names in node.param_axes().items():
      if getattr(node, attr, None) is not None:
        out[prefix + '/'.join(map(str, path + (attr,)))] = names
  return out


def partition_spec(shape, names, mesh, rules=DEFAULT_RULES, fsdp_min_size: int = 1024) -> P:
  """Mesh axes for one parameter: rules first, then FSDP on the largest dividing dimension, or, when a
  rule sharded the parameter, on that (largest) dimension too: ('tensor', 'fsdp')."""
  spec = [None] * len(shape)
  rules = dict(rules)
  used = set()
  for i, name in enumerate(names or ()):
    axis = rules.get(name)
    if axis and axis not in used and mesh.shape.get(axis, 1) > 1 and shape[i] % mesh.shape[axis] == 0:
      spec[i] = axis
      used.add(axis)
  n = mesh.shape.get('fsdp', 1)
  if n > 1 and 'fsdp' not in used and math.prod(shape) >= fsdp_min_size:
    if used:
      # 'fsdp' joins the ruled dimension, never another: XLA's SPMD partitioner (jax 0.10.2) gets a
      # matmul/conv wrong (batch rows swapped between devices) when the weight's contracted dim is on
      # 'tensor', its other dim on 'fsdp' and the batch on ('data', 'fsdp'): the input gradient of
      # every (fsdp, tensor) kernel. Tensor-major, so gathering over 'fsdp' leaves the tensor shard.
      dims = [i for i in range(len(shape)) if spec[i] is not None and shape[i] % (mesh.shape[spec[i]] * n) == 0]
      if dims:
        i = max(dims, key=lambda i: shape[i])
        spec[i] = (spec[i], 'fsdp')
    else:
      free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % n == 0]
      if free:
        spec[max(free, key=lambda i: shape[i])] = 'fsdp'
  return P(*spec)


def param_shardings(flat: dict, axes: dict, mesh, rules=DEFAULT_RULES, fsdp_min_size: int = 1024) -> dict:
  """{path: NamedSharding} for a flat parameter dict."""
  return {
    k: NamedSharding(mesh, partition_spec(v.shape, axes.get(k), mesh, rules, fsdp_min_size)) for k, v in flat.items()
  }


def place_model(model: nnx.Module, mesh, rules=TENSOR_RULES, fsdp_min_size: int = 1024) -> nnx.Module:
  """Put `model`'s arrays on `mesh`, in place, each as its logical axes and `rules` say (by default
  Megatron-style tensor parallelism: heads, MLP and vocabulary over 'tensor'; FSDP where the mesh has
  'fsdp'); arrays without axes (int8 weights, buffers) are replicated. Jitted calls of the model then run
  sharded, XLA adding the collectives. Returns the model.

  On a mesh whose 'data' axis is split too, nothing is split over 'fsdp': a placed model's calls get inputs of
  any sharding, and XLA's SPMD partitioner (jax 0.10) computed wrong outputs (7% off, silently) for replicated
  inputs against weights FSDP-split on their input channels next to a 'data' axis. Training steps shard their
  batch over ('data', 'fsdp') and are not affected."""
  from jaxdream.distributed.multihost import to_global

  if mesh.shape.get('data', 1) > 1 and mesh.shape.get('fsdp', 1) > 1:
    fsdp_min_size = math.inf
  axes = logical_axes(model)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = var[...]
    key = '/'.join(map(str, path))
    spec = partition_spec(value.shape, axes.get(key), mesh, rules, fsdp_min_size)
    var.set_value(to_global(value, NamedSharding(mesh, spec)))
  return model


def state_shardings(state, trainable_shardings: dict, mesh):
  """Shardings of the training state: every leaf under a parameter's path key shaped like the parameter
  (the parameter, its optimizer moments, its EMA) follows that parameter; everything else (step, rng,
  counts, adafactor's factored moments: one value per row or column) replicates."""
  replicated = NamedSharding(mesh, P())
  shapes = {k: v.shape for k, v in state['trainable'].items()}

  def follow(path, leaf):
    for k in reversed(path):
      if isinstance(k, jax.tree_util.DictKey) and k.key in trainable_shardings:
        return trainable_shardings[k.key] if leaf.shape == shapes[k.key] else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(follow, state)


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def split_batch(mesh) -> tuple[NamedSharding, int]:
  """The sharding that splits a batch's first dimension over whichever of BATCH_AXES the mesh has (any mesh,
  not only make_mesh's), and into how many pieces: a batch must be a multiple of that."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  n = math.prod(mesh.shape[a] for a in axes)
  return NamedSharding(mesh, P(axes if axes else None)), n


def process_rows(sharding, total: int) -> slice:
  """The rows of a `total`-row global batch that this process's devices hold: what it reads and feeds
  (jax.make_mesh orders devices host by host, so they are one contiguous range)."""
  index = sharding.addressable_devices_indices_map((total,)).values()
  starts = [i[0].start or 0 for i in index]
  stops = [total if i[0].stop is None else i[0].stop for i in index]
  rows = slice(min(starts), max(stops))
  if sum(b - a for a, b in set(zip(starts, stops))) != rows.stop - rows.start:
    raise ValueError(f"this process's batch rows are not contiguous under {sharding}")
  return rows


def per_device_bytes(tree) -> int:
  """Bytes of `tree`'s arrays held by the first device (what FSDP should divide)."""
  device = jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total
