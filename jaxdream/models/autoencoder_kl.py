"""AutoencoderKL (the Stable Diffusion VAE), NHWC, named as diffusers' weights name it."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdream.models.config import ConfigError, resolve_config
from jaxdream.nn.attention import check_implementation
from jaxdream.nn.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from jaxdream.nn.layers import Conv2d, GroupNorm, activation

DEFAULTS = dict(
  in_channels=3,
  out_channels=3,
  down_block_types=('DownEncoderBlock2D',),
  up_block_types=('UpDecoderBlock2D',),
  block_out_channels=(64,),
  layers_per_block=1,
  act_fn='silu',
  latent_channels=4,
  norm_num_groups=32,
  sample_size=32,
  scaling_factor=0.18215,
  shift_factor=None,
  latents_mean=None,
  latents_std=None,
  force_upcast=True,
  use_quant_conv=True,
  use_post_quant_conv=True,
  mid_block_add_attention=True,
)
SUPPORTED = dict(
  down_block_types=('DownEncoderBlock2D',), up_block_types=('UpDecoderBlock2D',), act_fn=('silu', 'swish')
)
_EPS = 1e-6  # diffusers' VAE blocks use 1e-6 throughout


class DiagonalGaussian(NamedTuple):
  """The encoder's latent distribution; `mean` and `logvar` are NHWC."""

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key):
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean


def _resnets(in_ch: int, out_ch: int, num_layers: int, groups: int, act_fn: str, *, dtype, rngs) -> nnx.List:
  """A VAE block's resnets: no time embedding, the first one maps in_ch to out_ch."""
  return nnx.List(
    [
      ResnetBlock2D(
        in_ch if i == 0 else out_ch,
        out_ch,
        temb_channels=None,
        groups=groups,
        eps=_EPS,
        act_fn=act_fn,
        dtype=dtype,
        rngs=rngs,
      )
      for i in range(num_layers)
    ]
  )


