"""The `jaxdream` command line: one parser, each command group in its own module."""

from __future__ import annotations

import argparse
import sys

from jaxdream.cli import quiet
from jaxdream.cli.convert import _add_convert_parser
from jaxdream.cli.eval import _add_eval_parsers
from jaxdream.cli.lora import _add_lora_parsers
from jaxdream.cli.model_files import add_model_file_arguments
from jaxdream.cli.sample import SampleSession, _add_sample_parser, _demo, _inspect, _sample
from jaxdream.cli.serve import _add_serve_parser
from jaxdream.cli.subjects import _add_subjects_parser
from jaxdream.cli.vlm import _add_vlm_parsers
from jaxdream.runtime import CompileCache


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='jaxdream', description='DreamBooth fine-tuning and sampling in JAX')
  sub = p.add_subparsers(dest='command', required=True)
  sub.add_parser(
    'train',
    help='DreamBooth fine-tuning: jaxdream train --config FILE --workdir DIR [--config.key=value ...]',
    add_help=False,
  )
  d = sub.add_parser('demo', help='create a tiny local model and run every part of it once')
  d.add_argument('--out', default='outputs/demo', help='output folder')
  d.add_argument('--prompt', default='a photo of sks dog')
  d.set_defaults(fn=_demo)
  i = sub.add_parser(
    'inspect',
    help="print a model's parts and parameter counts: a diffusers folder, or a single file (its inferred type, "
    'without building the model)',
  )
  i.add_argument('path', nargs='?', metavar='MODEL', help='diffusers-format model folder or single-file checkpoint')
  i.add_argument('--model', help='the same, as a flag')
  add_model_file_arguments(i)
  i.add_argument(
    '--allow-pickle', action='store_true', help='also load pickle (.bin/.ckpt) weights; they can run code when loaded'
  )
  i.set_defaults(fn=_inspect)
  _add_sample_parser(sub)
  _add_vlm_parsers(sub)
  _add_lora_parsers(sub)
  _add_convert_parser(sub)
  _add_subjects_parser(sub)
  _add_eval_parsers(sub)
  _add_serve_parser(sub)
  return p


def main(argv=None, *, cache=None):
  """Run one command; returns its exit status. cache: a `jaxdream.runtime.CompileCache` that the command keeps
  what it loads and compiles in, for a caller (a test, a notebook) that runs several commands in one process;
  by default each call starts empty."""
  quiet.silence_third_party()
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ['train']:  # absl flags with ml_collections config overrides: its own parser
    from jaxdream.cli.train import main as train_main

    return train_main(argv[1:])
  args = build_parser().parse_args(argv)
  args.cache = CompileCache() if cache is None else cache
  from jaxdream.models import ConfigError, WeightsError

  try:
    if args.fn is _sample:  # successive `sample` commands given one cache share the loaded model
      return _sample(args, args.cache.get(('sample-session',), SampleSession))
    return args.fn(args)
  except (WeightsError, ConfigError, OSError, ValueError) as e:  # OSError: a path the command cannot write or read
    print(f'jaxdream {args.command}: error: {e}', file=sys.stderr)
    return 2
  except Exception as e:
    if isinstance(e, RuntimeError) and 'Unable to initialize backend' in str(e):  # JAX_PLATFORMS names a missing one
      print(f'jaxdream {args.command}: error: {str(e).splitlines()[0]}', file=sys.stderr)
      return 2
    if type(e).__name__ != 'JaxRuntimeError' or 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    first = str(e).strip().splitlines()[0]
    print(f'jaxdream {args.command}: error: out of memory ({first}); use a smaller size or batch', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
