"""Device meshes over the axes ('data', 'fsdp', 'tensor').

jaxdream uses Auto axes: parameters and batches get shardings (jax.jit in/out shardings, device_put) and
XLA's partitioner propagates them through the model. `jax.make_mesh` now defaults to Explicit axes, where
every op whose output sharding is ambiguous (an embedding gather, say) must be annotated by hand; with
Auto axes the model code stays free of sharding details, which live in the config's rules instead.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ('data', 'fsdp', 'tensor')


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; one size may be -1 for "the rest of the devices"."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh sizes {dict(zip(AXES, sizes))}: at most one may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise ValueError(f'mesh sizes {dict(zip(AXES, sizes))} do not divide {len(devices)} devices')
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(
      f'mesh sizes {dict(zip(AXES, sizes))} use {int(np.prod(sizes))} of '
      f'{len(devices)} devices; use -1 for one axis to take the rest'
    )
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def as_auto(mesh: Mesh) -> Mesh:
  """The same devices and axis names with Auto axes (see the module docstring)."""
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
