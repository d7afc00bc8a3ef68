"""Sampling: txt2img, img2img and inpainting with classifier-free guidance, one compiled loop each.

The whole denoising loop (the pipeline's `encode_prompt`, every UNet step, the scheduler, VAE decoding) is
one jitted function over the pipeline's components, cached in the pipeline's own CompileCache. The UNet's
conditioning is the pipeline's (diffusion/conditioning.py): the prompt's, plus its micro-conditioning per image.
Conditional and unconditional passes are one batched UNet call (two when an A1111 negative prompt has another
number of 75-token chunks than the prompt, as A1111 runs them). Prompts (as token ids), seeds, guidance
scales (one per image), strength and the progress callback are per-call values, so new ones never
recompile; a new image size, batch size, step count, scheduler or model structure does. Calls may run
from several threads at once: each gets its own images and its own progress calls.

Randomness is per image: image b draws everything (initial noise, VAE posterior samples, ancestral step
noise) from `jax.random.key(seeds[b])`, so an image depends only on its own seed and prompt.

Adapters per image: with `adapters` (diffusion.adapters.stack_adapters) each image uses its own LoRA
adapter and weight (`adapter_ids`, `adapter_scales`, per-call arrays) in the same batched loop.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdream.diffusion import adapters as per_image_adapters
from jaxdream.diffusion import sdxl, upscale
from jaxdream.diffusion.conditioning import Emphasis, encode_chunks
from jaxdream.distributed.mesh import as_auto
from jaxdream.distributed.multihost import run_together, to_global, to_host
from jaxdream.distributed.sharding import split_batch
from jaxdream.io import prompt_syntax
from jaxdream.io.prompt_syntax import prompt_schedule
from jaxdream.io.tokenizer import tokenize
from jaxdream.runtime import Structure
from jaxdream.schedulers import make_scheduler

# Streams derived from an image's seed, so that adding a feature never shifts another stream.
_NOISE, _ENCODE, _MASKED_ENCODE, _STEPS = 0, 1, 2, 3


def image_keys(seeds: Sequence[int], stream: int):
  """One key per image for the given purpose (_NOISE, _ENCODE, ...)."""
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stream))(jnp.asarray(seeds, jnp.uint32))


def image_noise(seeds: Sequence[int], shape: tuple[int, ...], stream: int = _NOISE):
  """Standard-normal arrays (B, *shape), image b's drawn from its own seed."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(image_keys(seeds, stream))


def slerp_noise(strength: float, low, high):
  """A1111's slerp of two noise arrays (B, H, W, C): per image, column by column (its `dim=1` of (C, H, W) noise is
  the height), along the great circle from `low` to `high` by `strength`; nearly parallel columns (a mean cosine
  over 0.9995) mixed linearly, with A1111's weights, and so are columns of one element (A1111 divides 0 by 0 there:
  a black image)."""
  low, high = jnp.asarray(low, jnp.float32), jnp.asarray(high, jnp.float32)
  unit = lambda a: a / jnp.linalg.norm(a, axis=1, keepdims=True)
  dot = jnp.sum(unit(low) * unit(high), axis=1, keepdims=True)  # (B, 1, W, C)
  omega = jnp.arccos(dot)
  so = jnp.sin(omega)
  safe = jnp.where(so == 0, 1.0, so)  # one-row noise: every column (anti)parallel, where A1111's 0/0 is NaN
  curved = jnp.sin((1.0 - strength) * omega) / safe * low + jnp.sin(strength * omega) / safe * high
  straight = low * strength + high * (1 - strength)  # A1111's (its weights, as written)
  near = jnp.mean(dot, axis=(1, 2, 3), keepdims=True) > 0.9995
  return jnp.where(near | (so == 0), straight, curved)


def variation_noise(seeds, subseeds, strength: float, shape: tuple, resize_from: tuple | None = None):
  """Initial noise (B, *shape) with A1111's variation seeds: each image's seed's noise slerped toward its
  subseed's by `strength`, drawn at `resize_from` (latent (height, width): A1111's seed_resize_from_h/w // 8) and
  pasted into the middle of the seed's noise at `shape` (cropped when larger), as A1111's ImageRNG makes it. Pass
  it as the samplers' `latents`."""
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f'subseed_strength must be in [0, 1], got {strength}')
  small = shape if resize_from is None else (*resize_from, shape[-1])
  noise = image_noise(seeds, small)
  if strength:
    noise = slerp_noise(strength, noise, image_noise(subseeds, small))
  if small == shape:
    return noise
  full = image_noise(seeds, shape)
  (h, w), (sh, sw) = shape[:2], small[:2]
  dy, dx = (h - sh) // 2, (w - sw) // 2
  ph, pw = (sh if dy >= 0 else sh + 2 * dy), (sw if dx >= 0 else sw + 2 * dx)
  ty, tx, dy, dx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
  return full.at[:, ty : ty + ph, tx : tx + pw].set(noise[:, dy : dy + ph, dx : dx + pw])


@dataclasses.dataclass(frozen=True)
class _Mode:
  cfg: bool  # classifier-free guidance (a guidance_scale > 1), as diffusers decides
  init: str  # 'noise' (txt2img, inpaint at strength 1), 'image' (the image latents noised to the first step),
  # 'as_is' (denoising_start: the given latents are already at the first step's noise level)
  blend: bool  # 4-channel inpainting: re-impose the known region after every step
  unet_mask: bool  # 9-channel inpainting UNet: mask and masked-image latents are UNet inputs
  progress: bool
  # what else the progress callback gets: '' nothing, 'latents' the latents after the step, 'denoised' the
  # prompt's clean-latent estimate of the step (A1111's live preview, and what it keeps when interrupted)
  progress_latents: str = ''
  latent: bool = False  # return the final latents undecoded (output_type='latent')
  adapters: bool = False  # per-image LoRA adapters (stacked factors, ids and scales are arguments)
  clip_skip: int = 0  # the pipeline's encode_prompt skips this many of the text encoders' last layers
  clip_skip_negative: bool = False  # for the negative prompts too (A1111); diffusers skips for the prompts only
  chunks: tuple[int, int] = (1, 1)  # prompt chunks of the negative and the positive prompts (A1111 prompts)
  rescale: bool = False  # diffusers' guidance_rescale for some image (the values are arguments)


def _split(pipeline) -> tuple[dict, dict]:
  """(graph definitions, parameters) of the pipeline's components, by name."""
  graphdefs, params = {}, {}
  for name, model in pipeline.components.items():
    graphdefs[name], params[name] = nnx.split(model)
  return graphdefs, params


def _sampler(pipeline, graphdefs: dict, sch, mode: _Mode):
  """The jitted loop for one pipeline structure, schedule and mode, from the pipeline's compile cache."""
  key = (
    'sampler',
    tuple((name, Structure(g)) for name, g in graphdefs.items()),
    pipeline.encode_prompt,
    sch.name,
    json.dumps(sch.config, sort_keys=True, default=str),
    sch.num_inference_steps,
    getattr(sch, 'eta', 0.0),
    mode,
  )
  return pipeline.compiled.get(
    key, lambda: _build_sampler(graphdefs, pipeline.encode_prompt, pipeline.callbacks, sch, mode)
  )