class UNetMidBlock2D(nnx.Module):
  def __init__(self, channels: int, groups: int, act_fn: str, add_attention: bool, *, attention_impl: str, dtype, rngs):
    self.resnets = _resnets(channels, channels, 2, groups, act_fn, dtype=dtype, rngs=rngs)
    # One head over all channels, softmax in float32 (diffusers' upcast_softmax for the VAE).
    self.attentions = (
      nnx.List(
        [
          Attention(
            channels,
            heads=1,
            dim_head=channels,
            bias=True,
            upcast=True,
            norm_num_groups=groups,
            eps=_EPS,
            residual=True,
            attention_impl=attention_impl,
            dtype=dtype,
            rngs=rngs,
          )
        ]
      )
      if add_attention
      else None
    )

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class EncoderBlock(nnx.Module):
  """DownEncoderBlock2D."""

  def __init__(
    self, in_ch: int, out_ch: int, num_layers: int, add_downsample: bool, groups: int, act_fn: str, *, dtype, rngs
  ):
    self.resnets = _resnets(in_ch, out_ch, num_layers, groups, act_fn, dtype=dtype, rngs=rngs)
    self.downsamplers = (
      nnx.List([Downsample2D(out_ch, out_ch, padding=0, dtype=dtype, rngs=rngs)]) if add_downsample else None
    )

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nnx.Module):
  """UpDecoderBlock2D."""

  def __init__(
    self, in_ch: int, out_ch: int, num_layers: int, add_upsample: bool, groups: int, act_fn: str, *, dtype, rngs
  ):
    self.resnets = _resnets(in_ch, out_ch, num_layers, groups, act_fn, dtype=dtype, rngs=rngs)
    self.upsamplers = nnx.List([Upsample2D(out_ch, dtype=dtype, rngs=rngs)]) if add_upsample else None

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    ch, groups, act = list(cfg['block_out_channels']), cfg['norm_num_groups'], cfg['act_fn']
    self.conv_in = Conv2d(cfg['in_channels'], ch[0], 3, dtype=dtype, rngs=rngs)
    self.down_blocks = nnx.List(
      [
        EncoderBlock(
          ch[max(i - 1, 0)], ch[i], cfg['layers_per_block'], i < len(ch) - 1, groups, act, dtype=dtype, rngs=rngs
        )
        for i in range(len(ch))
      ]
    )
    self.mid_block = UNetMidBlock2D(
      ch[-1], groups, act, cfg['mid_block_add_attention'], attention_impl=attention_impl, dtype=dtype, rngs=rngs
    )
    self.conv_norm_out = GroupNorm(groups, ch[-1], eps=_EPS, dtype=dtype)
    self.conv_out = Conv2d(ch[-1], 2 * cfg['latent_channels'], 3, dtype=dtype, rngs=rngs)
    self.act_fn = act

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(activation(self.act_fn)(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    ch, groups, act = list(cfg['block_out_channels']), cfg['norm_num_groups'], cfg['act_fn']
    rev = ch[::-1]
    self.conv_in = Conv2d(cfg['latent_channels'], rev[0], 3, dtype=dtype, rngs=rngs)
    self.mid_block = UNetMidBlock2D(
      rev[0], groups, act, cfg['mid_block_add_attention'], attention_impl=attention_impl, dtype=dtype, rngs=rngs
    )
    self.up_blocks = nnx.List(
      [
        DecoderBlock(
          rev[max(i - 1, 0)], rev[i], cfg['layers_per_block'] + 1, i < len(ch) - 1, groups, act, dtype=dtype, rngs=rngs
        )
        for i in range(len(ch))
      ]
    )
    self.conv_norm_out = GroupNorm(groups, ch[0], eps=_EPS, dtype=dtype)
    self.conv_out = Conv2d(ch[0], cfg['out_channels'], 3, dtype=dtype, rngs=rngs)
    self.act_fn = act

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(activation(self.act_fn)(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """`vae.encode(images)` (NHWC in [-1, 1]) -> DiagonalGaussian(mean, logvar);
  `vae.decode(latents)` -> NHWC images in [-1, 1]. `encode_latents`/`decode_latents` work in the
  diffusion model's latent space: (x - shift_factor) * scaling_factor, or (x - latents_mean) * scaling_factor /
  latents_std where the config has both, the one place that applies them."""

  CONFIG_NAME = 'config.json'
  WEIGHTS_NAME = 'diffusion_pytorch_model'
  CLASS_NAME = 'AutoencoderKL'
  # Checkpoints converted before diffusers 0.14 name the mid-block attention query/key/value/proj_attn.
  LEGACY_RENAMES = (
    (r'(mid_block\.attentions\.0)\.query\.', r'\1.to_q.'),
    (r'(mid_block\.attentions\.0)\.key\.', r'\1.to_k.'),
    (r'(mid_block\.attentions\.0)\.value\.', r'\1.to_v.'),
    (r'(mid_block\.attentions\.0)\.proj_attn\.', r'\1.to_out.0.'),
  )

  @staticmethod
  def resolve_config(config: dict) -> dict:
    return resolve_config(config, DEFAULTS, model='AutoencoderKL', supported=SUPPORTED)

  def __init__(self, config: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    cfg = self.resolve_config(config)
    self.config = dict(config)
    self.dtype = dtype
    lat = cfg['latent_channels']
    attention_impl = check_implementation(attention_impl)
    self.encoder = Encoder(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.quant_conv = Conv2d(2 * lat, 2 * lat, 1, padding=0, dtype=dtype, rngs=rngs) if cfg['use_quant_conv'] else None
    self.post_quant_conv = (
      Conv2d(lat, lat, 1, padding=0, dtype=dtype, rngs=rngs) if cfg['use_post_quant_conv'] else None
    )
    self.scaling_factor = cfg['scaling_factor']
    self.shift_factor = cfg['shift_factor'] or 0.0
    # Per-channel latent statistics (Playground v2.5's SDXL VAE), used as diffusers' SDXL pipelines and training
    # scripts use them: only when both are given, in place of the shift.
    self.latents_mean = self.latents_std = None
    if cfg['latents_mean'] is not None and cfg['latents_std'] is not None:
      for key in ('latents_mean', 'latents_std'):
        if len(cfg[key]) != lat:
          raise ConfigError(f'AutoencoderKL config: {key} has {len(cfg[key])} values for {lat} latent channels')
      self.latents_mean = tuple(float(v) for v in cfg['latents_mean'])
      self.latents_std = tuple(float(v) for v in cfg['latents_std'])
    self.downsampling_factor = 2 ** (len(cfg['block_out_channels']) - 1)
    self.latent_channels = lat

  def encode(self, images) -> DiagonalGaussian:
    moments = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, latents):
    z = latents.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def _latent_affine(self) -> tuple:
    """(offset, scale): the diffusion model's latents are (x - offset) * scale."""
    if self.latents_mean is None:
      return self.shift_factor, self.scaling_factor
    std = jnp.asarray(self.latents_std, jnp.float32)
    return jnp.asarray(self.latents_mean, jnp.float32), self.scaling_factor / std

  def encode_latents(self, images) -> tuple[jax.Array, jax.Array]:
    """(mean, std) of the posterior in the diffusion model's (scaled, shifted) latent space."""
    dist = self.encode(images)
    offset, scale = self._latent_affine()
    return (dist.mean - offset) * scale, dist.std * scale

  def decode_latents(self, z):
    """Images from latents of the diffusion model's space: the inverse scaling, then `decode`."""
    offset, scale = self._latent_affine()
    return self.decode(z / scale + offset)

  def __call__(self, images, key=None):
    """Reconstruction: encode, take the mean (or a sample with `key`), decode."""
    dist = self.encode(images)
    return self.decode(dist.sample(key) if key is not None else dist.mean)
