"""Whole txt2img runs (text encoder(s), every UNet step with classifier-free guidance, VAE decoding) in
jaxdream and in diffusers/torch, side by side in one run; prints images/s of each and the ratio.

CPU (the reference measurements):
  python benchmarks/sample.py --preset tiny --steps 10 --batch 2 --threads 2
  python benchmarks/sample.py --preset sd15 --steps 2 --batch 1 --threads 2 --repeats 1
  python benchmarks/sample.py --preset sdxl --height 512 --width 512 --steps 2 --batch 1 --threads 2 --repeats 1
GPU (jaxdream bf16 vs torch fp16 with SDPA attention, then torch.compile'd UNet if that works):
  python benchmarks/sample.py --preset sd15 --steps 20 --batch 8 --device gpu

Both sides run the same random weights: the torch pipeline is built from configs, saved with
save_pretrained and loaded by jaxdream from that folder. Both start from the same initial latents with a
deterministic scheduler, so the images should agree too (printed as the largest pixel difference; only
meaningful in float32 on CPU). jaxdream's first call compiles its sampling loop (once per image size,
batch, step count and scheduler); that time is reported apart from the steady-state speed.

sdxl (the published SDXL base architecture: 2.57B UNet, both text encoders, 3.5B parameters in all) and sdxl-tiny
(its structure, small widths) run each side in its own process, one after the other, on a random-weight
StableDiffusionXLPipeline folder written once under --cache-dir (benchmarks/_sdxl.py): one side's float32 weights
(14 GB for sdxl) are in memory at a time. Without negative prompts both sides use zero negative embeddings (SDXL's
force_zeros_for_empty_prompt); the time ids are the output size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import _report
import _sdxl

# name -> (diffusers class, the options our name fixes)
SCHEDULERS = {
  'ddim': ('DDIMScheduler', {}),
  'euler': ('EulerDiscreteScheduler', {}),
  'dpmpp_2m': ('DPMSolverMultistepScheduler', {'algorithm_type': 'dpmsolver++', 'solver_order': 2}),
}


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=['tiny', 'sd15', *_sdxl.PRESETS], default='tiny')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--batch', type=int, default=2, help='images per call')
  p.add_argument('--height', type=int, help="default: the model's size (tiny 64, sd15 512, sdxl 1024, sdxl-tiny 128)")
  p.add_argument('--width', type=int)
  p.add_argument('--guidance', type=float, default=7.5)
  p.add_argument('--scheduler', choices=sorted(SCHEDULERS), default='ddim')
  p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
  p.add_argument('--threads', type=int, help='CPU cores for both sides (default: all this process may use)')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per side after a warm-up call')
  p.add_argument('--no-torch-compile', action='store_true', help='GPU: skip the torch.compile run')
  p.add_argument('--skip-torch', action='store_true')
  p.add_argument('--cache-dir', default=_sdxl.CACHE, help='sdxl presets: where the random-weight folder is kept')
  p.add_argument('--json', help='write the per-repeat times of each side to this file (benchmarks/_report.py)')
  p.add_argument('--side', choices=['jaxdream', 'torch'], help=argparse.SUPPRESS)  # a child process (sdxl presets)
  p.add_argument('--folder', help=argparse.SUPPRESS)  # the child's pipeline folder
  p.add_argument('--output', help=argparse.SUPPRESS)  # where the child saves its images (.npy)
  return p.parse_args()


def _configs(preset):
  """UNet, VAE and text encoder configs as keyword arguments of the diffusers/transformers classes."""
  from jaxdream.diffusion import tiny_model
  from jaxdream.models import presets

  configs = {
    'tiny': (tiny_model.TINY_UNET, tiny_model.TINY_VAE, tiny_model.TINY_TEXT_ENCODER),
    'sd15': (presets.SD15_UNET, presets.SD_VAE, presets.SD15_TEXT_ENCODER),
  }[preset]
  return [{k: v for k, v in c.items() if not k.startswith('_') and k != 'model_type'} for c in configs]


def build_torch_pipeline(preset: str, folder: str, scheduler: str):
  """A diffusers StableDiffusionPipeline with random weights and the real CLIP tokenizer, saved to `folder`."""
  import diffusers
  import torch
  from transformers import CLIPTextConfig, CLIPTextModel

  from jaxdream.diffusion.tiny_model import SD15_SCHEDULER
  from jaxdream.io.tokenizer import load_tokenizer, write_clip_tokenizer

  unet_cfg, vae_cfg, te_cfg = _configs(preset)
  torch.manual_seed(0)
  tok_dir = os.path.join(folder, '.tokenizer-src')
  write_clip_tokenizer(tok_dir)
  cls, fixed = SCHEDULERS[scheduler]
  pipe = diffusers.StableDiffusionPipeline(
    unet=diffusers.UNet2DConditionModel(**unet_cfg).eval(),
    vae=diffusers.AutoencoderKL(**vae_cfg).eval(),
    text_encoder=CLIPTextModel(CLIPTextConfig(**te_cfg)).eval(),
    tokenizer=load_tokenizer(tok_dir),
    scheduler=getattr(diffusers, cls).from_config(dict(SD15_SCHEDULER, **fixed)),
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )
  pipe.save_pretrained(os.path.join(folder, 'model'))
  pipe.set_progress_bar_config(disable=True)
  return pipe


def _print(name, batch, timing):
  first, steady = timing.first, timing.median
  print(
    f'{name}: {steady / batch:.3f} s/image, {batch / steady:.3f} images/s '
    f'(first call {first:.1f} s, so compile/warm-up ~{max(first - steady, 0):.1f} s)',
    flush=True,
  )
  return batch / steady


def _work(args, h, w, factor, channels=4):
  """What is measured, the same for both sides: the prompts, the initial latents (NHWC; `factor` the VAE's
  downscaling) and its description."""
  import numpy as np

  b = args.batch
  prompts = [f'a photo of an astronaut riding a horse, variant {i}' for i in range(b)]
  latents = np.random.default_rng(0).standard_normal((b, h // factor, w // factor, channels)).astype(np.float32)
  work = f'{args.preset} {h}x{w}, batch {b}, {args.steps} {args.scheduler} steps, guidance {args.guidance}'
  return prompts, latents, work


def _time_jaxdream(jpipe, args, prompts, latents, h, w):
  """jaxdream's timing (its first call compiles) and its side of the row; timing.out holds the uint8 images."""
  import jax.numpy as jnp

  from jaxdream.diffusion.sampling import txt2img

  timing = _report.timed(
    lambda: txt2img(
      jpipe,
      prompts,
      num_inference_steps=args.steps,
      guidance_scale=args.guidance,
      scheduler=args.scheduler,
      height=h,
      width=w,
      latents=latents,
    ),
    args.repeats,
  )
  dtype = jnp.dtype(jpipe.unet.dtype).name
  _print(f'jaxdream  ({dtype})', args.batch, timing)
  return timing, _report.timing_side('jaxdream', timing, f'jaxdream {dtype}')


