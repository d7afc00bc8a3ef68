"""LoRA files on the command line: `--lora FILE[:SCALE]`, A1111's `<lora:name:scale>` prompt tags, and
`jaxdream lora merge`."""

from __future__ import annotations

import os

from jaxdream.cli.args import check_model_output, check_output
from jaxdream.lora.tags import lora_in_dir, lora_name, lora_scale_value, prompt_loras, with_tags  # noqa: F401


def parse_lora_spec(spec: str, flag: str = '--lora') -> tuple[str, float]:
  """'FILE' or 'FILE:SCALE' -> (path, scale); the file must exist. A path that itself has a colon and no
  scale is taken whole."""
  path, sep, scale = spec.rpartition(':')
  try:
    float(scale)
  except ValueError:
    sep = ''  # no number after the last colon: the colon is the path's
  value = lora_scale_value(scale, f'{flag} {spec!r}') if sep else 1.0
  if not sep:
    path = spec
  if not path:
    raise ValueError(f'{flag} {spec!r}: expected FILE or FILE:SCALE')
  if not os.path.isfile(path):
    raise ValueError(f'{flag} {path}: no such LoRA file')
  return path, value


def check_lora_files(loras) -> None:
  """Read every file once (headers and tensors, memory-mapped) so that a broken one fails before any compile."""
  from jaxdream.lora import load_lora

  for path in sorted({p for p, _ in loras}):
    load_lora(path)


def with_loras(pipe, loras):
  """The pipeline with these (path, scale) LoRAs merged (the pipeline itself when there are none). The merged
  one has the base's structure, so it shares the base's compiled loops (and the registry they report to)."""
  from jaxdream.lora import merge_lora

  loras = [(p, s) for p, s in loras if s != 0]
  if not loras:
    return pipe
  merged = merge_lora(pipe, loras)
  merged.compiled, merged.callbacks = pipe.compiled, pipe.callbacks
  return merged


def _merge(args):
  """Write a diffusers model folder with the LoRAs merged into its weights."""
  from jaxdream.diffusion.pipeline import load_pipeline, save_pipeline
  from jaxdream.lora import merge_lora

  loras = [parse_lora_spec(s) for s in args.lora]
  check_lora_files(loras)
  check_output('--out', args.out, folder=True, inputs=[args.model])
  check_model_output('--out', args.out)
  pipe = load_pipeline(args.model, allow_pickle=args.allow_pickle)
  merged = merge_lora(pipe, loras, strict=not args.skip_unmatched)
  for skipped in getattr(merged, 'lora_skipped', []):
    print(f'skipped {skipped}')
  save_pipeline(merged, args.out)
  print(f'wrote {args.out} ({", ".join(f"{os.path.basename(p)}:{s:g}" for p, s in loras)} merged into {args.model})')
  return 0


def _add_lora_parsers(sub):
  lo = sub.add_parser('lora', help='LoRA files: merge them into a model folder')
  lsub = lo.add_subparsers(dest='lora_command', required=True)
  m = lsub.add_parser(
    'merge',
    help='write a diffusers model folder with LoRA files merged in',
    description='Merge LoRA files (diffusers/peft or kohya/A1111 .safetensors) into a diffusers model folder: '
    'W + scale * alpha / rank * up @ down per adapted layer.',
  )
  m.add_argument('--model', required=True, help='base diffusers-format model folder')
  m.add_argument('--lora', required=True, action='append', metavar='FILE[:SCALE]', help='a LoRA file (repeatable)')
  m.add_argument('--out', required=True, help='folder to write the merged model to')
  m.add_argument(
    '--skip-unmatched',
    action='store_true',
    help='merge the adapters that fit the model and list the others (default: an error naming them)',
  )
  m.add_argument(
    '--allow-pickle', action='store_true', help='also load pickle (.bin/.ckpt) weights; they can run code when loaded'
  )
  m.set_defaults(fn=_merge)