def _build_sampler(graphdefs: dict, encode_prompt, callbacks, sch, mode: _Mode):
  timesteps = jnp.asarray(sch.timesteps)
  n = sch.num_steps
  per_image_step = jax.vmap(sch.step, in_axes=(0, 0, None, 0, 0))
  per_image_noise = jax.vmap(sch.add_noise, in_axes=(0, 0, None))
  per_image_denoised = jax.vmap(sch.denoised, in_axes=(0, 0, None))

  def run(
    params,
    adapters,
    cond_ids,
    uncond_ids,
    cond_weights,
    uncond_weights,
    cond_counts,
    uncond_counts,
    cond_ends,
    uncond_ends,
    cond_inputs,
    uncond_inputs,
    keep_uncond,
    noise,
    step_keys,
    adapter_ids,
    adapter_scales,
    guidance,
    guidance_rescale,
    start,
    end,
    image_latents,
    mask,
    masked_latents,
    token,
  ):
    models = {name: nnx.merge(graphdef, params[name]) for name, graphdef in graphdefs.items()}
    twice = lambda a: jnp.concatenate([a, a]) if mode.cfg else a
    if mode.adapters:  # both halves of a guided image use its adapter, as its merged weights would
      per_image_adapters.set_per_example(models, adapters, twice(adapter_ids), twice(adapter_scales))
    halves = lambda u, c: jax.tree.map(lambda u, c: jnp.concatenate([u, c]), u, c) if mode.cfg else c
    kwargs = {'clip_skip': mode.clip_skip} if mode.clip_skip else {}  # a pipeline's own encode_prompt may not take it
    ids, weights = halves(uncond_ids, cond_ids), halves(uncond_weights, cond_weights)
    counts, ends = halves(uncond_counts, cond_counts), halves(uncond_ends, cond_ends)
    # The segments of each image's prompt (A1111 prompt editing: ids (B, segments, chunks, L)) encoded as rows of
    # one batch, image-major, each image's rescaled together as the webui does: context (segments, B, T, D), from
    # which the loop picks each image's segment per step. Repeated last segments (padding) are not counted.
    rows, segs = ends.shape
    flat = lambda a: a.reshape((rows * segs,) + a.shape[2:])
    counted = jnp.concatenate([jnp.ones((rows, 1), bool), ends[:, 1:] != ends[:, :-1]], axis=1)
    emphasis = None
    if weights is not None:
      groups = jnp.repeat(jnp.arange(rows), segs)
      emphasis = Emphasis(jax.tree.map(flat, weights), groups, flat(counted))
    if mode.adapters and segs > 1:
      rows_of = lambda a: jnp.repeat(twice(a), segs)
      per_image_adapters.set_per_example(models, adapters, rows_of(adapter_ids), rows_of(adapter_scales))
    context, extra = encode_chunks(encode_prompt, models, jax.tree.map(flat, ids), flat(counts), emphasis, **kwargs)
    if mode.cfg and mode.clip_skip and not mode.clip_skip_negative:  # the negative half (first rows) in full
      full = encode_chunks(encode_prompt, models, jax.tree.map(flat, ids), flat(counts), emphasis)
      half = rows // 2 * segs
      pick = lambda skipped, whole: jnp.concatenate([whole[:half], skipped[half:]])
      context, extra = pick(context, full[0]), jax.tree.map(pick, extra, full[1])
    unflat = lambda a: jnp.swapaxes(a.reshape((rows, segs) + a.shape[1:]), 0, 1)
    context, extra = unflat(context), jax.tree.map(unflat, extra)
    if mode.adapters and segs > 1:  # the UNet's rows again: one per image and half
      per_image_adapters.set_per_example(models, adapters, twice(adapter_ids), twice(adapter_scales))
    if mode.cfg:  # force_zeros_for_empty_prompt without a negative prompt: the negative half's embeddings are zeros
      keep = lambda a: a.at[:, : a.shape[1] // 2].multiply(
        keep_uncond.reshape((1, -1) + (1,) * (a.ndim - 2)).astype(a.dtype)
      )
      context, extra = keep(context), jax.tree.map(keep, extra)
    inputs = halves(uncond_inputs, cond_inputs)
    # A negative prompt of another number of chunks than the prompt's: the two halves' UNet calls run apart, each
    # with its own context length, as A1111 does (padding either would change its cross-attention).
    apart = mode.cfg and mode.chunks[0] != mode.chunks[1]
    if apart and mode.adapters:  # one half per call from here on
      per_image_adapters.set_per_example(models, adapters, adapter_ids, adapter_scales)

    def conditioning(i):
      """(context, extra) of step i: each image's segment whose last step (A1111's, counted from the first step
      run) is the first at or after it."""
      if ends.shape[1] == 1:
        c, e = context[0], jax.tree.map(lambda a: a[0], extra)
      else:
        g = jnp.sum(ends < i - start, axis=1)
        pick = lambda a: jnp.take_along_axis(a, g.reshape((1, -1) + (1,) * (a.ndim - 2)), axis=0)[0]
        c, e = pick(context), jax.tree.map(pick, extra)
      return c, {**e, **inputs}

    if mode.init == 'image':
      x = per_image_noise(image_latents, noise, start)
    elif mode.init == 'as_is':
      x = image_latents
    else:
      x = noise * sch.init_noise_sigma
    state = jax.vmap(sch.init_state)(x)

    def body(i, carry):
      x, state = carry
      inp = sch.scale_model_input(x, i)
      if mode.unet_mask:
        inp = jnp.concatenate([inp, mask, masked_latents], axis=-1)
      t = jnp.broadcast_to(timesteps[i], (inp.shape[0],))
      ctx, ext = conditioning(i)
      if apart:
        b, length = ctx.shape[0] // 2, ctx.shape[1] // max(mode.chunks)
        ctxs = ctx[:b, : mode.chunks[0] * length], ctx[b:, : mode.chunks[1] * length]
        exts = jax.tree.map(lambda a: a[:b], ext), jax.tree.map(lambda a: a[b:], ext)
        eps = jnp.concatenate([models['unet'](inp, t, c, **e).astype(jnp.float32) for c, e in zip(ctxs, exts)])
      else:
        if mode.cfg:
          inp, t = jnp.concatenate([inp, inp]), jnp.concatenate([t, t])
        eps = models['unet'](inp, t, ctx, **ext).astype(jnp.float32)
      if mode.progress_latents == 'denoised':  # A1111: from the prompt's half, before guidance mixes the two
        preview = per_image_denoised(x, jnp.split(eps, 2)[1] if mode.cfg else eps, i)
      if mode.cfg:
        uncond, cond = jnp.split(eps, 2)
        eps = uncond + guidance.reshape((-1,) + (1,) * (eps.ndim - 1)) * (cond - uncond)
        if mode.rescale:
          eps = _rescale_guidance(eps, cond, guidance_rescale)
      keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(step_keys, i)
      x, state = per_image_step(state, eps, i, x, keys)
      if mode.blend:  # known region: the original latents noised to the next step's level (none after the last)
        known = jnp.where(i < end - 1, per_image_noise(image_latents, noise, jnp.minimum(i + 1, n - 1)), image_latents)
        x = (1.0 - mask) * known + mask * x
      if mode.progress_latents:  # the loop is shared by every call: the call's token finds its own callback
        shown = preview if mode.progress_latents == 'denoised' else x
        jax.debug.callback(lambda token, i, x: callbacks(token, int(i), np.array(x)), token, i, shown)
      elif mode.progress:
        jax.debug.callback(lambda token, i: callbacks(token, int(i)), token, i)
      return x, state

    x, _ = jax.lax.fori_loop(start, end, body, (x, state))
    if mode.latent:
      return x
    return decode_uint8(models['vae'], x)

  return jax.jit(run)


def _rescale_guidance(guided, cond, rescale):
  """diffusers' rescale_noise_cfg (Lin et al. 2023, 3.4): the guided prediction scaled to the standard deviation
  (torch's, unbiased) of the prompt's, mixed in by each image's `rescale` (0: as it was)."""
  axes = tuple(range(1, guided.ndim))
  ratio = jnp.std(cond, axis=axes, keepdims=True, ddof=1) / jnp.std(guided, axis=axes, keepdims=True, ddof=1)
  r = rescale.reshape((-1,) + (1,) * (guided.ndim - 1))
  return jnp.where(r > 0, r * (guided * ratio) + (1 - r) * guided, guided)


def decode_uint8(vae, latents, truncate: bool = False):
  """uint8 NHWC images of scaled latents, as the sampler returns them (traceable); `truncate`: 255 * the [0, 1] image
  truncated, not rounded, as A1111 makes the image its hires fix upscales."""
  images = jnp.clip(vae.decode_latents(latents).astype(jnp.float32) / 2 + 0.5, 0.0, 1.0) * 255
  return (jnp.floor(images) if truncate else jnp.round(images)).astype(jnp.uint8)


