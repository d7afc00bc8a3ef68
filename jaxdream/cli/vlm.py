"""`jaxdream caption`, `ask` and `check-subject`: captions, answers and grounding with a vision-language model
(Kosmos-2, Qwen2.5-VL or Qwen3-VL, told apart by the folder's config.json)."""

from __future__ import annotations

import json
import os

from jaxdream.cli.args import check_not_input, check_output, int_between, positive_float
from jaxdream.io.files import atomic_write

GET_VLM = (
  'get one on a machine with internet: huggingface-cli download microsoft/kosmos-2-patch14-224 --local-dir kosmos2 '
  '(or Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen3-VL-8B-Instruct)'
)


def _check_vlm_folder(path: str):
  """A clear message for a --model that is not a supported VLM folder, before anything is loaded."""
  from jaxdream.io.weights import WeightsError
  from jaxdream.models import ConfigError
  from jaxdream.vlm.api import model_type

  try:
    model_type(path)
  except (FileNotFoundError, WeightsError, ConfigError) as e:
    raise type(e)(f'--model {e}; {GET_VLM}') from None


def _image_paths(images) -> list[str]:
  """The images of the arguments, each checked to open: a clear message instead of a decoder's traceback."""
  from PIL import Image, UnidentifiedImageError

  from jaxdream.io.images import list_images

  paths = list_images(images)
  if not paths:
    raise FileNotFoundError(f'no images in {", ".join(images)}')
  for path in paths:
    try:
      with Image.open(path) as im:
        im.load()  # decodes the pixels: verify() passes a truncated JPEG
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
      raise ValueError(f'{path}: not a readable image ({e})') from None
  return paths


def _load_vlm(args):
  """The VLM bundle of --model, from the call's cache (`main(..., cache=)`): callers that pass the same
  cache to several commands reuse the loaded model and its compiled generation."""
  import jax.numpy as jnp

  from jaxdream import vlm

  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  int8, tensor = getattr(args, 'int8', False), getattr(args, 'tensor_parallel', 1)
  key = ('vlm', os.path.abspath(args.model), args.dtype, int8, tensor)

  def load():
    _check_vlm_folder(args.model)
    return vlm.load(args.model, dtype=dtype, int8=int8, tensor_parallel=tensor)

  return args.cache.get(key, load)


def _check_outputs(args, paths=()):
  """Output paths that can be written and overwrite no input image (an annotated copy DIR/STEM.png)."""
  check_output('--json', args.json, folder=False, inputs=paths)
  for flag in ('draw', 'heatmaps', 'write_captions'):
    check_output(f'--{flag.replace("_", "-")}', getattr(args, flag, None), folder=True)
  if getattr(args, 'draw', None):
    stems = [os.path.join(args.draw, os.path.splitext(os.path.basename(p))[0] + '.png') for p in paths]
    for path, out in zip(paths, stems):
      check_not_input('--draw', out, [path])


def _vlm_generation(args) -> dict:
  kw = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, batch_size=args.batch_size)
  if args.repetition_penalty is not None:
    kw['repetition_penalty'] = args.repetition_penalty
  return kw


def _print_result(path: str, r: dict):
  print(f'{path}: {r["text"]}')
  for phrase, _, boxes in r['entities']:
    print(f'  {phrase}: ' + '; '.join('(' + ', '.join(f'{v:.3f}' for v in b) + ')' for b in boxes))


def _record(path: str, r: dict, **extra) -> dict:
  """One image's result as JSON: Kosmos-2's whole decoded sequence too, when there is one."""
  whole = {'generated_text': r['generated_text']} if 'generated_text' in r else {}
  entities = [dict(phrase=p, span=list(s), boxes=[list(b) for b in bs]) for p, s, bs in r['entities']]
  return dict(image=path, **extra, **whole, text=r['text'], entities=entities)


def _caption(args):
  """Caption and ground images; optionally JSON, annotated copies and caption sidecars."""
  import re

  from jaxdream import vlm

  paths = _image_paths(args.images)
  _check_outputs(args, paths)
  results = vlm.caption(
    _load_vlm(args), paths, prompt=args.prompt, heatmaps=bool(args.heatmaps), **_vlm_generation(args)
  )
  records = []
  for path, r in zip(paths, results):
    stem = os.path.splitext(os.path.basename(path))[0]
    _print_result(path, r)
    if args.draw:
      os.makedirs(args.draw, exist_ok=True)
      vlm.draw_entities(path, r['entities']).save(os.path.join(args.draw, f'{stem}.png'))
    if args.heatmaps:
      os.makedirs(args.heatmaps, exist_ok=True)
      for k, (phrase, heat) in enumerate(r['heatmaps']):
        name = re.sub(r'[^A-Za-z0-9]+', '_', phrase).strip('_')
        vlm.draw_heatmap(path, heat).save(os.path.join(args.heatmaps, f'{stem}_{k}_{name}.png'))
    if args.write_captions is not None:  # DreamBooth caption sidecars: DIR, or next to each image
      folder = args.write_captions or os.path.dirname(path)
      os.makedirs(folder, exist_ok=True)
      atomic_write(os.path.join(folder, f'{stem}.txt'), r['text'])
    records.append(_record(path, r))
  if args.json:
    atomic_write(args.json, json.dumps(records, indent=2))


