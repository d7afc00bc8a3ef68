"""The benchmarks' one machine-readable way to report, shared by the scripts: `timed` times calls, `side` and
`row` describe what was measured, and `write_json` (each script's --json PATH) writes the raw per-repeat
values of every side with their unit, for benchmarks/run_all.py to aggregate. Printed output stays each
script's own.

A row compares two sides (or reports one): the first is jaxdream, the second its peer (PyTorch, or another
way of running jaxdream), and both hold one value per repeat in the row's unit ('s' per timed call, or
'GiB'). `per_call` and `item` say how much work one call is (e.g. 32 images), so that a table can show
images/s or s/image.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import socket
import statistics
import sys
import time

PACKAGES = ('jax', 'jaxlib', 'flax', 'torch', 'diffusers', 'transformers')


def pin_cpu(threads: int):
  """Both sides of a one-process CPU comparison on the same `threads` cores (0: all), set before jax and torch
  start their thread pools; prints the load average that the result should be read with."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if threads:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
  import torch

  if threads:
    torch.set_num_threads(threads)
  print(f'load average before: {os.getloadavg()[0]:.1f}', flush=True)


def peak_rss() -> int:
  """The kernel's high-water mark of this process's resident set, bytes (exact, unlike sampling)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return r if sys.platform == 'darwin' else r * 1024


def rss() -> int:
  """This process's resident set now, bytes."""
  try:
    import psutil

    return psutil.Process().memory_info().rss
  except ImportError:
    return peak_rss()


def reset_peak() -> bool:
  """Return freed heap to the OS, then restart the high-water mark from the current RSS (Linux >= 4.0), so
  that it covers live memory of what follows, not what loading or compiling left in malloc's free lists."""
  import gc

  gc.collect()  # objects in reference cycles (a replaced model's layers) are freed first
  try:
    import ctypes

    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


@dataclasses.dataclass
class Timing:
  """Wall and CPU seconds of each timed call, the warm-up call's wall seconds (jax compiles there; None
  without a warm-up) and the last call's result."""

  times: list[float]
  cpu: list[float]
  first: float | None = None
  out: object = None

  @property
  def median(self) -> float:
    return statistics.median(self.times)

  @property
  def cpu_median(self) -> float:
    return statistics.median(self.cpu)


def timed(fn, repeats: int, *, warmup: bool = True) -> Timing:
  """Call `fn` once untimed as a warm-up (unless warmup=False), then `repeats` timed calls. CPU time is this
  process's: on a shared machine it says how much work a call was, whatever share of the cores it got."""
  first = out = None
  if warmup:
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
  times, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return Timing(times, cpu, first, out)


def side(name: str, values, *, cpu=None, first=None, label: str | None = None) -> dict:
  """One side of a row: `values` one per repeat, in the row's unit; `cpu` CPU seconds per repeat."""
  out = {'name': name, 'label': label or name, 'values': [float(v) for v in values]}
  if cpu is not None:
    out['cpu'] = [float(c) for c in cpu]
  if first is not None:
    out['first'] = float(first)
  return out


def timing_side(name: str, timing: Timing, label: str | None = None) -> dict:
  return side(name, timing.times, cpu=timing.cpu, first=timing.first, label=label)


def row(name: str, sides: list[dict], *, unit: str = 's', per_call: float = 1, item: str = 'call', **notes) -> dict:
  """One measured piece of work: jaxdream's side first, then its peer's (if any)."""
  if not 1 <= len(sides) <= 2:
    raise ValueError(f'{name}: a row has one or two sides, got {len(sides)}')
  return {'name': name, 'unit': unit, 'per_call': per_call, 'item': item, 'sides': sides, 'notes': notes}


def versions() -> dict:
  """Versions of python and of the packages a comparison depends on (None: not installed), read from the
  installed metadata, so nothing is imported."""
  out = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def environment(threads: dict | None = None, device: dict | None = None) -> dict:
  """Where the numbers were measured: versions, host, CPU, the cores this process may use, the device jax
  runs on (default: jax's first device, when this process imported jax) and the thread counts of each side (default: torch's, when
  imported, and the cores jax may use)."""
  jax, torch = sys.modules.get('jax'), sys.modules.get('torch')
  if device is None and jax is not None:
    d = jax.devices()[0]
    device = {'platform': d.platform, 'kind': d.device_kind, 'count': jax.device_count()}
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  if threads is None:
    threads = {'jaxdream_cores': cores}
    if torch is not None:
      threads['torch'] = torch.get_num_threads()
  return {
    'versions': versions(),
    'host': socket.gethostname(),
    'cpu': cpu_model(),
    'cpu_count': os.cpu_count(),
    'cores': cores,
    'device': device,
    'threads': threads,
  }


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def write_json(path: str | None, rows: list[dict], *, threads: dict | None = None, device: dict | None = None) -> None:
  """The script's --json PATH: its command line, rows and environment (nothing when path is None)."""
  if not path:
    return
  report = {
    'script': os.path.basename(sys.argv[0]),
    'argv': sys.argv[1:],
    'rows': rows,
    'environment': environment(threads, device),
  }
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(tmp, path)