def _decode_truncated(pipeline, latents):
  """decode_uint8(..., truncate=True) of latents, compiled once per VAE."""
  vae_def, vae_params = nnx.split(pipeline.vae)
  build = lambda: jax.jit(lambda params, x: decode_uint8(nnx.merge(vae_def, params), x, truncate=True))
  return np.asarray(pipeline.compiled.get(('decode_truncated', Structure(vae_def)), build)(vae_params, latents))


def _encode(pipeline, images, seeds, stream):
  """Latents of NHWC images, sampled from the VAE posterior with each image's own noise."""
  vae_def, vae_params = nnx.split(pipeline.vae)

  def build():
    def encode(params, images, noise):
      mean, std = nnx.merge(vae_def, params).encode_latents(images)
      return mean + std * noise

    return jax.jit(encode)

  fn = pipeline.compiled.get(('encode', Structure(vae_def)), build)
  f, c = pipeline.vae_scale_factor, pipeline.vae.latent_channels
  shape = (images.shape[1] // f, images.shape[2] // f, c)
  return fn(vae_params, jnp.asarray(images), image_noise(seeds, shape, stream))


def check_clip_skip(pipeline, clip_skip) -> int:
  """`clip_skip` as an int, if the pipeline's text encoders have the layers to skip (a ValueError if not). `pipeline`
  may also be a ModelSpec (its configs' layer counts: checked before any weight is read)."""
  clip_skip = int(clip_skip or 0)
  if not clip_skip:
    return 0
  if hasattr(pipeline, 'configs'):  # a ModelSpec
    encode_prompt = pipeline.conditioning['encode_prompt']
    layers = [
      c.get('num_hidden_layers', 12) for n, c in pipeline.configs.items() if n.startswith('text_encoder')
    ]  # CLIP's default
  else:
    encode_prompt = pipeline.encode_prompt
    encoders = [m for n, m in pipeline.components.items() if n.startswith('text_encoder')]
    layers = [len(m.text_model.encoder.layers) for m in encoders if hasattr(getattr(m, 'text_model', None), 'encoder')]
  # SD reads hidden_states[-(clip_skip + 1)] (the embeddings at most), SDXL hidden_states[-(clip_skip + 2)].
  most = max(min(layers, default=0) - (encode_prompt is sdxl.encode_prompt), 0)
  if not 0 <= clip_skip <= most:
    raise ValueError(f'clip_skip must be in [0, {most}] for these text encoders, got {clip_skip}')
  return clip_skip


def _expand(prompts, num_images_per_prompt, what, none_allowed: bool = False):
  """Prompts repeated per image; with `none_allowed`, entries may be None (negative prompts: none for that image)."""
  if isinstance(prompts, str):
    prompts = [prompts]
  if not isinstance(prompts, Sequence) or not all(isinstance(p, str) or (none_allowed and p is None) for p in prompts):
    raise ValueError(f'{what} must be a string or a list of strings, got {prompts!r:.80}')
  prompts = list(prompts)
  if not prompts:
    raise ValueError(f'{what}: give at least one prompt')
  return [p for p in prompts for _ in range(num_images_per_prompt)]


def _count(value, what: str, least: int = 1) -> int:
  """An integer argument (not a bool or a float), at least `least`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
    raise ValueError(f'{what} must be an integer >= {least}, got {value!r}')
  return int(value)


def _seeds(seed, batch):
  if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
    seeds = [seed + b for b in range(batch)]
  elif isinstance(seed, (Sequence, np.ndarray)) and all(
    isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seed
  ):
    seeds = list(seed)
  else:
    raise ValueError(f'seed must be an int or one int per image, got {seed!r:.80}')
  if len(seeds) != batch:
    raise ValueError(f'{len(seeds)} seeds for {batch} images: give one seed per image, or one int')
  if not all(0 <= int(s) < 2**32 for s in seeds):  # image b gets seed + b
    raise ValueError(f'seeds must be in [0, 2**32) (image b gets seed + b), got {seeds[0]}..{seeds[-1]}')
  return seeds


def _check_size(pipeline, height, width):
  dh, dw = pipeline.default_size
  height = dh if height is None else _count(height, 'height')
  width = dw if width is None else _count(width, 'width')
  f = pipeline.vae_scale_factor
  if height % f or width % f:
    raise ValueError(f"height and width must be multiples of {f} (this model's VAE factor), got {height}x{width}")
  return height, width


def _as_list(items, batch_ndims) -> list:
  """One image, a list of them, or a batched array (ndim in `batch_ndims`) as a list."""
  if isinstance(items, np.ndarray) and items.ndim in batch_ndims:
    return list(items)
  return list(items) if isinstance(items, (list, tuple)) else [items]


def _to_images(images, height, width) -> np.ndarray:
  """Images as float32 NHWC in [-1, 1]: uint8 arrays (B,H,W,3) in 0..255, float arrays in [0, 1] (or, with
  negative values, already in [-1, 1]), as diffusers' image processor reads them, PIL images or paths; resized
  (Lanczos) if needed."""
  from PIL import Image

  out = []
  for im in _as_list(images, (4,)):
    if isinstance(im, str):
      im = Image.open(im)
    if isinstance(im, Image.Image):
      im = np.asarray(
        im.convert('RGB').resize((width, height), Image.LANCZOS) if im.size != (width, height) else im.convert('RGB')
      )
    im = np.asarray(im)
    if im.ndim == 2 or (im.ndim == 3 and im.shape[-1] == 1):  # grayscale
      im = np.repeat(im.reshape(im.shape[:2] + (1,)), 3, -1)
    if im.ndim != 3 or im.shape[-1] != 3:
      raise ValueError(f'init images must be RGB (H, W, 3) arrays, PIL images or paths; got an array {im.shape}')
    if im.dtype == np.uint8:
      if im.shape[:2] != (height, width):
        im = np.asarray(Image.fromarray(im).resize((width, height), Image.LANCZOS))
      x = im.astype(np.float32) / 127.5 - 1.0
    elif np.issubdtype(im.dtype, np.floating):
      if not np.isfinite(im).all() or im.max() > 1.0 or im.min() < -1.0:
        raise ValueError(
          f'float init images must be in [0, 1] (or [-1, 1]), as diffusers reads them; got values in '
          f'[{np.nanmin(im):g}, {np.nanmax(im):g}] (pass uint8 for 0..255)'
        )
      x = im.astype(np.float32) if im.min() < 0 else im.astype(np.float32) * 2.0 - 1.0
    else:
      raise ValueError(f'init images must be uint8 or float arrays, got {im.dtype}')
    if x.shape[:2] != (height, width):  # a float image: each channel resized in float
      x = np.stack(
        [np.asarray(Image.fromarray(c, mode='F').resize((width, height), Image.LANCZOS)) for c in x.transpose(2, 0, 1)],
        -1,
      )
    out.append(x.astype(np.float32))
  return np.stack(out)


def _to_masks(masks, height, width) -> np.ndarray:
  """Masks as float32 (B,H,W,1), 1 where to paint: binarised at 0.5 like diffusers' mask processor."""
  from PIL import Image

  if isinstance(masks, np.ndarray) and masks.ndim == 3 and masks.shape[-1] in (1, 3, 4):
    masks = [masks]  # one (H, W, C) mask (an RGB image as an array), not a batch of H masks
  out = []
  for m in _as_list(masks, (3, 4)):
    if isinstance(m, str):
      m = Image.open(m)
    if isinstance(m, Image.Image):
      m = m.convert('L')
      m = np.asarray(m.resize((width, height), Image.LANCZOS) if m.size != (width, height) else m)
    m = np.asarray(m, np.float32)
    if m.ndim == 3 and m.shape[-1] in (1, 3, 4):
      m = m[..., :3].mean(-1)
    if m.ndim != 2:
      raise ValueError(f'masks must be (H, W) or (H, W, C) arrays, PIL images or paths; got an array {m.shape}')
    if not np.isfinite(m).all():
      raise ValueError('masks must be finite numbers')
    if m.max() > 1.0:
      m = m / 255.0
    if m.shape != (height, width):  # as an image mask: resized to the images' size
      m = np.asarray(Image.fromarray(m.astype(np.float32), mode='F').resize((width, height), Image.LANCZOS))
    out.append((m >= 0.5).astype(np.float32)[..., None])
  return np.stack(out)


def _generate(
  pipeline,
  prompts,
  negative_prompts,
  *,
  num_images_per_prompt,
  num_inference_steps,
  guidance_scale,
  scheduler,
  seed,
  height,
  width,
  latents,
  eta,
  mesh,
  progress,
  progress_latents=False,
  init_images=None,
  masks=None,
  masked_content='original',
  strength=1.0,
  output_type='uint8',
  adapters=None,
  adapter_ids=None,
  adapter_scales=None,
  micro_conditioning: dict | None = None,
  denoising_start: float | None = None,
  denoising_end: float | None = None,
  clip_skip: int = 0,
  prompt_syntax: str = 'plain',
  guidance_rescale=0.0,
  prompts_2=None,
  negative_prompts_2=None,
):
  if output_type not in ('uint8', 'latent'):
    raise ValueError(f"output_type must be 'uint8' or 'latent', got {output_type!r}")
  num_images_per_prompt = _count(num_images_per_prompt, 'num_images_per_prompt')
  num_inference_steps = _count(num_inference_steps, 'num_inference_steps')
  if not (np.isfinite(eta) and eta >= 0):
    raise ValueError(f'eta must be a number >= 0, got {eta}')
  prompts_raw = prompts
  prompts = _expand(prompts, num_images_per_prompt, 'prompts')
  b = len(prompts)
  if negative_prompts is None:
    negatives = [None] * b
  elif isinstance(negative_prompts, str):  # one for all prompts
    negatives = [negative_prompts] * b
  else:
    negatives = _expand(negative_prompts, num_images_per_prompt, 'negative_prompts', none_allowed=True)
  if len(negatives) != b:
    raise ValueError(f'{len(negatives)} negative prompts for {b} prompts')
  # An image without a negative prompt (None) gets zeros for its negative half where the model asks for it
  # (force_zeros_for_empty_prompt: SDXL), else the empty prompt's encoding.
  keep_uncond = [n is not None or not pipeline.force_zeros_for_empty_prompt for n in negatives]
  negatives = ['' if n is None else n for n in negatives]
  f, c = pipeline.vae_scale_factor, pipeline.vae.latent_channels
  given_latents = init_images is not None and _is_latents(init_images, c)
  if given_latents:  # the image size is the latents'
    size = (init_images.shape[1] * f, init_images.shape[2] * f)
    if (height or size[0], width or size[1]) != size:
      raise ValueError(f'init latents {init_images.shape} are {size[1]}x{size[0]} images, not {width}x{height}')
    height, width = size
  elif init_images is not None and height is None and width is None:
    h0, w0 = _first_size(init_images)
    height, width = h0 // f * f, w0 // f * f
  height, width = _check_size(pipeline, height, width)
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f'strength must be in [0, 1], got {strength}')
  clip_skip = check_clip_skip(pipeline, clip_skip)
  seeds = _seeds(seed, b)
  guidance = [
    float(g) for g in per_image_adapters.per_image(guidance_scale, b, num_images_per_prompt, 'guidance scales')
  ]
  if not all(np.isfinite(guidance)):
    raise ValueError(f'guidance scales must be finite numbers, got {guidance_scale}')
  rescale = per_image_adapters.per_image(guidance_rescale, b, num_images_per_prompt, 'guidance rescales')
  if not all(isinstance(r, (int, float, np.number)) and np.isfinite(r) and r >= 0 for r in rescale):
    raise ValueError(f'guidance_rescale must be numbers >= 0, got {guidance_rescale}')
  # as diffusers: only where the image is guided (its scale > 1)
  rescale = [float(r) if g > 1.0 else 0.0 for r, g in zip(rescale, guidance, strict=True)]
  cond, uncond, chunks = _tokenized(pipeline, prompts, negatives, prompt_syntax, num_inference_steps)
  if prompts_2 is not None or negative_prompts_2 is not None:
    second = prompts_raw if prompts_2 is None else prompts_2
    cond, uncond = _second_prompts(
      pipeline, cond, uncond, prompt_syntax, num_images_per_prompt, second, negative_prompts_2, negatives
    )
  ids, scales = _adapter_choice(pipeline, adapters, adapter_ids, adapter_scales, b, num_images_per_prompt)
  sch = make_scheduler(scheduler, pipeline.scheduler_config, num_inference_steps, eta=eta)
  if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
    raise ValueError(f'denoising_start {denoising_start} must be below denoising_end {denoising_end}')
  shape = (height // f, width // f, c)
  if latents is None:
    noise = image_noise(seeds, shape)
  else:
    noise = jnp.asarray(latents, jnp.float32)
    if noise.shape != (b,) + shape:
      raise ValueError(f'latents must have shape {(b,) + shape} (NHWC), got {noise.shape}')

  unet_in = pipeline.unet.config.get('in_channels', 4)
  image_latents = mask = masked_latents = jnp.zeros((b,) + shape[:2] + (1,))
  start = 0
  if init_images is not None:
    images = jnp.asarray(init_images, jnp.float32) if given_latents else _to_images(init_images, height, width)
    if len(images) == 1 and b > 1:
      images = np.repeat(images, b, 0)
    if len(images) != b:
      raise ValueError(f'{len(images)} init images for {b} images')
    image_latents = images if given_latents else _encode(pipeline, images, seeds, _ENCODE)
    start = sch.start_index(strength) if denoising_start is None else sch.denoising_start_index(denoising_start)
    if masks is not None:
      m = _to_masks(masks, height, width)
      if len(m) == 1 and b > 1:
        m = np.repeat(m, b, 0)
      if len(m) != b:
        raise ValueError(f'{len(m)} masks for {b} images: give one mask, or one per image')
      # The latent mask: nearest-neighbour downsampling, as torch's interpolate does it.
      mask = jnp.asarray(m[:, ::f, ::f])
      image_latents = _masked_content(image_latents, mask, noise, masked_content)
      if unet_in == 2 * c + 1:
        if given_latents:
          raise ValueError('a 9-channel inpainting UNet encodes the masked image: give init images, not latents')
        masked_latents = _encode(pipeline, images * (m < 0.5), seeds, _MASKED_ENCODE)
      elif unet_in != c:
        raise ValueError(
          f'UNet has {unet_in} input channels: neither a {c}-channel model nor a {2 * c + 1}-channel inpainting model'
        )
  elif unet_in != c:
    raise ValueError(f'this UNet takes {unet_in} input channels (an inpainting model?): use inpaint()')

  inpainting = masks is not None
  if init_images is None or (inpainting and strength >= 1.0 and denoising_start is None):
    init = 'noise'
  else:
    init = 'image' if denoising_start is None else 'as_is'
  preview = _preview_kind(progress_latents)
  mode = _Mode(
    cfg=max(guidance) > 1.0,
    init=init,
    blend=inpainting and unet_in == c,
    unet_mask=inpainting and unet_in != c,
    progress=progress is not None,
    progress_latents=preview if progress is not None else '',
    latent=output_type == 'latent',
    adapters=adapters is not None,
    clip_skip=clip_skip,
    clip_skip_negative=prompt_syntax == 'a1111',
    chunks=chunks,
    rescale=max(guidance) > 1.0 and max(rescale) > 0,
  )
  if mode.init == 'noise' and init_images is not None:
    start = 0  # inpainting at full strength starts from pure noise
  _check_micro_settings(pipeline, micro_conditioning or {})
  micro = lambda negative: {
    k: jnp.broadcast_to(jnp.asarray(v, jnp.float32), (b, *np.shape(v)))
    for k, v in pipeline.micro_conditioning(height, width, negative=negative, **(micro_conditioning or {})).items()
  }
  graphdefs, params = _split(pipeline)
  fn = _sampler(pipeline, graphdefs, sch, mode)
  with pipeline.callbacks.register(progress) as token:
    args = dict(  # in `run`'s order
      params=params,
      adapters=adapters,
      cond_ids=jax.tree.map(jnp.asarray, cond[0]),
      uncond_ids=jax.tree.map(jnp.asarray, uncond[0]),
      cond_weights=jax.tree.map(jnp.asarray, cond[1]),
      uncond_weights=jax.tree.map(jnp.asarray, uncond[1]),
      cond_counts=jnp.asarray(cond[2]),
      uncond_counts=jnp.asarray(uncond[2]),
      cond_ends=jnp.asarray(cond[3]),
      uncond_ends=jnp.asarray(uncond[3]),
      cond_inputs=micro(False),
      uncond_inputs=micro(True),
      keep_uncond=jnp.asarray(keep_uncond),
      noise=noise,
      step_keys=image_keys(seeds, _STEPS),
      adapter_ids=ids,
      adapter_scales=scales,
      # diffusers guides only with a scale > 1: an image at <= 1 is its prompt's prediction alone (scale 1), also
      # in a batch guided for the others
      guidance=jnp.asarray([max(g, 1.0) for g in guidance], jnp.float32),
      guidance_rescale=jnp.asarray(rescale, jnp.float32),
      start=jnp.int32(start),
      end=jnp.int32(sch.num_steps if denoising_end is None else sch.denoising_end_index(denoising_end, start)),
      image_latents=jnp.asarray(image_latents),
      mask=jnp.asarray(mask),
      masked_latents=jnp.asarray(masked_latents),
      token=jnp.int32(token),
    )
    if mesh is not None:
      args = _place_on_mesh(args, mesh)
    images = to_host(run_together(fn, *args.values()))[:b]
    if progress is not None:
      jax.effects_barrier()  # every step's callback has run before the token is forgotten
  return images


def _check_micro_settings(pipeline, settings: dict):
  """A ValueError naming micro-conditioning settings the model's function does not take (and those it does)."""
  import inspect

  params = inspect.signature(pipeline.micro_conditioning).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):  # it names what it refuses itself
    return
  known = [n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != 'negative']
  unknown = sorted(set(settings) - set(known))
  if unknown:
    raise ValueError(
      f'micro_conditioning: {", ".join(unknown)} is not a setting of this model; it takes {", ".join(known)}'
    )


