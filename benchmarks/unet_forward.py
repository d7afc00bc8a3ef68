"""One UNet forward in jaxdream and in diffusers/torch, side by side; prints the ratio.

CPU (the reference measurement):
  python benchmarks/unet_forward.py --preset sd15 --batch 2 --size 64 --threads 2
  python benchmarks/unet_forward.py --preset sdxl --batch 1 --size 64 --threads 2 --repeats 2   # SDXL at 512 px
GPU (jaxdream bf16 vs torch fp16 SDPA):
  python benchmarks/unet_forward.py --preset sd15 --batch 8 --size 64 --device gpu

Both sides get the same random weights and the same inputs, and the outputs are compared. sd15, sd21 and tiny run
both sides in this process (torch's init, copied into jaxdream through a safetensors folder). sdxl (the published
SDXL base UNet, 2.57B parameters) and sdxl-tiny (its block structure, small widths) run each side in its own
process, one after the other, on a random-weight folder written once under --cache-dir (benchmarks/_sdxl.py); their
UNet also takes the pooled text embedding and the 6 time ids (the image size, no crop).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _report
import _sdxl


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=['sd15', 'sd21', 'tiny', *_sdxl.PRESETS], default='sd15')
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--size', type=int, default=64, help='latent height and width')
  p.add_argument('--threads', type=int, default=2, help='CPU threads for each side')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
  p.add_argument('--attention', default='auto', help='jaxdream attention implementation')
  p.add_argument('--skip-torch', action='store_true')
  p.add_argument('--cache-dir', default=_sdxl.CACHE, help='sdxl presets: where the random-weight folder is kept')
  p.add_argument('--json', help='write the per-repeat times of each side to this file (benchmarks/_report.py)')
  p.add_argument('--side', choices=['jaxdream', 'torch'], help=argparse.SUPPRESS)  # a child process (sdxl presets)
  p.add_argument('--folder', help=argparse.SUPPRESS)  # the child's UNet folder
  p.add_argument('--output', help=argparse.SUPPRESS)  # where the child saves its output (.npy, NHWC float32)
  return p.parse_args()


def _inputs(args, config):
  """Latents, timesteps and context; SDXL's pooled embedding and time ids (None without added conditioning)."""
  import numpy as np

  b, s = args.batch, args.size
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, 4, s, s), np.float32)
  t = np.array([999 - 37 * i for i in range(b)], np.int64)
  c = rng.standard_normal((b, 77, config['cross_attention_dim']), np.float32)
  if config.get('addition_embed_type') != 'text_time':
    return x, t, c, None
  pooled_dim = config['projection_class_embeddings_input_dim'] - 6 * config['addition_time_embed_dim']
  pooled = rng.standard_normal((b, pooled_dim), np.float32)
  time_ids = np.array([[8 * s, 8 * s, 0, 0, 8 * s, 8 * s]] * b, np.float32)  # original size, crop, target size
  return x, t, c, (pooled, time_ids)


