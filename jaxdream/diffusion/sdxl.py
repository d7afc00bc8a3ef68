"""Stable Diffusion XL conditioning, as diffusers' StableDiffusionXLPipeline computes it.

The prompt: every text encoder's penultimate hidden state, concatenated on the feature axis (base: CLIP ViT-L's 768
+ OpenCLIP bigG's 1280 = 2048; the refiner has text_encoder_2 alone), and the last encoder's projected pooled output
(`text_embeds`). Micro-conditioning, the UNet's `time_ids` per image: original size, crop's top-left corner and target
size (base), or original size, crop and an aesthetic score (refiner: 6.0 for the prompt, 2.5 for the negative).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PIPELINE_CLASSES = ('StableDiffusionXLPipeline', 'StableDiffusionXLImg2ImgPipeline', 'StableDiffusionXLInpaintPipeline')
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # diffusers' defaults


def _encoder_order(name: str) -> int:
  """text_encoder -> 1, text_encoder_2 -> 2: the order in which diffusers concatenates their features."""
  return int(name.removeprefix('text_encoder').removeprefix('_') or 1)


def _a1111_pool_ids(model, ids):
  """`ids` with textual inversion tokens (ids past the tokenizer's own, `tokenizer_vocab`) as 0, or None."""
  n = getattr(model, 'tokenizer_vocab', None)
  return None if n is None else jnp.where(ids >= n, 0, ids)


def encode_prompt(models: dict, ids: dict, clip_skip: int = 0, emphasis=None) -> tuple[jax.Array, dict]:
  """(context (B, L, sum of hidden sizes), {'text_embeds': (B, projection_dim)}) from token ids per text encoder:
  each encoder's penultimate hidden state (`clip_skip` layers earlier: diffusers' hidden_states[-(clip_skip + 2)]).
  `emphasis`: A1111 prompts' per-token weights (conditioning.Emphasis), applied to each encoder's states on its own."""
  names = sorted(ids, key=_encoder_order)
  # A1111 (its prompts come with emphasis) pools at the end token with textual inversion tokens read as 0;
  # diffusers at the largest id, which an embedding's token is (the legacy eos_token_id=2 rule)
  pool = lambda name: _a1111_pool_ids(models[name], ids[name]) if emphasis is not None else None
  outs = [models[name].forward(ids[name], pool_ids=pool(name)) for name in names]
  states = [out['hidden_states'][-(clip_skip + 2)] for out in outs]
  if emphasis is not None:
    states = [emphasis(h, name) for h, name in zip(states, names)]
  context = jnp.concatenate(states, axis=-1)
  if 'text_embeds' not in outs[-1]:
    raise ValueError('SDXL needs a CLIPTextModelWithProjection as its last text encoder (the pooled prompt embedding)')
  return context, {'text_embeds': outs[-1]['text_embeds']}


def _pair(name: str, value, default) -> tuple[float, float]:
  """A micro-conditioning size or corner: two finite numbers (None: `default`)."""
  if value is None:
    return default
  try:
    pair = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    pair = ()
  if len(pair) != 2 or not all(np.isfinite(pair)):
    raise ValueError(f'{name} must be two finite numbers (height, width) / (top, left), got {value!r}')
  return pair


def _score(name: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
    raise ValueError(f'{name} must be a finite number, got {value!r}')
  return float(value)


def size_time_ids(
  height: int,
  width: int,
  *,
  negative: bool = False,
  original_size: tuple[int, int] | None = None,
  crops_coords_top_left: tuple[int, int] = (0, 0),
  target_size: tuple[int, int] | None = None,
) -> dict:
  """SDXL base's micro-conditioning: {'time_ids': original_size + crops_coords_top_left + target_size}, both sizes
  (height, width) of the output unless given; the same for the prompt and the negative prompt."""
  del negative
  ids = (
    *_pair('original_size', original_size, (height, width)),
    *_pair('crops_coords_top_left', crops_coords_top_left, (0.0, 0.0)),
    *_pair('target_size', target_size, (height, width)),
  )
  return {'time_ids': np.asarray(ids, np.float32)}


def aesthetic_time_ids(
  height: int,
  width: int,
  *,
  negative: bool = False,
  original_size: tuple[int, int] | None = None,
  crops_coords_top_left: tuple[int, int] = (0, 0),
  aesthetic_score: float = AESTHETIC_SCORE,
  negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE,
  negative_original_size: tuple[int, int] | None = None,
  negative_crops_coords_top_left: tuple[int, int] = (0, 0),
) -> dict:
  """The refiner's micro-conditioning (requires_aesthetics_score): {'time_ids': original_size +
  crops_coords_top_left + (aesthetic_score,)}; for the negative prompt negative_original_size (default
  original_size) + negative_crops_coords_top_left (default (0, 0), not the prompt's crop) + (negative_aesthetic_score,),
  as diffusers' SDXL img2img and inpaint pipelines make them."""
  original = _pair('original_size', original_size, (height, width))
  if negative:
    ids = (
      *_pair('negative_original_size', negative_original_size, original),
      *_pair('negative_crops_coords_top_left', negative_crops_coords_top_left, (0.0, 0.0)),
      _score('negative_aesthetic_score', negative_aesthetic_score),
    )
  else:
    ids = (
      *original,
      *_pair('crops_coords_top_left', crops_coords_top_left, (0.0, 0.0)),
      _score('aesthetic_score', aesthetic_score),
    )
  return {'time_ids': np.asarray(ids, np.float32)}


def check_refiner(base, refiner) -> None:
  """Raise ValueError unless `refiner` (a Pipeline, or anything with its `pipeline_class` and `micro_conditioning`)
  is an SDXL refiner that can take over from the SDXL base `base`."""
  if base.pipeline_class not in PIPELINE_CLASSES or base.micro_conditioning is not size_time_ids:
    raise ValueError(f'a refiner takes over from an SDXL base model, not from a {base.pipeline_class}')
  if refiner.pipeline_class not in PIPELINE_CLASSES or refiner.micro_conditioning is not aesthetic_time_ids:
    raise ValueError(
      f'the refiner must be an SDXL refiner (model_index.json: requires_aesthetics_score true), '
      f'not a {refiner.pipeline_class}' + (' base' if refiner.micro_conditioning is size_time_ids else '')
    )
