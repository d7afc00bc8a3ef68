"""The language models (decoders) of Qwen2.5-VL and Qwen3-VL (transformers' Qwen2_5_VLTextModel and
Qwen3VLTextModel), one class for both, and their multimodal rotary positions (M-RoPE).

Each token has three position ids (temporal, height, width): text tokens repeat one id three times, image
tokens count along their grid (`get_rope_index`). The rotary frequencies are split between the three:
Qwen2.5-VL in contiguous sections (`mrope_section`), Qwen3-VL interleaved (T H W T H W ... then T).

The module tree is named as the weights under `model.language_model.` name it, so `load_state_dict` loads
them with that prefix stripped. The decoder runs over a fixed-shape KV cache by slot, as Kosmos-2's does
(`jaxdream.nn.attention.decoder_mask`): the caller assembles the image-feature merge, the LM head and the
generation protocol around it.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.models.config import ConfigError, resolve_config
from jaxdream.nn.attention import (
  check_implementation,
  decoder_mask,
  dot_product_attention,
  kernel_for,
  split_heads,
  write_cache,
)
from jaxdream.nn.layers import ACTIVATIONS, Embed, RMSNorm, activation, linear_class

MODEL_TYPES = ('qwen2_5_vl', 'qwen3_vl')
# transformers' Qwen2_5_VLTextConfig / Qwen3VLTextConfig defaults (and their rotary embeddings' mrope_section).
_DEFAULTS = {
  'qwen2_5_vl': dict(
    vocab_size=152064,
    hidden_size=8192,
    intermediate_size=29568,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    hidden_act='silu',
    rms_norm_eps=1e-5,
    rope_theta=1000000.0,
    mrope_section=(16, 24, 24),
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=80,
    layer_types=None,
  ),
  'qwen3_vl': dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=22016,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    head_dim=128,
    hidden_act='silu',
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
    mrope_section=(24, 20, 20),
    attention_bias=False,
    layer_types=None,
  ),
}
# Rotary types computed as plain RoPE ('mrope' is the old name transformers maps to 'default').
_ROPE_TYPES = ('default', 'mrope')


def _rope_config(text: dict, model_type: str) -> dict:
  """theta, mrope_section and interleaving, read as transformers reads them: `rope_scaling` (older files) or
  `rope_parameters` (transformers 5), theta inside it or beside it."""
  key = 'rope_scaling' if text.get('rope_scaling') else 'rope_parameters'
  rope = dict(text.get(key) or {})
  rope_type = rope.get('rope_type', rope.get('type', 'default'))
  if rope_type not in _ROPE_TYPES:
    raise ConfigError(
      f'{model_type} text config {key}.rope_type={rope_type!r} is not supported by jaxdream '
      f'(supported: {", ".join(map(repr, _ROPE_TYPES))})'
    )
  interleaved = model_type == 'qwen3_vl'  # each model's rotary embedding has one layout, whatever the flag says
  if 'mrope_interleaved' in rope and bool(rope['mrope_interleaved']) != interleaved:
    raise ConfigError(
      f'{model_type} text config {key}.mrope_interleaved={rope["mrope_interleaved"]!r}: transformers always '
      f'{"interleaves" if interleaved else "sections"} M-RoPE for {model_type}, so jaxdream does too'
    )
  section = rope.get('mrope_section', _DEFAULTS[model_type]['mrope_section'])
  theta = rope.get('rope_theta', text.get('rope_theta', _DEFAULTS[model_type]['rope_theta']))
  return dict(rope_theta=float(theta), mrope_section=tuple(int(s) for s in section), mrope_interleaved=interleaved)


def resolve_qwen_text_config(config: dict, model_type: str) -> dict:
  """The decoder's checked config from a Qwen2.5-VL / Qwen3-VL config.json dict (top level).

  The text fields sit in `text_config` (transformers 5) or, in older Qwen2.5-VL folders, at the top level.
  Returns hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
  head_dim, rms_norm_eps, vocab_size, hidden_act, rope_theta, mrope_section, mrope_interleaved, qkv_bias,
  o_bias, qk_norm, tie_word_embeddings and model_type.
  """
  if model_type not in MODEL_TYPES:
    raise ConfigError(f'model_type={model_type!r} has no Qwen text decoder in jaxdream (supported: {MODEL_TYPES})')
  raw = config.get('text_config') or config
  name = f'{model_type} text'
  text = resolve_config(
    raw, _DEFAULTS[model_type], model=name, supported=dict(hidden_act=tuple(ACTIVATIONS)), strict=False
  )
  heads = int(text['num_attention_heads'])
  kv_heads = int(text['num_key_value_heads'] or heads)
  hidden = int(text['hidden_size'])
  if model_type == 'qwen2_5_vl':
    # Qwen2.5-VL's attention takes head_dim from the width whatever the file says.
    if hidden % heads:
      raise ConfigError(f'{name} config: hidden_size={hidden} is not divisible by num_attention_heads={heads}')
    head_dim = hidden // heads
    layers = int(text['num_hidden_layers'])
    # transformers makes layers from max_window_layers on sliding-window ones when use_sliding_window is set.
    if text['use_sliding_window'] and text['sliding_window'] is not None and int(text['max_window_layers']) < layers:
      raise ConfigError(
        f'{name} config use_sliding_window=True (sliding-window attention from layer '
        f'{text["max_window_layers"]}) is not supported by jaxdream'
      )
    qkv_bias, o_bias, qk_norm = True, False, False
  else:
    head_dim = int(text['head_dim'])
    qkv_bias = o_bias = bool(text['attention_bias'])
    qk_norm = True
  if 'sliding_attention' in (text['layer_types'] or ()):
    raise ConfigError(f'{name} config layer_types={text["layer_types"]!r}: sliding-window attention is not supported')
  if heads % kv_heads:
    raise ConfigError(f'{name} config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}')
  rope = _rope_config(raw, model_type)
  if sum(rope['mrope_section']) != head_dim // 2:
    raise ConfigError(
      f'{name} config mrope_section={list(rope["mrope_section"])} must add up to head_dim / 2 = {head_dim // 2}'
    )
  if model_type == 'qwen2_5_vl':  # transformers ties when either level asks (files from before v5 kept it inside)
    tie = bool(config.get('tie_word_embeddings', False) or raw.get('tie_word_embeddings', False))
  else:
    tie = bool(config.get('tie_word_embeddings', False))
  return dict(
    model_type=model_type,
    hidden_size=hidden,
    intermediate_size=int(text['intermediate_size']),
    num_hidden_layers=int(text['num_hidden_layers']),
    num_attention_heads=heads,
    num_key_value_heads=kv_heads,
    head_dim=head_dim,
    rms_norm_eps=float(text['rms_norm_eps']),
    vocab_size=int(text['vocab_size']),
    hidden_act=text['hidden_act'],
    qkv_bias=qkv_bias,
    o_bias=o_bias,
    qk_norm=qk_norm,
    tie_word_embeddings=tie,
    **rope,
  )


# ----------------------------------------------------------------------------------------------- rotary


def mrope_rows(head_dim: int, section, interleaved: bool) -> np.ndarray:
  """For each of the head_dim / 2 rotary frequencies, which position row (0 temporal, 1 height, 2 width)
  drives it: Qwen2.5-VL's contiguous sections, or Qwen3-VL's interleaving (H at 1, 4, 7, ... up to
  3 * section[1], W at 2, 5, 8, ... up to 3 * section[2], T elsewhere)."""
  if not interleaved:
    return np.repeat(np.arange(3), section)
  rows = np.zeros(head_dim // 2, np.int32)
  rows[1 : 3 * section[1] : 3] = 1
  rows[2 : 3 * section[2] : 3] = 2
  return rows


def rope_inv_freq(theta: float, head_dim: int) -> np.ndarray:
  """transformers' default rotary inverse frequencies, float32."""
  return 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))