def _time_jax(model, args, inputs):
  """(timing, compile seconds, output NHWC): the forward jitted with the parameters as arguments."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  x, t, c, added = inputs
  graphdef, params = nnx.split(model)
  fwd = jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))
  jargs = [jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(c), *map(jnp.asarray, added or ())]
  t0 = time.perf_counter()
  compiled = fwd.lower(params, *jargs).compile()
  compile_s = time.perf_counter() - t0
  timing = _report.timed(lambda: compiled(params, *jargs).block_until_ready(), args.repeats)  # warm-up runs once
  return timing, compile_s, timing.out


def _time_torch(tmodel, args, inputs):
  """(timing, output NHWC float32), the model already on its device and dtype."""
  import torch

  gpu = args.device == 'gpu'
  device, dtype = next(tmodel.parameters()).device, next(tmodel.parameters()).dtype
  x, t, c, added = inputs
  tx, tt, tc = (torch.from_numpy(a).to(device) for a in (x, t, c))
  tx, tc = tx.to(dtype), tc.to(dtype)
  kw = {}
  if added:
    kw['added_cond_kwargs'] = {
      k: torch.from_numpy(a).to(device, dtype) for k, a in zip(('text_embeds', 'time_ids'), added)
    }

  def run():
    with torch.inference_mode():
      out = tmodel(tx, tt, tc, **kw).sample
      if gpu:
        torch.cuda.synchronize()
    return out

  timing = _report.timed(run, args.repeats)
  return timing, timing.out.float().cpu().numpy().transpose(0, 2, 3, 1)


def _dtypes(args):
  """(jax dtype, torch dtype) names: bf16 / fp16 on GPU, float32 on CPU."""
  return ('bfloat16', 'float16') if args.device == 'gpu' else ('float32', 'float32')


def _rel(ours, ref) -> float:
  import numpy as np

  ref = np.asarray(ref, np.float32)
  return float(np.linalg.norm(np.asarray(ours, np.float32) - ref) / np.linalg.norm(ref))


def _report_jax(args, timing, compile_s, backend):
  jax_dtype = _dtypes(args)[0]
  b, s = args.batch, args.size
  print(
    f'jaxdream  {args.preset} batch {b} {s}x{s} {jax_dtype}: {timing.median:.3f} s/forward '
    f'(compile {compile_s:.1f} s, backend {backend}, attention {args.attention})',
    flush=True,
  )
  return _report.timing_side('jaxdream', timing, f'jaxdream {jax_dtype}')


def _report_torch(args, timing, version, ours, ref, jax_s):
  torch_dtype = _dtypes(args)[1]
  rel = _rel(ours, ref)
  print(
    f'diffusers {args.preset} batch {args.batch} {args.size}x{args.size} {torch_dtype}: {timing.median:.3f} '
    f's/forward (torch {version}, {args.threads} threads)'
  )
  print(
    f'speed ratio (torch time / jaxdream time): {timing.median / jax_s:.2f}x   output relative difference: {rel:.2e}'
  )
  return _report.timing_side('torch', timing, f'diffusers {torch_dtype}'), rel


def _name(args):
  return f'UNet forward, {args.preset}, batch {args.batch}, {args.size}x{args.size} latents'


def main():
  args = _parse()
  if args.device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
  if args.side:
    return _side(args)
  if args.preset in _sdxl.PRESETS:
    return _per_side(args)
  import jax
  import jax.numpy as jnp
  import torch
  from diffusers import UNet2DConditionModel as TorchUNet

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
  jax_dtype, torch_dtype = _dtypes(args)
  torch.manual_seed(0)
  tmodel = TorchUNet(**config).eval()
  with tempfile.TemporaryDirectory() as d:
    tmodel.save_pretrained(d)
    model = load_unet(d, dtype=getattr(jnp, jax_dtype), attention_impl=args.attention)
  tmodel = tmodel.to('cuda' if args.device == 'gpu' else 'cpu', getattr(torch, torch_dtype))
  inputs = _inputs(args, config)
  jax_t, compile_s, jax_out = _time_jax(model, args, inputs)
  sides = [_report_jax(args, jax_t, compile_s, jax.default_backend())]
  if args.skip_torch:
    _report.write_json(args.json, [_report.row(_name(args), sides, item='forward', compile_s=compile_s)])
    return
  torch_t, ref = _time_torch(tmodel, args, inputs)
  side, rel = _report_torch(args, torch_t, torch.__version__, jax_out, ref, jax_t.median)
  sides.append(side)
  _report.write_json(args.json, [_report.row(_name(args), sides, item='forward', compile_s=compile_s, rel_diff=rel)])


def _per_side(args):
  """sdxl presets: each side in its own child process on the preset's random-weight folder."""
  import numpy as np

  folder = os.path.join(_sdxl.model_folder(args.cache_dir, args.preset), 'unet')
  child = [os.path.abspath(__file__), '--preset', args.preset, '--folder', folder, '--device', args.device]
  child += ['--batch', str(args.batch), '--size', str(args.size), '--threads', str(args.threads)]
  child += ['--repeats', str(args.repeats), '--attention', args.attention]
  with tempfile.TemporaryDirectory(prefix='jaxdream-unet-') as tmp:
    out = {side: os.path.join(tmp, f'{side}.npy') for side in ('jaxdream', 'torch')}
    r = _sdxl.run_side(child + ['--side', 'jaxdream', '--output', out['jaxdream']])
    jax_t = _report.Timing(r['times'], r['cpu'], r['first'])
    sides = [_report_jax(args, jax_t, r['compile_s'], r['backend'])]
    notes = dict(compile_s=r['compile_s'], load_s=r['load_s'])
    if not args.skip_torch:
      r = _sdxl.run_side(child + ['--side', 'torch', '--output', out['torch']])
      torch_t = _report.Timing(r['times'], r['cpu'], r['first'])
      side, notes['rel_diff'] = _report_torch(
        args, torch_t, r['version'], np.load(out['jaxdream']), np.load(out['torch']), jax_t.median
      )
      sides.append(side)
  _report.write_json(
    args.json, [_report.row(_name(args), sides, item='forward', **notes)], threads={'per_side': args.threads}
  )


def _side(args):
  """A child process: load the UNet folder, time one side, save its output and print its RESULT line."""
  import json

  import numpy as np

  _sdxl.pin_threads(args.threads)
  with open(os.path.join(args.folder, 'config.json')) as f:
    inputs = _inputs(args, json.load(f))
  jax_dtype, torch_dtype = _dtypes(args)
  t0 = time.perf_counter()
  if args.side == 'jaxdream':
    import jax
    import jax.numpy as jnp

    from jaxdream.models import load_unet

    model = load_unet(args.folder, dtype=getattr(jnp, jax_dtype), attention_impl=args.attention)
    load_s = time.perf_counter() - t0
    timing, compile_s, out = _time_jax(model, args, inputs)
    extra = dict(compile_s=compile_s, backend=jax.default_backend())
  else:
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.set_num_threads(args.threads)
    device = 'cuda' if args.device == 'gpu' else 'cpu'
    tmodel = TorchUNet.from_pretrained(args.folder, torch_dtype=getattr(torch, torch_dtype)).to(device).eval()
    load_s = time.perf_counter() - t0
    timing, out = _time_torch(tmodel, args, inputs)
    extra = dict(version=torch.__version__)
  np.save(args.output, np.asarray(out, np.float32))
  _sdxl.result(times=timing.times, cpu=timing.cpu, first=timing.first, load_s=load_s, **extra)


if __name__ == '__main__':
  sys.exit(main())
