"""`jaxdream convert IN OUT`: a diffusers model folder to a single-file checkpoint (original CompVis/Stability
layout, as A1111, SD.Next and ComfyUI load them), or a single file to a diffusers folder."""

from __future__ import annotations

import os

from jaxdream.cli.args import check_model_output, check_output


def _convert(args):
  from jaxdream.cli.model_files import model_file_options
  from jaxdream.diffusion.pipeline import load_pipeline, save_pipeline

  to_file = os.path.isdir(args.input)
  if not to_file and not os.path.isfile(args.input):
    raise ValueError(f'{args.input}: no such model folder or file')
  if to_file and not args.output.endswith('.safetensors'):
    raise ValueError(f'{args.output}: a model folder converts to a single .safetensors file')
  if not to_file and (os.path.isfile(args.output) or args.output.endswith(('.safetensors', '.ckpt'))):
    raise ValueError(f'{args.output}: a single file converts to a model folder, and this names a file')
  check_output('OUT', args.output, folder=not to_file, inputs=[args.input])
  if not to_file:
    check_model_output('OUT', args.output)
  pipe = load_pipeline(args.input, allow_pickle=args.allow_pickle, **model_file_options(args))
  save_pipeline(pipe, args.output, weights_dtype='float16' if args.fp16 else None, single_file=to_file)
  kind = 'single file' if to_file else 'diffusers folder'
  print(f'wrote {args.output} ({kind}, {pipe.pipeline_class}, {"float16" if args.fp16 else "float32"})')
  return 0


def _add_convert_parser(sub):
  from jaxdream.cli.model_files import add_model_file_arguments

  c = sub.add_parser(
    'convert',
    help='convert between a diffusers model folder and a single-file checkpoint',
    description='Convert a diffusers model folder to one .safetensors file in the original CompVis/Stability '
    'layout (A1111, SD.Next, ComfyUI), or such a file (SD 1.x, 2.x, inpainting, SDXL base or refiner) to a '
    'diffusers folder. Nothing is downloaded: a file takes its configs from the published model of its type, or '
    'from --config-dir.',
  )
  c.add_argument('input', metavar='IN', help='a diffusers model folder, or a single-file checkpoint')
  c.add_argument('output', metavar='OUT', help='the .safetensors file to write, or the folder')
  add_model_file_arguments(c, what='IN')
  c.add_argument('--fp16', action='store_true', help='store float16 weights')
  c.add_argument(
    '--allow-pickle', action='store_true', help='also load pickle (.ckpt) weights; they can run code when loaded'
  )
  c.set_defaults(fn=_convert)