def mrope_cos_sin(position_ids, inv_freq, rows):
  """cos, sin (B, L, head_dim) in float32 for position_ids (3, B, L): each frequency rotates by its row's
  position, and the half-dim angles are repeated as transformers' rotate_half layout wants."""
  pos = jnp.moveaxis(jnp.asarray(position_ids)[rows], 0, -1).astype(jnp.float32)  # (B, L, head_dim / 2)
  angles = pos * inv_freq
  angles = jnp.concatenate([angles, angles], -1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
  """x (B, L, H, D) rotated in float32 (rotate_half convention), in x's dtype."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
  return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


# ----------------------------------------------------------------------------------------------- decoder


class QwenTextAttention(nnx.Module):
  """Grouped-query attention with M-RoPE (and Qwen3's per-head RMSNorm of q and k before it)."""

  def __init__(self, cfg: dict, *, dtype, attention_impl, rngs):
    d, h, kvh, hd = cfg['hidden_size'], cfg['num_attention_heads'], cfg['num_key_value_heads'], cfg['head_dim']
    col = dict(use_bias=cfg['qkv_bias'], axes=('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.q_proj = linear_class(dtype)(d, h * hd, **col)
    self.k_proj = linear_class(dtype)(d, kvh * hd, **col)
    self.v_proj = linear_class(dtype)(d, kvh * hd, **col)
    self.o_proj = linear_class(dtype)(
      h * hd, d, use_bias=cfg['o_bias'], axes=('heads', 'embed'), dtype=dtype, rngs=rngs
    )
    if cfg['qk_norm']:
      self.q_norm = RMSNorm(hd, eps=cfg['rms_norm_eps'], dtype=dtype)
      self.k_norm = RMSNorm(hd, eps=cfg['rms_norm_eps'], dtype=dtype)
    else:
      self.q_norm = self.k_norm = None
    self.heads, self.kv_heads = h, kvh
    self.attention_impl = attention_impl

  def __call__(self, x, cos, sin, mask, cache=None, index=0):
    q, k = split_heads(self.q_proj(x), self.heads), split_heads(self.k_proj(x), self.kv_heads)
    v = split_heads(self.v_proj(x), self.kv_heads)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if cache is not None:
      cache = k, v = write_cache(cache, k, v, index)  # the cache keeps the kv heads, rotated
    groups = self.heads // self.kv_heads  # query head i reads kv head i // groups, as transformers' repeat_kv
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    out = dot_product_attention(q, k, v, mask=mask, implementation=kernel_for(self.attention_impl, masked=True))
    return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1)), cache


class QwenTextMLP(nnx.Module):
  def __init__(self, cfg: dict, *, dtype, rngs):
    d, f = cfg['hidden_size'], cfg['intermediate_size']
    self.gate_proj = linear_class(dtype)(d, f, use_bias=False, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.up_proj = linear_class(dtype)(d, f, use_bias=False, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.down_proj = linear_class(dtype)(f, d, use_bias=False, axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.act = cfg['hidden_act']

  def __call__(self, x):
    return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class QwenTextDecoderLayer(nnx.Module):
  def __init__(self, cfg: dict, *, dtype, attention_impl, rngs):
    d, eps = cfg['hidden_size'], cfg['rms_norm_eps']
    self.self_attn = QwenTextAttention(cfg, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.mlp = QwenTextMLP(cfg, dtype=dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(d, eps=eps, dtype=dtype)
    self.post_attention_layernorm = RMSNorm(d, eps=eps, dtype=dtype)

  def __call__(self, x, cos, sin, mask, cache=None, index=0):
    h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, index)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), cache


class QwenTextModel(nnx.Module):
  """The Qwen2.5-VL or Qwen3-VL decoder (`config` from `resolve_qwen_text_config`), up to its final norm.

  `model(inputs_embeds, position_ids, kv_valid, cache, index, deepstack=())` runs L tokens sitting at cache
  slots index..index+L-1: position_ids (3, B, L) from `get_rope_index` / `decode_position_ids`; kv_valid
  (B, T) which of the cache's T slots may be attended to (left padding excluded), or with cache=None
  which of the L tokens. Attention is causal by slot. `deepstack`: Qwen3-VL's visual features, (B, L, D)
  arrays added to the hidden states after decoder layers 0, 1, ... (zero outside image positions).
  Returns (hidden (B, L, D) after the final norm, the updated cache or None).
  """

  def __init__(self, config: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    cfg = dict(config)
    impl = check_implementation(attention_impl)
    self.embed_tokens = Embed(cfg['vocab_size'], cfg['hidden_size'], dtype=dtype, rngs=rngs)
    self.layers = nnx.List(
      [QwenTextDecoderLayer(cfg, dtype=dtype, attention_impl=impl, rngs=rngs) for _ in range(cfg['num_hidden_layers'])]
    )
    self.norm = RMSNorm(cfg['hidden_size'], eps=cfg['rms_norm_eps'], dtype=dtype)
    hd = cfg['head_dim']
    self.rope_theta = cfg['rope_theta']
    self.rope_rows = tuple(int(r) for r in mrope_rows(hd, cfg['mrope_section'], cfg['mrope_interleaved']))
    self.num_layers, self.kv_heads, self.head_dim = cfg['num_hidden_layers'], cfg['num_key_value_heads'], hd
    self.dtype = dtype

  def embed(self, input_ids):
    """Token embeddings (B, L, D) in the compute dtype (Qwen does not scale them)."""
    return self.embed_tokens(input_ids)

  def init_cache(self, batch: int, length: int, dtype=None):
    """Per decoder layer (keys, values), each (batch, length, num_key_value_heads, head_dim)."""
    shape = (batch, length, self.kv_heads, self.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype or self.dtype)
    return [(zeros(), zeros()) for _ in range(self.num_layers)]

  def __call__(self, inputs_embeds, position_ids, kv_valid, cache=None, index=0, *, deepstack=()):
    deepstack = deepstack[: self.num_layers]  # as transformers: more DeepStack mergers than layers go unused
    x = inputs_embeds.astype(self.dtype)
    cos, sin = mrope_cos_sin(position_ids, rope_inv_freq(self.rope_theta, self.head_dim), np.asarray(self.rope_rows))
    mask = decoder_mask(index + jnp.arange(x.shape[1]), kv_valid)
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, c = layer(x, cos, sin, mask, None if cache is None else cache[i], index)
      new_cache.append(c)
      if i < len(deepstack):
        x = x + deepstack[i].astype(x.dtype)
    return self.norm(x), (None if cache is None else new_cache)


# ----------------------------------------------------------------------------------------------- positions


def _image_positions(grid_thw, start: int, merge: int) -> np.ndarray:
  """(3, t * h/merge * w/merge) positions of one image's merged tokens, offset by `start`."""
  t, h, w = (int(g) for g in grid_thw)
  tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing='ij')
  return np.stack([tt, hh, ww]).reshape(3, -1) + start


def get_rope_index(
  input_ids, image_grid_thw, attention_mask, *, spatial_merge_size: int, image_token_id: int, vision_start_token_id: int
):
  """transformers' `get_rope_index` (Qwen2.5-VL and Qwen3-VL agree for images), on the host in numpy.

  input_ids (B, L); image_grid_thw (num_images, 3), the images in prompt order over all rows, or None;
  attention_mask (B, L) or None (all real). Each image is one run of `image_token_id` tokens right after
  a `vision_start_token_id`. Text tokens count on from the previous one; an image's tokens take
  (start + t, start + row, start + column) over its merged grid, and the text after it starts at
  start + max(h, w) / spatial_merge_size. Padding gets 0.

  Returns (position_ids (3, B, L) int32, rope_deltas (B,) int32) where rope_deltas is what to add to a cache
  slot to get the position of a token decoded there (`decode_position_ids`): transformers 5's deltas minus
  the row's left padding (transformers 4's definition; the same without padding).
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f'input_ids must be (batch, length); got shape {ids.shape}')
  real = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  grids = iter(np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw))
  used = 0
  positions = np.zeros((3,) + ids.shape, np.int64)
  deltas = np.zeros(ids.shape[0], np.int64)
  for b in range(ids.shape[0]):
    row = ids[b, real[b]]
    pieces, pos, i = [], 0, 0
    for is_image, run in itertools.groupby(row == image_token_id):
      n = len(list(run))
      if not is_image:
        pieces.append(np.broadcast_to(np.arange(n) + pos, (3, n)))
        pos += n
      else:
        grid = next(grids, None)
        if grid is None:
          raise ValueError(f'more image-token runs in input_ids than the {used} rows of image_grid_thw')
        used += 1
        tokens = int(np.prod(grid)) // spatial_merge_size**2
        if n != tokens:
          raise ValueError(
            f'row {b}: an image run of {n} tokens where image_grid_thw[{used - 1}]={list(map(int, grid))} '
            f'makes {tokens} (spatial_merge_size={spatial_merge_size})'
          )
        if i == 0 or row[i - 1] != vision_start_token_id:
          raise ValueError(
            f'row {b}: the image tokens at {i} do not follow vision_start_token_id={vision_start_token_id}'
          )
        pieces.append(_image_positions(grid, pos, spatial_merge_size))
        pos += max(int(grid[1]), int(grid[2])) // spatial_merge_size
      i += n
    row_positions = np.concatenate(pieces, 1) if pieces else np.zeros((3, 0), np.int64)
    positions[:, b, real[b]] = row_positions
    deltas[b] = (row_positions.max() + 1 if len(row) else 0) - ids.shape[1]
  if next(grids, None) is not None:
    raise ValueError(f'image_grid_thw has more rows than the {used} images in input_ids')
  return positions.astype(np.int32), deltas.astype(np.int32)


def decode_position_ids(index, rope_deltas):
  """(3, B, 1) int32 positions of the tokens decoded into cache slot `index` (int or traced scalar), as
  transformers' generation continues them after a prompt that ends in text: slot + rope_deltas."""
  pos = (index + jnp.asarray(rope_deltas, jnp.int32)).astype(jnp.int32)
  return jnp.broadcast_to(pos[None, :, None], (3, pos.shape[0], 1))
