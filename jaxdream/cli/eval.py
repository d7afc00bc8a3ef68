"""`jaxdream eval dreambench` (the DreamBooth paper's DINO / CLIP-I / CLIP-T protocol, seeded and resumable)
and `jaxdream eval compare` (paired per-subject differences of runs with CIs and p-values).

Every argument, folder and image is checked before a model is loaded or anything compiles."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time

from jaxdream.cli.args import check_output
from jaxdream.cli.sample import MAX_SIDE

LORA_FILE = 'pytorch_lora_weights.safetensors'
GENERATION_FILE = 'generation.json'  # in the generated-images folder: what its images were made with


@dataclasses.dataclass
class _Generation:
  """A checked --model run: image size, scheduler, mesh, and the settings its images depend on."""

  size: tuple
  scheduler: str
  mesh: object
  settings: dict  # written to GENERATION_FILE; a rerun into the same --out must match it
  model_files: dict  # sha256 of every file of the model folder


def _add_eval_parsers(sub):
  from jaxdream.cli.model_files import add_model_file_arguments

  e = sub.add_parser('eval', help='DreamBench evaluation (DINO, CLIP-I, CLIP-T) and paired comparisons of runs')
  esub = e.add_subparsers(dest='eval_command', required=True)
  d = esub.add_parser(
    'dreambench',
    help='score a model (or generated images) with the DreamBench protocol',
    description='Generate (--model) or read (--images) DREAMBENCH images, score them with DINO, CLIP-I and CLIP-T '
    'and write scores.json, scores.csv, report.md and per-subject grids to --out. See docs/evaluation.md.',
  )
  d.add_argument('--dataset', required=True, help='DreamBench-layout folder: <subject>/*.jpg, prompts_and_classes.txt')
  d.add_argument('--clip', required=True, help='transformers CLIPModel folder (e.g. openai/clip-vit-base-patch32)')
  d.add_argument('--dino', required=True, help='transformers ViTModel folder (e.g. facebook/dino-vits16)')
  d.add_argument('--out', required=True, help='report folder (generated images go to OUT/images/)')
  src = d.add_mutually_exclusive_group(required=True)
  src.add_argument('--model', help='diffusers model folder or single-file checkpoint to generate the images with')
  add_model_file_arguments(d)
  src.add_argument('--images', help='already generated images: IMAGES/<subject>/<prompt>_<image>.png')
  d.add_argument(
    '--loras', help=f'a per-subject run folder: each subject sampled with LORAS/loras/<subject>/{LORA_FILE}'
  )
  d.add_argument('--subjects', help='comma-separated subjects (default: all of the dataset)')
  d.add_argument('--num-prompts', type=int, default=25, help='the first N prompts of each list (default 25)')
  d.add_argument('--images-per-prompt', type=int, default=4, help='images per prompt (default 4)')
  d.add_argument('--identifier', default='sks', help="the subjects' rare token in the prompts (default sks)")
  d.add_argument('--steps', type=int, default=50, help='denoising steps (default 50)')
  d.add_argument('--guidance', type=float, default=7.5, help='classifier-free guidance scale (default 7.5)')
  d.add_argument('--scheduler', help="scheduler name (default: the model folder's own)")
  d.add_argument('--height', type=int, help="image height (default: the model's)")
  d.add_argument('--width', type=int, help="image width (default: the model's)")
  d.add_argument(
    '--devices', type=int, default=-1, help='devices that split each generation and scoring batch (default -1: all)'
  )
  d.add_argument('--seed', type=int, default=0, help='base seed of the images and the bootstrap (default 0)')
  d.add_argument('--vlm', help='Kosmos-2 folder: also report the fraction of images where it grounds the class noun')
  d.add_argument('--batch-size', type=int, default=32, help='scoring batch size (default 32)')
  d.set_defaults(fn=_dreambench)
  c = esub.add_parser(
    'compare',
    help='paired per-subject comparison of eval runs (scores.json files): differences, CIs, Wilcoxon p-values',
  )
  c.add_argument('scores', nargs='+', help='scores.json files; each run after the first is compared with the first')
  c.add_argument('--out', help='also write the tables to this markdown file')
  c.add_argument('--seed', type=int, default=0, help='bootstrap seed (default 0)')
  c.set_defaults(fn=_compare)


def _check_folder(flag: str, path: str, cls):
  """A scoring model folder of the right type, from its config alone; CLIP's also with a readable tokenizer (CLIP-T)
  and image processor config, before anything is generated or embedded."""
  from jaxdream.io.tokenizer import load_tokenizer
  from jaxdream.models import CLIPModel, ConfigError, WeightsError, check_component
  from jaxdream.vlm.processor import read_image_processor_config

  if not os.path.isdir(path):
    raise ValueError(f'{flag} {path}: no such folder')
  try:
    check_component(cls, path)
    if cls is CLIPModel:
      load_tokenizer(path)
      read_image_processor_config(path, default={})
  except (ConfigError, WeightsError) as e:
    raise ValueError(f'{flag} {e}') from None


def _check_vlm(path: str):
  from jaxdream.models import read_config

  if not os.path.isdir(path):
    raise ValueError(f'--vlm {path}: no such folder')
  kind = read_config(path).get('model_type')
  if kind != 'kosmos-2':
    raise ValueError(f'--vlm {path}: not a Kosmos-2 folder (model_type={kind!r}, expected "kosmos-2")')


def _lora_files(args, protocol) -> dict:
  if not args.loras:
    return {}
  if not args.model:
    raise ValueError('--loras needs --model (the base model the adapters were trained on)')
  files = {s: os.path.join(args.loras, 'loras', s, LORA_FILE) for s in protocol.subjects}
  missing = [p for p in files.values() if not os.path.isfile(p)]
  if missing:
    raise ValueError(f'--loras {args.loras}: no adapter file {", ".join(missing)}')
  return files


def _check_sampling(args, factor: int, scheduler_config: dict) -> str:
  """The scheduler name to sample with, after checking steps, guidance and the name."""
  from jaxdream.schedulers import make_scheduler, scheduler_name_for_config

  if args.steps < 1:
    raise ValueError(f'--steps must be at least 1, got {args.steps}')
  if not 0 <= args.guidance < float('inf'):
    raise ValueError(f'--guidance must be a number >= 0, got {args.guidance}')
  for flag, v in (('--height', args.height), ('--width', args.width)):
    if v is not None and (v <= 0 or v % factor):
      raise ValueError(f"{flag} {v}: must be a positive multiple of {factor} (this model's VAE downsampling factor)")
    if v is not None and v > MAX_SIDE:  # a typo, not an image: its latents alone would not fit in memory
      raise ValueError(f'{flag} {v}: larger than {MAX_SIDE} pixels')
  name = args.scheduler or scheduler_name_for_config(scheduler_config)
  make_scheduler(name, scheduler_config, args.steps)
  return name


def _plan(args):
  """Check every input, reading configs and images only; returns (protocol, generated-image folder,
  {subject: LoRA file}, the _Generation of a --model run or None)."""
  from jaxdream.cli.model_files import model_file_options
  from jaxdream.cli.sample import _model_info
  from jaxdream.evaluation.dreambench import check_generated, check_readable, make_protocol
  from jaxdream.models import CLIPModel, ViTModel

  subjects = [s.strip() for s in args.subjects.split(',') if s.strip()] if args.subjects is not None else None
  if subjects == []:  # not 'all': an empty list is a slip, and all 30 subjects are hours of work
    raise ValueError(f'--subjects {args.subjects!r}: no subject named')
  for flag, value in (('--num-prompts', args.num_prompts), ('--images-per-prompt', args.images_per_prompt)):
    if value is not None and value < 1:
      raise ValueError(f'{flag} must be at least 1, got {value}')
  protocol = make_protocol(
    args.dataset,
    subjects,
    num_prompts=args.num_prompts,
    images_per_prompt=args.images_per_prompt,
    seed=args.seed,
    identifier=args.identifier,
  )
  if args.batch_size < 1:
    raise ValueError(f'--batch-size must be at least 1, got {args.batch_size}')
  check_output('--out', args.out, folder=True)
  _check_folder('--clip', args.clip, CLIPModel)
  _check_folder('--dino', args.dino, ViTModel)
  if args.vlm:
    _check_vlm(args.vlm)
  loras = _lora_files(args, protocol)
  model = None
  given = [f'--{k.replace("_", "-")}' for k, v in model_file_options(args).items() if v]
  if given and not args.model:
    raise ValueError(f'{", ".join(given)}: options of a --model single file, not of --images')
  if args.model:
    factor, (h, w), scheduler_config = _model_info(args.model, **model_file_options(args))
    model = _generation(
      args, (args.height or h, args.width or w), _check_sampling(args, factor, scheduler_config), loras
    )
    folder = os.path.join(args.out, 'images')
    _check_same_generation(folder, model.settings)
    existing = [
      os.path.join(folder, s, im.name)
      for s in protocol.subjects
      for im in protocol.images(s)
      if os.path.exists(os.path.join(folder, s, im.name))
    ]
    check_readable(existing)  # an earlier, interrupted run's images are reused: they must decode
  else:
    folder = args.images
    check_readable(p for paths in check_generated(protocol, folder).values() for p in paths)
  check_readable(p for s in protocol.subjects for p in protocol.real_images(s))
  if loras:
    from jaxdream.cli.lora import check_lora_files

    check_lora_files([(p, 1.0) for p in loras.values()])
  return protocol, folder, loras, model


def _generation(args, size, scheduler, loras) -> _Generation:
  import hashlib

  from jaxdream.cli.model_files import model_file_options
  from jaxdream.cli.sample import _sample_mesh
  from jaxdream.evaluation.report import sha256_file, sha256_tree

  files = sha256_tree(args.model)
  settings = dict(
    model_sha256=hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),  # of all its files
    loras={s: sha256_file(p) for s, p in loras.items()},
    identifier=args.identifier,
    seed=args.seed,
    steps=args.steps,
    guidance=args.guidance,
    scheduler=scheduler,
    height=size[0],
    width=size[1],
  )
  settings.update({k: v for k, v in model_file_options(args).items() if v})  # a single file's, when given
  return _Generation(size, scheduler, _sample_mesh(args), settings, files)


def _earlier_generation(folder: str) -> dict:
  path = os.path.join(folder, GENERATION_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'{path}: unreadable ({e}); remove it with the images it describes') from None


def _check_same_generation(folder: str, settings: dict):
  """Images kept from an earlier run into the same folder are reused only if made the same way (a LoRA
  compared for the subjects both runs sample: another subset of subjects may follow)."""
  before = _earlier_generation(folder)
  if not before:
    return
  differ = sorted(k for k in set(before) | set(settings) if k != 'loras' and before.get(k) != settings.get(k))
  old, new = before.get('loras', {}), settings['loras']
  differ += [f'the LoRA of {s}' for s in sorted(set(old) & set(new)) if old[s] != new[s]]
  if differ:
    raise ValueError(
      f'{folder} holds images generated with other settings ({", ".join(differ)} differ); '
      'use another --out or remove that folder'
    )


def _scorer(args, kind: str, path: str):
  """A scoring model, kept in the command's cache (in-process callers reuse it and its compiled programs)."""
  from jaxdream.evaluation import load_clip, load_dino

  load = load_clip if kind == 'clip' else load_dino
  config = os.path.join(path, 'config.json')
  key = ('eval-scorer', kind, os.path.realpath(path), os.stat(config).st_mtime_ns, args.batch_size)
  return args.cache.get(key, lambda: load(path, batch_size=args.batch_size))


