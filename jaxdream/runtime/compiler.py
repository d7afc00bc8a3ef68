"""Options for XLA's compiler, chosen per backend and compute dtype: `jax.jit(..., compiler_options=
compiler_options(dtype, low_memory=...))`. Only XLA:CPU gets any; TPU and GPU compile with their defaults.

Two XLA:CPU defaults cost some of jaxdream's programs time or memory (docs/performance.md has the
measurements):
- Matmuls and convolutions run as YNNPACK fusions. In float32 XLA's own kernels are faster at jaxdream's
  shapes: the scoring models' matmuls took 1.3-1.4x the CPU time with YNNPACK, SDXL's 1280-channel 3x3
  convolutions 1.8x, a decode step's matrix-vector products 1.5x. In bfloat16
  YNNPACK is 2-3x faster (it has bf16 kernels; XLA's own convert to float32), so bfloat16 programs keep it.
  The gain depends on the shapes, so only the scoring models ask for XLA's kernels (`xla_kernels=True`): the
  tiny model's training step took 1.55x the CPU time with them, and the tiny Qwen2.5-VL's greedy decoding
  at batch 4 7x as long (its 151,936-wide LM head at 4 rows); SDXL's 1280-channel convolutions gained, but the
  SD 1.5 UNet, VAE decoder and training step did not when re-measured.
- Instructions are scheduled for concurrency, which keeps many large temporaries alive at once. The
  memory-optimized scheduler orders the same instructions to keep the fewest bytes alive: SD 1.5's training
  step at 256 px, float32, one device, 9.34 -> 5.79 GiB of temporaries; the tiny model's step got faster,
  not slower. Training steps ask for it (`low_memory=True`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CPU_XLA_KERNELS = {'xla_cpu_experimental_ynn_fusion_type': ''}  # '': no YNNPACK fusion of any kind
_CPU_MEMORY_SCHEDULER = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
# Loop-invariant code motion moves a decoding loop's weight conversions (bfloat16 or int8 -> float32) out of
# the loop: a float32 copy of every weight, made on each call and held through it. Left in the loop, each
# conversion fuses into its matrix-vector product and reads the weight once (nn.layers.matmul).
_CPU_NO_LOOP_HOISTING = {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}


@functools.cache
def _accepted(backend: str, options: tuple) -> bool:
  """Whether this jaxlib's compiler knows `options` (an XLA without these flags fails the compile; they are
  experimental and may go)."""
  try:
    x = jax.device_put(1.0, jax.local_devices(backend=backend)[0])  # jit(backend=) is deprecated
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(x).compile()
  except Exception:  # noqa: BLE001 - any refusal means: compile without them
    return False
  return True


def compiler_options(
  dtype=jnp.float32,
  *,
  xla_kernels: bool = False,
  low_memory: bool = False,
  decoding: bool = False,
  backend: str | None = None,
) -> dict | None:
  """The options for a program computing in `dtype` (its models' compute dtype) on `backend` (default: jax's
  default backend): on CPU, with `xla_kernels`, XLA's own matmul/convolution kernels for a float32 program
  (for programs measured to gain: the scoring models), with `low_memory`, the memory-optimized scheduler, and
  with `decoding` (loops that read the weights at every step), no hoisting of loop invariants; None (the
  defaults) elsewhere."""
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    return None
  options = {}
  if xla_kernels and jnp.dtype(dtype) == jnp.float32:
    options.update(_CPU_XLA_KERNELS)
  if low_memory:
    options.update(_CPU_MEMORY_SCHEDULER)
  if decoding:
    options.update(_CPU_NO_LOOP_HOISTING)
  if not options or not _accepted(backend, tuple(sorted(options.items()))):
    return None
  return options