def _ask(args):
  """Answer one question about each image."""
  from jaxdream import vlm

  paths = _image_paths(args.image)
  _check_outputs(args, paths)
  results = vlm.ask(_load_vlm(args), paths, args.question, **_vlm_generation(args))
  for path, r in zip(paths, results):
    _print_result(path, r)
  if args.json:
    records = [_record(path, r, question=args.question) for path, r in zip(paths, results)]
    atomic_write(args.json, json.dumps(records, indent=2))


def _check_subject(args):
  """Whether a subject phrase is grounded in each image of a (DreamBooth) folder: a JSON summary."""
  from jaxdream import vlm

  paths = _image_paths(args.images)
  _check_outputs(args, paths)
  summary = vlm.check_subject(_load_vlm(args), paths, args.phrase, mode=args.mode, **_vlm_generation(args))
  print(json.dumps(summary, indent=2))
  if args.json:
    atomic_write(args.json, json.dumps(summary, indent=2))


def _add_vlm_parsers(sub):
  def common(parser):
    parser.add_argument('--model', required=True, help='transformers-format folder of Kosmos-2, Qwen2.5-VL or Qwen3-VL')
    parser.add_argument('--max-new-tokens', type=int_between(1), default=64)
    parser.add_argument('--num-beams', type=int_between(1), default=1, help='beam search width (default 1: greedy)')
    parser.add_argument('--batch-size', type=int_between(1), default=8, help='images per generation batch')
    parser.add_argument(
      '--repetition-penalty',
      type=positive_float,
      help="transformers' repetition penalty (1.0: off; default: Qwen folders' generation_config.json, else 1.0)",
    )
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='compute dtype')
    parser.add_argument('--int8', action='store_true', help='weight-only int8 (a quarter of the parameter memory)')
    parser.add_argument(
      '--tensor-parallel',
      type=int,
      default=1,
      metavar='N',
      help='split the model over N local devices (attention heads, MLP, vocabulary): for the 7B/8B sizes',
    )
    parser.add_argument('--json', metavar='FILE', help='also write the results to this JSON file')

  c = sub.add_parser('caption', help='caption images and ground their phrases with boxes (Kosmos-2, Qwen-VL)')
  common(c)
  c.add_argument('images', nargs='+', help='image files or folders of images')
  c.add_argument(
    '--prompt',
    help="Kosmos-2: the prompt the caption continues, <grounding> asks for boxes (default: '<grounding>An image "
    "of'); Qwen: the question asked (default: 'Describe this image in one sentence.')",
  )
  c.add_argument('--draw', metavar='DIR', help='write PNG copies with the boxes and phrases drawn on them')
  c.add_argument(
    '--heatmaps', metavar='DIR', help='write, per grounded phrase, the image with where its tokens attended overlaid'
  )
  c.add_argument(
    '--write-captions',
    metavar='DIR',
    nargs='?',
    const='',
    help='write <image stem>.txt caption sidecars (the clean caption) into DIR, or next to each '
    'image when no DIR is given, for DreamBooth training',
  )
  c.set_defaults(fn=_caption)
  a = sub.add_parser('ask', help='answer a question about images (Kosmos-2, Qwen-VL)')
  common(a)
  a.add_argument('--image', required=True, action='append', help='an image file or folder of images (repeat for more)')
  a.add_argument('question', help='e.g. "What color is the dog?"')
  a.set_defaults(fn=_ask)
  s = sub.add_parser('check-subject', help='check that a subject phrase is grounded in each image (Kosmos-2, Qwen-VL)')
  common(s)
  s.add_argument('--images', required=True, nargs='+', help='folder(s) or files of images')
  s.add_argument('--phrase', required=True, help='the subject, e.g. "dog"')
  s.add_argument(
    '--mode',
    choices=('caption', 'refer'),
    default='caption',
    help="Kosmos-2: caption: the phrase must appear among a free caption's grounded entities; refer: ask "
    'the model where the phrase is (default: %(default)s). Qwen models are always asked where it is',
  )
  s.set_defaults(fn=_check_subject)
