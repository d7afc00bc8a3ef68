"""Whole txt2img runs (text encoder, every UNet step with classifier-free guidance, VAE decoding) in
jaxdream and in diffusers/torch, side by side in one run; prints images/s of each and the ratio.

CPU (the reference measurements):
  python benchmarks/sample.py --preset tiny --steps 10 --batch 2 --threads 2
  python benchmarks/sample.py --preset sd15 --steps 2 --batch 1 --threads 2 --repeats 1
GPU (jaxdream bf16 vs torch fp16 with SDPA attention, then torch.compile'd UNet if that works):
  python benchmarks/sample.py --preset sd15 --steps 20 --batch 8 --device gpu

Both sides run the same random weights: the torch pipeline is built from configs, saved with
save_pretrained and loaded by jaxdream from that folder. Both start from the same initial latents with a
deterministic scheduler, so the images should agree too (printed as the largest pixel difference; only
meaningful in float32 on CPU). jaxdream's first call compiles its sampling loop (once per image size,
batch, step count and scheduler); that time is reported apart from the steady-state speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _report

# name -> (diffusers class, the options our name fixes)
SCHEDULERS = {
  'ddim': ('DDIMScheduler', {}),
  'euler': ('EulerDiscreteScheduler', {}),
  'dpmpp_2m': ('DPMSolverMultistepScheduler', {'algorithm_type': 'dpmsolver++', 'solver_order': 2}),
}


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=['tiny', 'sd15'], default='tiny')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--batch', type=int, default=2, help='images per call')
  p.add_argument('--height', type=int, help="default: the model's size (tiny 64, sd15 512)")
  p.add_argument('--width', type=int)
  p.add_argument('--guidance', type=float, default=7.5)
  p.add_argument('--scheduler', choices=sorted(SCHEDULERS), default='ddim')
  p.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
  p.add_argument('--threads', type=int, help='CPU cores for both sides (default: all this process may use)')
  p.add_argument('--repeats', type=int, default=3, help='timed calls per side after a warm-up call')
  p.add_argument('--no-torch-compile', action='store_true', help='GPU: skip the torch.compile run')
  p.add_argument('--skip-torch', action='store_true')
  p.add_argument('--json', help='write the per-repeat times of each side to this file (benchmarks/_report.py)')
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


def main():
  args = _parse()
  if args.device == 'cpu':
    os.environ['JAX_PLATFORMS'] = 'cpu'
    if args.threads:  # before jax and torch start their thread pools: both sides get the same cores
      os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from jaxdream import load_pipeline
  from jaxdream.diffusion.sampling import txt2img

  if args.threads:
    torch.set_num_threads(args.threads)
  gpu = args.device == 'gpu'
  torch_device, torch_dtype = ('cuda', torch.float16) if gpu else ('cpu', torch.float32)
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    tpipe = build_torch_pipeline(args.preset, tmp, args.scheduler)
    jpipe = load_pipeline(os.path.join(tmp, 'model'), dtype=jnp.bfloat16 if gpu else jnp.float32)
  print(f'built and saved the {args.preset} pipeline, loaded it in jaxdream ({time.perf_counter() - t0:.1f} s)')
  h, w = args.height or jpipe.default_size[0], args.width or jpipe.default_size[1]
  f, b = jpipe.vae_scale_factor, args.batch
  prompts = [f'a photo of an astronaut riding a horse, variant {i}' for i in range(b)]
  latents = np.random.default_rng(0).standard_normal((b, h // f, w // f, jpipe.vae.latent_channels)).astype(np.float32)
  work = f'{args.preset} {h}x{w}, batch {b}, {args.steps} {args.scheduler} steps, guidance {args.guidance}'
  print(
    f'work: {work}; jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} on '
    f'{torch_device}, {torch.get_num_threads()} torch threads, {len(os.sched_getaffinity(0))} cores',
    flush=True,
  )

  jax_t = _report.timed(
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
  ours = jax_t.out
  jax_label = f'jaxdream {jnp.dtype(jpipe.unet.dtype).name}'
  jax_ips = _print(f'jaxdream  ({jnp.dtype(jpipe.unet.dtype).name})', b, jax_t)
  sides = [_report.timing_side('jaxdream', jax_t, jax_label)]
  name = f'txt2img, {work}'

  def write():
    _report.write_json(args.json, [_report.row(name, sides, per_call=b, item='image')])

  if args.skip_torch:
    write()
    return 0

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
  ref = torch_t.out
  torch_ips = _print(f'diffusers ({str(torch_dtype)[6:]}, eager)', b, torch_t)
  best_torch = _report.timing_side('torch', torch_t, f'diffusers {str(torch_dtype)[6:]}')
  diff = int(np.abs(ours.astype(int) - np.round(np.clip(ref, 0, 1) * 255)).max())
  if gpu and not args.no_torch_compile:
    try:
      tpipe.unet = torch.compile(tpipe.unet, mode='max-autotune-no-cudagraphs', fullgraph=True)
      compiled_t = _report.timed(run_torch, args.repeats)
      compiled_ips = _print('diffusers (fp16, torch.compile UNet)', b, compiled_t)
      if compiled_ips > torch_ips:
        torch_ips, best_torch = compiled_ips, _report.timing_side('torch', compiled_t, 'diffusers fp16, torch.compile')
    except Exception as e:  # noqa: BLE001 -- report and compare with eager torch
      print(f'torch.compile failed, comparing with eager torch: {type(e).__name__}: {str(e)[:200]}')
  print(
    f'ratio (jaxdream images/s / torch images/s, best torch): {jax_ips / torch_ips:.2f}x   '
    f'largest pixel difference: {diff}'
  )
  sides.append(best_torch)
  write()
  return 0


if __name__ == '__main__':
  sys.exit(main())