def _preview_kind(progress_latents) -> str:
  """`progress_latents` as the loop's mode: False/None '', True 'latents', or 'latents' / 'denoised'."""
  if progress_latents in (False, None):
    return ''
  if progress_latents is True:
    return 'latents'
  if progress_latents in ('latents', 'denoised'):
    return progress_latents
  raise ValueError(f"progress_latents must be a bool, 'latents' or 'denoised', got {progress_latents!r}")


MASKED_CONTENTS = ('original', 'latent_noise', 'latent_nothing')


def _schedules(prompts, syntax: str, steps: int) -> list[list[tuple[int, str]]]:
  """Each prompt's [(last step, text), ...]: A1111's prompt editing (`prompt_schedule`), one text for plain prompts."""
  if prompt_syntax.check_syntax(syntax) == 'plain':
    return [[(steps, p)] for p in prompts]
  return [prompt_schedule(p, steps) for p in prompts]


def prompt_chunks(pipeline, prompt: str, steps: int, syntax: str = 'a1111') -> tuple[int, int]:
  """(segments, 75-token chunks) the sampler encodes for one prompt: its prompt-editing texts over `steps`, and
  the most chunks any of them needs (what a server limits and batches by)."""
  texts = [t for _, t in _schedules([prompt], syntax, steps)[0]]
  counts = pipeline.tokenize_chunks(texts, syntax)[2]
  return len(texts), int(counts.max())