def _scoring_mesh(args, model):
  """The mesh whose data axes split each scoring batch, as generation's (--devices; None: one device)."""
  from jaxdream.cli.sample import _sample_mesh

  return model.mesh if model else _sample_mesh(args)


def _generate(args, protocol, folder, loras, model, bar):
  from jaxdream.cli.lora import with_loras
  from jaxdream.cli.model_files import model_file_options
  from jaxdream.cli.sample import SampleSession, _model_name
  from jaxdream.evaluation.dreambench import generate
  from jaxdream.io.files import atomic_write
  from jaxdream.io.images import format_parameters
  from jaxdream.lora import check_lora

  (h, w), scheduler, mesh = model.size, model.scheduler, model.mesh
  pipe = args.cache.get(('sample-session',), SampleSession).pipeline(args.model, False, **model_file_options(args))
  for path in loras.values():
    check_lora(pipe.components, path)  # a LoRA for another model fails before any compile
  name = _model_name(args.model)

  def parameters(im):
    return format_parameters(
      im.prompt,
      '',
      steps=args.steps,
      scheduler=scheduler,
      guidance=args.guidance,
      seed=im.seed,
      width=w,
      height=h,
      model=name,
      strength=None,
    )

  sampling = dict(
    num_inference_steps=args.steps, guidance_scale=args.guidance, scheduler=scheduler, mesh=mesh, height=h, width=w
  )
  pipeline_for = (lambda s: with_loras(pipe, [(loras[s], 1.0)])) if loras else (lambda s: pipe)
  os.makedirs(folder, exist_ok=True)
  settings = dict(model.settings, loras={**_earlier_generation(folder).get('loras', {}), **model.settings['loras']})
  atomic_write(os.path.join(folder, GENERATION_FILE), json.dumps(settings, indent=1, sort_keys=True) + '\n')
  return generate(protocol, pipeline_for, folder, progress=bar.update, parameters=parameters, **sampling)


