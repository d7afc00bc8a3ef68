"""The `jaxdream` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _demo(args):
  """Build the tiny local model, load it back, and run text encoder, UNet and VAE once."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from PIL import Image

  from jaxdream import load_pipeline
  from jaxdream.tiny_model import create_tiny_pipeline

  model_dir = os.path.join(args.out, 'tiny-sd')
  t0 = time.perf_counter()
  create_tiny_pipeline(model_dir)
  pipe = load_pipeline(model_dir)
  print(f'tiny model folder: {model_dir} (created and loaded in {time.perf_counter() - t0:.1f} s)')
  ids = pipe.tokenize([args.prompt])
  print(f'prompt {args.prompt!r} -> {int((ids[0] != ids[0, -1]).sum()) + 1} tokens')

  @nnx.jit
  def run(pipe_te, pipe_unet, pipe_vae, ids, latents):
    context = pipe_te(ids)
    eps = pipe_unet(latents, jnp.array([500]), context)
    return context, eps, pipe_vae.decode(latents / pipe_vae.scaling_factor)

  h, w = pipe.default_size
  f = pipe.vae_scale_factor
  latents = jax.random.normal(jax.random.key(0), (1, h // f, w // f, pipe.unet.config['in_channels']))
  t0 = time.perf_counter()
  context, eps, image = jax.block_until_ready(run(pipe.text_encoder, pipe.unet, pipe.vae, ids, latents))
  print(f'text embeddings {context.shape}, UNet output {eps.shape}, decoded image {image.shape} '
        f'({time.perf_counter() - t0:.1f} s including compilation)')
  png = os.path.join(args.out, 'demo_decoded.png')
  Image.fromarray(np.asarray((jnp.clip(image[0], -1, 1) + 1) * 127.5, np.uint8)).save(png)
  print(f'wrote {png}')


def _inspect(args):
  """Load a diffusers model folder and print its parts and parameter counts."""
  from jaxdream import load_pipeline
  from jaxdream.models import count_params

  pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
  info = {name: count_params(getattr(pipe, name)) for name in ('unet', 'text_encoder', 'vae')}
  info['scheduler'] = pipe.scheduler_config.get('_class_name')
  info['default_size'] = pipe.default_size
  print(json.dumps(info, indent=2))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='jaxdream', description='DreamBooth fine-tuning and sampling in JAX')
  sub = p.add_subparsers(dest='command', required=True)
  d = sub.add_parser('demo', help='create a tiny local model and run every part of it once')
  d.add_argument('--out', default='outputs/demo', help='output folder')
  d.add_argument('--prompt', default='a photo of sks dog')
  d.set_defaults(fn=_demo)
  i = sub.add_parser('inspect', help='load a diffusers model folder and print its parts')
  i.add_argument('--model', required=True, help='diffusers-format model folder')
  i.add_argument('--allow-pickle', action='store_true',
                 help='also load pickle (.bin/.ckpt) weights; they can run code when loaded')
  i.set_defaults(fn=_inspect)
  return p


def main(argv=None):
  args = build_parser().parse_args(argv)
  from jaxdream.models import ConfigError, WeightsError
  try:
    return args.fn(args)
  except (WeightsError, ConfigError, FileNotFoundError) as e:
    print(f'jaxdream {args.command}: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