def _tokenized(pipeline, prompts, negatives, syntax: str, steps: int):
  """(prompts', negatives' (ids, weights, chunk counts, segment ends), (negatives' chunks, prompts' chunks)) for
  the sampler: per text encoder ids (B, segments, chunks, L) and weights alike (None for plain prompts), counts and
  last steps (B, segments). Segments are A1111's prompt editing, the last repeated where an image has fewer, their
  number rounded up to a power of two (a new number compiles a new loop). Both halves have as many segments and
  chunks, as the text encoders run them together. A prompt's segments of fewer chunks keep A1111's empty chunks
  (its count is its longest segment's); a prompt of fewer chunks than the batch's continues with its last vector."""
  schedules = [_schedules(texts, syntax, steps) for texts in (prompts, negatives)]
  most = max(len(s) for half in schedules for s in half)
  n = 1 << (most - 1).bit_length()
  segment = lambda half, g: [s[min(g, len(s) - 1)] for s in half]
  tokenize = lambda k: [
    [pipeline.tokenize_chunks([t for _, t in segment(half, g)], syntax, k) for g in range(n)] for half in schedules
  ]
  tokens = tokenize(0)
  chunks = [max(next(iter(ids.values())).shape[1] for ids, _, _ in half) for half in tokens]
  if any(next(iter(ids.values())).shape[1] != max(chunks) for half in tokens for ids, _, _ in half):
    tokens = tokenize(max(chunks))
  out = []
  for half, toks in zip(schedules, tokens):
    ids = {name: np.stack([t[0][name] for t in toks], axis=1) for name in toks[0][0]}
    weights = (
      None if toks[0][1] is None else {name: np.stack([t[1][name] for t in toks], axis=1) for name in toks[0][1]}
    )
    counts = np.stack([t[2] for t in toks], axis=1)
    counts = np.broadcast_to(counts.max(axis=1, keepdims=True), counts.shape).copy()
    ends = np.asarray([[s[min(g, len(s) - 1)][0] for g in range(n)] for s in half], np.int32)
    out.append((ids, weights, counts, ends))
  return out[0], out[1], (chunks[1], chunks[0])


def _second_prompts(pipeline, cond, uncond, syntax: str, per_prompt: int, prompts_2, negatives_2, negatives):
  """(cond, uncond) with SDXL's second text encoder reading its own texts, as diffusers' prompt_2 and
  negative_prompt_2 (default: the prompts and negative prompts)."""
  if not {'text_encoder', 'text_encoder_2'} <= set(pipeline.tokenizers):
    raise ValueError('prompts_2 / negative_prompts_2 are for SDXL base models (a second text encoder of their own)')
  if prompt_syntax.check_syntax(syntax) != 'plain':
    raise ValueError("prompts_2 / negative_prompts_2 take prompt_syntax='plain' (diffusers'), not A1111 prompts")
  second = _expand(prompts_2, per_prompt, 'prompts_2')
  if negatives_2 is None:
    negatives_2 = negatives
  elif isinstance(negatives_2, str):
    negatives_2 = [negatives_2] * len(second)
  else:
    negatives_2 = ['' if n is None else n for n in _expand(negatives_2, per_prompt, 'negative_prompts_2', True)]
  if not len(second) == len(negatives_2) == len(negatives):
    raise ValueError(f'{len(second)} prompts_2 and {len(negatives_2)} negative_prompts_2 for {len(negatives)} images')
  tok = pipeline.tokenizers['text_encoder_2']
  own = lambda half, texts: (dict(half[0], text_encoder_2=tokenize(tok, texts)[:, None, None]), *half[1:])
  return own(cond, second), own(uncond, negatives_2)


def _masked_content(image_latents, mask, noise, masked_content: str):
  """What the masked area starts from (A1111's inpainting_fill): the image's latents ('original'), the image's own
  initial noise in their place ('latent_noise', as A1111 draws it from the same seed), or zeros
  ('latent_nothing'); the unmasked area keeps the image's latents. A per-call value: nothing recompiles."""
  if masked_content not in MASKED_CONTENTS:
    raise ValueError(f'masked_content {masked_content!r}: one of {", ".join(MASKED_CONTENTS)}')
  if masked_content == 'original':
    return image_latents
  fill = noise if masked_content == 'latent_noise' else jnp.zeros_like(image_latents)
  return image_latents * (1.0 - mask) + fill * mask


