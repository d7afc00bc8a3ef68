"""One UNet forward in jaxdream and in diffusers/torch, side by side in one run; prints the ratio.

CPU (the reference measurement):
  python benchmarks/unet_forward.py --preset sd15 --batch 2 --size 64 --threads 2
GPU (jaxdream bf16 vs torch fp16 SDPA):
  python benchmarks/unet_forward.py --preset sd15 --batch 8 --size 64 --device gpu

Both sides get the same random weights (torch's init, copied into jaxdream through a safetensors
folder, which also checks that the outputs agree) and the same inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _report


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=['sd15', 'sd21', 'tiny'], default='sd15')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--size', type=int, default=64, help='latent height and width')
  p.add_argument('--threads', type=int, default=2, help='CPU threads for each side')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
  p.add_argument('--attention', default='auto', help='jaxdream attention implementation')
  p.add_argument('--skip-torch', action='store_true')
  p.add_argument('--json', help='write the per-repeat times of each side to this file (benchmarks/_report.py)')
  return p.parse_args()


def main():
  args = _parse()
  if args.device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet
  from flax import nnx

  from jaxdream.models import load_unet, presets

  torch.set_num_threads(args.threads)
  config = dict({'sd15': presets.SD15_UNET, 'sd21': presets.SD21_UNET}.get(args.preset, {}))
  if args.preset == 'tiny':
    config = dict(
      presets.SD15_UNET,
      block_out_channels=[32, 64, 64, 64],
      cross_attention_dim=32,
      attention_head_dim=4,
      norm_num_groups=8,
      layers_per_block=1,
    )
  config = {k: v for k, v in config.items() if not k.startswith('_')}
  gpu = args.device == 'gpu'
  torch_device = 'cuda' if gpu else 'cpu'
  torch_dtype = torch.float16 if gpu else torch.float32
  jax_dtype = jnp.bfloat16 if gpu else jnp.float32

  torch.manual_seed(0)
  tmodel = TorchUNet(**config).eval()
  with tempfile.TemporaryDirectory() as d:
    tmodel.save_pretrained(d)
    model = load_unet(d, dtype=jax_dtype, attention_impl=args.attention)
  tmodel = tmodel.to(torch_device, torch_dtype)

  b, s, ctx_dim = args.batch, args.size, config['cross_attention_dim']
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, 4, s, s), np.float32)
  t = np.array([999 - 37 * i for i in range(b)], np.int64)
  c = rng.standard_normal((b, 77, ctx_dim), np.float32)

  graphdef, params = nnx.split(model)
  fwd = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c))
  jx, jt, jc = jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(c)
  t0 = time.perf_counter()
  compiled = fwd.lower(params, jx, jt, jc).compile()
  compile_s = time.perf_counter() - t0
  jax_out = None

  def run_jax():
    nonlocal jax_out
    jax_out = compiled(params, jx, jt, jc).block_until_ready()

  jax_t = _report.timed(run_jax, args.repeats)  # the warm-up call runs the compiled program once
  jax_s = jax_t.median
  name = f'UNet forward, {args.preset}, batch {b}, {s}x{s} latents'
  sides = [_report.timing_side('jaxdream', jax_t, f'jaxdream {jnp.dtype(jax_dtype).name}')]
  print(
    f'jaxdream  {args.preset} batch {b} {s}x{s} {jnp.dtype(jax_dtype).name}: {jax_s:.3f} s/forward '
    f'(compile {compile_s:.1f} s, backend {jax.default_backend()}, attention {args.attention})',
    flush=True,
  )
  if args.skip_torch:
    _report.write_json(args.json, [_report.row(name, sides, item='forward', compile_s=compile_s)])
    return
  tx, tt, tc = (torch.from_numpy(a).to(torch_device) for a in (x, t, c))
  tx, tc = tx.to(torch_dtype), tc.to(torch_dtype)
  torch_out = None

  def run_torch():
    nonlocal torch_out
    with torch.inference_mode():
      torch_out = tmodel(tx, tt, tc).sample
      if gpu:
        torch.cuda.synchronize()

  torch_t = _report.timed(run_torch, args.repeats)
  torch_s = torch_t.median
  ref = torch_out.float().cpu().numpy().transpose(0, 2, 3, 1)
  rel = float(np.linalg.norm(np.asarray(jax_out, np.float32) - ref) / np.linalg.norm(ref))
  print(
    f'diffusers {args.preset} batch {b} {s}x{s} {str(torch_dtype)[6:]}: {torch_s:.3f} s/forward '
    f'(torch {torch.__version__}, {args.threads} threads)'
  )
  print(f'speed ratio (torch time / jaxdream time): {torch_s / jax_s:.2f}x   output relative difference: {rel:.2e}')
  sides.append(_report.timing_side('torch', torch_t, f'diffusers {str(torch_dtype)[6:]}'))
  _report.write_json(args.json, [_report.row(name, sides, item='forward', compile_s=compile_s, rel_diff=rel)])


if __name__ == '__main__':
  sys.exit(main())
