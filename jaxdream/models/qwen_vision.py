"""The vision towers of Qwen2.5-VL (transformers' Qwen2_5_VisionTransformerPretrainedModel) and Qwen3-VL
(Qwen3VLVisionModel): images of any size as packed patch sequences, 2-D rotary attention within each image
(Qwen2.5: within windows but for the full-attention blocks), and a merger that turns each 2x2 block of patches
into one token of the language model's width. Qwen3-VL adds a learned position table resampled to each image's
grid and DeepStack features: the merged output of some intermediate blocks, which the decoder adds to its
early hidden states.

The module tree is named as the weights name it under `model.visual.`, so `load_state_dict(tower, weights)`
with that prefix stripped fills it. Everything that depends on the images' grids (rotary angles, which tokens
attend to which, position-table taps) is computed in numpy from `grid_thw`, a static tuple of Python ints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.models.config import ConfigError, resolve_config, square_size
from jaxdream.nn.attention import check_implementation, dot_product_attention, kernel_for
from jaxdream.nn.layers import ACTIVATIONS, WEIGHT_PRODUCT, Embed, LayerNorm, RMSNorm, activation, linear_class

_COMMON = dict(
  in_channels=3,
  spatial_merge_size=2,
  temporal_patch_size=2,
  rope_parameters=None,
)
# transformers' defaults for each tower (the published checkpoints spell most of them out).
DEFAULTS = {
  'qwen2_5_vl': dict(
    _COMMON,
    depth=32,
    hidden_size=3584,
    hidden_act='silu',
    intermediate_size=3420,
    num_heads=16,
    patch_size=14,
    window_size=112,
    out_hidden_size=3584,
    fullatt_block_indexes=(7, 15, 23, 31),
  ),
  'qwen3_vl': dict(
    _COMMON,
    depth=27,
    hidden_size=1152,
    hidden_act='gelu_pytorch_tanh',
    intermediate_size=4304,
    num_heads=16,
    patch_size=16,
    out_hidden_size=3584,
    num_position_embeddings=2304,
    deepstack_visual_indexes=(8, 16, 24),
  ),
}
SUPPORTED = dict(hidden_act=tuple(ACTIVATIONS))
# Older names some published config.json files use (Qwen2.5-VL's `in_chans`), and transformers' attribute map.
_ALIASES = dict(in_chans='in_channels', num_attention_heads='num_heads', num_hidden_layers='depth')


def resolve_qwen_vision_config(config: dict, model_type: str) -> dict:
  """The checked vision config of a Qwen2.5-VL (`model_type` 'qwen2_5_vl') or Qwen3-VL ('qwen3_vl') config.json
  (the top-level dict: its `vision_config` is read). Ints for sizes, tuples for block index lists, plus
  `model_type`, `head_dim` and `rope_theta`."""
  if model_type not in DEFAULTS:
    raise ConfigError(f'unsupported Qwen-VL model_type {model_type!r}; supported: {sorted(DEFAULTS)}')
  name = f'{model_type} vision'
  vision = config.get('vision_config')
  if not isinstance(vision, dict):
    raise ConfigError(f'{name} config: the config has no vision_config dict (is it a {model_type} config.json?)')
  vision = {_ALIASES.get(k, k): v for k, v in vision.items()}
  cfg = resolve_config(vision, DEFAULTS[model_type], model=name, supported=SUPPORTED, strict=False)
  cfg['patch_size'] = square_size(cfg['patch_size'], 'patch_size', name)
  spatial = vision.get('spatial_patch_size', cfg['patch_size'])
  if spatial != cfg['patch_size']:
    raise ConfigError(f'{name} config: spatial_patch_size={spatial!r} differs from patch_size={cfg["patch_size"]}')
  for key in ('depth', 'hidden_size', 'intermediate_size', 'num_heads', 'in_channels', 'out_hidden_size'):
    cfg[key] = int(cfg[key])
  cfg['temporal_patch_size'] = square_size(cfg['temporal_patch_size'], 'temporal_patch_size', name)
  cfg['spatial_merge_size'] = int(cfg['spatial_merge_size'])
  rope = dict(cfg.pop('rope_parameters') or {})
  if rope.get('rope_type', 'axial') != 'axial':
    raise ConfigError(f'{name} config: rope_parameters.rope_type={rope["rope_type"]!r} is not supported (only axial)')
  cfg['rope_theta'] = float(rope.get('rope_theta', vision.get('rope_theta', 10000.0)))
  d, heads = cfg['hidden_size'], cfg['num_heads']
  if d % heads or (d // heads) % 4:
    raise ConfigError(
      f'{name} config: hidden_size={d} over num_heads={heads} must give a head dim divisible by 4 (2-D rotary)'
    )
  cfg['head_dim'] = d // heads
  index_keys = ('fullatt_block_indexes',) if model_type == 'qwen2_5_vl' else ('deepstack_visual_indexes',)
  for key in index_keys:
    cfg[key] = tuple(int(i) for i in cfg[key])
    if any(not 0 <= i < cfg['depth'] for i in cfg[key]):
      raise ConfigError(f'{name} config: {key}={list(cfg[key])} names blocks outside 0..{cfg["depth"] - 1}')
  if model_type == 'qwen2_5_vl':
    cfg['window_size'] = int(cfg['window_size'])
    if cfg['window_size'] < cfg['patch_size'] * cfg['spatial_merge_size']:
      raise ConfigError(
        f'{name} config: window_size={cfg["window_size"]} is smaller than one merged token '
        f'({cfg["patch_size"] * cfg["spatial_merge_size"]} pixels)'
      )
  else:
    n = int(cfg['num_position_embeddings'])
    if int(round(n**0.5)) ** 2 != n:
      raise ConfigError(f'{name} config: num_position_embeddings={n} is not a square grid')
    cfg['num_position_embeddings'] = n
  cfg['model_type'] = model_type
  return cfg


# ----------------------------------------------------------------------------------------- grid-derived inputs


def check_grid(grid_thw, merge: int) -> tuple[tuple[int, int, int], ...]:
  """`grid_thw` as a tuple of (t, h, w) Python int triples; h and w must be multiples of the merge size."""
  try:
    grid = tuple((int(t), int(h), int(w)) for t, h, w in np.asarray(grid_thw).reshape(-1, 3).tolist())
  except (TypeError, ValueError):
    raise ValueError(f'grid_thw must be (t, h, w) triples of ints, got {grid_thw!r}') from None
  if not grid:
    raise ValueError('grid_thw is empty: at least one image is needed')
  for t, h, w in grid:
    if min(t, h, w) < 1 or h % merge or w % merge:
      raise ValueError(f'grid_thw entry {(t, h, w)}: sizes must be positive, h and w multiples of {merge}')
  return grid


def patch_rows_cols(grid, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """Each patch's (row, col) in its frame, in the processor's order: frames, then merge blocks row-major,
  then the patches of a block row-major (transformers' get_vision_position_ids)."""
  rows, cols = [], []
  for t, h, w in grid:
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    block = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
    rows.append(np.tile(block(r), t))
    cols.append(np.tile(block(c), t))
  return np.concatenate(rows), np.concatenate(cols)


def rotary_cos_sin(grid, merge: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (N, head_dim) float32: the first half of each head rotates by the row, the second by the
  column (frequencies over head_dim // 4), the whole repeated for rotate_half's two halves."""
  rows, cols = patch_rows_cols(grid, merge)
  quarter = head_dim // 2
  inv_freq = (1.0 / theta ** (np.arange(0, quarter, 2, dtype=np.float32) / quarter)).astype(np.float32)
  angles = np.concatenate([rows[:, None] * inv_freq, cols[:, None] * inv_freq], -1).astype(np.float32)
  angles = np.concatenate([angles, angles], -1)
  return np.cos(angles), np.sin(angles)


def frame_segments(grid) -> np.ndarray:
  """(N,) int: which frame of which image each patch is in; full attention stays within a frame."""
  return np.concatenate([np.repeat(np.arange(t), h * w) for t, h, w in grid]) + np.repeat(
    np.cumsum([0] + [t for t, _, _ in grid])[:-1], [t * h * w for t, h, w in grid]
  )


def window_segments(grid, merge: int, window: int) -> np.ndarray:
  """(N,) int: which attention window each patch is in. Windows tile each frame's grid of merged tokens in
  `window` x `window` squares from the top left (the last row and column of windows may be partial), as
  transformers' get_vision_window_index. The tokens stay in the processor's order between blocks (each block
  gathers its windows itself, `segment_attention`), so there is no window order to undo after the merger."""
  rows, cols = patch_rows_cols(grid, merge)
  out, start, offset = np.empty(len(rows), np.int64), 0, 0
  for t, h, w in grid:
    n = h * w
    across = -(-(w // merge) // window)
    per_frame = -(-(h // merge) // window) * across
    for f in range(t):
      r, c = rows[start : start + n] // merge // window, cols[start : start + n] // merge // window
      out[start : start + n] = offset + f * per_frame + r * across + c
      start += n
    offset += t * per_frame
  return out


def position_taps(grid, merge: int, side: int) -> tuple[np.ndarray, np.ndarray]:
  """Qwen3-VL's learned `side` x `side` position table resampled to each frame's grid, bilinearly with
  aligned corners (transformers' get_vision_interpolation_indices_and_weights): (N, 4) table indices and
  their (N, 4) float32 weights."""
  rows, cols = patch_rows_cols(grid, merge)
  sizes = np.concatenate([np.full((t * h * w, 2), (h, w)) for t, h, w in grid])

  def axis(index, size):
    src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    taps = floor.astype(np.int64)[:, None] + np.arange(2)
    weights = np.maximum(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0).astype(np.float32)
    return np.clip(taps, 0, side - 1), weights

  (ht, hw), (wt, ww) = axis(rows, sizes[:, 0]), axis(cols, sizes[:, 1])
  indices = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
  return indices, (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)


# ----------------------------------------------------------------------------------------------------- layers


def _conv3d_to_jax(w):
  return np.transpose(np.asarray(w), (1, 2, 3, 4, 0))  # (D, C, T, P, P) -> (C, T, P, P, D)


class PatchConv3d(nnx.Module):
  """A Conv3d whose kernel equals its stride, applied to patches the processor already cut out and
  flattened (N, C*T*P*P): a matmul with the kernel flattened in the same (C, T, P, P) order."""

  TORCH_PARAMS = {
    'kernel': ('weight', _conv3d_to_jax, lambda k: np.transpose(np.asarray(k), (4, 0, 1, 2, 3))),
    'bias': ('bias', np.asarray, np.asarray),
  }

  def __init__(self, in_channels, out_channels, temporal, patch, *, use_bias, dtype, rngs):
    shape = (in_channels, temporal, patch, patch, out_channels)
    bound = 1.0 / np.sqrt(in_channels * temporal * patch * patch)
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound))
    self.bias = (
      nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), jnp.float32, -bound, bound)) if use_bias else None
    )
    self.dtype = dtype

  def param_axes(self) -> dict:
    return {'kernel': ('conv_in', None, None, None, 'embed'), 'bias': ('embed',)}

  def __call__(self, x):
    kernel = self.kernel[...]
    if x.shape[-1] != np.prod(kernel.shape[:-1]):
      raise ValueError(
        f'pixel_values have {x.shape[-1]} values per patch; the patch embedding takes '
        f'{int(np.prod(kernel.shape[:-1]))} (channels x temporal patch x patch x patch)'
      )
    y = jnp.dot(x.astype(self.dtype), kernel.reshape(-1, kernel.shape[-1]).astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return jax.ad_checkpoint.checkpoint_name(y, WEIGHT_PRODUCT)


class VisionPatchEmbed(nnx.Module):
  def __init__(self, cfg: dict, *, use_bias: bool, dtype, rngs):
    c, t, p, d = cfg['in_channels'], cfg['temporal_patch_size'], cfg['patch_size'], cfg['hidden_size']
    self.proj = PatchConv3d(c, d, t, p, use_bias=use_bias, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.proj(x)


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], -1)


class VisionAttention(nnx.Module):
  """Self-attention over the packed patches of all images, each patch attending only to patches of its own
  segment (frame or window, `segment_attention`); rotary on queries and keys in float32, as transformers."""

  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    d = cfg['hidden_size']
    self.qkv = linear_class(dtype)(d, 3 * d, axes=('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.proj = linear_class(dtype)(d, d, axes=('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.heads, self.attention_impl = cfg['num_heads'], attention_impl

  def __call__(self, x, cos, sin, segments: np.ndarray):
    n = x.shape[0]
    qkv = self.qkv(x).reshape(n, 3, self.heads, -1)
    rope = lambda a: a.astype(jnp.float32) * cos[:, None] + _rotate_half(a.astype(jnp.float32)) * sin[:, None]
    q, k, v = rope(qkv[:, 0]).astype(x.dtype), rope(qkv[:, 1]).astype(x.dtype), qkv[:, 2]
    return self.proj(segment_attention(q, k, v, segments, self.attention_impl).reshape(n, -1))


def segment_layout(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """How to batch tokens by segment: `index` (S, L) the tokens of each segment in order, padded with N (a
  zero row appended to the tokens); `valid` (S, L) which entries are tokens; `slot` (N,) each token's place
  in the flattened (S * L) batch."""
  n = len(segments)
  _, seg, counts = np.unique(segments, return_inverse=True, return_counts=True)
  order = np.argsort(seg, kind='stable')
  rank = np.arange(n) - np.concatenate([[0], np.cumsum(counts)[:-1]])[seg[order]]
  index = np.full((len(counts), counts.max()), n)
  index[seg[order], rank] = order
  slot = np.empty(n, np.int64)
  slot[order] = seg[order] * counts.max() + rank
  return index, index < n, slot


def segment_attention(q, k, v, segments: np.ndarray, implementation: str):
  """Attention of (N, H, D) tokens within their segments (frames or windows): the segments are gathered into
  a batch padded to the longest, padded keys masked, and the outputs gathered back to the tokens' order. Its
  cost is that of the segments, not of an N x N mask."""
  if len(np.unique(segments)) == 1:
    return dot_product_attention(q[None], k[None], v[None], implementation=implementation)[0]
  index, valid, slot = segment_layout(segments)
  batch = lambda a: jnp.concatenate([a, jnp.zeros_like(a[:1])])[jnp.asarray(index)]  # (S, L, H, D)
  mask = None if valid.all() else jnp.asarray(valid)[:, None, None, :]  # padded queries are dropped below
  impl = kernel_for(implementation, masked=mask is not None)
  out = dot_product_attention(batch(q), batch(k), batch(v), mask=mask, implementation=impl)
  return out.reshape(-1, *out.shape[2:])[jnp.asarray(slot)]


class Qwen2_5VisionMLP(nnx.Module):
  """Gated MLP: down_proj(act(gate_proj(x)) * up_proj(x)), with biases."""

  def __init__(self, cfg: dict, *, dtype, rngs):
    d, h = cfg['hidden_size'], cfg['intermediate_size']
    self.gate_proj = linear_class(dtype)(d, h, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.up_proj = linear_class(dtype)(d, h, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.down_proj = linear_class(dtype)(h, d, axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.act = cfg['hidden_act']

  def __call__(self, x):
    return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


class Qwen3VisionMLP(nnx.Module):
  def __init__(self, cfg: dict, *, dtype, rngs):
    d, h = cfg['hidden_size'], cfg['intermediate_size']
    self.linear_fc1 = linear_class(dtype)(d, h, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.linear_fc2 = linear_class(dtype)(h, d, axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.act = cfg['hidden_act']

  def __call__(self, x):
    return self.linear_fc2(activation(self.act)(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
  """Pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)). Qwen2.5: RMSNorm and the gated MLP; Qwen3:
  LayerNorm and a plain two-layer MLP (both norms with eps 1e-6)."""

  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    d = cfg['hidden_size']
    qwen3 = cfg['model_type'] == 'qwen3_vl'
    norm = (lambda: LayerNorm(d, eps=1e-6, dtype=dtype)) if qwen3 else (lambda: RMSNorm(d, eps=1e-6, dtype=dtype))
    self.norm1 = norm()
    self.norm2 = norm()
    self.attn = VisionAttention(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.mlp = (Qwen3VisionMLP if qwen3 else Qwen2_5VisionMLP)(cfg, dtype=dtype, rngs=rngs)

  def __call__(self, x, cos, sin, segments):
    x = x + self.attn(self.norm1(x), cos, sin, segments)
    return x + self.mlp(self.norm2(x))


class _NoParams(nnx.Module):
  """Placeholder for a parameter-free torch module that holds a list index (the GELU in merger.mlp)."""


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)  # torch's nn.GELU()


class Qwen2_5VisionPatchMerger(nnx.Module):
  """ln_q (RMSNorm per patch), then each merge block's patches side by side through mlp.0, GELU, mlp.2."""

  def __init__(self, cfg: dict, *, dtype, rngs):
    d, wide = cfg['hidden_size'], cfg['hidden_size'] * cfg['spatial_merge_size'] ** 2
    self.ln_q = RMSNorm(d, eps=1e-6, dtype=dtype)
    self.wide = wide
    self.mlp = nnx.List(
      [
        linear_class(dtype)(wide, wide, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs),
        _NoParams(),
        linear_class(dtype)(wide, cfg['out_hidden_size'], axes=('mlp', 'embed'), dtype=dtype, rngs=rngs),
      ]
    )

  def __call__(self, x):
    x = self.ln_q(x).reshape(-1, self.wide)
    return self.mlp[2](_gelu(self.mlp[0](x)))


class Qwen3VisionPatchMerger(nnx.Module):
  """LayerNorm per patch (the main merger) or over the merged block (`postshuffle`, the DeepStack mergers),
  then linear_fc1, GELU, linear_fc2."""

  def __init__(self, cfg: dict, *, postshuffle: bool, dtype, rngs):
    d, wide = cfg['hidden_size'], cfg['hidden_size'] * cfg['spatial_merge_size'] ** 2
    self.norm = LayerNorm(wide if postshuffle else d, eps=1e-6, dtype=dtype)
    self.linear_fc1 = linear_class(dtype)(wide, wide, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.linear_fc2 = linear_class(dtype)(wide, cfg['out_hidden_size'], axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.wide, self.postshuffle = wide, postshuffle

  def __call__(self, x):
    x = self.norm(x.reshape(-1, self.wide)) if self.postshuffle else self.norm(x).reshape(-1, self.wide)
    return self.linear_fc2(_gelu(self.linear_fc1(x)))


def _check_cfg(cfg: dict, model_type: str) -> dict:
  if not isinstance(cfg, dict) or cfg.get('model_type') != model_type or 'head_dim' not in cfg:
    raise ConfigError(
      f'expected the output of resolve_qwen_vision_config(config, {model_type!r}), got '
      f'{type(cfg).__name__} with model_type={cfg.get("model_type") if isinstance(cfg, dict) else None!r}'
    )
  return cfg


def _check_pixels(pixel_values, grid, cfg):
  n = sum(t * h * w for t, h, w in grid)
  if pixel_values.ndim != 2 or pixel_values.shape[0] != n:
    raise ValueError(
      f'pixel_values {tuple(pixel_values.shape)} do not match grid_thw {grid}: expected ({n}, '
      f'{cfg["in_channels"] * cfg["temporal_patch_size"] * cfg["patch_size"] ** 2})'
    )


# ------------------------------------------------------------------------------------------------------ towers


class Qwen2_5VisionTransformer(nnx.Module):
  """`tower(pixel_values, grid_thw)` -> (N // merge**2, out_hidden_size) features, one per merged token in
  the processor's order. pixel_values: (N, C*T*P*P) as the processor flattens them; grid_thw: static
  ((t, h, w), ...) per image, in patches. Blocks in `fullatt_block_indexes` attend over each whole frame,
  the others within windows of window_size pixels."""

  def __init__(self, cfg: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    cfg = _check_cfg(cfg, 'qwen2_5_vl')
    impl = check_implementation(attention_impl)
    self.patch_embed = VisionPatchEmbed(cfg, use_bias=False, dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(cfg, attention_impl=impl, dtype=dtype, rngs=rngs) for _ in range(cfg['depth'])])
    self.merger = Qwen2_5VisionPatchMerger(cfg, dtype=dtype, rngs=rngs)
    self.cfg = dict(cfg)
    self.merge_size = cfg['spatial_merge_size']
    self.dtype = dtype

  def __call__(self, pixel_values, grid_thw):
    cfg, merge = self.cfg, self.merge_size
    grid = check_grid(grid_thw, merge)
    _check_pixels(pixel_values, grid, cfg)
    cos, sin = (jnp.asarray(a) for a in rotary_cos_sin(grid, merge, cfg['head_dim'], cfg['rope_theta']))
    full = frame_segments(grid)
    window = window_segments(grid, merge, cfg['window_size'] // merge // cfg['patch_size'])
    x = self.patch_embed(pixel_values)
    for i, block in enumerate(self.blocks):
      x = block(x, cos, sin, full if i in cfg['fullatt_block_indexes'] else window)
    return self.merger(x)


class Qwen3VisionModel(nnx.Module):
  """`tower(pixel_values, grid_thw)` -> (features, deepstack_features): features (N // merge**2,
  out_hidden_size) as Qwen2.5's, and one more such array per block in `deepstack_visual_indexes` (that
  block's output through its own merger), in that list's order. All blocks attend over each whole frame."""

  def __init__(self, cfg: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    cfg = _check_cfg(cfg, 'qwen3_vl')
    impl = check_implementation(attention_impl)
    self.patch_embed = VisionPatchEmbed(cfg, use_bias=True, dtype=dtype, rngs=rngs)
    self.pos_embed = Embed(cfg['num_position_embeddings'], cfg['hidden_size'], axes=('position', 'embed'), rngs=rngs)
    self.blocks = nnx.List([VisionBlock(cfg, attention_impl=impl, dtype=dtype, rngs=rngs) for _ in range(cfg['depth'])])
    self.merger = Qwen3VisionPatchMerger(cfg, postshuffle=False, dtype=dtype, rngs=rngs)
    self.deepstack_merger_list = nnx.List(
      [Qwen3VisionPatchMerger(cfg, postshuffle=True, dtype=dtype, rngs=rngs) for _ in cfg['deepstack_visual_indexes']]
    )
    self.cfg = dict(cfg)
    self.merge_size = cfg['spatial_merge_size']
    self.dtype = dtype

  def __call__(self, pixel_values, grid_thw):
    cfg, merge = self.cfg, self.merge_size
    grid = check_grid(grid_thw, merge)
    _check_pixels(pixel_values, grid, cfg)
    cos, sin = (jnp.asarray(a) for a in rotary_cos_sin(grid, merge, cfg['head_dim'], cfg['rope_theta']))
    taps, weights = position_taps(grid, merge, int(round(cfg['num_position_embeddings'] ** 0.5)))
    table = self.pos_embed.embedding[...]
    pos = jnp.sum(jnp.take(table, jnp.asarray(taps), axis=0) * jnp.asarray(weights)[:, :, None], 1)
    x = self.patch_embed(pixel_values)
    x = x + pos.astype(x.dtype)
    segments = frame_segments(grid)
    deepstack = []
    for i, block in enumerate(self.blocks):
      x = block(x, cos, sin, segments)
      if i in cfg['deepstack_visual_indexes']:
        deepstack.append(self.deepstack_merger_list[cfg['deepstack_visual_indexes'].index(i)](x))
    return self.merger(x), deepstack