def _is_latents(images, channels: int) -> bool:
  """Whether img2img/inpaint's init images are latents: a float array (B, H/f, W/f, C) with the VAE's C latent
  channels (as diffusers reads an `image` with that many channels)."""
  return (
    isinstance(images, (np.ndarray, jax.Array))
    and images.ndim == 4
    and images.shape[-1] == channels
    and jnp.issubdtype(images.dtype, jnp.floating)
  )


def _first_size(images):
  from PIL import Image

  im = (
    images[0] if isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4) else images
  )
  if isinstance(im, str):
    with Image.open(im) as f:
      return f.size[1], f.size[0]
  if isinstance(im, Image.Image):
    return im.size[1], im.size[0]
  return np.asarray(im).shape[:2]


def _adapter_choice(pipeline, adapters, adapter_ids, adapter_scales, b, per_prompt):
  """(ids, scales) per image as arrays (B,): which stacked adapter each image uses, at which weight."""
  if adapters is None:
    if adapter_ids is not None or adapter_scales is not None:
      raise ValueError('adapter_ids / adapter_scales need adapters (diffusion.adapters.stack_adapters)')
    return jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.float32)
  if adapter_ids is None:
    raise ValueError('adapters need adapter_ids: which stacked adapter each prompt uses')
  per_image_adapters.check_adapters(pipeline, adapters)
  ids = per_image_adapters.per_image(adapter_ids, b, per_prompt, 'adapter_ids')
  scales = 1.0 if adapter_scales is None else adapter_scales
  scales = per_image_adapters.per_image(scales, b, per_prompt, 'adapter_scales')
  n = per_image_adapters.num_adapters(adapters)
  bad = [i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < n)]
  if bad:
    raise ValueError(f'adapter_ids {bad} out of range: {n} adapters are stacked (ids 0..{n - 1})')
  return jnp.asarray(ids, jnp.int32), jnp.asarray(scales, jnp.float32)


# The loop's arguments that hold one entry per image (split over the mesh); the rest are replicated.
_PER_IMAGE = (
  'cond_ids',
  'uncond_ids',
  'cond_weights',
  'uncond_weights',
  'cond_counts',
  'uncond_counts',
  'cond_ends',
  'uncond_ends',
  'keep_uncond',
  'cond_inputs',
  'uncond_inputs',
  'noise',
  'step_keys',
  'adapter_ids',
  'adapter_scales',
  'guidance',
  'image_latents',
  'mask',
  'masked_latents',
)


def _place_on_mesh(args: dict, mesh) -> dict:
  """Parameters replicated, per-image inputs split over the mesh's data axes. A batch that does not
  divide is padded with copies of its last image (dropped afterwards; images are independent)."""
  mesh = as_auto(mesh)
  split, n = split_batch(mesh)
  pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], (-a.shape[0]) % n, axis=0)])
  rep = NamedSharding(mesh, P())
  return {
    name: to_global(jax.tree.map(pad, a), split) if name in _PER_IMAGE else to_global(a, rep)
    for name, a in args.items()
  }


def txt2img(
  pipeline,
  prompts,
  *,
  negative_prompts=None,
  num_inference_steps: int = 50,
  guidance_scale=7.5,
  scheduler: str | None = None,
  seed=0,
  height: int | None = None,
  width: int | None = None,
  latents=None,
  num_images_per_prompt: int = 1,
  eta: float = 0.0,
  mesh=None,
  progress: Callable[[int], None] | None = None,
  progress_latents: bool | str = False,
  output_type: str = 'uint8',
  adapters: dict | None = None,
  adapter_ids=None,
  adapter_scales=None,
  micro_conditioning: dict | None = None,
  clip_skip: int = 0,
  prompt_syntax: str = 'plain',
  guidance_rescale=0.0,
  prompts_2=None,
  negative_prompts_2=None,
  denoising_end: float | None = None,
) -> np.ndarray:
  """Images for prompts, uint8 (B, H, W, 3), B = len(prompts) * num_images_per_prompt.

  scheduler: a name from jaxdream.schedulers.SCHEDULER_NAMES, or None for the model folder's own.
  negative_prompts: one per prompt, or one for all; None (for all, or as an entry): no negative prompt, whose half
    of guidance is zeros where the model asks for it (force_zeros_for_empty_prompt: SDXL), as in diffusers.
  seed: an int (image b gets seed + b) or one seed per image.
  guidance_scale: one for all images, or one per prompt (a server batches requests with different ones);
    guidance runs for every image when any scale is > 1.
  latents: optional initial standard-normal noise, NHWC (B, H/f, W/f, C); it is scaled by the
    scheduler's initial sigma, as in diffusers.
  mesh: a jax.sharding.Mesh: the batch is split over its 'data' (and 'fsdp') axes.
  progress: called with the step index after each step (from inside the compiled loop); this call's
    own, even while other threads sample from the same pipeline, and changing it never recompiles.
  progress_latents: progress is called with (step index, the latents after that step: a float32 host copy, NHWC),
    for live previews (another program: the latents leave the device every step). 'denoised': with the clean
    latents the step's model output predicts from the prompt's half of guidance instead (A1111's live preview,
    and what A1111 decodes when a run is interrupted; `Scheduler.denoised`).
  output_type: 'uint8' (images), or 'latent': the final scaled latents, float32 NHWC (B, H/f, W/f, C),
    not decoded, as diffusers' output_type='latent' (NCHW there).
  adapters: LoRA adapters stacked by diffusion.adapters.stack_adapters; `pipeline` must carry LoRA layers
    with the same targets and ranks (their values are not used). Each prompt uses the adapter
    `adapter_ids[i]` (an int, or one per prompt) at weight `adapter_scales[i]` (default 1.0; 0 is the base
    model), as if merged at that weight; new ids and scales never recompile (a new number of stacked
    adapters does).
  micro_conditioning: the model's micro-conditioning settings (SDXL, diffusion/sdxl.py): original_size,
    crops_coords_top_left, target_size (base; sizes (height, width), default the output size), aesthetic_score,
    negative_aesthetic_score (refiner); new values never recompile.
  guidance_rescale: diffusers' guidance_rescale (one for all images, or one per prompt; 0: off), the guided
    prediction rescaled to the prompt's standard deviation by that fraction (Lin et al. 2023, for zero terminal SNR
    schedules); new values never recompile (turning it on for a loop does, once).
  prompts_2, negative_prompts_2: SDXL's second text encoder's texts (diffusers' prompt_2 / negative_prompt_2; default
    the prompts and negative prompts; plain prompts; a refiner's one encoder reads the prompts).
  clip_skip: skip this many of the text encoders' last layers, as diffusers' clip_skip (A1111's
    CLIP_stop_at_last_layers is clip_skip + 1): for the prompts only, as diffusers; with prompt_syntax='a1111' for
    the negative prompts too, as A1111. Each value compiles its own loop.
  prompt_syntax: 'plain' (diffusers': the prompt as written, cut at the tokenizer's 77 tokens) or 'a1111'
    (stable-diffusion-webui's: `(word:1.3)` / `(word)` / `[word]` emphasis, BREAK, prompt editing `[a:b:when]` and
    alternation `[a|b]`, prompts of any length in chunks of 75 tokens: io/prompt_syntax.py). Each number of chunks
    and of prompt-editing texts (rounded up to a power of two) compiles its own loop.
  denoising_end: stop at this fraction (0, 1) of the schedule, as diffusers' `denoising_end`: the steps whose
    timestep is at or above `(1 - denoising_end) * num_train_timesteps` run. With output_type='latent', the SDXL
    base's half of a hand-off to the refiner (`refine`; img2img's `denoising_start`). New values never recompile.
  """
  return _generate(
    pipeline,
    prompts,
    negative_prompts,
    num_images_per_prompt=num_images_per_prompt,
    num_inference_steps=num_inference_steps,
    guidance_scale=guidance_scale,
    scheduler=scheduler,
    seed=seed,
    height=height,
    width=width,
    latents=latents,
    eta=eta,
    mesh=mesh,
    progress=progress,
    progress_latents=progress_latents,
    output_type=output_type,
    adapters=adapters,
    adapter_ids=adapter_ids,
    adapter_scales=adapter_scales,
    micro_conditioning=micro_conditioning,
    clip_skip=clip_skip,
    prompt_syntax=prompt_syntax,
    guidance_rescale=guidance_rescale,
    prompts_2=prompts_2,
    negative_prompts_2=negative_prompts_2,
    denoising_end=denoising_end,
  )


