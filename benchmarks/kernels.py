"""The kernels a CPU comparison comes down to, XLA (jax) against torch, side by side in one process: the
matrix products, convolutions and matrix-vector products that dominate jaxdream's CPU benchmarks, each
timed on the same shapes and threads. It prints each kernel's throughput on both sides and the ratio
(torch time / jax time), which bounds what any model built from that kernel can reach against torch.

  python benchmarks/kernels.py --threads 2 --repeats 7

Rows (float32 unless marked):
  vit_mlp     6304x384 @ 384x1536: DINO ViT-S/16's MLP at batch 32 (the scoring benchmark's main cost)
  clip_mlp    1600x768 @ 768x3072: CLIP ViT-B/32's MLP at batch 32
  conv320     3x3 conv, 320 -> 320 channels, 2x64x64: SD 1.5's top level at 512 px
  conv1280    3x3 conv, 1280 -> 1280 channels, 2x32x32: SDXL's lowest level at 1024 px (16x16 at 512)
  conv320_grad  conv320's forward and both gradients (jax.vjp; torch autograd), as a training step runs it
  conv320_grad_256  the same at 2x32x32: SD 1.5's top level in the 256 px training benchmark
  gemv_f32    4x2048 @ 2048x11008: one decode step's MLP product for Qwen2.5-VL-3B at batch 4 (memory bound:
              GB/s of weights read)
  gemv_bf16   the same in bfloat16 weights (float32 accumulation)
  mm_bf16     the vit_mlp shape in bfloat16 (float32 accumulation)
  mm4096      4096x4096 @ 4096x4096: the machine's float32 ceiling (a model of matmuls runs below this rate)
  vit_fc2     6304x1536 @ 1536x384: DINO's second MLP product
  gemv1_f32   1x2048 @ 2048x11008: batch-1 decoding's product, float32
  gemv2_bf16  2x2048 @ 2048x11008 in bfloat16 (a lone bfloat16 row is padded to two: nn.layers.matmul)
  gemv2_bf16_oi  the same with the weights stored (out, in), as torch's Linear stores them (both sides)
jax runs each kernel jitted on its default CPU backend, torch with torch.set_num_threads(--threads); both
sides are pinned to the same --threads cores, timed alternately (jax, torch, jax, ...), medians reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import _report

GEMV = (4, 2048, 11008)
KERNELS = {
  'vit_mlp': ('mm', (6304, 384, 1536), 'float32'),
  'clip_mlp': ('mm', (1600, 768, 3072), 'float32'),
  'conv320': ('conv', (2, 64, 64, 320, 320), 'float32'),
  'conv1280': ('conv', (2, 32, 32, 1280, 1280), 'float32'),
  'conv320_grad': ('conv_grad', (2, 64, 64, 320, 320), 'float32'),
  'conv320_grad_256': ('conv_grad', (2, 32, 32, 320, 320), 'float32'),
  'gemv_f32': ('mm', GEMV, 'float32'),
  'gemv_bf16': ('mm', GEMV, 'bfloat16'),
  'mm_bf16': ('mm', (6304, 384, 1536), 'bfloat16'),
  'mm4096': ('mm', (4096, 4096, 4096), 'float32'),
  'vit_fc2': ('mm', (6304, 1536, 384), 'float32'),
  'gemv1_f32': ('mm', (1, 2048, 11008), 'float32'),
  'gemv2_bf16': ('mm', (2, 2048, 11008), 'bfloat16'),
  'gemv2_bf16_oi': ('mm_oi', (2, 2048, 11008), 'bfloat16'),
}


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--kernels', nargs='+', choices=list(KERNELS), default=list(KERNELS))
  p.add_argument('--threads', type=int, default=2, help='CPU cores for each side (0: all)')
  p.add_argument('--repeats', type=int, default=7, help='timed calls per side (median)')
  p.add_argument('--json', help='write the per-repeat times of each side to this file (benchmarks/_report.py)')
  return p.parse_args()


def _work(kind, shape, dtype):
  """(FLOPs, bytes of the second operand) of one call."""
  import numpy as np

  size = 2 if dtype == 'bfloat16' else 4
  if kind in ('mm', 'mm_oi'):
    m, k, n = shape
    return 2 * m * k * n, k * n * size
  b, h, w, ci, co = shape
  passes = 3 if kind == 'conv_grad' else 1  # forward, input gradient, kernel gradient
  return passes * 2 * b * h * w * ci * co * 9, int(np.prod((3, 3, ci, co))) * size


def _sides(kind, shape, dtype):
  """(jax call, torch call), each returning a finished result, on the same random operands."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  rng = np.random.default_rng(0)
  jdt, tdt = {'float32': (jnp.float32, torch.float32), 'bfloat16': (jnp.bfloat16, torch.bfloat16)}[dtype]
  if kind == 'mm':
    m, k, n = shape
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    ja, jb = jnp.asarray(a, jdt), jnp.asarray(b, jdt)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    ta, tb = torch.from_numpy(a).to(tdt), torch.from_numpy(b).to(tdt)
    return (lambda: f(ja, jb).block_until_ready()), (lambda: ta @ tb)
  if kind == 'mm_oi':  # x @ w.T with w (out, in): torch's Linear layout
    m, k, n = shape
    a, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
    ja, jw = jnp.asarray(a, jdt), jnp.asarray(w, jdt)
    dims = (((1,), (1,)), ((), ()))
    f = jax.jit(lambda a, w: jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32))
    ta, tw = torch.from_numpy(a).to(tdt), torch.from_numpy(w).to(tdt)
    return (lambda: f(ja, jw).block_until_ready()), (lambda: torch.nn.functional.linear(ta, tw))
  bsz, h, w, ci, co = shape
  x, k = rng.standard_normal((bsz, h, w, ci), np.float32), rng.standard_normal((3, 3, ci, co), np.float32)
  jx, jk = jnp.asarray(x, jdt), jnp.asarray(k, jdt)
  f = jax.jit(
    lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  )
  # torch's fastest CPU layout for this: channels-last activations (oneDNN), as diffusers on CPU can use.
  tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).to(tdt)
  tk = torch.from_numpy(k).permute(3, 2, 0, 1).contiguous().to(tdt)
  if kind == 'conv_grad':  # both gradients against a fixed output gradient
    g = rng.standard_normal((bsz, h, w, co), np.float32)
    jg = jnp.asarray(g, jdt)
    grads = jax.jit(lambda x, k, g: jax.vjp(f, x, k)[1](g))
    tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).to(tdt)
    tx.requires_grad_(), tk.requires_grad_()

    def torch_grads():
      return torch.autograd.grad(torch.nn.functional.conv2d(tx, tk, padding=1), (tx, tk), tg)

    return (lambda: jax.block_until_ready(grads(jx, jk, jg))), torch_grads
  return (lambda: f(jx, jk).block_until_ready()), (lambda: torch.nn.functional.conv2d(tx, tk, padding=1))


