"""Qwen2.5-VL and Qwen3-VL (transformers' Qwen2_5_VLForConditionalGeneration and
Qwen3VLForConditionalGeneration): the vision tower (models/qwen_vision.py), the decoder (models/qwen_text.py),
the image features spliced into the token embeddings at the image-pad tokens, and the LM head.

The model implements jaxdream.vlm.generation's GenerativeModel. The vision tower's shapes depend on the
images' grids, so `generation_inputs` runs it (compiled once per set of grids) before the decoding loop and
hands the loop fixed-shape arrays: the features already placed at their tokens, (B, L, D) with zeros
elsewhere, and Qwen3-VL's DeepStack features likewise. Beam search then runs the tower once, not per beam.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.io.weights import WeightsError, abstract_model, load_state_dict, read_config, read_weights
from jaxdream.models.config import ConfigError
from jaxdream.models.qwen_text import (
  MODEL_TYPES,
  QwenTextModel,
  decode_position_ids,
  get_rope_index,
  resolve_qwen_text_config,
)
from jaxdream.models.qwen_vision import Qwen2_5VisionTransformer, Qwen3VisionModel, resolve_qwen_vision_config
from jaxdream.nn.adapters import quantize_int8 as int8
from jaxdream.nn.layers import linear_class
from jaxdream.runtime import CompileCache, compiled

_VISION = {'qwen2_5_vl': Qwen2_5VisionTransformer, 'qwen3_vl': Qwen3VisionModel}


def model_type_of(config: dict, source: str = 'config.json') -> str:
  model_type = config.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ConfigError(
      f'{source}: model_type {model_type!r} is not a Qwen vision-language model ({", ".join(MODEL_TYPES)})'
    )
  return model_type


def _token_id(config: dict, name: str) -> int:
  """A special token id of the top-level config (transformers 5), or of its text config (older files)."""
  value = config.get(name, (config.get('text_config') or {}).get(name))
  if value is None:
    raise ConfigError(f'config.json has no {name}')
  return int(value)


class QwenVLModel(nnx.Module):
  """transformers' Qwen2_5_VLModel / Qwen3VLModel: `visual` and `language_model`, as the weights name them."""

  def __init__(self, config: dict, *, dtype, attention_impl: str, rngs: nnx.Rngs):
    model_type = model_type_of(config)
    vision = resolve_qwen_vision_config(config, model_type)
    self.visual = _VISION[model_type](vision, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.language_model = QwenTextModel(
      resolve_qwen_text_config(config, model_type), dtype=dtype, attention_impl=attention_impl, rngs=rngs
    )


class QwenVLForConditionalGeneration(nnx.Module):
  """`model(pixel_values, image_grid_thw, input_ids, attention_mask)` -> float32 logits (B, L, V), as
  transformers' forward; generation through jaxdream.vlm.generation (this class is a GenerativeModel).

  pixel_values (N, C*T*P*P) and image_grid_thw (num_images, 3) as the processor makes them; the images in
  prompt order over all rows; input_ids left-padded for batches."""

  def __init__(self, config: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    self.model_type = model_type_of(config)
    self.model = QwenVLModel(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    text = resolve_qwen_text_config(config, self.model_type)
    self.tied = bool(text['tie_word_embeddings'])
    self.lm_head = (
      None
      if self.tied
      else linear_class(dtype)(
        text['hidden_size'], text['vocab_size'], use_bias=False, axes=('embed', 'vocab'), dtype=dtype, rngs=rngs
      )
    )
    self.vocab_size = int(text['vocab_size'])  # generation checks prompt ids against it
    self.image_token_id = _token_id(config, 'image_token_id')
    self.vision_start_token_id = _token_id(config, 'vision_start_token_id')
    self.merge_size = self.model.visual.merge_size
    eos = (config.get('text_config') or {}).get('eos_token_id', config.get('eos_token_id'))
    self.eos_token_id = tuple(eos) if isinstance(eos, (list, tuple)) else eos
    self.pad_token_id = None
    self.max_position_embeddings = int(
      (config.get('text_config') or config).get('max_position_embeddings', config.get('max_position_embeddings', 0))
      or 128000
    )
    self.dtype = dtype
    self.compile_cache = CompileCache()  # jaxdream.vlm's compiled generation (and vision tower) for this model

  def logits(self, h):
    """float32 logits of hidden states: the LM head, or the token embeddings when they are tied."""
    if self.lm_head is None:
      return self.model.language_model.embed_tokens.attend(h).astype(jnp.float32)
    return self.lm_head(h).astype(jnp.float32)

  def image_features(self, pixel_values, grid_thw: tuple):
    """(features (N', D), [DeepStack features (N', D)] (empty for Qwen2.5-VL)) of all images, in order."""
    out = self.model.visual(pixel_values, grid_thw)
    return out if isinstance(out, tuple) else (out, [])

  def placed(self, input_ids, features):
    """(B, L, D): `features` rows at the image-pad tokens in reading order (transformers' masked_scatter),
    zeros elsewhere."""
    mask = input_ids == self.image_token_id
    index = jnp.clip(jnp.cumsum(mask.reshape(-1)) - 1, 0, None).reshape(mask.shape)
    return jnp.where(mask[..., None], features[index], 0).astype(self.dtype)

  def embeddings(self, inputs: dict):
    """Token embeddings with the image features spliced in, and the DeepStack arrays for the decoder."""
    ids = inputs['input_ids']
    x = self.model.language_model.embed(ids)
    if 'image_embeds' not in inputs:
      return x, []
    x = jnp.where((ids == self.image_token_id)[..., None], inputs['image_embeds'].astype(x.dtype), x)
    return x, list(inputs.get('deepstack', ()))

  def init_cache(self, batch: int, length: int, dtype=None):
    return self.model.language_model.init_cache(batch, length, dtype)

  # ------------------------------------------------------------------ jaxdream.vlm.generation.GenerativeModel

  def generation_inputs(self, pixel_values, image_grid_thw, input_ids, attention_mask=None) -> dict:
    """On the host, before the decoding loop: the inputs checked, the M-RoPE positions, and the vision
    tower's features placed at their tokens (compiled once per set of image grids)."""
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
      raise ValueError(f'input_ids must be (batch, length); got shape {ids.shape}')
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    longest = int(mask.sum(1).max(initial=0))
    if longest > self.max_position_embeddings:
      raise ValueError(
        f"a prompt of {longest} tokens is longer than the model's context of {self.max_position_embeddings} "
        '(max_position_embeddings)'
      )
    grid_rows = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    grid = tuple(tuple(int(v) for v in row) for row in grid_rows.reshape(-1, 3))  # None: a text-only prompt
    tokens = int(np.sum((ids == self.image_token_id) & (mask > 0)))
    expected = sum(t * h * w for t, h, w in grid) // self.merge_size**2
    if tokens != expected:
      raise ValueError(
        f'input_ids hold {tokens} image tokens where image_grid_thw {[list(g) for g in grid]} makes {expected} '
        '(use the processor, which expands each image placeholder to its grid)'
      )
    position_ids, rope_deltas = get_rope_index(
      ids,
      np.asarray(grid) if grid else None,
      mask,
      spatial_merge_size=self.merge_size,
      image_token_id=self.image_token_id,
      vision_start_token_id=self.vision_start_token_id,
    )
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, rope_deltas=rope_deltas)
    if grid:
      pixels = jnp.asarray(pixel_values, jnp.float32)
      inputs.update(compiled(self, _placed_image_features, grid=grid)(pixels, jnp.asarray(ids)))
    return inputs

  def prefill(self, inputs: dict, cache, kv_valid):
    """The prompt with its image features; decode_state: each row's slot -> position offset."""
    x, deepstack = self.embeddings(inputs)
    h, cache = self.model.language_model(x, inputs['position_ids'], kv_valid, cache, 0, deepstack=deepstack)
    return self.logits(h[:, -1]), cache, inputs['rope_deltas']

  def decode_step(self, tokens, index, cache, kv_valid, rope_deltas):
    lm = self.model.language_model
    h, cache = lm(lm.embed(tokens[:, None]), decode_position_ids(index, rope_deltas), kv_valid, cache, index)
    return self.logits(h[:, 0]), cache

  def __call__(self, inputs: dict):
    """float32 logits (B, L, V) of the whole prompt, as transformers' forward: `inputs` from
    `generation_inputs` (e.g. `model(model.generation_inputs(pixel_values, image_grid_thw, input_ids))`)."""
    x, deepstack = self.embeddings(inputs)
    mask = jnp.asarray(inputs['attention_mask']).astype(bool)
    h, _ = self.model.language_model(x, inputs['position_ids'], mask, deepstack=deepstack)
    return self.logits(h)


def _placed_image_features(model: QwenVLForConditionalGeneration, pixel_values, input_ids, *, grid):
  """The vision tower's features (and DeepStack features) placed at the image tokens: (B, L, D) each."""
  features, deepstack = model.image_features(pixel_values.astype(model.dtype), grid)
  out = dict(image_embeds=model.placed(input_ids, features))
  if deepstack:
    out['deepstack'] = jnp.stack([model.placed(input_ids, d) for d in deepstack])
  return out


def _hf_key(key: str) -> str:
  """transformers 5's names for the weights of older Qwen2.5-VL files (`visual.`, `model.layers.`, ...)."""
  if key.startswith(('model.language_model.', 'model.visual.', 'lm_head.')):
    return key
  if key.startswith('visual.'):
    return 'model.' + key
  if key.startswith('model.'):
    return 'model.language_model.' + key[len('model.') :]
  return key


def load_qwen_vl(
  path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', allow_pickle: bool = False
) -> QwenVLForConditionalGeneration:
  """Load a transformers Qwen2.5-VL or Qwen3-VL folder (config.json + model.safetensors, or shards with an
  index; older files' names included). EOS and pad ids from generation_config.json, as generate takes them.
  As transformers does, the LM head shares the token embeddings when the config ties them."""
  config = read_config(path)
  model_type_of(config, os.path.join(path, 'config.json'))
  weights = {_hf_key(k): v for k, v in read_weights(path, 'model', allow_pickle=allow_pickle).items()}
  model = abstract_model(
    lambda rngs: QwenVLForConditionalGeneration(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
  )
  if model.tied:
    head, embed = weights.pop('lm_head.weight', None), weights.get('model.language_model.embed_tokens.weight')
    if head is not None and embed is not None and not np.array_equal(head, embed):
      raise WeightsError(
        f'{path}: config.json ties the LM head to the token embeddings, but lm_head.weight differs from them'
      )
  load_state_dict(model, weights, source=path, param_dtype=dtype)
  generation = os.path.join(path, 'generation_config.json')
  if os.path.exists(generation):  # what transformers' generate defaults to, over config.json's
    with open(generation) as f:
      try:
        generation = json.load(f)
      except json.JSONDecodeError as e:
        raise WeightsError(f'{generation}: not valid JSON ({e})') from None
    eos, pad = generation.get('eos_token_id'), generation.get('pad_token_id')
    if eos is not None:
      model.eos_token_id = tuple(eos) if isinstance(eos, (list, tuple)) else eos
    if pad is not None:
      model.pad_token_id = int(pad)
  return model


def quantize_int8(model: QwenVLForConditionalGeneration) -> QwenVLForConditionalGeneration:
  """Weight-only int8 inference, in place: every Linear (vision tower, mergers, decoder, LM head) and the
  token embeddings keep int8 weights with float32 per-channel scales. Returns the model."""
  return int8(model, [model.model.language_model.embed_tokens])