def img2img(
  pipeline,
  prompts,
  init_images,
  *,
  strength: float = 0.8,
  negative_prompts=None,
  num_inference_steps: int = 50,
  guidance_scale=7.5,
  scheduler: str | None = None,
  seed=0,
  height: int | None = None,
  width: int | None = None,
  latents=None,
  num_images_per_prompt: int = 1,
  eta: float = 0.0,
  mesh=None,
  progress=None,
  progress_latents: bool | str = False,
  adapters: dict | None = None,
  adapter_ids=None,
  adapter_scales=None,
  micro_conditioning: dict | None = None,
  clip_skip: int = 0,
  prompt_syntax: str = 'plain',
  guidance_rescale=0.0,
  prompts_2=None,
  negative_prompts_2=None,
  denoising_start: float | None = None,
  denoising_end: float | None = None,
  output_type: str = 'uint8',
) -> np.ndarray:
  """Images that start from `init_images` (uint8 arrays, PIL images or paths), noised to `strength`
  (1.0: the image is replaced by noise entirely; 0.0: returned almost unchanged), as diffusers'
  StableDiffusionImg2ImgPipeline. `latents` here is the noise added to the image latents. `adapters`,
  `adapter_ids`, `adapter_scales`: per-image LoRA adapters, `micro_conditioning`, `denoising_end`, `output_type`: as
  in txt2img.

  `init_images` may be latents instead: a float array (B, H/f, W/f, C) with the VAE's C latent channels (scaled, as
  txt2img's output_type='latent' gives them), as diffusers' `image=` latents.
  denoising_start: take over at this fraction (0, 1) of the schedule, as diffusers' `denoising_start` (the SDXL
  refiner's half of a hand-off: `refine`): the steps whose timestep is below `(1 - denoising_start) *
  num_train_timesteps` run, from the init latents as they are (not noised; `strength` is ignored). New values never
  recompile."""
  if init_images is None:
    raise ValueError('img2img needs init_images (txt2img samples without them)')
  return _generate(
    pipeline,
    prompts,
    negative_prompts,
    num_images_per_prompt=num_images_per_prompt,
    num_inference_steps=num_inference_steps,
    guidance_scale=guidance_scale,
    scheduler=scheduler,
    seed=seed,
    height=height,
    width=width,
    latents=latents,
    eta=eta,
    mesh=mesh,
    progress=progress,
    progress_latents=progress_latents,
    init_images=init_images,
    strength=strength,
    adapters=adapters,
    adapter_ids=adapter_ids,
    adapter_scales=adapter_scales,
    micro_conditioning=micro_conditioning,
    clip_skip=clip_skip,
    prompt_syntax=prompt_syntax,
    guidance_rescale=guidance_rescale,
    prompts_2=prompts_2,
    negative_prompts_2=negative_prompts_2,
    denoising_start=denoising_start,
    denoising_end=denoising_end,
    output_type=output_type,
  )


def inpaint(
  pipeline,
  prompts,
  init_images,
  masks,
  *,
  strength: float = 1.0,
  negative_prompts=None,
  num_inference_steps: int = 50,
  guidance_scale=7.5,
  scheduler: str | None = None,
  seed=0,
  height: int | None = None,
  width: int | None = None,
  latents=None,
  num_images_per_prompt: int = 1,
  eta: float = 0.0,
  mesh=None,
  progress=None,
  progress_latents: bool | str = False,
  adapters: dict | None = None,
  adapter_ids=None,
  adapter_scales=None,
  micro_conditioning: dict | None = None,
  clip_skip: int = 0,
  prompt_syntax: str = 'plain',
  guidance_rescale=0.0,
  prompts_2=None,
  negative_prompts_2=None,
  masked_content: str = 'original',
  denoising_start: float | None = None,
  denoising_end: float | None = None,
  output_type: str = 'uint8',
) -> np.ndarray:
  """Repaint the white (>= 0.5) region of `masks` in `init_images`, as diffusers'
  StableDiffusionInpaintPipeline: 9-channel inpainting UNets get the mask and masked image as inputs;
  standard 4-channel models keep the unmasked region by blending the noised original latents back in
  after every step. `masked_content`: what the masked area's latents start from before they are noised to
  `strength` (A1111's inpainting_fill): 'original', 'latent_noise' or 'latent_nothing'. `adapters`,
  `adapter_ids`, `adapter_scales`: per-image LoRA adapters, `micro_conditioning`, `denoising_end`,
  `output_type`: as in txt2img; latents as `init_images` (4-channel UNets) and `denoising_start`: as in img2img
  (the known region is then blended from those latents, as diffusers does)."""
  if init_images is None or masks is None:
    raise ValueError('inpaint needs init_images and masks (txt2img and img2img sample without them)')
  return _generate(
    pipeline,
    prompts,
    negative_prompts,
    num_images_per_prompt=num_images_per_prompt,
    num_inference_steps=num_inference_steps,
    guidance_scale=guidance_scale,
    scheduler=scheduler,
    seed=seed,
    height=height,
    width=width,
    latents=latents,
    eta=eta,
    mesh=mesh,
    progress=progress,
    progress_latents=progress_latents,
    init_images=init_images,
    masks=masks,
    masked_content=masked_content,
    strength=strength,
    adapters=adapters,
    adapter_ids=adapter_ids,
    adapter_scales=adapter_scales,
    micro_conditioning=micro_conditioning,
    clip_skip=clip_skip,
    prompt_syntax=prompt_syntax,
    guidance_rescale=guidance_rescale,
    prompts_2=prompts_2,
    negative_prompts_2=negative_prompts_2,
    denoising_start=denoising_start,
    denoising_end=denoising_end,
    output_type=output_type,
  )


def refine(
  base,
  refiner,
  prompts,
  *,
  refiner_start: float = 0.8,
  init_images=None,
  masks=None,
  strength: float | None = None,
  negative_prompts=None,
  num_inference_steps: int = 50,
  guidance_scale=7.5,
  scheduler: str | None = None,
  seed=0,
  height: int | None = None,
  width: int | None = None,
  latents=None,
  num_images_per_prompt: int = 1,
  eta: float = 0.0,
  mesh=None,
  progress=None,
  micro_conditioning: dict | None = None,
  refiner_micro_conditioning: dict | None = None,
  output_type: str = 'uint8',
  clip_skip: int = 0,
  prompt_syntax: str = 'plain',
  guidance_rescale=0.0,
  prompts_2=None,
  negative_prompts_2=None,
) -> np.ndarray:
  """SDXL's ensemble of experts: the base denoises the first `refiner_start` of the schedule (txt2img, or img2img /
  inpaint with `init_images` / `masks`), the refiner the rest from the base's latents (img2img, or inpaint with the
  same masks), as diffusers' base pipeline with `denoising_end` and `output_type='latent'` followed by its refiner
  with `denoising_start` and `image=` those latents. Both use `num_inference_steps`, each its own scheduler config
  (`scheduler`, a name, for both). `latents`: the base's initial noise. `micro_conditioning` is the base's,
  `refiner_micro_conditioning` the refiner's (aesthetic_score, negative_aesthetic_score, original_size,
  crops_coords_top_left). Other arguments as in txt2img."""
  sdxl.check_refiner(base, refiner)
  if not 0.0 < refiner_start < 1.0:
    raise ValueError(f'refiner_start must be in (0, 1), got {refiner_start}')
  common = dict(
    negative_prompts=negative_prompts,
    num_inference_steps=num_inference_steps,
    guidance_scale=guidance_scale,
    scheduler=scheduler,
    seed=seed,
    num_images_per_prompt=num_images_per_prompt,
    eta=eta,
    mesh=mesh,
    progress=progress,
    clip_skip=clip_skip,
    prompt_syntax=prompt_syntax,
    guidance_rescale=guidance_rescale,
  )
  first = dict(
    common,
    prompts_2=prompts_2,  # the base's second text encoder (diffusers' refiner does not read them)
    negative_prompts_2=negative_prompts_2,
    height=height,
    width=width,
    latents=latents,
    micro_conditioning=micro_conditioning,
    denoising_end=refiner_start,
    output_type='latent',
  )
  if strength is not None:
    first['strength'] = strength
  if init_images is None:
    if masks is not None:
      raise ValueError('masks need init_images (the images to paint into)')
    x = txt2img(base, prompts, **first)
  elif masks is None:
    x = img2img(base, prompts, init_images, **first)
  else:
    x = inpaint(base, prompts, init_images, masks, **first)
  second = dict(  # x holds one latent per image, as the refiner's batch of the same prompts
    common,
    micro_conditioning=refiner_micro_conditioning,
    denoising_start=refiner_start,
    output_type=output_type,
  )
  if masks is None:
    return img2img(refiner, prompts, x, **second)
  return inpaint(refiner, prompts, x, masks, **second)


