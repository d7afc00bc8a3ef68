"""Options for XLA's compiler, chosen per backend.

XLA:CPU schedules a program's instructions for concurrency by default, which keeps many large temporaries
alive at once: a training step's activations and recomputed blocks overlap, and remat saves nothing. Its
memory-optimized scheduler orders the same instructions to keep the fewest bytes alive. Measured on
jaxdream's DreamBooth step (docs/performance.md): SD 1.5 at 256 px, float32, one device, temporaries
9.34 -> 5.79 GiB; the tiny model's step got faster, not slower. Other backends schedule for memory
already (TPU, GPU), so the option is CPU-only.
"""

from __future__ import annotations

import functools

import jax

_CPU_MEMORY_SCHEDULER = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


@functools.cache
def _accepted(backend: str, options: tuple) -> bool:
  """Whether this jaxlib's compiler knows `options` (an XLA without the flag fails the compile)."""
  try:
    jax.jit(lambda x: x + 1, backend=backend, compiler_options=dict(options)).lower(1.0).compile()
  except Exception:  # noqa: BLE001 - any refusal means: compile without the options
    return False
  return True


def low_memory_options(backend: str | None = None) -> dict:
  """`jax.jit(..., compiler_options=...)` for a program whose peak memory matters more than its
  instruction-level concurrency (training steps): XLA:CPU's memory-optimized scheduler on CPU, nothing
  elsewhere."""
  backend = backend or jax.default_backend()
  if backend != 'cpu' or not _accepted(backend, tuple(_CPU_MEMORY_SCHEDULER.items())):
    return {}
  return dict(_CPU_MEMORY_SCHEDULER)