def main():
  args = _parse()
  _report.pin_cpu(args.threads)
  rows = []
  for name in args.kernels:
    kind, shape, dtype = KERNELS[name]
    run_jax, run_torch = _sides(kind, shape, dtype)
    run_jax(), run_torch()  # warm-up: jax compiles, torch picks its kernels
    jt, tt = [], []
    for _ in range(args.repeats):  # alternate, so that a change of load hits both sides alike
      for fn, out in ((run_jax, jt), (run_torch, tt)):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    j, t = statistics.median(jt), statistics.median(tt)
    flops, weight_bytes = _work(kind, shape, dtype)
    rate = (
      (lambda s: f'{weight_bytes / s / 1e9:.1f} GB/s of weights')
      if name.startswith('gemv')
      else (lambda s: f'{flops / s / 1e9:.0f} GFLOP/s')
    )
    print(
      f'{name:10s} {dtype:8s} {str(shape):28s} jax {j * 1e3:8.2f} ms ({rate(j)}), '
      f'torch {t * 1e3:8.2f} ms ({rate(t)}); ratio {t / j:.2f}x',
      flush=True,
    )
    rows.append(
      _report.row(
        f'kernel {name} ({dtype}, {shape})',
        [_report.side('jaxdream', jt, label='jax/XLA'), _report.side('torch', tt)],
      )
    )
  print(f'load average after: {os.getloadavg()[0]:.1f}')
  _report.write_json(args.json, rows)


if __name__ == '__main__':
  sys.exit(main())