def _vlm_scores(args, protocol, generated) -> dict:
  """{subject: [grounded per image]}: whether Kosmos-2 grounds the subject's class noun in each image."""
  from tqdm import tqdm

  from jaxdream.vlm.api import check_subject, load

  bundle = args.cache.get(('eval-vlm', os.path.realpath(args.vlm)), lambda: load(args.vlm))
  out = {}
  for s in tqdm(protocol.subjects, desc='kosmos-2', unit='subject'):
    result = check_subject(bundle, generated[s], protocol.class_noun(s))
    out[s] = [r['grounded'] for r in result['images']]
  return out


def _manifest(args, protocol, model, loras, real, generated, folder, clip, dino) -> dict:
  from jaxdream.evaluation.report import environment, sha256_file, sha256_tree
  from jaxdream.io.dreambench import PROMPTS_FILE

  config = protocol.describe()
  config.update(
    model=args.model,
    loras=args.loras,
    images=args.images,
    clip=args.clip,
    dino=args.dino,
    vlm=args.vlm,
    bootstrap_seed=args.seed,
  )
  if model:
    config.update(
      steps=args.steps,
      guidance=args.guidance,
      scheduler=model.scheduler,
      height=model.size[0],
      width=model.size[1],
      devices=model.mesh.size if model.mesh is not None else 1,
    )
  rel = lambda paths, root: {os.path.relpath(p, root): sha256_file(p) for s in protocol.subjects for p in paths[s]}
  files = {
    'dataset': sha256_file(os.path.join(args.dataset, PROMPTS_FILE)),
    'real_images': rel(real, args.dataset),
    'generated_images': rel(generated, folder),
    'clip': sha256_tree(args.clip),
    'dino': sha256_tree(args.dino),
  }
  if model:
    files['model'] = model.model_files
  if loras:
    files['loras'] = {s: sha256_file(p) for s, p in loras.items()}
  if args.vlm:
    files['vlm'] = sha256_tree(args.vlm)
  return {
    'environment': environment(),
    'config': config,
    'preprocessing': {'clip': clip.transform.describe(), 'dino': dino.transform.describe()},
    'files': files,
    'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),  # the one timestamp
  }


