"""`jaxdream demo`, `inspect` and `sample`: model folders and single-file checkpoints, txt2img/img2img/inpainting, XYZ
sweeps."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import re
import threading
import time

from jaxdream.cli.args import check_output, int_between

MAX_SIDE = 16384  # pixels, an image's height or width


def _demo(args):
  """Build the tiny local model, load it back, and run text encoder, UNet and VAE once."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from PIL import Image

  from jaxdream.diffusion.pipeline import load_pipeline
  from jaxdream.diffusion.tiny_model import create_tiny_pipeline

  check_output('--out', args.out, folder=True)
  model_dir = os.path.join(args.out, 'tiny-sd')
  t0 = time.perf_counter()
  create_tiny_pipeline(model_dir)
  pipe = load_pipeline(model_dir)
  print(f'tiny model folder: {model_dir} (created and loaded in {time.perf_counter() - t0:.1f} s)')
  ids = pipe.tokenize([args.prompt])
  first = next(iter(ids.values()))
  print(f'prompt {args.prompt!r} -> {int((first[0] != first[0, -1]).sum()) + 1} tokens')

  @nnx.jit
  def run(components, ids, latents):
    context, extra = pipe.encode_prompt(components, ids)
    eps = components['unet'](latents, jnp.array([500]), context, **extra)
    return context, eps, components['vae'].decode_latents(latents)

  h, w = pipe.default_size
  f = pipe.vae_scale_factor
  latents = jax.random.normal(jax.random.key(0), (1, h // f, w // f, pipe.unet.config['in_channels']))
  t0 = time.perf_counter()
  context, eps, image = jax.block_until_ready(run(pipe.components, ids, latents))
  print(
    f'text embeddings {context.shape}, UNet output {eps.shape}, decoded image {image.shape} '
    f'({time.perf_counter() - t0:.1f} s including compilation)'
  )
  png = os.path.join(args.out, 'demo_decoded.png')
  Image.fromarray(np.asarray((jnp.clip(image[0], -1, 1) + 1) * 127.5, np.uint8)).save(png)
  print(f'wrote {png}')


def _inspect(args):
  """Print a model's parts and parameter counts: a diffusers folder is loaded; a single file is described from its
  key names and shapes (no model built, no weights read): the type inferred, each part's parameters and dtype."""
  from jaxdream.cli.model_files import model_file_options
  from jaxdream.diffusion.pipeline import load_pipeline, read_model
  from jaxdream.models import count_params

  path = args.path or args.model
  if not path or (args.path and args.model):
    raise ValueError('give one model, as MODEL or as --model MODEL')
  spec = read_model(path, allow_pickle=args.allow_pickle, **model_file_options(args))
  if spec.single_file:
    info = _describe_single_file(spec)
  else:
    pipe = load_pipeline(path, allow_pickle=args.allow_pickle, prediction_type=args.prediction_type)
    info = {name: count_params(model) for name, model in pipe.components.items()}
  info['scheduler'] = spec.scheduler_config.get('_class_name')
  info['prediction_type'] = spec.scheduler_config.get('prediction_type', 'epsilon')
  info['default_size'] = spec.default_size
  print(json.dumps(info, indent=2))
  return 0


def _describe_single_file(spec) -> dict:
  """A single file's parts (parameter counts, as stored), their dtypes, its inferred type and where its configs
  come from."""
  import numpy as np

  from jaxdream.models import single_file

  stored = single_file.stored_components(spec.tensors, spec.model_type, spec.configs)
  info = {name: sum(int(np.prod(v.shape)) for v in tensors.values()) for name, tensors in stored.items()}
  info['dtype'] = {name: sorted({str(v.dtype) for v in tensors.values()}) for name, tensors in stored.items()}
  info['dtype'] = {name: d[0] if len(d) == 1 else d for name, d in info['dtype'].items()}
  info['model_type'] = spec.model_type
  v = spec.scheduler_config.get('prediction_type') == 'v_prediction'
  info['kind'] = single_file.DESCRIPTIONS[spec.model_type] + (' (v-prediction)' if v else '')
  info['pipeline_class'] = spec.conditioning['pipeline_class']
  info['configs'] = spec.config_dir or 'presets (the published model of this type)'
  info['ema_weights'] = any(k.startswith(single_file.EMA) for k in spec.tensors)
  return info


# What `--sweep KEY=...` can vary, and how its values are read.
SWEEP_KEYS = {
  'guidance': float,
  'steps': int,
  'seed': int,
  'scheduler': str,
  'strength': float,
  'prompt': str,
  'lora_scale': float,  # multiplies the scale of every LoRA (--lora and prompt tags)
}


class SampleSession:
  """What the `sample` commands of one session share: the last model (and SDXL refiner) loaded, with the
  compiled loops its pipeline owns. `jaxdream.cli.main(argv, cache=...)` keeps one in its cache, so that
  in-process callers (tests, notebooks) reuse them; without one each command loads its model afresh."""

  def __init__(self):
    self._loaded = {}  # role -> (model key, pipeline)
    self._embedded = {}  # role -> ((pipeline id, embedding files), the pipeline with those embeddings)
    self._lock = threading.Lock()

  def pipeline(self, path: str, allow_pickle: bool, role: str = 'model', **options):
    """The pipeline of a model folder or single file for `role` ('model', or 'refiner'), loaded with
    load_pipeline's `options` (config_dir, prediction_type, extract_ema), reloaded when the model or the options
    changed; one per role (more would multiply the memory)."""
    from jaxdream.diffusion.pipeline import load_pipeline

    stamp = path if os.path.isfile(path) else os.path.join(path, 'model_index.json')
    key = (
      os.path.realpath(path),
      allow_pickle,
      os.stat(stamp).st_mtime_ns if os.path.exists(stamp) else 0,
      tuple(sorted(options.items())),
    )
    with self._lock:
      if self._loaded.get(role, (None,))[0] != key:
        self._loaded.pop(role, None)  # the old one is freed before the new one loads
        self._embedded.pop(role, None)
        self._loaded[role] = (key, load_pipeline(path, allow_pickle=allow_pickle, **options))
      return self._loaded[role][1]

  def with_embeddings(self, pipe, args, role: str = 'model'):
    """`pipe` with the run's --embedding files, kept while the model and the files stay the same (so that its
    loops, compiled for the longer token tables, are reused)."""
    if not args.embedding:
      return pipe
    files = []
    for spec in args.embedding:
      path, _, token = spec.partition('=')
      files.append((os.path.realpath(path), os.stat(path).st_mtime_ns if os.path.isfile(path) else 0, token))
    key = (id(pipe), tuple(files), args.allow_pickle)
    with self._lock:
      if self._embedded.get(role, (None,))[0] != key:
        self._embedded.pop(role, None)
        self._embedded[role] = (key, _with_embeddings(pipe, args, refiner=role == 'refiner'))
      return self._embedded[role][1]


@dataclasses.dataclass(frozen=True)
class _Job:
  """One sampling call: the settings that a sweep axis can vary (field names are SWEEP_KEYS)."""

  prompt: str
  guidance: float
  steps: int
  seed: int
  scheduler: str
  strength: float | None  # None: txt2img
  lora_scale: float = 1.0

  def loras(self, plan) -> tuple[str, tuple]:
    """(the prompt without <lora:...> tags, ((path, scale), ...) of --lora and the tags, times lora_scale)."""
    from jaxdream.cli.lora import prompt_loras

    text, tags = prompt_loras(self.prompt, plan.lora_dir)
    return text, tuple((p, s * self.lora_scale) for p, s in (*plan.loras, *tags))


@dataclasses.dataclass(frozen=True)
class _Axis:
  key: str
  values: tuple

  def label(self, value) -> str:
    from jaxdream.io.images import format_number

    return f'{self.key}: {format_number(value) if isinstance(value, float) else value}'


def _parse_sweep(text: str) -> _Axis:
  key, sep, values = text.partition('=')
  key = key.strip()
  if not sep or key not in SWEEP_KEYS:
    raise ValueError(f'--sweep {text!r}: expected KEY=V1,V2,... with KEY one of {", ".join(SWEEP_KEYS)}')
  parts = [v.strip() for v in values.split('|' if '|' in values else ',')]
  if not all(parts):
    raise ValueError(f'--sweep {text!r}: empty value (separate values with "," or "|")')
  try:
    return _Axis(key, tuple(SWEEP_KEYS[key](v) for v in parts))
  except ValueError:
    raise ValueError(
      f'--sweep {text!r}: {key} values must be {SWEEP_KEYS[key].__name__}s; valid keys: {", ".join(SWEEP_KEYS)}'
    ) from None


def _open_image(path: str, flag: str, mode: str):
  from PIL import Image

  if not os.path.isfile(path):
    raise ValueError(f'{flag} {path}: no such file')
  try:
    with Image.open(path) as im:
      return im.convert(mode)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'{flag} {path}: not a readable image ({e})') from None


def _model_info(path: str, allow_pickle: bool = False, **options):
  """(VAE factor, default (height, width), scheduler config) of a model folder or single file (load_pipeline's
  `options`) from its configs alone (a single file's key names too), so that arguments are checked before any
  weights are read; a bad model gives load_pipeline's error."""
  from jaxdream.diffusion.pipeline import read_model

  spec = read_model(path, allow_pickle=allow_pickle, **options)
  return spec.vae_scale_factor, spec.default_size, spec.scheduler_config


def _model_name(path: str) -> str:
  """A model's name in the images' parameters: its folder's, or its file's without the extension (as A1111)."""
  name = os.path.basename(os.path.abspath(path))
  return os.path.splitext(name)[0] if os.path.isfile(path) else name


def _check_job(job: _Job, scheduler_config: dict, num_images: int, refiner=None, hires=None) -> int:
  """Raise ValueError for a bad setting; return how many steps the job runs (for the progress bar), the
  refiner's included (`refiner`: its scheduler config and start fraction), or the hires pass's (`hires`)."""
  from jaxdream.diffusion.sampling import check_hires_schedule
  from jaxdream.schedulers import make_scheduler

  if job.steps < 1:
    raise ValueError(f'steps must be at least 1, got {job.steps}')
  if not 0 <= job.guidance < math.inf:
    raise ValueError(f'guidance must be a number >= 0, got {job.guidance}')
  if not 0 <= job.seed <= 2**32 - num_images:
    raise ValueError(f'seed must be in [0, {2**32 - num_images}] (image b gets seed + b), got {job.seed}')
  if job.strength is not None and not 0 <= job.strength <= 1:
    raise ValueError(f'strength must be in [0, 1], got {job.strength}')
  sch = make_scheduler(job.scheduler, scheduler_config, job.steps)
  start = 0 if job.strength is None else sch.start_index(job.strength)
  if hires is not None:
    return sch.num_steps + check_hires_schedule(
      job.scheduler, scheduler_config, hires['hires_steps'] or job.steps, hires['strength']
    )
  if refiner is None:
    return sch.num_steps - start
  refiner_config, refiner_start = refiner
  second = make_scheduler(job.scheduler, refiner_config, job.steps)
  return (
    sch.denoising_end_index(refiner_start, start)
    - start
    + second.num_steps
    - second.denoising_start_index(refiner_start)
  )


@dataclasses.dataclass
class _Plan:
  """A checked `sample` command: what to generate, at which size, from which inputs."""

  jobs: list
  axes: list
  size: tuple
  init: object = None  # PIL images
  mask: object = None
  total_steps: int = 0
  mesh: object = None  # jax.sharding.Mesh splitting each batch (--devices)
  refiner: tuple | None = None  # (SDXL refiner folder or file, the fraction of the schedule at which it takes over)
  options: dict = dataclasses.field(default_factory=dict)  # load_pipeline's options of --model (model_files)
  refiner_options: dict = dataclasses.field(default_factory=dict)  # and of --refiner
  micro: dict = dataclasses.field(default_factory=dict)  # the model's micro-conditioning settings (SDXL)
  refiner_micro: dict = dataclasses.field(default_factory=dict)
  loras: tuple = ()  # (path, scale) of each --lora
  hires: dict | None = None  # hires fix's settings (--hires-scale ...), as sampling.hires_fix takes them
  lora_dir: str | None = None  # where prompt tags' <lora:name> files are


def _plan(args) -> _Plan:
  """Check every argument against the model's configs, reading no weights and compiling nothing."""
  from jaxdream.cli.model_files import model_file_options
  from jaxdream.diffusion.pipeline import read_model
  from jaxdream.diffusion.sampling import check_clip_skip
  from jaxdream.schedulers import scheduler_name_for_config

  if args.mask and not args.init_image:
    raise ValueError('--mask needs --init-image (the image to paint into)')
  if args.num_images < 1:
    raise ValueError(f'--num-images must be at least 1, got {args.num_images}')
  if not 0 <= args.guidance_rescale <= 1:
    raise ValueError(f'--guidance-rescale {args.guidance_rescale}: must be in [0, 1]')
  check_output('--out', args.out, folder=True)
  for spec in args.embedding or []:  # read with the model; named here, before it loads
    path = spec.partition('=')[0]
    if not os.path.isfile(path):
      raise ValueError(f'--embedding {path}: no such file')
    if not path.endswith(('.safetensors', '.pt', '.bin')):
      raise ValueError(f'--embedding {path}: expected a .safetensors embedding (.pt/.bin with --allow-pickle)')
  for flag, given in (('--init-image', args.init_image), ('--mask', args.mask)):
    # this run writes NNNNN.png and grids into --out: an input there under such a name would be overwritten
    if given and os.path.realpath(os.path.dirname(os.path.abspath(given))) == os.path.realpath(args.out):
      if re.fullmatch(r'\d{5}\.png|grid\.png|xyz_grid(_z\d+)?\.png', os.path.basename(given)):
        raise ValueError(f'{flag} {given}: this run writes a file of that name in --out; move it or use another --out')
  axes = [_parse_sweep(s) for s in args.sweep or []]
  keys = [a.key for a in axes]
  if len(axes) > 3 or len(set(keys)) < len(keys):
    raise ValueError(f'--sweep: give one to three different keys (X, Y, Z axes), got {", ".join(keys)}')
  if not args.init_image and (args.strength is not None or 'strength' in keys):
    raise ValueError('strength (denoising strength) needs --init-image')
  options = model_file_options(args)
  spec = read_model(args.model, allow_pickle=args.allow_pickle, **options)  # a bad model fails here
  try:
    check_clip_skip(spec, args.clip_skip)
  except ValueError as e:
    raise ValueError(f'--clip-skip {args.clip_skip}: {e}') from None
  second = [
    f for f, v in (('--prompt-2', args.prompt_2), ('--negative-prompt-2', args.negative_prompt_2)) if v is not None
  ]
  if second and not {'text_encoder', 'text_encoder_2'} <= set(spec.configs):
    raise ValueError(f'{", ".join(second)}: for SDXL base models (a second text encoder); {args.model} has none')
  if second and args.prompt_syntax != 'plain':
    raise ValueError(f"{', '.join(second)}: plain prompts only (diffusers'), not --prompt-syntax a1111")
  f, (h, w), scheduler_config = spec.vae_scale_factor, spec.default_size, spec.scheduler_config
  init = mask = None
  if args.init_image:
    init = _open_image(args.init_image, '--init-image', 'RGB')
    h, w = init.height // f * f, init.width // f * f  # the image's size, rounded down as the sampler does
    if not h or not w:
      raise ValueError(f'--init-image {args.init_image}: {init.width}x{init.height} is smaller than {f} pixels')
  if args.mask:
    mask = _open_image(args.mask, '--mask', 'L')
  h = h if args.height is None else args.height
  w = w if args.width is None else args.width
  for flag, v in (('--height', h), ('--width', w)):
    if v <= 0 or v % f:
      raise ValueError(f"{flag} {v}: must be a positive multiple of {f} (this model's VAE downsampling factor)")
    if v > MAX_SIDE:  # a typo, not an image: its latents alone would not fit in memory
      raise ValueError(f'{flag} {v}: larger than {MAX_SIDE} pixels')
  base = _Job(
    prompt=args.prompt,
    guidance=args.guidance,
    steps=args.steps,
    seed=random.randrange(2**32 - args.num_images) if args.seed is None else args.seed,
    scheduler=args.scheduler or scheduler_name_for_config(scheduler_config),
    strength=args.strength if args.strength is not None else 1.0 if mask else 0.8 if init else None,
  )
  # Z outermost, X innermost: the order in which images are numbered and grids filled.
  jobs = [
    dataclasses.replace(base, **dict(zip(keys[::-1], combo)))
    for combo in itertools.product(*(a.values for a in axes[::-1]))
  ]
  plan = _Plan(jobs=jobs, axes=axes, size=(h, w), init=init, mask=mask, mesh=_sample_mesh(args), options=options)
  refiner_config = _plan_sdxl(plan, args, spec)
  refiner = None if plan.refiner is None else (refiner_config, plan.refiner[1])
  plan.hires = _plan_hires(args, plan, f)
  plan.total_steps = sum(_check_job(job, scheduler_config, args.num_images, refiner, plan.hires) for job in jobs)
  _plan_loras(plan, args)
  return plan


def _plan_hires(args, plan: _Plan, f: int) -> dict | None:
  """hires_fix's settings of --hires-scale and its flags (None without them), checked."""
  from jaxdream.diffusion import upscale

  flags = {'--hires-upscaler': args.hires_upscaler, '--hires-strength': args.hires_strength,
           '--hires-steps': args.hires_steps}  # fmt: skip
  if args.hires_scale is None:
    given = [flag for flag, v in flags.items() if v is not None]
    if given:
      raise ValueError(f'{", ".join(given)} needs --hires-scale (hires fix)')
    return None
  if plan.init is not None or plan.refiner is not None:
    raise ValueError('--hires-scale (hires fix) is for txt2img: not with --init-image or --refiner')
  if not 0 < args.hires_scale <= 8:
    raise ValueError(f'--hires-scale {args.hires_scale}: must be in (0, 8]')
  strength = 0.7 if args.hires_strength is None else args.hires_strength  # A1111's web UI default
  if not 0 < strength <= 1:
    raise ValueError(f'--hires-strength {strength}: must be in (0, 1]')
  if args.hires_steps is not None and args.hires_steps < 1:
    raise ValueError(f'--hires-steps {args.hires_steps}: must be at least 1')
  h, w = plan.size
  out_w, out_h = upscale.output_size(w, h, args.hires_scale, factor=f)
  if not (f <= out_w <= MAX_SIDE and f <= out_h <= MAX_SIDE):
    raise ValueError(
      f'--hires-scale {args.hires_scale}: {w}x{h} becomes {out_w}x{out_h}; each side in [{f}, {MAX_SIDE}]'
    )
  upscaler = upscale.check_upscaler(args.hires_upscaler or upscale.DEFAULT_UPSCALER)
  return dict(scale=args.hires_scale, upscaler=upscaler, strength=strength, hires_steps=args.hires_steps)


def _hires_fields(hires: dict) -> dict:
  """A1111's infotext fields of a hires fix."""
  from jaxdream.io.images import format_number

  fields = {'Hires upscale': format_number(hires['scale']), 'Hires steps': hires['hires_steps'],
            'Hires upscaler': hires['upscaler']}  # fmt: skip
  return {k: v for k, v in fields.items() if v is not None}


def _plan_sdxl(plan: _Plan, args, spec) -> dict | None:
  """Check --refiner (and its single-file options), --refiner-start and the SDXL micro-conditioning flags against
  the models' configs (`spec`: the model's read_model); set the plan's refiner and settings; return the refiner's
  scheduler config."""
  import types

  from jaxdream.cli.model_files import model_file_options
  from jaxdream.diffusion import sdxl
  from jaxdream.diffusion.pipeline import read_model

  model = types.SimpleNamespace(**spec.conditioning)
  sizes = {}
  if args.original_size:  # W H on the command line, (height, width) in SDXL's time ids
    sizes['original_size'] = tuple(args.original_size[::-1])
  if args.crop_top_left:  # X Y: (top, left)
    sizes['crops_coords_top_left'] = tuple(args.crop_top_left[::-1])
  scores = {
    k: v
    for k, v in (('aesthetic_score', args.aesthetic_score), ('negative_aesthetic_score', args.negative_aesthetic_score))
    if v is not None
  }
  refiner_options = model_file_options(args, prefix='refiner-')
  given = [f'--refiner-{k.replace("_", "-")}' for k, v in refiner_options.items() if v]
  if args.refiner_start is not None:
    given.insert(0, '--refiner-start')
  if given and not args.refiner:
    raise ValueError(f'{", ".join(given)} needs --refiner (an SDXL refiner model folder or file)')
  sdxl_model = model.pipeline_class in sdxl.PIPELINE_CLASSES
  if (sizes or scores) and not sdxl_model:
    flags = [n for n, v in vars(args).items() if v is not None and n in _SDXL_FLAGS]
    raise ValueError(
      f'{", ".join(_SDXL_FLAGS[n] for n in flags)}: SDXL micro-conditioning, but {args.model} is a '
      f'{model.pipeline_class}'
    )
  refiner_config = None
  if args.refiner:
    refiner = read_model(args.refiner, allow_pickle=args.allow_pickle, **refiner_options)
    sdxl.check_refiner(model, types.SimpleNamespace(**refiner.conditioning))
    refiner_f, f, refiner_config = refiner.vae_scale_factor, spec.vae_scale_factor, refiner.scheduler_config
    if refiner_f != f:
      raise ValueError(f'--refiner {args.refiner}: its VAE downsamples by {refiner_f}, the model by {f}')
    plan.refiner_options = refiner_options
    start = 0.8 if args.refiner_start is None else args.refiner_start
    if not 0 < start < 1:
      raise ValueError(f'--refiner-start {start}: must be in (0, 1), the fraction of the steps the model runs')
    plan.refiner = (args.refiner, start)
    plan.micro, plan.refiner_micro = sizes, {**sizes, **scores}
  elif scores and model.micro_conditioning is not sdxl.aesthetic_time_ids:
    raise ValueError('--aesthetic-score and --negative-aesthetic-score condition an SDXL refiner: give --refiner')
  else:
    plan.micro = {**sizes, **scores}
  return refiner_config


# The SDXL micro-conditioning flags, by argparse name.
_SDXL_FLAGS = {
  'original_size': '--original-size',
  'crop_top_left': '--crop-top-left',
  'aesthetic_score': '--aesthetic-score',
  'negative_aesthetic_score': '--negative-aesthetic-score',
}


def _plan_loras(plan: _Plan, args):
  """Check --lora, --lora-dir and the prompts' <lora:name:scale> tags, and read every LoRA file once."""
  from jaxdream.cli.lora import check_lora_files, parse_lora_spec

  if args.lora_dir and not os.path.isdir(args.lora_dir):
    raise ValueError(f'--lora-dir {args.lora_dir}: no such folder')
  plan.loras, plan.lora_dir = tuple(parse_lora_spec(s) for s in args.lora or []), args.lora_dir
  used = [lora for job in plan.jobs for lora in job.loras(plan)[1]]
  if any(a.key == 'lora_scale' for a in plan.axes) and not used:
    raise ValueError('--sweep lora_scale needs a LoRA (--lora FILE or a <lora:name> prompt tag)')
  check_lora_files(used)


def _sample_mesh(args):
  """The mesh whose 'data' axis splits each batch (None: one device)."""
  import jax

  from jaxdream.distributed.mesh import make_mesh

  n = jax.device_count() if args.devices == -1 else args.devices
  if not 1 <= n <= jax.device_count():
    raise ValueError(f'--devices {args.devices}: this machine has {jax.device_count()} device(s)')
  return make_mesh(data=n, devices=jax.devices()[:n]) if n > 1 else None


def _run_job(pipe, job: _Job, plan: _Plan, args, progress, refiner=None):
  from jaxdream.diffusion import sampling

  kw = dict(
    negative_prompts=[args.negative_prompt],
    num_inference_steps=job.steps,
    guidance_scale=job.guidance,
    scheduler=job.scheduler,
    seed=job.seed,
    height=plan.size[0],
    width=plan.size[1],
    num_images_per_prompt=args.num_images,
    progress=progress,
    mesh=plan.mesh,
    clip_skip=args.clip_skip,
    prompt_syntax=args.prompt_syntax,
    guidance_rescale=args.guidance_rescale,
  )
  if args.prompt_2 is not None or args.negative_prompt_2 is not None:
    kw.update(prompts_2=None if args.prompt_2 is None else [args.prompt_2], negative_prompts_2=args.negative_prompt_2)
  if refiner is not None:
    return sampling.refine(
      pipe,
      refiner,
      [job.prompt],
      refiner_start=plan.refiner[1],
      init_images=plan.init,
      masks=plan.mask,
      strength=job.strength,
      micro_conditioning=plan.micro,
      refiner_micro_conditioning=plan.refiner_micro,
      **kw,
    )
  kw['micro_conditioning'] = plan.micro
  if plan.hires is not None:
    return sampling.hires_fix(
      pipe, [job.prompt], **dict(plan.hires, hires_steps=plan.hires['hires_steps'] or job.steps), **kw
    )
  if plan.mask is not None:
    return sampling.inpaint(pipe, [job.prompt], plan.init, plan.mask, strength=job.strength, **kw)
  if plan.init is not None:
    return sampling.img2img(pipe, [job.prompt], plan.init, strength=job.strength, **kw)
  return sampling.txt2img(pipe, [job.prompt], **kw)


def _with_embeddings(pipe, args, refiner: bool = False):
  """The pipeline knowing each --embedding (a refiner: the SDXL ones, for its one text encoder)."""
  from jaxdream.diffusion.textual_inversion import SDXL_KEYS, load_textual_inversion, read_embedding

  for spec in args.embedding or []:
    path, _, token = spec.partition('=')
    name, tables = read_embedding(path, allow_pickle=args.allow_pickle)
    if refiner and not SDXL_KEYS.keys() <= tables.keys():
      continue
    stem = os.path.splitext(os.path.basename(path))[0]
    pipe = load_textual_inversion(pipe, path, token or name or stem, allow_pickle=args.allow_pickle)
  return pipe


def _sample(args, session: SampleSession | None = None):
  """Generate images (txt2img, img2img, inpainting, or an XYZ sweep of them) as PNGs with A1111 parameters."""
  import numpy as np
  from tqdm import tqdm

  from jaxdream.cli.lora import with_loras, with_tags
  from jaxdream.diffusion.tiny_model import builtin_model_folder
  from jaxdream.io.images import format_number, format_parameters, grid_shape, make_grid, save_png
  from jaxdream.lora import check_lora

  args.model = builtin_model_folder(args.model)  # builtin:tiny-base: the shipped folder
  plan = _plan(args)
  t0 = time.perf_counter()
  session = session or SampleSession()
  pipe = session.pipeline(args.model, args.allow_pickle, **plan.options)
  refiner = plan.refiner and session.pipeline(
    plan.refiner[0], args.allow_pickle, role='refiner', **plan.refiner_options
  )
  pipe, refiner = session.with_embeddings(pipe, args), refiner and session.with_embeddings(refiner, args, 'refiner')
  for path in sorted({p for job in plan.jobs for p, _ in job.loras(plan)[1]}):
    check_lora(pipe.components, path)  # a LoRA for another model fails before any output or compile
  os.makedirs(args.out, exist_ok=True)
  if args.seed is None:
    print(f'seed {plan.jobs[0].seed} (random)')
  model = _model_name(args.model)
  results, texts = [], []  # per job its images; per image its parameters
  merged = (None, pipe)  # the last LoRA set and its merged pipeline (one at a time: each is a model's size)
  bar = tqdm(total=plan.total_steps, desc='sampling', unit='step')
  try:
    for job in plan.jobs:
      prompt, loras = job.loras(plan)
      if loras != merged[0]:
        merged = (loras, with_loras(pipe, loras))
      run = dataclasses.replace(job, prompt=prompt)
      results.append(_run_job(merged[1], run, plan, args, progress=lambda _step: bar.update(1), refiner=refiner))
      for b, image in enumerate(results[-1]):
        texts.append(
          format_parameters(
            with_tags(prompt, loras) if loras else job.prompt,
            args.negative_prompt,
            steps=job.steps,
            scheduler=job.scheduler,
            guidance=job.guidance,
            seed=job.seed + b,
            width=plan.size[1],
            height=plan.size[0],
            model=model,
            strength=job.strength if plan.hires is None else plan.hires['strength'],
            refiner=plan.refiner and _model_name(plan.refiner[0]),
            refiner_start=plan.refiner and plan.refiner[1],
            clip_skip=args.clip_skip,
            extra={
              **({'CFG rescale': format_number(args.guidance_rescale)} if args.guidance_rescale else {}),
              **(_hires_fields(plan.hires) if plan.hires else {}),
            },
          )
        )
        save_png(os.path.join(args.out, f'{len(texts) - 1:05d}.png'), image, texts[-1])
  finally:
    bar.close()
  n = len(texts)
  if plan.axes:
    grids = _xyz_grids(plan.axes, [make_grid(im, *grid_shape(len(im))) for im in results])
  else:
    grids = {'grid.png': make_grid(np.concatenate(results), *grid_shape(n))}
  for name, grid in grids.items():
    save_png(os.path.join(args.out, name), grid, texts[0])  # grids carry the first image's parameters, as in A1111
  names = '00000.png' if n == 1 else f'00000.png .. {n - 1:05d}.png'
  print(
    f'wrote {n} image{"s" * (n > 1)} to {args.out}{os.sep} ({names}) and {", ".join(grids)} '
    f'in {time.perf_counter() - t0:.1f} s'
  )
  return 0


def _xyz_grids(axes: list, cells: list) -> dict:
  """One labelled grid image per Z value: a row per Y value, a column per X value."""
  from jaxdream.io.images import labelled_grid

  x, y, z = (axes + [None, None])[:3]
  nx, ny = len(x.values), len(y.values) if y else 1
  grids = {}
  for k, zv in enumerate(z.values if z else [None]):
    block = cells[k * nx * ny : (k + 1) * nx * ny]
    grids[f'xyz_grid_z{k}.png' if z else 'xyz_grid.png'] = labelled_grid(
      [block[r * nx : (r + 1) * nx] for r in range(ny)],
      [x.label(v) for v in x.values],
      [y.label(v) for v in y.values] if y else None,
      z.label(zv) if z else None,
    )
  return grids


def _add_sample_parser(sub):
  from jaxdream.cli.model_files import add_model_file_arguments
  from jaxdream.io.images import SAMPLER_NAMES

  s = sub.add_parser(
    'sample',
    help='generate images: txt2img, img2img (--init-image), inpainting (--mask), XYZ sweeps',
    description='Generate images from a diffusers-format model folder or a single-file checkpoint (original '
    'CompVis/Stability layout .safetensors, as A1111, SD.Next and ComfyUI keep them). Each image is written as a PNG '
    'carrying its generation parameters as AUTOMATIC1111 / SD.Next write them (PNG Info reads '
    'them back), together with grid.png of all images. Files of an earlier run in the same '
    '--out folder are replaced.',
  )
  s.add_argument(
    '--model',
    required=True,
    help='diffusers-format model folder, single-file checkpoint (.safetensors: SD 1.x/2.x, inpainting, SDXL), or '
    "'builtin:tiny-base' (jaxdream's own tiny model)",
  )
  add_model_file_arguments(s)
  s.add_argument('--prompt', required=True)
  s.add_argument('--negative-prompt', default='')
  s.add_argument('--prompt-2', help="SDXL: the second text encoder's prompt (diffusers' prompt_2; default --prompt)")
  s.add_argument(
    '--negative-prompt-2', help="SDXL: the second text encoder's negative prompt (default --negative-prompt)"
  )
  s.add_argument('--steps', type=int, default=20, help='number of denoising steps (default 20)')
  s.add_argument('--guidance', type=float, default=7.5, help='classifier-free guidance scale (default 7.5)')
  s.add_argument(
    '--guidance-rescale',
    type=float,
    default=0.0,
    help="diffusers' guidance_rescale in [0, 1] (0: off; about 0.7 for zero terminal SNR models), recorded as SD.Next's "
    "'CFG rescale'",
  )
  s.add_argument(
    '--clip-skip',
    type=int_between(0),
    default=0,
    help="skip this many of the text encoder's last layers, as diffusers' clip_skip (A1111's Clip skip minus 1)",
  )
  s.add_argument(
    '--prompt-syntax',
    choices=['plain', 'a1111'],
    default='plain',
    help="plain: the prompts as written, cut at 77 tokens, as diffusers (default); a1111: AUTOMATIC1111's "
    '(word:1.3) / (word) / [word] emphasis, BREAK and prompts of any length, as its web UI and `jaxdream serve` read them',
  )
  s.add_argument('--scheduler', help=f"one of {', '.join(SAMPLER_NAMES)} (default: the model folder's own)")
  s.add_argument('--seed', type=int, help='seed of the first image; image b gets seed + b (default: random)')
  s.add_argument('--num-images', type=int, default=1, help='images per setting (default 1)')
  s.add_argument(
    '--height',
    type=int,
    help="image height, a multiple of the VAE factor (default: the model's size, or the init image's)",
  )
  s.add_argument('--width', type=int, help='image width (as --height)')
  s.add_argument('--init-image', help='start from this image (img2img; with --mask: inpainting)')
  s.add_argument(
    '--strength', type=float, help='denoising strength in [0, 1] with --init-image (default 0.8; 1.0 with --mask)'
  )
  s.add_argument('--mask', help='inpainting mask image: white (>= 50%%) is repainted; needs --init-image')
  s.add_argument(
    '--refiner',
    metavar='MODEL',
    help="an SDXL refiner model folder or single file: it takes over from the SDXL --model at --refiner-start (diffusers' "
    'ensemble of experts: the model stops at that fraction of the schedule, the refiner runs the rest)',
  )
  s.add_argument(
    '--refiner-start',
    type=float,
    metavar='FRACTION',
    help='with --refiner: the fraction of the schedule, in (0, 1), at which the refiner takes over (default 0.8)',
  )
  add_model_file_arguments(s, prefix='refiner-', what='--refiner')
  s.add_argument(
    '--hires-scale',
    type=float,
    metavar='SCALE',
    help="hires fix (A1111's): generate at --width x --height, upscale by SCALE, then denoise again at that size",
  )
  s.add_argument(
    '--hires-upscaler',
    metavar='NAME',
    help="with --hires-scale: A1111's 'Latent' (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent "
    "(bicubic antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)', or an image upscaler: 'None', 'Lanczos', "
    "'Nearest'",
  )
  s.add_argument(
    '--hires-strength', type=float, help="with --hires-scale: the second pass's denoising strength (default 0.7)"
  )
  s.add_argument(
    '--hires-steps',
    type=int,
    help='with --hires-scale: steps of the second pass (default: --steps), as A1111 runs them',
  )
  s.add_argument(
    '--original-size',
    type=int,
    nargs=2,
    metavar=('W', 'H'),
    help="SDXL micro-conditioning: the training image's original size (default: the output size)",
  )
  s.add_argument(
    '--crop-top-left',
    type=int,
    nargs=2,
    metavar=('X', 'Y'),
    help='SDXL micro-conditioning: the top-left corner of the training crop (default 0 0)',
  )
  s.add_argument(
    '--aesthetic-score', type=float, help='SDXL refiner micro-conditioning: the aesthetic score (default 6.0)'
  )
  s.add_argument(
    '--negative-aesthetic-score',
    type=float,
    help="SDXL refiner micro-conditioning: the negative prompt's aesthetic score (default 2.5)",
  )
  s.add_argument('--out', required=True, help='output folder')
  s.add_argument(
    '--devices',
    type=int,
    default=1,
    help='split each batch of images over this many devices (-1: all of them; default 1)',
  )
  s.add_argument(
    '--sweep',
    action='append',
    metavar='KEY=V1,V2,...',
    help=f'an XYZ plot axis; give one to three (X, Y, Z) and every combination is generated, with '
    f'one labelled grid per Z value (xyz_grid.png, or xyz_grid_z0.png, ...). KEY: '
    f'{", ".join(SWEEP_KEYS)}. Values are separated by commas, or by "|" when the text '
    f'has one (for prompts with commas: --sweep "prompt=a dog, oil|a cat, photo")',
  )
  s.add_argument(
    '--lora',
    action='append',
    metavar='FILE[:SCALE]',
    help='merge a LoRA file (diffusers/peft or kohya/A1111 .safetensors) at this scale (default 1); repeatable',
  )
  s.add_argument(
    '--lora-dir',
    help='folder of LoRA files for A1111 prompt tags: <lora:name:0.8> in the prompt loads DIR/name.safetensors '
    '(or DIR/name/pytorch_lora_weights.safetensors) at scale 0.8; the tag is removed from the prompt text',
  )
  s.add_argument(
    '--embedding',
    action='append',
    metavar='FILE[=TOKEN]',
    help='a textual inversion embedding (diffusers, A1111 or SDXL .safetensors; .pt with --allow-pickle) for the '
    "prompts to name as TOKEN (default: the token the file names, else the file's name, as A1111); repeatable",
  )
  s.add_argument(
    '--allow-pickle', action='store_true', help='also load pickle (.bin/.ckpt) weights; they can run code when loaded'
  )
  s.set_defaults(fn=_sample)
