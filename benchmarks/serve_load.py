"""Load test of `jaxdream serve` on loopback: N concurrent clients x M txt2img requests, then the same requests
one at a time; prints p50/p95 latency, images/s, errors and the server's resident memory before and after.

  python benchmarks/serve_load.py --clients 8 --requests 4            # starts a server with builtin:tiny
  python benchmarks/serve_load.py --url http://127.0.0.1:7860 ...     # or loads one already running

Bounded: at most 64 clients x 100 requests, and no new request after --time-limit seconds (the rest are counted
as not sent). Requests use the warm-up's size, steps and sampler, so nothing is compiled while measuring.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _rss_mib(url: str) -> float | None:
  text = httpx.get(f'{url}/metrics', timeout=30).text
  m = re.search(r'^process_resident_memory_bytes (\S+)$', text, re.M)
  return float(m.group(1)) / 2**20 if m else None


def _start_server(args) -> tuple[subprocess.Popen, str]:
  port = _free_port()
  cmd = [sys.executable, '-m', 'jaxdream.cli', 'serve', '--model', args.model, '--port', str(port)]
  cmd += ['--max-batch', str(args.max_batch), '--queue-size', str(max(64, args.clients * 2))]
  cmd += ['--warmup-steps', str(args.steps)]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  url = f'http://127.0.0.1:{port}'
  deadline = time.monotonic() + args.start_timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise SystemExit(f'the server exited with status {proc.returncode}:\n{proc.stderr.read()}')
    try:
      if httpx.get(f'{url}/sdapi/v1/sd-models', timeout=5).status_code == 200:
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain its log lines
        return proc, url
    except httpx.TransportError:
      time.sleep(0.5)
  proc.kill()
  raise SystemExit(f'the server did not answer within {args.start_timeout} s')


def _body(args, i: int) -> dict:
  return dict(prompt=f'a photo of subject {i}', seed=i, steps=args.steps, sampler_name='Euler', cfg_scale=7.0)


def _run(args, url: str, clients: int, per_client: int, deadline: float) -> dict:
  latencies, errors, lost = [], [], [0]
  lock = threading.Lock()

  def client(c: int):
    with httpx.Client(timeout=args.request_timeout) as http:
      for j in range(per_client):
        if time.monotonic() > deadline:
          with lock:
            lost[0] += per_client - j
          return
        t0 = time.monotonic()
        try:
          r = http.post(f'{url}/sdapi/v1/txt2img', json=_body(args, c * per_client + j))
          ok = r.status_code == 200 and len(r.json()['images']) == 1
          reason = None if ok else f'HTTP {r.status_code}'
        except httpx.HTTPError as e:
          ok, reason = False, type(e).__name__
        with lock:
          (latencies.append(time.monotonic() - t0) if ok else errors.append(reason))

  t0 = time.monotonic()
  threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.monotonic() - t0
  q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19 or [float('nan')] * 19
  return dict(
    ok=len(latencies), errors=errors, not_sent=lost[0], wall=wall, p50=q[9], p95=q[18], ips=len(latencies) / wall
  )


def _print(name: str, r: dict):
  errs = f'{len(r["errors"])} ({", ".join(sorted(set(r["errors"])))})' if r['errors'] else '0'
  print(
    f'{name:>14}: {r["ok"]} ok, errors {errs}, not sent {r["not_sent"]}, {r["wall"]:.1f} s, '
    f'{r["ips"]:.2f} images/s, latency p50 {r["p50"]:.2f} s, p95 {r["p95"]:.2f} s'
  )


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--url', help='a running server (default: start one with --model)')
  p.add_argument('--model', default='builtin:tiny')
  p.add_argument('--clients', type=int, default=8)
  p.add_argument('--requests', type=int, default=4, help='requests per client')
  p.add_argument('--steps', type=int, default=4)
  p.add_argument('--max-batch', type=int, default=8)
  p.add_argument('--time-limit', type=float, default=300, help='seconds per phase before no new request is sent')
  p.add_argument('--request-timeout', type=float, default=300)
  p.add_argument('--start-timeout', type=float, default=300)
  p.add_argument('--skip-sequential', action='store_true')
  args = p.parse_args(argv)
  if not (1 <= args.clients <= 64 and 1 <= args.requests <= 100):
    raise SystemExit('--clients must be in [1, 64] and --requests in [1, 100]')
  proc = None
  if args.url:
    url = args.url.rstrip('/')
  else:
    t0 = time.monotonic()
    proc, url = _start_server(args)
    print(f'server: {args.model} at {url}, loaded and compiled in {time.monotonic() - t0:.1f} s')
  try:
    httpx.post(f'{url}/sdapi/v1/txt2img', json=_body(args, 10**6), timeout=args.request_timeout).raise_for_status()
    rss0 = _rss_mib(url)
    n = args.clients * args.requests
    print(f'{args.clients} clients x {args.requests} requests ({n} images, {args.steps} steps), cpus: {os.cpu_count()}')
    conc = _run(args, url, args.clients, args.requests, time.monotonic() + args.time_limit)
    _print('concurrent', conc)
    rss1 = _rss_mib(url)
    if not args.skip_sequential:
      seq = _run(args, url, 1, n, time.monotonic() + args.time_limit)
      _print('one at a time', seq)
      print(f'{"speed-up":>14}: {conc["ips"] / seq["ips"]:.2f}x images/s')
    rss2 = _rss_mib(url)
    if rss0 is not None:
      print(
        f'{"server RSS":>14}: {rss0:.0f} MiB before, {rss1:.0f} MiB after the concurrent phase, {rss2:.0f} MiB at '
        f'the end ({100 * (rss2 / rss0 - 1):+.1f}%)'
      )
    return 0 if not conc['errors'] else 1
  finally:
    if proc is not None:
      proc.send_signal(signal.SIGTERM)
      try:
        print(f'server exit status after SIGTERM: {proc.wait(60)}')
      except subprocess.TimeoutExpired:
        proc.kill()


if __name__ == '__main__':
  sys.exit(main())