def _time_torch(tpipe, args, prompts, latents, h, w):
  """The best torch side (eager; on GPU also a torch.compile'd UNet) and the eager run's float images in [0, 1]."""
  import torch

  gpu = args.device == 'gpu'
  torch_device, torch_dtype = ('cuda', torch.float16) if gpu else ('cpu', torch.float32)
  if gpu:
    tpipe = tpipe.to(torch_device, torch_dtype)
  t_latents = torch.from_numpy(latents.transpose(0, 3, 1, 2)).to(torch_device, torch_dtype)

  def run_torch():
    with torch.inference_mode():
      images = tpipe(
        prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=h,
        width=w,
        latents=t_latents,
        output_type='np',
      ).images
    if gpu:
      torch.cuda.synchronize()
    return images

  torch_t = _report.timed(run_torch, args.repeats)
  name = str(torch_dtype)[6:]
  torch_ips = _print(f'diffusers ({name}, eager)', args.batch, torch_t)
  best = _report.timing_side('torch', torch_t, f'diffusers {name}')
  if gpu and not args.no_torch_compile:
    try:
      tpipe.unet = torch.compile(tpipe.unet, mode='max-autotune-no-cudagraphs', fullgraph=True)
      compiled_t = _report.timed(run_torch, args.repeats)
      if _print('diffusers (fp16, torch.compile UNet)', args.batch, compiled_t) > torch_ips:
        best = _report.timing_side('torch', compiled_t, 'diffusers fp16, torch.compile')
    except Exception as e:  # noqa: BLE001 -- report and compare with eager torch
      print(f'torch.compile failed, comparing with eager torch: {type(e).__name__}: {str(e)[:200]}')
  return best, torch_t.out


def _set_scheduler(tpipe, scheduler: str):
  """The diffusers scheduler our name stands for, on the pipeline's own scheduler config (as jaxdream reads it)."""
  import diffusers

  cls, fixed = SCHEDULERS[scheduler]
  tpipe.scheduler = getattr(diffusers, cls).from_config(dict(tpipe.scheduler.config, **fixed))


def _finish(args, work, sides, ours=None, ref=None):
  """The ratio (images/s, the best torch) and the largest pixel difference printed; the --json row written."""
  import numpy as np

  b = args.batch
  if len(sides) == 2:
    ratio = (b / statistics.median(sides[0]['values'])) / (b / statistics.median(sides[1]['values']))
    diff = int(np.abs(ours.astype(int) - np.round(np.clip(ref, 0, 1) * 255)).max())
    print(f'ratio (jaxdream images/s / torch images/s, best torch): {ratio:.2f}x   largest pixel difference: {diff}')
  _report.write_json(args.json, [_report.row(f'txt2img, {work}', sides, per_call=b, item='image')])
  return 0


