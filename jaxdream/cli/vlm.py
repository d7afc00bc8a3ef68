"""`jaxdream caption` and `check-subject`: grounded captions with a vision-language model."""

from __future__ import annotations

import json
import os

from jaxdream.io.files import atomic_write

GET_KOSMOS2 = (
  'get one on a machine with internet: huggingface-cli download microsoft/kosmos-2-patch14-224 --local-dir kosmos2'
)


def _check_vlm_folder(path: str):
  """A clear message for a --model that is not a Kosmos-2 folder, before anything is loaded."""
  config = os.path.join(path, 'config.json')
  if not os.path.isdir(path):
    raise FileNotFoundError(
      f'--model {path}: no such folder; it must be a transformers Kosmos-2 folder ({GET_KOSMOS2})'
    )
  if not os.path.isfile(config):
    raise FileNotFoundError(f'--model {path}: no config.json, so not a transformers Kosmos-2 folder ({GET_KOSMOS2})')
  try:
    with open(config) as f:
      model_type = json.load(f).get('model_type')
  except (OSError, ValueError, AttributeError) as e:
    raise ValueError(f'--model {path}: config.json is not readable JSON ({e})') from None
  if model_type != 'kosmos-2':
    raise ValueError(f"--model {path}: a {model_type!r} model, not Kosmos-2 (model_type 'kosmos-2'); {GET_KOSMOS2}")


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
        im.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
      raise ValueError(f'{path}: not a readable image ({e})') from None
  return paths


def _load_vlm(args):
  """The Kosmos-2 bundle of --model, from the call's cache (`main(..., cache=)`): callers that pass the same
  cache to several commands reuse the loaded model and its compiled generation."""
  import jax.numpy as jnp

  from jaxdream import vlm

  dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
  key = ('kosmos2', os.path.abspath(args.model), args.dtype)

  def load():
    _check_vlm_folder(args.model)
    return vlm.load(args.model, dtype=dtype)

  return args.cache.get(key, load)


def _vlm_generation(args) -> dict:
  return dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, batch_size=args.batch_size)


def _caption(args):
  """Caption and ground images with Kosmos-2; optionally JSON, annotated copies and caption sidecars."""
  import re

  from jaxdream import vlm

  paths = _image_paths(args.images)
  results = vlm.caption(
    _load_vlm(args), paths, prompt=args.prompt, heatmaps=bool(args.heatmaps), **_vlm_generation(args)
  )
  records = []
  for path, r in zip(paths, results):
    stem = os.path.splitext(os.path.basename(path))[0]
    print(f'{path}: {r["text"]}')
    for phrase, _, boxes in r['entities']:
      print(f'  {phrase}: ' + '; '.join('(' + ', '.join(f'{v:.3f}' for v in b) + ')' for b in boxes))
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
    records.append(
      dict(
        image=path,
        generated_text=r['generated_text'],
        text=r['text'],
        entities=[dict(phrase=p, span=list(s), boxes=[list(b) for b in bs]) for p, s, bs in r['entities']],
      )
    )
  if args.json:
    atomic_write(args.json, json.dumps(records, indent=2))


def _check_subject(args):
  """Whether a subject phrase is grounded in each image of a (DreamBooth) folder: a JSON summary."""
  from jaxdream import vlm

  paths = _image_paths(args.images)
  summary = vlm.check_subject(_load_vlm(args), paths, args.phrase, mode=args.mode, **_vlm_generation(args))
  print(json.dumps(summary, indent=2))
  if args.json:
    atomic_write(args.json, json.dumps(summary, indent=2))


def _add_vlm_parsers(sub):
  def common(parser):
    parser.add_argument('--model', required=True, help='transformers-format Kosmos-2 folder')
    parser.add_argument('--max-new-tokens', type=int, default=64)
    parser.add_argument('--num-beams', type=int, default=1, help='beam search width (default 1: greedy)')
    parser.add_argument('--batch-size', type=int, default=8, help='images per generation batch')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32', help='compute dtype')
    parser.add_argument('--json', metavar='FILE', help='also write the results to this JSON file')

  c = sub.add_parser('caption', help='caption images and ground their phrases with boxes (Kosmos-2)')
  common(c)
  c.add_argument('images', nargs='+', help='image files or folders of images')
  c.add_argument(
    '--prompt',
    default='<grounding>An image of',
    help='prompt the caption continues; <grounding> asks for boxes (default: %(default)s)',
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
  s = sub.add_parser('check-subject', help='check that a subject phrase is grounded in each image (Kosmos-2)')
  common(s)
  s.add_argument('--images', required=True, nargs='+', help='folder(s) or files of images')
  s.add_argument('--phrase', required=True, help='the subject, e.g. "dog"')
  s.add_argument(
    '--mode',
    choices=('caption', 'refer'),
    default='caption',
    help="caption: the phrase must appear among a free caption's grounded entities; refer: ask "
    'the model where the phrase is (default: %(default)s)',
  )
  s.set_defaults(fn=_check_subject)
