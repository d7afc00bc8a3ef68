"""Counters and histograms in Prometheus' text format (written by hand: no client library needed)."""

from __future__ import annotations

import collections
import os
import threading

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _Histogram:
  def __init__(self, buckets):
    self.buckets = tuple(buckets)
    self.counts = [0] * len(self.buckets)
    self.sum, self.count = 0.0, 0

  def observe(self, value: float):
    for i, b in enumerate(self.buckets):
      if value <= b:
        self.counts[i] += 1
    self.sum += value
    self.count += 1

  def lines(self, name: str, labels: str = '') -> list[str]:
    sep = ',' if labels else ''
    out = [f'{name}_bucket{{{labels}{sep}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
    braces = f'{{{labels}}}' if labels else ''
    return out + [f'{name}_sum{braces} {self.sum:.6f}', f'{name}_count{braces} {self.count}']


class Metrics:
  def __init__(self, max_batch: int):
    self._lock = threading.Lock()
    self.requests = collections.Counter()  # (path, status)
    self.errors = collections.Counter()  # kind
    self.latency = _Histogram(LATENCY_BUCKETS)
    self.batch_sizes = _Histogram(range(1, max_batch + 1))
    self.batch_seconds = _Histogram(LATENCY_BUCKETS)
    self.images = 0

  def request(self, path: str, status: int, seconds: float):
    with self._lock:
      self.requests[(path, status)] += 1
      self.latency.observe(seconds)

  def error(self, kind: str):
    with self._lock:
      self.errors[kind] += 1

  def batch(self, size: int, seconds: float, generated: int):
    with self._lock:
      self.batch_sizes.observe(size)
      self.batch_seconds.observe(seconds)
      self.images += generated

  def render(self, queue_depth: int) -> str:
    p = 'jaxdream_serve_'
    with self._lock:
      lines = [
        f'# HELP {p}queue_depth Requests waiting or running.',
        f'# TYPE {p}queue_depth gauge',
        f'{p}queue_depth {queue_depth}',
        f'# HELP {p}images_generated_total Images generated.',
        f'# TYPE {p}images_generated_total counter',
        f'{p}images_generated_total {self.images}',
        f'# HELP {p}requests_total HTTP requests by path and status.',
        f'# TYPE {p}requests_total counter',
        *(f'{p}requests_total{{path="{path}",status="{s}"}} {n}' for (path, s), n in sorted(self.requests.items())),
        f'# HELP {p}errors_total Failed requests by kind.',
        f'# TYPE {p}errors_total counter',
        *(f'{p}errors_total{{kind="{k}"}} {n}' for k, n in sorted(self.errors.items())),
        f'# HELP {p}request_latency_seconds HTTP request latency.',
        f'# TYPE {p}request_latency_seconds histogram',
        *self.latency.lines(f'{p}request_latency_seconds'),
        f'# HELP {p}batch_size Images per sampler call.',
        f'# TYPE {p}batch_size histogram',
        *self.batch_sizes.lines(f'{p}batch_size'),
        '# HELP process_resident_memory_bytes Resident memory of the server process.',
        '# TYPE process_resident_memory_bytes gauge',
        f'process_resident_memory_bytes {_rss_bytes()}',
        f'# HELP {p}batch_seconds Seconds per sampler call.',
        f'# TYPE {p}batch_seconds histogram',
        *self.batch_seconds.lines(f'{p}batch_seconds'),
      ]
    return '\n'.join(lines) + '\n'


def _rss_bytes() -> int:
  """This process's resident memory (Linux /proc; 0 where there is none)."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return 0