def main():
  args = _parse()
  if args.device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
    if args.threads and not args.side:  # before jax and torch start their thread pools: both sides get the same cores
      _sdxl.pin_threads(args.threads)
  if args.side:
    return _side(args)
  if args.preset in _sdxl.PRESETS:
    return _per_side(args)
  import jax
  import jax.numpy as jnp
  import torch

  from jaxdream import load_pipeline

  if args.threads:
    torch.set_num_threads(args.threads)
  gpu = args.device == 'gpu'
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    tpipe = build_torch_pipeline(args.preset, tmp, args.scheduler)
    jpipe = load_pipeline(os.path.join(tmp, 'model'), dtype=jnp.bfloat16 if gpu else jnp.float32)
  print(f'built and saved the {args.preset} pipeline, loaded it in jaxdream ({time.perf_counter() - t0:.1f} s)')
  h, w = args.height or jpipe.default_size[0], args.width or jpipe.default_size[1]
  prompts, latents, work = _work(args, h, w, jpipe.vae_scale_factor, jpipe.vae.latent_channels)
  print(
    f'work: {work}; jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} on '
    f'{"cuda" if gpu else "cpu"}, {torch.get_num_threads()} torch threads, {len(os.sched_getaffinity(0))} cores',
    flush=True,
  )
  jax_t, side = _time_jaxdream(jpipe, args, prompts, latents, h, w)
  if args.skip_torch:
    return _finish(args, work, [side])
  best, ref = _time_torch(tpipe, args, prompts, latents, h, w)
  return _finish(args, work, [side, best], jax_t.out, ref)


def _per_side(args):
  """sdxl presets: each side in its own child process on the preset's random-weight folder (benchmarks/_sdxl.py)."""
  import numpy as np

  folder = _sdxl.model_folder(args.cache_dir, args.preset)
  default, factor = _sdxl.image_size(folder)
  h, w = args.height or default[0], args.width or default[1]
  work = _work(args, h, w, factor)[2]
  child = [os.path.abspath(__file__), '--preset', args.preset, '--folder', folder, '--device', args.device]
  child += ['--steps', str(args.steps), '--batch', str(args.batch), '--height', str(h), '--width', str(w)]
  child += ['--guidance', str(args.guidance), '--scheduler', args.scheduler, '--repeats', str(args.repeats)]
  child += ['--threads', str(args.threads)] if args.threads else []
  child += ['--no-torch-compile'] if args.no_torch_compile else []
  print(f'work: {work}; each side in its own process', flush=True)
  with tempfile.TemporaryDirectory(prefix='jaxdream-sample-') as tmp:
    out = {side: os.path.join(tmp, f'{side}.npy') for side in ('jaxdream', 'torch')}
    sides = [_sdxl.run_side(child + ['--side', 'jaxdream', '--output', out['jaxdream']])['side']]
    if args.skip_torch:
      return _finish(args, work, sides)
    sides.append(_sdxl.run_side(child + ['--side', 'torch', '--output', out['torch']])['side'])
    return _finish(args, work, sides, np.load(out['jaxdream']), np.load(out['torch']))


def _side(args):
  """A child process: load the pipeline folder, time one side, save its images and print its RESULT line."""
  import numpy as np

  if args.device == 'cpu':
    _sdxl.pin_threads(args.threads)
  prompts, latents, _ = _work(args, args.height, args.width, _sdxl.image_size(args.folder)[1])
  t0 = time.perf_counter()
  if args.side == 'jaxdream':
    import jax
    import jax.numpy as jnp

    from jaxdream import load_pipeline

    jpipe = load_pipeline(args.folder, dtype=jnp.bfloat16 if args.device == 'gpu' else jnp.float32)
    print(f'jaxdream loaded the pipeline in {time.perf_counter() - t0:.1f} s (jax {jax.__version__})', flush=True)
    timing, side = _time_jaxdream(jpipe, args, prompts, latents, args.height, args.width)
    images = timing.out
  else:
    import diffusers
    import torch

    if args.threads:
      torch.set_num_threads(args.threads)
    tpipe = diffusers.StableDiffusionXLPipeline.from_pretrained(args.folder, add_watermarker=False)
    tpipe.set_progress_bar_config(disable=True)
    _set_scheduler(tpipe, args.scheduler)
    print(
      f'diffusers loaded the pipeline in {time.perf_counter() - t0:.1f} s (torch {torch.__version__}, '
      f'{torch.get_num_threads()} threads)',
      flush=True,
    )
    side, images = _time_torch(tpipe, args, prompts, latents, args.height, args.width)
  np.save(args.output, np.asarray(images))
  _sdxl.result(side=side)
  return 0


if __name__ == '__main__':
  sys.exit(main())
