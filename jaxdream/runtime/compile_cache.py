"""One explicit cache of compiled functions per owner (a pipeline, a model, a CLI session).

Module-level caches make two users of one process share and overwrite each other's state; here the owner
holds its cache, and the key names everything that makes two compiled functions differ (model structure,
shapes, static settings). Thread-safe: two threads asking for the same key build it once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any

from flax import nnx


class CompileCache:
  def __init__(self):
    self._fns: dict[Hashable, Any] = {}
    self._lock = threading.Lock()

  def get(self, key: Hashable, build: Callable[[], Any]):
    """The function cached under `key`, built by `build()` on first use."""
    with self._lock:
      if key not in self._fns:
        self._fns[key] = build()
      return self._fns[key]

  def __deepcopy__(self, memo):
    # A copy of its owner (copy.deepcopy of a model) starts empty: locks and compiled functions are not copied.
    return type(self)()

  def values(self) -> list:
    """The cached functions (a snapshot)."""
    with self._lock:
      return list(self._fns.values())

  def clear(self):
    with self._lock:
      self._fns.clear()

  def __len__(self) -> int:
    return len(self._fns)

  def __contains__(self, key) -> bool:
    return key in self._fns


class Structure:
  """A model's graph definition (nnx.split's first result) as part of a cache key. Graph definitions
  compare by value but do not hash (model configs are dicts): this hashes by type and compares the
  whole structure, so a model changed in place (e.g. int8 layers swapped in) gets its own entry."""

  def __init__(self, graphdef):
    self.graphdef = graphdef

  def __hash__(self) -> int:
    return hash(type(self.graphdef))

  def __eq__(self, other) -> bool:
    return isinstance(other, Structure) and self.graphdef == other.graphdef


def compiled(model, fn, **static):
  """`fn(model, *arrays, **static)` jitted, called as `compiled(model, fn, **static)(*arrays)`. The model's
  parameters are an argument of the compiled function, not constants baked into it; the function is cached
  in `model.compile_cache` per `fn`, static settings and graph structure (quantizing a model in place changes
  its structure, so it compiles anew)."""
  import jax

  from jaxdream.runtime.compiler import compiler_options

  # Not runtime.compiler's float32 kernel options: the VLMs' decode loops run here, and XLA:CPU's own kernels
  # made the tiny Qwen2.5-VL's batch-4 decoding 7x slower (docs/performance.md). `decoding`: the loops keep
  # their weight conversions inside (fused into the products, not a copy of every weight).
  options = compiler_options(decoding=True)
  graphdef, state = nnx.split(model)
  key = (fn, tuple(sorted(static.items())), Structure(graphdef))
  jitted = model.compile_cache.get(
    key,
    lambda: jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args, **static), compiler_options=options),
  )
  return lambda *args: jitted(state, *args)