def hires_schedule(hires_steps: int, strength: float) -> tuple[int, float]:
  """(schedule steps, img2img strength) of a hires pass, as the webui's setup_img2img_steps sets it up when given
  the steps: `hires_steps` steps at the end of a schedule of int(hires_steps / min(strength, 0.999)) steps."""
  total = int(hires_steps / min(strength, 0.999))
  return total, min(1.0, (hires_steps + 0.5) / total)  # int(total * strength) == hires_steps


def check_hires_schedule(scheduler: str | None, scheduler_config: dict, hires_steps: int, strength) -> int:
  """The steps a hires pass of `hires_steps` at `strength` runs with `scheduler` (for progress bars); a ValueError
  naming the hires strength and steps when their schedule cannot run."""
  if isinstance(strength, bool) or not (isinstance(strength, (int, float)) and 0.0 < strength <= 1.0):
    raise ValueError(f'hires strength must be in (0, 1], got {strength!r}')
  limit = int(scheduler_config.get('num_train_timesteps', 1000))
  if hires_steps / min(strength, 0.999) >= limit + 1:
    raise ValueError(
      f'hires strength {strength:g} with {hires_steps} hires steps needs a schedule of hires_steps / strength = '
      f"{hires_steps / min(strength, 0.999):.4g} steps, more than the model's {limit} timesteps: raise the strength or "
      'lower the hires steps'
    )
  total, strength = hires_schedule(hires_steps, strength)
  sch = make_scheduler(scheduler, scheduler_config, total)
  return sch.num_steps - sch.start_index(strength)


def hires_fix(
  pipeline,
  prompts,
  *,
  scale: float = 2.0,
  resize_x: int = 0,
  resize_y: int = 0,
  upscaler: str = upscale.DEFAULT_UPSCALER,
  strength: float = 0.7,
  hires_steps: int | None = None,
  hires_scheduler: str | None = None,
  hires_prompts=None,
  hires_negative_prompts=None,
  negative_prompts=None,
  num_inference_steps: int = 50,
  guidance_scale=7.5,
  scheduler: str | None = None,
  seed=0,
  height: int | None = None,
  width: int | None = None,
  latents=None,
  num_images_per_prompt: int = 1,
  eta: float = 0.0,
  mesh=None,
  progress=None,
  progress_latents: bool | str = False,
  adapters: dict | None = None,
  adapter_ids=None,
  adapter_scales=None,
  micro_conditioning: dict | None = None,
  clip_skip: int = 0,
  prompt_syntax: str = 'plain',
  guidance_rescale=0.0,
  prompts_2=None,
  negative_prompts_2=None,
  output_type: str = 'uint8',
) -> np.ndarray:
  """A1111's hires fix (txt2img's `enable_hr`): txt2img at height x width, upscaled, then img2img at the larger size
  from those latents with the same seeds, as the webui's sample_hr_pass runs it.

  scale / resize_x / resize_y: the larger size, `scale` times the first pass's, or resize_x x resize_y (0: from the
    aspect ratio; both: covered, then cropped), in A1111's arithmetic (`upscale.hires_size`, `upscale.output_size`).
  upscaler: an A1111 latent mode ('Latent', 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic
    antialiased)', 'Latent (nearest)', 'Latent (nearest-exact)': the latents resized as torch's interpolate) or an
    image upscaler ('None', 'Lanczos', 'Nearest': the decoded images resized with PIL, then encoded).
  strength: the second pass's denoising strength (A1111's denoising_strength). As in the webui's hires pass, it runs
    `hires_steps` (default: num_inference_steps) steps, the last ones of a schedule of int(hires_steps / min(strength,
    0.999)) steps.
  hires_scheduler, hires_prompts, hires_negative_prompts: the second pass's (default: the first pass's).
  progress is called for the steps of both passes, with each pass's step index in its schedule. Other arguments as
  in txt2img; `latents` is the first pass's initial noise."""
  upscale.check_upscaler(upscaler)
  if not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
    raise ValueError(f'hires scale must be a number > 0, got {scale!r}')
  for what, v in (('resize_x', resize_x), ('resize_y', resize_y)):
    _count(v, what, least=0)
  hires_steps = _count(num_inference_steps if hires_steps is None else hires_steps, 'hires_steps')
  check_hires_schedule(scheduler if hires_scheduler is None else hires_scheduler, pipeline.scheduler_config,
                       hires_steps, strength)  # fmt: skip
  f = pipeline.vae_scale_factor
  height, width = _check_size(pipeline, height, width)
  up_x, up_y, tx, ty = upscale.hires_size(width, height, scale, resize_x, resize_y, f)
  out_w, out_h = upscale.output_size(width, height, scale, resize_x, resize_y, f)
  if out_w < f or out_h < f:
    raise ValueError(f'hires size {up_x}x{up_y} of a {width}x{height} first pass leaves no image')
  common = dict(
    negative_prompts=negative_prompts,
    guidance_scale=guidance_scale,
    seed=seed,
    num_images_per_prompt=num_images_per_prompt,
    eta=eta,
    mesh=mesh,
    progress=progress,
    progress_latents=progress_latents,
    adapters=adapters,
    adapter_ids=adapter_ids,
    adapter_scales=adapter_scales,
    clip_skip=clip_skip,
    prompt_syntax=prompt_syntax,
    guidance_rescale=guidance_rescale,
    prompts_2=prompts_2,
    negative_prompts_2=negative_prompts_2,
  )
  first = dict(
    common,
    num_inference_steps=num_inference_steps,
    scheduler=scheduler,
    height=height,
    width=width,
    latents=latents,
    micro_conditioning=micro_conditioning,
  )
  x = txt2img(pipeline, prompts, output_type='latent', **first)
  if upscaler in upscale.LATENT_MODES:
    x = upscale.resize_latents(x, up_y // f, up_x // f, *upscale.LATENT_MODES[upscaler])
  else:  # A1111 truncates the decoded image to uint8 (it rounds the images it returns)
    images = upscale.upscale_images(_decode_truncated(pipeline, jnp.asarray(x)), up_x, up_y, upscaler)
    seeds = _seeds(seed, len(images))
    x = _encode(pipeline, images.astype(np.float32) / 127.5 - 1.0, seeds, _ENCODE)
  x = x[:, ty // 2 : x.shape[1] - (ty + 1) // 2, tx // 2 : x.shape[2] - (tx + 1) // 2]
  total, second_strength = hires_schedule(hires_steps, strength)
  second = dict(
    common,
    negative_prompts=negative_prompts if hires_negative_prompts is None else hires_negative_prompts,
    num_inference_steps=total,
    strength=second_strength,
    scheduler=scheduler if hires_scheduler is None else hires_scheduler,
    micro_conditioning=micro_conditioning,
    output_type=output_type,
  )
  return img2img(pipeline, prompts if hires_prompts is None else hires_prompts, np.asarray(x), **second)
