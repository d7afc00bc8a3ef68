"""UNet2DConditionModel (Stable Diffusion 1.x / 2.x and SDXL), NHWC, named as diffusers' weights name it."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.models.config import ConfigError, per_block, resolve_config
from jaxdream.nn.adapters import LoRALinear, register_lora_class
from jaxdream.nn.attention import check_implementation
from jaxdream.nn.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from jaxdream.nn.layers import Conv2d, GroupNorm, LayerNorm, Linear, activation
from jaxdream.nn.remat import remat_block

# Every key diffusers writes, with its default. Keys listed in SUPPORTED accept only those values.
DEFAULTS = dict(
  sample_size=None,
  in_channels=4,
  out_channels=4,
  center_input_sample=False,
  flip_sin_to_cos=True,
  freq_shift=0,
  down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
  mid_block_type='UNetMidBlock2DCrossAttn',
  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
  only_cross_attention=False,
  block_out_channels=(320, 640, 1280, 1280),
  layers_per_block=2,
  downsample_padding=1,
  mid_block_scale_factor=1.0,
  dropout=0.0,
  act_fn='silu',
  norm_num_groups=32,
  norm_eps=1e-5,
  cross_attention_dim=1280,
  transformer_layers_per_block=1,
  reverse_transformer_layers_per_block=None,
  encoder_hid_dim=None,
  encoder_hid_dim_type=None,
  attention_head_dim=8,
  num_attention_heads=None,
  dual_cross_attention=False,
  use_linear_projection=False,
  class_embed_type=None,
  addition_embed_type=None,
  addition_time_embed_dim=None,
  num_class_embeds=None,
  upcast_attention=False,
  resnet_time_scale_shift='default',
  resnet_skip_time_act=False,
  resnet_out_scale_factor=1.0,
  time_embedding_type='positional',
  time_embedding_dim=None,
  time_embedding_act_fn=None,
  timestep_post_act=None,
  time_cond_proj_dim=None,
  conv_in_kernel=3,
  conv_out_kernel=3,
  projection_class_embeddings_input_dim=None,
  attention_type='default',
  class_embeddings_concat=False,
  mid_block_only_cross_attention=None,
  cross_attention_norm=None,
  addition_embed_type_num_heads=64,
)
SUPPORTED = dict(
  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
  up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
  mid_block_type=('UNetMidBlock2DCrossAttn',),
  only_cross_attention=(False,),
  dropout=(0.0,),
  act_fn=('silu', 'swish'),
  encoder_hid_dim=(None,),
  encoder_hid_dim_type=(None,),
  num_attention_heads=(None,),
  dual_cross_attention=(False,),
  class_embed_type=(None,),
  addition_embed_type=(None, 'text_time'),
  num_class_embeds=(None,),
  resnet_time_scale_shift=('default',),
  resnet_skip_time_act=(False,),
  resnet_out_scale_factor=(1.0,),
  time_embedding_type=('positional',),
  time_embedding_dim=(None,),
  time_embedding_act_fn=(None,),
  timestep_post_act=(None,),
  time_cond_proj_dim=(None,),
  attention_type=('default',),
  class_embeddings_concat=(False,),
  mid_block_only_cross_attention=(None, False),
  cross_attention_norm=(None,),
)


def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
  """Sinusoidal timestep features, float32, as diffusers' get_timestep_embedding."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nnx.Module):
  def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str, *, dtype, rngs):
    self.linear_1 = Linear(in_channels, time_embed_dim, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.linear_2 = Linear(time_embed_dim, time_embed_dim, axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.act_fn = act_fn

  def __call__(self, x):
    return self.linear_2(activation(self.act_fn)(self.linear_1(x)))


class _NoParams(nnx.Module):
  """Placeholder for parameter-free torch modules that hold a list index (Dropout in ff.net)."""

  def __call__(self, x):
    return x


def _interleave(x):
  """[h; gate] halves of the last axis -> [h0, gate0, h1, gate1, ...]."""
  x = np.asarray(x)
  return x.reshape(*x.shape[:-1], 2, -1).swapaxes(-1, -2).reshape(x.shape)


def _deinterleave(x):
  x = np.asarray(x)
  return x.reshape(*x.shape[:-1], -1, 2).swapaxes(-1, -2).reshape(x.shape)


_LINEAR_TO_JAX, _LINEAR_TO_TORCH = Linear.TORCH_PARAMS['kernel'][1:]


class GEGLUProjection(Linear):
  """GEGLU's fused projection, its output features stored interleaved as [h0, gate0, h1, gate1, ...]
  (torch stores [h; gate]): split over 'tensor' in contiguous blocks, each shard then holds matching value
  and gate features, and the gating needs no exchange between shards."""

  TORCH_PARAMS = {
    'kernel': ('weight', lambda w: _interleave(_LINEAR_TO_JAX(w)), lambda k: _LINEAR_TO_TORCH(_deinterleave(k))),
    'bias': ('bias', _interleave, _deinterleave),
  }


class LoRAGEGLUProjection(LoRALinear, GEGLUProjection):
  """LoRA on GEGLU's projection (peft's and kohya's `ff.net.0.proj` target): B's output features are interleaved
  as the kernel's, so the update gates and shards with it, and files hold torch's [h; gate] order."""


register_lora_class(GEGLUProjection, LoRAGEGLUProjection)


class GEGLU(nnx.Module):
  def __init__(self, dim: int, inner: int, *, dtype, rngs):
    self.proj = GEGLUProjection(dim, 2 * inner, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = self.proj(x)
    y = y.reshape(*y.shape[:-1], -1, 2)
    return y[..., 0] * activation('gelu')(y[..., 1])


class FeedForward(nnx.Module):
  def __init__(self, dim: int, *, dtype, rngs, mult: int = 4):
    down = Linear(dim * mult, dim, axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.net = nnx.List([GEGLU(dim, dim * mult, dtype=dtype, rngs=rngs), _NoParams(), down])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  def __init__(
    self,
    dim: int,
    heads: int,
    dim_head: int,
    cross_attention_dim: int,
    *,
    upcast: bool,
    attention_impl: str,
    dtype,
    rngs,
  ):
    attn = dict(heads=heads, dim_head=dim_head, upcast=upcast, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.norm1 = LayerNorm(dim, dtype=dtype)
    self.attn1 = Attention(dim, **attn)
    self.norm2 = LayerNorm(dim, dtype=dtype)
    self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn)
    self.norm3 = LayerNorm(dim, dtype=dtype)
    self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
    self.remat = 'none'  # set for training (nn.remat)

  def __call__(self, x, context):
    return remat_block(self, BasicTransformerBlock._forward, x, context)

  def _forward(self, x, context):
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context) + x
    return self.ff(self.norm3(x)) + x


class Transformer2DModel(nnx.Module):
  def __init__(
    self,
    heads: int,
    channels: int,
    *,
    num_layers: int,
    cross_attention_dim: int,
    groups: int,
    use_linear_projection: bool,
    upcast: bool,
    attention_impl: str,
    dtype,
    rngs,
  ):
    self.norm = GroupNorm(groups, channels, eps=1e-6, dtype=dtype)
    # A 1x1 conv and a linear projection compute the same; only the stored weight layout differs.
    proj = (
      (lambda i, o: Linear(i, o, dtype=dtype, rngs=rngs))
      if use_linear_projection
      else (lambda i, o: Conv2d(i, o, 1, padding=0, dtype=dtype, rngs=rngs))
    )
    self.proj_in = proj(channels, channels)
    self.transformer_blocks = nnx.List(
      [
        BasicTransformerBlock(
          channels,
          heads,
          channels // heads,
          cross_attention_dim,
          upcast=upcast,
          attention_impl=attention_impl,
          dtype=dtype,
          rngs=rngs,
        )
        for _ in range(num_layers)
      ]
    )
    self.proj_out = proj(channels, channels)

  def __call__(self, x, context):
    b, h, w, c = x.shape
    y = self.proj_in(self.norm(x)).reshape(b, h * w, c)
    for block in self.transformer_blocks:
      y = block(y, context)
    return self.proj_out(y).reshape(b, h, w, c) + x


class DownBlock(nnx.Module):
  """CrossAttnDownBlock2D (with `attentions`, one per resnet: `cross` holds each one's settings) or DownBlock2D."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    num_layers: int,
    add_downsample: bool,
    cross: list[dict] | None,
    resnet: dict,
    downsample_padding: int,
    dtype,
    rngs,
  ):
    self.resnets = nnx.List(
      [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, **resnet) for i in range(num_layers)]
    )
    self.attentions = nnx.List([Transformer2DModel(channels=out_channels, **c) for c in cross]) if cross else None
    self.downsamplers = (
      nnx.List([Downsample2D(out_channels, out_channels, padding=downsample_padding, dtype=dtype, rngs=rngs)])
      if add_downsample
      else None
    )

  def __call__(self, x, temb, context):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, skips


class UpBlock(nnx.Module):
  """CrossAttnUpBlock2D (with `attentions`, one per resnet: `cross` holds each one's settings) or UpBlock2D."""

  def __init__(
    self,
    in_channels: int,
    prev_output_channels: int,
    out_channels: int,
    *,
    num_layers: int,
    add_upsample: bool,
    cross: list[dict] | None,
    resnet: dict,
    dtype,
    rngs,
  ):
    self.resnets = nnx.List(
      [
        ResnetBlock2D(
          (prev_output_channels if i == 0 else out_channels) + (in_channels if i == num_layers - 1 else out_channels),
          out_channels,
          **resnet,
        )
        for i in range(num_layers)
      ]
    )
    self.attentions = nnx.List([Transformer2DModel(channels=out_channels, **c) for c in cross]) if cross else None
    self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

  def __call__(self, x, skips, temb, context, upsample_size=None):
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


class UNetMidBlock2DCrossAttn(nnx.Module):
  def __init__(self, channels: int, *, cross: list[dict], resnet: dict):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, **resnet) for _ in range(2)])
    self.attentions = nnx.List([Transformer2DModel(channels=channels, **cross[0])])

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    x = self.attentions[0](x, context)
    return self.resnets[1](x, temb)


class UNet2DConditionModel(nnx.Module):
  """`unet(sample (B,H,W,C), timesteps (B,) or scalar, encoder_hidden_states (B,L,D))` -> (B,H,W,C_out).

  SDXL's UNets (addition_embed_type='text_time') also take `text_embeds` (B, P), the pooled prompt embedding,
  and `time_ids` (B, K), the micro-conditioning values, as keywords (diffusers' `added_cond_kwargs`).
  """

  CONFIG_NAME = 'config.json'
  WEIGHTS_NAME = 'diffusion_pytorch_model'
  CLASS_NAME = 'UNet2DConditionModel'

  @staticmethod
  def resolve_config(config: dict) -> dict:
    cfg = resolve_config(config, DEFAULTS, model='UNet2DConditionModel', supported=SUPPORTED)
    if cfg['norm_num_groups'] is None:
      raise ConfigError('UNet2DConditionModel config norm_num_groups=None is not supported by jaxdream')
    if len(cfg['down_block_types']) != len(cfg['up_block_types']):
      raise ConfigError('UNet2DConditionModel config: down_block_types and up_block_types differ in length')
    if len(cfg['block_out_channels']) != len(cfg['down_block_types']):
      raise ConfigError('UNet2DConditionModel config: block_out_channels must have one entry per block')
    if cfg['addition_embed_type'] == 'text_time':
      for key in ('addition_time_embed_dim', 'projection_class_embeddings_input_dim'):
        if cfg[key] is None:
          raise ConfigError(f"UNet2DConditionModel config: addition_embed_type='text_time' needs {key}")
    tl = cfg['transformer_layers_per_block']
    if isinstance(tl, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in tl):
      if cfg['reverse_transformer_layers_per_block'] is None:  # as diffusers: the up blocks' depths are not implied
        raise ConfigError(
          'UNet2DConditionModel config: per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block'
        )
    return cfg

  def __init__(self, config: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    cfg = self.resolve_config(config)
    attention_impl = check_implementation(attention_impl)
    self.config = dict(config)
    self.dtype = dtype
    n = len(cfg['down_block_types'])
    name = 'UNet2DConditionModel'
    channels = list(cfg['block_out_channels'])
    # diffusers' historical naming: in SD configs `attention_head_dim` is the number of heads.
    heads = per_block(cfg['attention_head_dim'], n, 'attention_head_dim', name)
    layers = per_block(cfg['layers_per_block'], n, 'layers_per_block', name)
    cross_dim = per_block(cfg['cross_attention_dim'], n, 'cross_attention_dim', name)
    # Transformer depth per block (an int, or one per layer); the up blocks mirror the down blocks' unless given.
    tlayers = per_block(cfg['transformer_layers_per_block'], n, 'transformer_layers_per_block', name)
    up_tlayers = (
      list(reversed(tlayers))
      if cfg['reverse_transformer_layers_per_block'] is None
      else per_block(cfg['reverse_transformer_layers_per_block'], n, 'reverse_transformer_layers_per_block', name)
    )
    for i, c in enumerate(channels):
      # Heads split the channels of attention blocks only: down block i, its mirror up block, the mid block.
      attends = 'CrossAttn' in cfg['down_block_types'][i] or 'CrossAttn' in cfg['up_block_types'][n - 1 - i]
      if (attends or i == n - 1) and c % heads[i]:
        raise ConfigError(f'{name} config: block {i} has {c} channels, not divisible by {heads[i]} heads')
    groups, eps = cfg['norm_num_groups'], cfg['norm_eps']
    temb_dim = channels[0] * 4
    resnet = dict(temb_channels=temb_dim, groups=groups, eps=eps, act_fn=cfg['act_fn'], dtype=dtype, rngs=rngs)

    def cross(i, depth, num_layers, is_cross=True):
      """Each of the block's transformers' settings (block i, in down order), or None for a block without them."""
      if not is_cross:
        return None
      depths = [depth] * num_layers if isinstance(depth, int) else list(depth)
      if len(depths) != num_layers:
        raise ConfigError(
          f'{name} config: transformer depths {depth} given per layer for a block of {num_layers} layers'
        )
      return [
        dict(
          heads=heads[i],
          num_layers=d,
          cross_attention_dim=cross_dim[i],
          groups=groups,
          use_linear_projection=cfg['use_linear_projection'],
          upcast=bool(cfg['upcast_attention']),  # SDXL's config says null
          attention_impl=attention_impl,
          dtype=dtype,
          rngs=rngs,
        )
        for d in depths
      ]

    self.flip_sin_to_cos, self.freq_shift = cfg['flip_sin_to_cos'], cfg['freq_shift']
    self.center_input_sample = cfg['center_input_sample']
    self.time_proj_dim = channels[0]
    self.conv_in = Conv2d(cfg['in_channels'], channels[0], cfg['conv_in_kernel'], dtype=dtype, rngs=rngs)
    self.time_embedding = TimestepEmbedding(channels[0], temb_dim, cfg['act_fn'], dtype=dtype, rngs=rngs)
    # SDXL's added conditioning: the pooled text embedding and the sinusoidal features of each micro-conditioning
    # value (time_ids: sizes, crop, aesthetic score), projected and added to the time embedding.
    self.addition_time_embed_dim = cfg['addition_time_embed_dim'] if cfg['addition_embed_type'] else None
    if self.addition_time_embed_dim:
      proj_dim = cfg['projection_class_embeddings_input_dim']
      self.add_embedding = TimestepEmbedding(proj_dim, temb_dim, 'silu', dtype=dtype, rngs=rngs)

    down, out_ch = [], channels[0]
    for i, kind in enumerate(cfg['down_block_types']):
      in_ch, out_ch = out_ch, channels[i]
      down.append(
        DownBlock(
          in_ch,
          out_ch,
          num_layers=layers[i],
          add_downsample=i < n - 1,
          cross=cross(i, tlayers[i], layers[i], kind == 'CrossAttnDownBlock2D'),
          resnet=resnet,
          downsample_padding=cfg['downsample_padding'],
          dtype=dtype,
          rngs=rngs,
        )
      )
    self.down_blocks = nnx.List(down)

    mid_resnet = dict(resnet, output_scale_factor=cfg['mid_block_scale_factor'])
    mid_depth = tlayers[-1] if isinstance(tlayers[-1], int) else tlayers[-1][0]  # its one transformer: the first
    self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], cross=cross(n - 1, mid_depth, 1), resnet=mid_resnet)

    rev = list(reversed(range(n)))  # block index in down order for each up block
    up, out_ch = [], channels[-1]
    for i, kind in enumerate(cfg['up_block_types']):
      prev, out_ch = out_ch, channels[rev[i]]
      in_ch = channels[rev[min(i + 1, n - 1)]]
      up.append(
        UpBlock(
          in_ch,
          prev,
          out_ch,
          num_layers=layers[rev[i]] + 1,
          add_upsample=i < n - 1,
          cross=cross(rev[i], up_tlayers[i], layers[rev[i]] + 1, kind == 'CrossAttnUpBlock2D'),
          resnet=resnet,
          dtype=dtype,
          rngs=rngs,
        )
      )
    self.up_blocks = nnx.List(up)

    self.conv_norm_out = GroupNorm(groups, channels[0], eps=eps, dtype=dtype)
    self.act_fn = cfg['act_fn']
    self.conv_out = Conv2d(channels[0], cfg['out_channels'], cfg['conv_out_kernel'], dtype=dtype, rngs=rngs)

  def __call__(self, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None):
    b = sample.shape[0]
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
    t = timestep_embedding(
      timesteps, self.time_proj_dim, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
    )
    temb = self.time_embedding(t.astype(self.dtype))
    if self.addition_time_embed_dim:
      temb = temb + self.add_embedding(self._added_features(text_embeds, time_ids, b).astype(self.dtype))
    elif text_embeds is not None or time_ids is not None:
      raise ValueError('this UNet has no added conditioning (addition_embed_type=None): text_embeds/time_ids given')
    context = encoder_hidden_states.astype(self.dtype)
    if self.center_input_sample:
      sample = 2 * sample - 1.0
    x = self.conv_in(sample.astype(self.dtype))
    skips = [x]
    for block in self.down_blocks:
      x, s = block(x, temb, context)
      skips += s
    x = self.mid_block(x, temb, context)
    for block in self.up_blocks:
      k = len(block.resnets)
      block_skips, skips = skips[-k:], skips[:-k]
      # Upsample to the next skip's size, so latents not divisible by 2**levels still work.
      size = skips[-1].shape[1:3] if skips else None
      x = block(x, block_skips, temb, context, size)
    x = activation(self.act_fn)(self.conv_norm_out(x))
    return self.conv_out(x)

  def _added_features(self, text_embeds, time_ids, batch: int):
    """[pooled text embedding, sinusoidal features of each time id], the input of `add_embedding`."""
    if text_embeds is None or time_ids is None:
      raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs text_embeds= and time_ids=")
    time_ids = jnp.asarray(time_ids)
    expected = self.add_embedding.linear_1.kernel.shape[0]
    got = text_embeds.shape[-1] + time_ids.shape[-1] * self.addition_time_embed_dim
    if text_embeds.shape[0] != batch or time_ids.shape[0] != batch or got != expected:
      raise ValueError(
        f'text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} give {got} added features '
        f'for a batch of {batch}; this UNet expects {expected} (projection_class_embeddings_input_dim) per image'
      )
    features = timestep_embedding(
      time_ids.reshape(-1),
      self.addition_time_embed_dim,
      flip_sin_to_cos=self.flip_sin_to_cos,
      freq_shift=self.freq_shift,
    ).reshape(batch, -1)
    return jnp.concatenate([text_embeds.astype(jnp.float32), features], axis=-1)
