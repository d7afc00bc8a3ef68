"""The FastAPI app: A1111's `/sdapi/v1` routes, the web page at `/`, `/metrics`; auth, body limit, one JSON log
line per request. Handlers check a request (in a worker thread: images are decoded, LoRA files read), submit it
to the queue and await its future; the event loop never samples."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import importlib.metadata
import io
import json
import logging
import math
import random
import time
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from jaxdream.diffusion import sampling, upscale
from jaxdream.diffusion.sampling import check_clip_skip, prompt_chunks
from jaxdream.io.images import format_number, format_parameters, parse_parameters, png_bytes, read_parameters
from jaxdream.lora.tags import parse_tags
from jaxdream.schedulers.common import strength_steps
from jaxdream.serve import inpainting, samplers
from jaxdream.serve.engine import BatchKey, Engine, Hires, Task
from jaxdream.serve.limits import ApiError, Limits, check_range, check_size, decode_image, image_bytes, resized
from jaxdream.serve.metrics import Metrics
from jaxdream.serve.outputs import DEFAULT_OUTDIR, save_pngs
from jaxdream.serve.queue import BatchQueue, QueueFull, ShuttingDown
from jaxdream.serve.schemas import Img2ImgRequest, OptionsRequest, PngInfoRequest, Txt2ImgRequest

log = logging.getLogger('jaxdream.serve')
RETRY_AFTER_S = 5


@dataclasses.dataclass
class Server:
  """What the app serves: the engine (models, LoRA files, sampling), its queue, limits, users and metrics."""

  engine: Engine
  queue: BatchQueue
  metrics: Metrics
  limits: Limits = dataclasses.field(default_factory=Limits)
  users: dict = dataclasses.field(default_factory=dict)  # user -> password; empty: no auth
  options: dict = dataclasses.field(default_factory=dict)  # A1111 options other than the model
  outdir: str = DEFAULT_OUTDIR  # where save_images writes (outputs.save_pngs)


def make_server(
  model: str,
  *,
  models_dir=None,
  lora_dir=None,
  config_dir=None,
  max_batch: int = 8,
  queue_size: int = 64,
  limits: Limits | None = None,
  users: dict | None = None,
  devices: int = 1,
  allow_pickle: bool = False,
  outdir: str = DEFAULT_OUTDIR,
  lora_cache: int = 64,
  lora_cache_mb: float = 1024,
  embeddings_dir=None,
) -> Server:
  if queue_size < 1:
    raise ValueError(f'--queue-size must be at least 1, got {queue_size}')
  engine = Engine(
    model,
    models_dir=models_dir,
    lora_dir=lora_dir,
    config_dir=config_dir,
    max_batch=max_batch,
    devices=devices,
    allow_pickle=allow_pickle,
    lora_cache=lora_cache,
    lora_cache_mb=lora_cache_mb,
    embeddings_dir=embeddings_dir,
  )
  metrics = Metrics(max_batch)
  queue = BatchQueue(
    engine.run,
    max_batch=max_batch,
    max_requests=queue_size,
    metrics=metrics,
    num_steps=engine.num_steps,
    preview=engine.preview,
    finish=engine.finish,
  )
  return Server(engine, queue, metrics, limits or Limits(), dict(users or {}), outdir=outdir)


def warm_up(server: Server, steps: int = 20, sampler: str = samplers.DEFAULT_SAMPLER, cfg_scale: float = 7.0):
  """Compile the sampler for the default model's own size (one batch through the queue's own path)."""
  eng = server.engine
  h, w = eng.pipeline(eng.current).default_size
  key = BatchKey(eng.current, 'txt2img', h, w, steps, samplers.resolve(sampler), cfg=cfg_scale > 1)
  server.queue.submit(key, [Task('', '', 0, cfg_scale)]).result()


# -- checking a request


# A1111 features that change the image and that jaxdream does not have: asked for, they are refused (as A1111
# refuses a script it does not have), never silently left out.
_UNSUPPORTED = {
  'restore_faces': 'face restoration (restore_faces)',
  'tiling': 'tiling',
  'script_name': 'scripts (script_name)',
  'alwayson_scripts': 'always-on scripts (alwayson_scripts: ControlNet, ADetailer, ...)',
}


def _refuse_unsupported(req):
  for field, what in _UNSUPPORTED.items():
    if getattr(req, field, None):
      raise ApiError(422, field, f'{what} is not supported by jaxdream serve')


def _version() -> str:
  try:
    return importlib.metadata.version('jaxdream')
  except importlib.metadata.PackageNotFoundError:  # run from a source tree that was not installed
    return 'unknown'


def _clip_skip(value) -> int:
  """diffusers' clip_skip of A1111's CLIP_stop_at_last_layers (1: the last layer, 2: the one before, ...)."""
  if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
    raise ApiError(
      422, 'CLIP_stop_at_last_layers', f'CLIP_stop_at_last_layers must be an integer in [1, 12], got {value!r}'
    )
  return value - 1


def _plan(server: Server, req: Txt2ImgRequest, kind: str):
  """(BatchKey, tasks, facts for the response) of a request, or an ApiError naming the field at fault."""
  eng, lim = server.engine, server.limits
  eng.refresh_embeddings()  # files added to --embeddings-dir are words from the next request on, as in A1111
  override = req.override_settings or {}
  model = eng.model_name(override['sd_model_checkpoint']) if 'sd_model_checkpoint' in override else eng.current
  pipe = eng.pipeline(model)
  f, (dh, dw) = pipe.vae_scale_factor, pipe.default_size
  width, height = req.width or dw, req.height or dh
  check_size('width', width, f, lim)
  check_size('height', height, f, lim)
  check_range('steps', req.steps, 1, lim.max_steps)
  check_range('batch_size', req.batch_size, 1, lim.max_batch_size)
  check_range('n_iter', req.n_iter, 1, lim.max_n_iter)
  n = req.batch_size * req.n_iter
  if n > lim.max_images:
    raise ApiError(422, 'batch_size', f'batch_size * n_iter = {n} images; at most {lim.max_images} per request')
  check_range('cfg_scale', req.cfg_scale, 0, 100)
  _refuse_unsupported(req)
  try:
    sampler = samplers.resolve(req.sampler_name or req.sampler_index, req.scheduler)
  except samplers.UnknownSampler as e:
    raise ApiError(422, e.field, str(e)) from None
  seed = req.seed if req.seed != -1 else random.randrange(2**32 - n)
  check_range('seed', seed, 0, 2**32 - n)
  try:
    text, tags = parse_tags(req.prompt)
  except ValueError as e:
    raise ApiError(422, 'prompt', str(e)) from None
  lora = _lora(eng, tags, lim)
  signature = eng.adapter(model, lora[0])[0] if lora else None
  inputs, strength, fill = [(None, None, None)], None, None
  if kind == 'img2img':
    req: Img2ImgRequest
    if not req.init_images:
      raise ApiError(422, 'init_images', 'init_images: give at least one base64-encoded image')
    images = [decode_image('init_images', im, lim) for im in req.init_images]
    strength = 0.75 if req.denoising_strength is None else req.denoising_strength
    check_range('denoising_strength', strength, 0, 1)
    if strength_steps(req.steps, strength) < 1:  # refused by the sampler, as by diffusers
      raise ApiError(422, 'denoising_strength', f'denoising_strength {strength:g} of {req.steps} steps runs no step')
    if req.mask:
      inputs, fill = _inpaint_inputs(req, images, decode_image('mask', req.mask, lim, 'L'), width, height)
      kind = 'inpaint'
    else:
      inputs = [(resized(im, width, height), None, None) for im in images]
  clip_skip = _clip_skip(override.get('CLIP_stop_at_last_layers', server.options.get('CLIP_stop_at_last_layers', 1)))
  try:
    check_clip_skip(pipe, clip_skip)
  except ValueError as e:
    raise ApiError(422, 'CLIP_stop_at_last_layers', f'CLIP_stop_at_last_layers {clip_skip + 1}: {e}') from None
  chunks = tuple(
    _prompt_chunks(pipe, field, p, req.steps, lim)
    for field, p in (('negative_prompt', req.negative_prompt), ('prompt', text))
  )
  hires, hires_texts = None, (None, None)
  if kind == 'txt2img' and req.enable_hr:  # A1111's img2img has no hires fix: the field is ignored there
    hires, hires_texts = _hires(server, pipe, req, model, sampler, text, tags, width, height)
  variation = _variation(req, n, f, lim)
  if variation is not None and hires is not None:
    raise ApiError(422, 'subseed_strength', 'variation seeds with hires fix are not supported by jaxdream serve')
  key = BatchKey(
    model, kind, height, width, req.steps, sampler, req.cfg_scale > 1, strength, signature, fill, clip_skip, chunks,
    hires,
  )  # fmt: skip
  # A1111: images count their seeds up, but with a variation strength all keep the seed and count the subseed up
  seeds = [seed + (0 if variation and variation[1] else i) for i in range(n)]
  tasks = [
    Task(
      text, req.negative_prompt, seeds[i], req.cfg_scale, lora, *inputs[i % len(inputs)], *hires_texts,
      variation=variation and (variation[0] + i, *variation[1:]),
    )
    for i in range(n)
  ]  # fmt: skip
  facts = dict(
    model=model, width=width, height=height, seed=seed, seeds=seeds, sampler=sampler, strength=strength,
    variation=variation,
  )  # fmt: skip
  return key, tasks, dict(facts, model_hash=eng.describe(model)['hash'])


def _variation(req: Txt2ImgRequest, n: int, factor: int, lim: Limits):
  """(first subseed, subseed_strength, noise size to resize from (latent height, width) or None) of A1111's variation
  seeds, or None when the request has none."""
  check_range('subseed_strength', req.subseed_strength, 0, 1)
  resize = req.seed_resize_from_h > 0 and req.seed_resize_from_w > 0  # A1111: both, else off
  if not req.subseed_strength and not resize:
    return None
  subseed = req.subseed if req.subseed != -1 else random.randrange(2**32 - n)
  check_range('subseed', subseed, 0, 2**32 - n)
  size = None
  if resize:
    for field in ('seed_resize_from_h', 'seed_resize_from_w'):
      check_range(field, getattr(req, field), factor, lim.max_size)
    size = (req.seed_resize_from_h // factor, req.seed_resize_from_w // factor)
  return subseed, float(req.subseed_strength), size


_SAME = ('', 'Use same checkpoint', 'Use same sampler', 'Use same scheduler')  # A1111's "as the first pass"


def _hires(
  server: Server, pipe, req: Txt2ImgRequest, model: str, sampler: str, text: str, tags, width: int, height: int
):
  """(Hires, (hires prompt, hires negative prompt)) of a txt2img request with enable_hr, as A1111 reads its hr_*
  fields; an ApiError naming the field at fault."""
  eng, lim, f = server.engine, server.limits, pipe.vae_scale_factor
  if (
    req.hr_checkpoint_name not in (None, *_SAME)
    and eng.model_name(req.hr_checkpoint_name, 'hr_checkpoint_name') != model
  ):
    raise ApiError(422, 'hr_checkpoint_name', 'a hires pass on another checkpoint is not supported by jaxdream serve')
  try:
    upscaler = upscale.check_upscaler(req.hr_upscaler or upscale.DEFAULT_UPSCALER)
  except ValueError as e:
    raise ApiError(422, 'hr_upscaler', str(e)) from None
  if not (req.hr_resize_x or req.hr_resize_y):  # A1111 reads hr_scale only without a resize
    check_range('hr_scale', req.hr_scale, 0, 8)
  check_range('hr_resize_x', req.hr_resize_x, 0, lim.max_size)
  check_range('hr_resize_y', req.hr_resize_y, 0, lim.max_size)
  out_w, out_h = upscale.output_size(width, height, req.hr_scale, req.hr_resize_x, req.hr_resize_y, f)
  resized_by = 'hr_resize_x' if req.hr_resize_x or req.hr_resize_y else 'hr_scale'
  check_size(f'{resized_by} (hires width)', out_w, f, lim)
  check_size(f'{resized_by} (hires height)', out_h, f, lim)
  check_range('hr_second_pass_steps', req.hr_second_pass_steps, 0, lim.max_steps)
  strength = 0.75 if req.denoising_strength is None else req.denoising_strength  # A1111's txt2img default
  check_range('denoising_strength', strength, 0, 1)
  if strength == 0:
    raise ApiError(422, 'denoising_strength', 'denoising_strength 0 leaves the hires pass no step')
  second = sampler
  if req.hr_sampler_name not in (None, *_SAME) or req.hr_scheduler not in (None, *_SAME):
    name = req.hr_sampler_name if req.hr_sampler_name not in (None, *_SAME) else req.sampler_name or req.sampler_index
    try:
      second = samplers.resolve(name, req.hr_scheduler if req.hr_scheduler not in (None, *_SAME) else req.scheduler)
    except samplers.UnknownSampler as e:
      raise ApiError(422, f'hr_{e.field}', str(e)) from None
  steps = req.hr_second_pass_steps or req.steps
  prompt, negative = None, None
  if req.hr_prompt:
    try:
      prompt, hr_tags = parse_tags(req.hr_prompt)
    except ValueError as e:
      raise ApiError(422, 'hr_prompt', str(e)) from None
    if sorted(hr_tags) != sorted(tags):  # one set of adapters per image for both passes
      raise ApiError(422, 'hr_prompt', "hr_prompt's <lora:...> tags must be the prompt's (the passes share adapters)")
  if req.hr_negative_prompt:
    negative = req.hr_negative_prompt
  try:
    sampling.check_hires_schedule(second, pipe.scheduler_config, steps, strength)
  except ValueError as e:
    raise ApiError(422, 'denoising_strength', str(e)) from None
  total = sampling.hires_schedule(steps, strength)[0]
  chunks = tuple(
    _prompt_chunks(pipe, field, p, total, lim)
    for field, p in (('hr_negative_prompt', negative or req.negative_prompt), ('hr_prompt', prompt or text))
  )
  hires = Hires(req.hr_scale, req.hr_resize_x, req.hr_resize_y, upscaler, steps, second, strength, chunks)
  return hires, (prompt, negative)


def _prompt_chunks(pipe, field: str, prompt: str, steps: int, lim: Limits) -> int:
  """The number of 75-token chunks of an A1111 prompt (its longest prompt-editing text), within the limits."""
  if len(prompt) > lim.max_prompt_chars:
    raise ApiError(422, field, f'{field}: {len(prompt)} characters; at most {lim.max_prompt_chars}')
  try:
    segments, chunks = prompt_chunks(pipe, prompt, steps)
  except ValueError as e:  # e.g. emphasis weights past float32
    raise ApiError(422, field, f'{field}: {e}') from None
  if chunks > lim.max_prompt_chunks:
    raise ApiError(422, field, f'{field}: {chunks} chunks of 75 tokens; at most {lim.max_prompt_chunks}')
  if segments * chunks > lim.max_prompt_encodings:
    raise ApiError(
      422, field, f'{field}: {segments} prompt-editing texts of {chunks} chunks; at most {lim.max_prompt_encodings}'
    )
  return chunks


def _lora(eng: Engine, tags, lim: Limits):
  """(adapter entry, the image's weight) of a prompt's <lora:name:weight> tags, or None: one file is its own
  entry at the tag's weight (so its images batch with any weight of it); several are one combined entry at
  their weights (a file named twice: the weights added, as A1111 applies it twice)."""
  if len(tags) > lim.max_loras:
    raise ApiError(422, 'prompt', f'{len(tags)} <lora:...> tags; at most {lim.max_loras} per prompt')
  weights: dict[str, float] = {}
  for name, w in tags:
    path = eng.lora_path(name)
    weights[path] = weights.get(path, 0.0) + w
  weights = {path: w for path, w in weights.items() if w != 0}
  if not weights:
    return None
  if len(weights) == 1:
    ((path, w),) = weights.items()
    return ((path, 1.0),), w
  return tuple(sorted(weights.items())), 1.0


def _inpaint_inputs(req: Img2ImgRequest, images: list, mask, width: int, height: int):
  """([(init, mask, Overlay) per init image], the sampler's masked_content), as A1111 prepares inpainting."""
  check_range('inpainting_fill', req.inpainting_fill, 0, len(inpainting.FILLS) - 1)
  check_range('inpaint_full_res_padding', req.inpaint_full_res_padding, 0, width + height)
  blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
  mask = inpainting.prepare_mask(mask, blur=blur, invert=bool(req.inpainting_mask_invert))
  kw = dict(fill_mode=int(req.inpainting_fill), full_res=req.inpaint_full_res, padding=req.inpaint_full_res_padding)
  inputs = [inpainting.inputs(im, mask, width=width, height=height, **kw) for im in images]
  return inputs, inpainting.MASKED_CONTENT[int(req.inpainting_fill)]


def _response(req: Txt2ImgRequest, key: BatchKey, facts: dict, images: list, outdir: str) -> dict:
  """A1111's {images, parameters, info}: base64 PNGs carrying their infotext, info a JSON string; with
  save_images, the PNGs written under `outdir` too."""
  n = len(images)
  seeds = facts['seeds'][:n]
  h, variation = key.hires, facts['variation']
  strength = key.strength if h is None else h.strength
  extra = {} if h is None else _hires_parameters(req, key)
  subseeds = seeds if variation is None else [variation[0] + i for i in range(n)]

  def fields(i):  # A1111's infotext fields of image i's variation seed
    if variation is None:
      return extra
    varied = {'Variation seed': subseeds[i], 'Variation seed strength': format_number(variation[1])}
    resized = {'Seed resize from': f'{req.seed_resize_from_w}x{req.seed_resize_from_h}'}
    return {**(varied if variation[1] else {}), **(resized if variation[2] else {}), **extra}

  texts = [
    format_parameters(
      req.prompt,
      req.negative_prompt,
      steps=key.steps,
      scheduler=key.sampler,
      guidance=req.cfg_scale,
      seed=s,
      width=key.width,
      height=key.height,
      model=key.model,
      strength=strength,
      clip_skip=key.clip_skip,
      extra=fields(i),
    )
    for i, s in enumerate(seeds)
  ]
  done = [i for i, im in enumerate(images) if im is not None]
  pngs = [png_bytes(images[i], texts[i]) for i in done]
  if req.save_images:
    save_pngs(outdir, 'txt2img' if key.kind == 'txt2img' else 'img2img', pngs, [seeds[i] for i in done])
  encoded = [base64.b64encode(png).decode('ascii') for png in pngs]
  info = {
    'prompt': req.prompt,
    'all_prompts': [req.prompt] * n,
    'negative_prompt': req.negative_prompt,
    'all_negative_prompts': [req.negative_prompt] * n,
    'seed': facts['seed'],
    'all_seeds': seeds,
    'subseed': subseeds[0],
    'all_subseeds': subseeds,
    'subseed_strength': 0 if variation is None else variation[1],
    'width': key.width,
    'height': key.height,
    'sampler_name': samplers.a1111_name(key.sampler),
    'cfg_scale': req.cfg_scale,
    'steps': key.steps,
    'batch_size': req.batch_size,
    'restore_faces': False,
    'face_restoration_model': None,
    'sd_model_name': key.model,
    'sd_model_hash': facts['model_hash'] or '',  # a folder model has no file hash; typed clients want a string
    'sd_vae_name': None,  # the model's own VAE
    'sd_vae_hash': None,
    'seed_resize_from_w': req.seed_resize_from_w if variation and variation[2] else -1,
    'seed_resize_from_h': req.seed_resize_from_h if variation and variation[2] else -1,
    'denoising_strength': strength,
    'extra_generation_params': extra,
    'index_of_first_image': 0,
    'infotexts': [texts[i] for i in done],
    'styles': req.styles or [],
    'job_timestamp': time.strftime('%Y%m%d%H%M%S'),
    'clip_skip': key.clip_skip + 1,
    'is_using_inpainting_conditioning': key.kind == 'inpaint',
    'interrupted': bool(getattr(images, 'interrupted', False)) or len(done) < n,
    'version': f'jaxdream {_version()}',
  }
  params = req.model_dump()
  params.update(width=key.width, height=key.height)
  if isinstance(req, Img2ImgRequest):
    params['init_images'] = params['mask'] = None  # as A1111: the inputs are not sent back
  return {'images': encoded if req.send_images else [], 'parameters': params, 'info': json.dumps(info)}


def _hires_parameters(req: Txt2ImgRequest, key: BatchKey) -> dict:
  """A1111's infotext fields of a hires fix."""
  h = key.hires
  resized = h.resize_x or h.resize_y
  fields = {
    'Hires upscale': None if resized else format_number(h.scale),
    'Hires resize': f'{h.resize_x}x{h.resize_y}' if resized else None,
    'Hires steps': h.steps if req.hr_second_pass_steps else None,
    'Hires upscaler': h.upscaler,
    'Hires sampler': samplers.a1111_name(h.sampler) if h.sampler != key.sampler else None,
    'Hires prompt': req.hr_prompt or None,
    'Hires negative prompt': req.hr_negative_prompt or None,
  }
  return {k: v for k, v in fields.items() if v is not None}


async def _generate(server: Server, req: Txt2ImgRequest, kind: str) -> dict:
  key, tasks, facts = await run_in_threadpool(_plan, server, req, kind)
  try:
    future = server.queue.submit(key, tasks, per_iteration=req.batch_size)
  except QueueFull as e:
    raise ApiError(429, None, f'{e}; retry later', 'queue_full') from None
  except ShuttingDown as e:
    raise ApiError(503, None, str(e), 'shutting_down') from None
  try:
    images = await asyncio.wrap_future(future)
  except ShuttingDown as e:
    raise ApiError(503, None, str(e), 'shutting_down') from None
  except Exception as e:  # noqa: BLE001
    log.exception('sampling failed')
    raise ApiError(500, None, f'sampling failed: {type(e).__name__}: {e}', 'sampling') from None
  return await run_in_threadpool(_response, req, key, facts, images, server.outdir)


# -- the app


def _authorized(server: Server, header: str | None) -> str | None:
  """The user of a valid Basic Authorization header (passwords compared in constant time), else None."""
  if not header or not header.lower().startswith('basic '):
    return None
  try:
    user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode('utf-8').partition(':')
  except (ValueError, UnicodeDecodeError):
    return None
  ok = False
  for name, secret in server.users.items():  # every entry compared: the time says nothing about which matched
    ok |= hmac.compare_digest(name.encode(), user.encode()) & hmac.compare_digest(secret.encode(), password.encode())
  return user if ok else None


class _BodyLimit:
  """413 for a body over the limit: by its Content-Length, or, sent chunked, once the bytes read pass it."""

  def __init__(self, app, server: Server):
    self.app, self.server = app, server

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    limit = self.server.limits.max_body_bytes
    headers = dict(scope.get('headers') or [])
    length = headers.get(b'content-length')
    too_big = JSONResponse(
      {'error': 'too_large', 'detail': f'request body over {limit} bytes', 'field': 'body'}, status_code=413
    )
    if length is not None:
      if not length.isdigit() or int(length) > limit:
        self.server.metrics.error('too_large')
        return await too_big(scope, receive, send)
      return await self.app(scope, receive, send)
    if headers.get(b'transfer-encoding', b'').lower() != b'chunked':
      return await self.app(scope, receive, send)
    chunks, size = [], 0
    while True:
      message = await receive()
      if message['type'] == 'http.disconnect':
        return
      chunks.append(message.get('body', b''))
      size += len(chunks[-1])
      if size > limit:
        self.server.metrics.error('too_large')
        return await too_big(scope, receive, send)
      if not message.get('more_body'):
        break
    body = b''.join(chunks)
    replayed = False

    async def replay():
      nonlocal replayed
      if replayed:
        return await receive()
      replayed = True
      return {'type': 'http.request', 'body': body, 'more_body': False}

    return await self.app(scope, replay, send)


def _json_safe(value):
  """`value` with non-finite floats as their names ('nan', 'inf'), which JSON cannot hold."""
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  return value


def _constant(value):
  """A route handler without parameters that answers `value`."""
  return lambda: value


def create_app(server: Server) -> FastAPI:
  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    await run_in_threadpool(server.queue.close)  # queued requests get 503; the running batch finishes

  app = FastAPI(
    title='jaxdream serve', description='AUTOMATIC1111-compatible sdapi/v1 over jaxdream', lifespan=lifespan
  )
  app.state.server = server
  app.add_middleware(_BodyLimit, server=server)

  @app.middleware('http')
  async def auth_and_log(request: Request, call_next):
    t0 = time.monotonic()
    user = None
    if server.users:
      user = _authorized(server, request.headers.get('authorization'))
      if user is None:
        server.metrics.error('unauthorized')
        response = JSONResponse(
          {'error': 'unauthorized', 'detail': 'authentication required', 'field': None},
          status_code=401,
          headers={'WWW-Authenticate': 'Basic realm="jaxdream"'},
        )
    if not server.users or user is not None:
      response = await call_next(request)
    seconds = time.monotonic() - t0
    path = request.url.path
    server.metrics.request(
      path if path.startswith('/sdapi/') or path in ('/', '/metrics') else 'other', response.status_code, seconds
    )
    line = dict(method=request.method, path=path, status=response.status_code, ms=round(seconds * 1000, 1))
    line.update(client=request.client.host if request.client else None, user=user)
    log.info(json.dumps(line))
    return response

  @app.exception_handler(ApiError)
  async def api_error(request: Request, e: ApiError):
    server.metrics.error(e.kind)
    headers = {'Retry-After': str(RETRY_AFTER_S)} if e.status in (429, 503) else None
    return JSONResponse({'error': e.kind, 'detail': e.detail, 'field': e.field}, status_code=e.status, headers=headers)

  @app.exception_handler(RequestValidationError)
  async def invalid(request: Request, e: RequestValidationError):
    server.metrics.error('invalid_request')
    # FastAPI's own answer, with the inputs it repeats made JSON (a NaN literal sent for an int is not)
    return JSONResponse({'detail': _json_safe(jsonable_encoder(e.errors()))}, status_code=422)

  @app.get('/', response_class=HTMLResponse, include_in_schema=False)
  async def page():
    return HTMLResponse(resources.files('jaxdream.serve').joinpath('static/index.html').read_text('utf-8'))

  @app.get('/metrics', response_class=PlainTextResponse)
  async def metrics():
    return PlainTextResponse(server.metrics.render(server.queue.depth()), media_type='text/plain; version=0.0.4')

  @app.post('/sdapi/v1/txt2img')
  async def txt2img(req: Txt2ImgRequest):
    return await _generate(server, req, 'txt2img')

  @app.post('/sdapi/v1/img2img')
  async def img2img(req: Img2ImgRequest):
    return await _generate(server, req, 'img2img')

  @app.get('/sdapi/v1/progress')
  async def progress(skip_current_image: bool = False):
    # A1111's default sends the preview; it is decoded only then (in a worker thread: a VAE call).
    return await run_in_threadpool(server.queue.progress, not skip_current_image)

  @app.post('/sdapi/v1/interrupt')
  async def interrupt():
    return {'interrupted': server.queue.interrupt()}

  @app.post('/sdapi/v1/skip')
  async def skip():
    return {'skipped': server.queue.interrupt(skip=True)}

  @app.get('/sdapi/v1/options')
  async def get_options():
    title = await run_in_threadpool(server.engine.title, server.engine.current)  # a file's title hashes it
    return {**server.options, 'sd_model_checkpoint': title, 'samples_format': 'png'}

  @app.post('/sdapi/v1/options')
  async def set_options(req: OptionsRequest):
    values = req.model_dump()
    if 'CLIP_stop_at_last_layers' in values:
      _clip_skip(values['CLIP_stop_at_last_layers'])  # checked now, not at the next request
    if 'sd_model_checkpoint' in values:
      name = server.engine.model_name(values.pop('sd_model_checkpoint'))
      await run_in_threadpool(server.engine.pipeline, name)  # loaded now: a broken model fails this call
      server.engine.current = name
    server.options.update(values)
    return None

  @app.get('/sdapi/v1/sd-models')
  async def sd_models():
    return await run_in_threadpool(lambda: [server.engine.describe(name) for name in server.engine.models()])

  @app.get('/sdapi/v1/samplers')
  async def sampler_list():
    return samplers.samplers()

  @app.get('/sdapi/v1/schedulers')
  async def scheduler_list():
    return list(samplers.SCHEDULERS)

  @app.get('/sdapi/v1/upscalers')
  async def upscaler_list():  # the image upscalers hires fix takes (no model upscalers)
    return [
      dict(name=name, model_name=None, model_path=None, model_url=None, scale=4) for name in upscale.IMAGE_UPSCALERS
    ]

  @app.get('/sdapi/v1/latent-upscale-modes')
  async def latent_upscale_modes():
    return [{'name': name} for name in upscale.LATENT_MODES]

  @app.get('/sdapi/v1/embeddings')
  async def embeddings():
    return server.engine.embeddings()

  @app.get('/sdapi/v1/loras')
  async def loras():
    return server.engine.loras()

  # What A1111 clients also list or call at start-up, and that jaxdream has none of (or nothing to do for).
  for path, empty in (
    ('/sdapi/v1/sd-vae', []),
    ('/sdapi/v1/prompt-styles', []),
    ('/sdapi/v1/hypernetworks', []),
    ('/sdapi/v1/face-restorers', []),
    ('/sdapi/v1/realesrgan-models', []),
    ('/sdapi/v1/scripts', {'txt2img': [], 'img2img': []}),
    ('/sdapi/v1/script-info', []),
    ('/sdapi/v1/extensions', []),
    ('/sdapi/v1/cmd-flags', {}),
  ):
    app.add_api_route(path, _constant(empty), methods=['GET'])
  app.add_api_route('/sdapi/v1/refresh-vae', _constant(None), methods=['POST'])

  @app.post('/sdapi/v1/refresh-embeddings')
  async def refresh_embeddings():
    await run_in_threadpool(server.engine.refresh_embeddings)
    return None

  @app.post('/sdapi/v1/refresh-checkpoints')
  async def refresh_checkpoints():
    server.engine.refresh_models()
    return None

  @app.post('/sdapi/v1/refresh-loras')
  async def refresh_loras():
    return None  # /loras lists the folder as it is at each call

  @app.post('/sdapi/v1/png-info')
  async def png_info(req: PngInfoRequest):
    decode_image('image', req.image, server.limits)  # a readable image within the limits
    text = read_parameters(io.BytesIO(image_bytes('image', req.image))) or ''
    items = {'parameters': text} if text else {}
    return {'info': text, 'items': items, 'parameters': parse_parameters(text) if text else {}}

  return app