def _dreambench(args) -> int:
  from tqdm import tqdm

  from jaxdream.evaluation import bootstrap_ci, dreambench_scores
  from jaxdream.evaluation.report import write_report

  t0 = time.perf_counter()
  protocol, folder, loras, model = _plan(args)
  mesh = _scoring_mesh(args, model)  # a bad --devices fails here, before any model loads
  clip, dino = _scorer(args, 'clip', args.clip), _scorer(args, 'dino', args.dino)
  subjects = protocol.subjects
  images = {s: protocol.images(s) for s in subjects}
  generated = {s: [os.path.join(folder, s, im.name) for im in images[s]] for s in subjects}
  if model:
    total = sum(not os.path.exists(p) for s in subjects for p in generated[s])
    with tqdm(total=total, desc='generating', unit='image') as bar:
      written = _generate(args, protocol, folder, loras, model, bar)
    print(f'generated {written} image(s) in {folder} ({sum(map(len, generated.values())) - written} already there)')
  real = {s: protocol.real_images(s) for s in subjects}
  prompts = {s: [im.prompt_without_identifier for im in images[s]] for s in subjects}
  n_real, n_gen = sum(map(len, real.values())), sum(map(len, generated.values()))
  n_text = len({p for s in subjects for p in prompts[s]})
  with tqdm(total=2 * (n_real + n_gen) + n_text, desc='scoring', unit='input') as bar:
    scores = dreambench_scores(real, generated, prompts, clip, dino, seed=args.seed, progress=bar.update, mesh=mesh)
  for s in subjects:
    for row, im in zip(scores['images'][s], images[s]):
      row.update(file=f'{s}/{im.name}', prompt_with_identifier=im.prompt, seed=im.seed)
  if args.vlm:
    grounded = _vlm_scores(args, protocol, generated)
    for s in subjects:
      for row, g in zip(scores['images'][s], grounded[s]):
        row['grounded'] = g
      scores['subjects'][s]['vlm'] = sum(grounded[s]) / len(grounded[s])
    per = [scores['subjects'][s]['vlm'] for s in subjects]
    scores['overall']['vlm'] = sum(per) / len(per)
    scores['ci']['vlm'] = list(bootstrap_ci(per, args.seed))
  scores['classes'] = {s: protocol.class_noun(s) for s in subjects}
  scores['manifest'] = _manifest(args, protocol, model, loras, real, generated, folder, clip, dino)
  paths = write_report(args.out, scores, real, generated)
  overall = ', '.join(f'{m} {v:.4f}' for m, v in scores['overall'].items())
  print(f'{len(subjects)} subject(s), {n_gen} image(s): {overall}')
  print(f'wrote {", ".join(paths[:3])} and {len(paths) - 3} grid(s) in {time.perf_counter() - t0:.1f} s')
  return 0


def _compare(args) -> int:
  from jaxdream.evaluation.compare import compare, comparison_markdown, load_scores, manifest_differences
  from jaxdream.io.files import atomic_write

  if len(args.scores) < 2:
    raise ValueError(f'give at least two scores.json files to compare, got {len(args.scores)}')
  check_output('--out', args.out, folder=False, inputs=args.scores)
  runs = [load_scores(p) for p in args.scores]
  for path, run in zip(args.scores[1:], runs[1:]):
    diff = manifest_differences(runs[0], run)
    if diff:
      print(
        f'warning: {path} and {args.scores[0]} differ in more than the model: {", ".join(diff)}; '
        'the comparison may not be fair',
        file=sys.stderr,
      )
  text = comparison_markdown(args.scores, [compare(runs[0], run, seed=args.seed) for run in runs[1:]])
  print(text, end='')
  if args.out:
    atomic_write(args.out, text)
    print(f'wrote {args.out}')
  return 0
