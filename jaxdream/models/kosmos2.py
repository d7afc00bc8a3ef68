"""Kosmos-2 (transformers' Kosmos2ForConditionalGeneration): a CLIP ViT image tower, a resampler that turns
its patch features into 64 latent tokens, and a Magneto-style text decoder that reads them in place of the
`<image>` placeholder tokens and writes captions with grounding tags (`<phrase>`, `<patch_index_XXXX>`).

The module tree is named as the PyTorch weights name it, so a transformers folder (config.json +
model.safetensors) loads through numpy. The text decoder runs with or without a fixed-shape KV cache;
`jaxdream.vlm`'s model-agnostic generation (greedy, sampling, beam search) runs it through the
`prefill` / `decode_step` protocol below.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.io.weights import abstract_model, load_state_dict, read_config, read_weights
from jaxdream.models.clip_vision import CLIPVisionTransformer, resolve_vision_config
from jaxdream.models.config import ConfigError, resolve_config
from jaxdream.nn.adapters import Int8Embed, Int8Linear, Quantized, state_bytes, swap_modules  # noqa: F401
from jaxdream.nn.adapters import quantize_int8 as int8
from jaxdream.nn.attention import (
  check_implementation,
  decoder_mask,
  dot_product_attention,
  kernel_for,
  split_heads,
  write_cache,
)
from jaxdream.nn.layers import Embed, LayerNorm, Linear, activation
from jaxdream.runtime import CompileCache

TEXT_DEFAULTS = dict(
  vocab_size=65037,
  max_position_embeddings=2048,
  embed_dim=2048,
  layers=24,
  ffn_dim=8192,
  attention_heads=32,
  activation_function='gelu',
  layer_norm_eps=1e-5,
  scale_embedding=True,
  tie_word_embeddings=True,
  pad_token_id=1,
  bos_token_id=0,
  eos_token_id=2,
  add_cross_attention=False,
)
VISION_DEFAULTS = dict(
  hidden_size=1024,
  intermediate_size=4096,
  num_hidden_layers=24,
  num_attention_heads=16,
  num_channels=3,
  image_size=224,
  patch_size=14,
  hidden_act='quick_gelu',
  layer_norm_eps=1e-5,
)
TEXT_SUPPORTED = dict(
  activation_function=('gelu', 'gelu_new', 'quick_gelu', 'relu', 'silu'), add_cross_attention=(False,)
)

_raw = (np.asarray, np.asarray)  # bare nn.Parameter tensors: same layout in both frameworks


def resolve_kosmos2_config(config: dict) -> dict:
  """The checked config: {'text': ..., 'vision': ..., 'latent_query_num': ..., 'tie_word_embeddings': ...}."""
  text = resolve_config(
    config.get('text_config') or {}, TEXT_DEFAULTS, model='Kosmos-2 text', supported=TEXT_SUPPORTED, strict=False
  )
  vision = resolve_vision_config(config.get('vision_config') or {}, VISION_DEFAULTS, model='Kosmos-2 vision')
  if text['embed_dim'] % text['attention_heads']:
    raise ConfigError(
      f'Kosmos-2 config: embed_dim={text["embed_dim"]} is not divisible by attention_heads={text["attention_heads"]}'
    )
  # transformers ties the LM head when either the outer or the text config asks for it.
  tie = bool(config.get('tie_word_embeddings', True) or text['tie_word_embeddings'])
  return dict(
    text=text, vision=vision, latent_query_num=int(config.get('latent_query_num', 64)), tie_word_embeddings=tie
  )


# ----------------------------------------------------------------------------------------------- vision tower


class Kosmos2VisionModel(nnx.Module):
  """CLIP's vision tower, weight names included, one level down (`vision_model.model.*`)."""

  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    self.model = CLIPVisionTransformer(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)


# ----------------------------------------------------------------------------------------------- text decoder


class KosmosTextAttention(nnx.Module):
  """Multi-head attention; the decoder's self-attention normalises its output before out_proj
  (`inner_attn_ln`, Magneto's sub-LN). With `cache` the new keys/values are written at `index` first."""

  def __init__(self, dim: int, heads: int, *, inner_ln_eps: float | None = None, dtype, attention_impl, rngs):
    col = dict(axes=('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.k_proj = Linear(dim, dim, **col)
    self.v_proj = Linear(dim, dim, **col)
    self.q_proj = Linear(dim, dim, **col)
    self.out_proj = Linear(dim, dim, axes=('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.inner_attn_ln = (
      None if inner_ln_eps is None else LayerNorm(dim, eps=inner_ln_eps, axes=('heads',), dtype=dtype)
    )
    self.heads = heads
    self.attention_impl = attention_impl

  def split(self, x):
    return split_heads(x, self.heads)

  def __call__(self, x, kv=None, *, mask=None, cache=None, index=None):
    kv = x if kv is None else kv
    q, k, v = self.split(self.q_proj(x)), self.split(self.k_proj(kv)), self.split(self.v_proj(kv))
    if cache is not None:
      cache = k, v = write_cache(cache, k, v, index)
    out = dot_product_attention(
      q, k, v, mask=mask, implementation=kernel_for(self.attention_impl, masked=mask is not None)
    )
    out = out.reshape(x.shape[0], x.shape[1], -1)
    if self.inner_attn_ln is not None:
      out = self.inner_attn_ln(out)
    return self.out_proj(out), cache

  def probabilities(self, x, kv=None, mask=None):
    """Softmax attention weights (B, H, Lq, Lk) in float32, for inspection (heatmaps)."""
    kv = x if kv is None else kv
    q, k = self.split(self.q_proj(x)), self.split(self.k_proj(kv))
    s = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(q.shape[-1])
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    return jax.nn.softmax(s, axis=-1)


class Kosmos2TextFFN(nnx.Module):
  def __init__(self, cfg: dict, *, dtype, rngs):
    self.fc1 = Linear(cfg['embed_dim'], cfg['ffn_dim'], axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(cfg['ffn_dim'], cfg['embed_dim'], axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.ffn_layernorm = LayerNorm(cfg['ffn_dim'], eps=cfg['layer_norm_eps'], axes=('mlp',), dtype=dtype)
    self.act = cfg['activation_function']

  def __call__(self, x):
    return self.fc2(self.ffn_layernorm(activation(self.act)(self.fc1(x))))


class Kosmos2TextBlock(nnx.Module):
  def __init__(self, cfg: dict, *, dtype, attention_impl, rngs):
    d, eps = cfg['embed_dim'], cfg['layer_norm_eps']
    self.self_attn = KosmosTextAttention(
      d, cfg['attention_heads'], inner_ln_eps=eps, dtype=dtype, attention_impl=attention_impl, rngs=rngs
    )
    self.self_attn_layer_norm = LayerNorm(d, eps=eps, dtype=dtype)
    self.ffn = Kosmos2TextFFN(cfg, dtype=dtype, rngs=rngs)
    self.final_layer_norm = LayerNorm(d, eps=eps, dtype=dtype)

  def __call__(self, x, mask, cache=None, index=None):
    h, cache = self.self_attn(self.self_attn_layer_norm(x), mask=mask, cache=cache, index=index)
    x = x + h
    return x + self.ffn(self.final_layer_norm(x)), cache


def sinusoidal_positions(position_ids, dim: int, padding_idx: int):
  """M2M100's sinusoidal embedding of `position_ids` (sin half, then cos half), zero at the padding index.
  Computed per position rather than from a table, so any length works."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000) / (half - 1)))
  angles = position_ids.astype(jnp.float32)[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return jnp.where((position_ids == padding_idx)[..., None], 0.0, emb)


class Kosmos2TextTransformer(nnx.Module):
  def __init__(self, cfg: dict, *, dtype, attention_impl, rngs):
    d = cfg['embed_dim']
    self.embed_tokens = Embed(cfg['vocab_size'], d, dtype=dtype, rngs=rngs)
    self.layers = nnx.List(
      [Kosmos2TextBlock(cfg, dtype=dtype, attention_impl=attention_impl, rngs=rngs) for _ in range(cfg['layers'])]
    )
    self.layer_norm = LayerNorm(d, eps=cfg['layer_norm_eps'], dtype=dtype)
    self.embed_scale = math.sqrt(d) if cfg['scale_embedding'] else 1.0
    self.padding_idx = cfg['pad_token_id']
    self.dtype = dtype

  def embed(self, input_ids, position_ids, image_embeds=None, image_mask=None):
    """Token embeddings with the image tokens spliced in where `image_mask` is set (each row holds
    exactly latent_query_num of them, in order), all scaled, plus the sinusoidal positions."""
    x = self.embed_tokens(input_ids)
    if image_embeds is not None:
      slot = jnp.clip(jnp.cumsum(image_mask, 1) - 1, 0, image_embeds.shape[1] - 1)
      spliced = jnp.take_along_axis(image_embeds.astype(x.dtype), slot[..., None], 1)
      x = jnp.where(image_mask[..., None].astype(bool), spliced, x)
    x = x * jnp.asarray(self.embed_scale, x.dtype)  # the image embeddings are scaled too, as in transformers
    return x + sinusoidal_positions(position_ids, x.shape[-1], self.padding_idx).astype(x.dtype)


class Kosmos2TextForCausalLM(nnx.Module):
  def __init__(self, cfg: dict, *, tied: bool, dtype, attention_impl, rngs):
    self.model = Kosmos2TextTransformer(cfg, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.lm_head = (
      None
      if tied
      else Linear(cfg['embed_dim'], cfg['vocab_size'], use_bias=False, axes=('embed', 'vocab'), dtype=dtype, rngs=rngs)
    )

  def logits(self, h):
    head = self.model.embed_tokens.attend if self.lm_head is None else self.lm_head
    return head(h).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------- resampler


class Kosmos2ImageToTextProjection(nnx.Module):
  """Latent queries attend over [projected patch features; the latent queries themselves]."""

  TORCH_PARAMS = {'latent_query': ('latent_query', *_raw)}

  def param_axes(self) -> dict:
    return {'latent_query': (None, 'embed')}

  def __init__(self, vision_dim: int, cfg: dict, num_latents: int, *, dtype, attention_impl, rngs):
    d = cfg['embed_dim']
    self.dense = Linear(vision_dim, d, dtype=dtype, rngs=rngs)
    self.latent_query = nnx.Param(jax.random.normal(rngs.params(), (num_latents, d)))
    self.x_attn = KosmosTextAttention(d, cfg['attention_heads'], dtype=dtype, attention_impl=attention_impl, rngs=rngs)

  def keys_values(self, features):
    x = self.dense(features)
    latents = jnp.broadcast_to(self.latent_query[...].astype(x.dtype), (x.shape[0],) + self.latent_query.shape)
    return latents, jnp.concatenate([x, latents], 1)

  def __call__(self, features):
    latents, kv = self.keys_values(features)
    return self.x_attn(latents, kv)[0]


# ----------------------------------------------------------------------------------------------- full model


def prompt_position_ids(input_ids, padding_idx: int):
  """transformers' positions for a prompt: counted over non-padding tokens, starting at padding_idx + 1;
  padding tokens get padding_idx (a zero embedding)."""
  real = (input_ids != padding_idx).astype(jnp.int32)
  return jnp.cumsum(real, 1) * real + padding_idx


class Kosmos2ForConditionalGeneration(nnx.Module):
  """`model(pixel_values, input_ids, image_embeds_position_mask, attention_mask)` -> logits (B, L, V).

  pixel_values are NHWC, normalised as the processor does. Generation: the model implements
  `jaxdream.vlm.generation.GenerativeModel` (`generation_inputs`, `init_cache`, `prefill`, `decode_step`, and a
  `compile_cache` of its compiled generation functions), on top of `decode`.
  """

  CONFIG_NAME = 'config.json'
  WEIGHTS_NAME = 'model'
  CLASS_NAME = 'Kosmos2ForConditionalGeneration'
  # Non-persistent buffers that older files carry; the sinusoid table is recomputed.
  IGNORED_KEYS = (r'.*\.position_ids', r'.*embed_positions\.weights?')

  @staticmethod
  def resolve_config(config: dict) -> dict:
    return resolve_kosmos2_config(config)

  def __init__(self, config: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    cfg = resolve_kosmos2_config(config)
    self.config = dict(config)
    text, vision = cfg['text'], cfg['vision']
    impl = check_implementation(attention_impl)
    self.text_model = Kosmos2TextForCausalLM(
      text, tied=cfg['tie_word_embeddings'], dtype=dtype, attention_impl=impl, rngs=rngs
    )
    self.vision_model = Kosmos2VisionModel(vision, attention_impl=impl, dtype=dtype, rngs=rngs)
    self.image_to_text_projection = Kosmos2ImageToTextProjection(
      vision['hidden_size'], text, cfg['latent_query_num'], dtype=dtype, attention_impl=impl, rngs=rngs
    )
    self.latent_query_num = cfg['latent_query_num']
    self.image_size = vision['image_size']
    self.num_layers, self.num_heads = text['layers'], text['attention_heads']
    self.head_dim = text['embed_dim'] // text['attention_heads']
    self.vocab_size = text['vocab_size']
    self.pad_token_id, self.bos_token_id, self.eos_token_id = (
      text['pad_token_id'],
      text['bos_token_id'],
      text['eos_token_id'],
    )
    self.dtype = dtype
    self.compile_cache = CompileCache()  # jaxdream.vlm's compiled generation for this model

  def vision_features(self, pixel_values):
    """The whole last hidden state through post_layernorm, then L2-normalised (what the resampler reads)."""
    vm = self.vision_model.model
    x = vm.post_layernorm(vm(pixel_values)).astype(jnp.float32)
    return (x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(self.dtype)

  def image_embeds(self, pixel_values):
    """(B, latent_query_num, D) image tokens for the text decoder."""
    return self.image_to_text_projection(self.vision_features(pixel_values))

  def init_cache(self, batch: int, length: int, dtype=None):
    """Per decoder layer (keys, values), each (batch, length, heads, head_dim)."""
    shape = (batch, length, self.num_heads, self.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype or self.dtype)
    return [(zeros(), zeros()) for _ in range(self.num_layers)]

  # ------------------------------------------------------------------ jaxdream.vlm.generation.GenerativeModel

  def generation_inputs(self, pixel_values, input_ids, attention_mask=None, image_embeds_position_mask=None) -> dict:
    """The arguments as the processor makes them (pixel_values NHWC), checked; arrays in the model's dtypes."""
    if image_embeds_position_mask is None:
      raise ValueError('Kosmos-2 generation needs image_embeds_position_mask (the processor makes it)')
    input_ids = np.asarray(input_ids, np.int32)
    image_mask = np.asarray(image_embeds_position_mask, np.int32)
    counts = image_mask.sum(1)
    if image_mask.shape != input_ids.shape or not np.all(counts == self.latent_query_num):
      raise ValueError(
        f'every row of image_embeds_position_mask (shape {image_mask.shape}, input_ids {input_ids.shape}) must '
        f'mark {self.latent_query_num} image positions; got {counts.tolist()}'
      )
    if len(pixel_values) != len(input_ids):
      raise ValueError(f'{len(pixel_values)} images for {len(input_ids)} prompts')
    return dict(
      pixel_values=jnp.asarray(pixel_values, self.dtype),
      input_ids=input_ids,
      attention_mask=attention_mask,
      image_embeds_position_mask=image_mask,
    )

  def prefill(self, inputs: dict, cache, kv_valid):
    """The prompt, image tokens spliced in, at transformers' padding-offset positions. decode_state: each
    row's first real (non-padding) slot, from which its positions count."""
    input_ids = inputs['input_ids']
    logits, cache = self.decode(
      input_ids,
      prompt_position_ids(input_ids, self.pad_token_id),
      kv_valid,
      cache=cache,
      index=0,
      image_embeds=self.image_embeds(inputs['pixel_values']),
      image_mask=inputs['image_embeds_position_mask'],
      last_only=True,
    )
    return logits[:, 0], cache, jnp.argmax(inputs['attention_mask'], 1)

  def decode_step(self, tokens, index, cache, kv_valid, first_real):
    """Positions continue from the prompt (as transformers counts them for a single prompt), and a padding
    token gets the padding position."""
    pad = self.pad_token_id
    positions = jnp.where(tokens == pad, pad, index + 1 - first_real + pad)
    logits, cache = self.decode(tokens[:, None], positions[:, None], kv_valid, cache=cache, index=index)
    return logits[:, 0], cache

  def decode(
    self, input_ids, position_ids, kv_valid, *, cache=None, index=0, image_embeds=None, image_mask=None, last_only=False
  ):
    """Run the decoder over `input_ids` (B, L) sitting at cache slots index..index+L-1.

    kv_valid: (B, T) which cache slots (or, without a cache, which tokens) may be attended to.
    Returns (logits float32 (B, L or 1, V), new cache).
    """
    tm = self.text_model.model
    x = tm.embed(input_ids, position_ids, image_embeds, image_mask)
    mask = decoder_mask(index + jnp.arange(input_ids.shape[1]), kv_valid)
    new_cache = []
    for i, layer in enumerate(tm.layers):
      x, c = layer(x, mask, None if cache is None else cache[i], index)
      new_cache.append(c)
    if last_only:
      x = x[:, -1:]
    return self.text_model.logits(tm.layer_norm(x)), (None if cache is None else new_cache)

  def attention_maps(self, pixel_values, input_ids, image_embeds_position_mask, attention_mask=None):
    """Attention probabilities, as transformers' output_attentions gives them: 'text', one (B, H, L, L) per
    decoder layer, and 'projection', (B, H, Q, 1 + patches + Q) from the resampler's latent queries to
    [class token, patch features, latents]."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    proj = self.image_to_text_projection
    latents, kv = proj.keys_values(self.vision_features(pixel_values))
    tm = self.text_model.model
    x = tm.embed(
      input_ids,
      prompt_position_ids(input_ids, self.pad_token_id),
      proj.x_attn(latents, kv)[0],
      image_embeds_position_mask,
    )
    mask = decoder_mask(jnp.arange(input_ids.shape[1]), attention_mask)
    text = []
    for layer in tm.layers:
      text.append(layer.self_attn.probabilities(layer.self_attn_layer_norm(x), mask=mask))
      x, _ = layer(x, mask)
    return dict(text=text, projection=proj.x_attn.probabilities(latents, kv))

  def __call__(self, pixel_values, input_ids, image_embeds_position_mask, attention_mask=None):
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    positions = prompt_position_ids(input_ids, self.pad_token_id)
    return self.decode(
      input_ids,
      positions,
      attention_mask,
      image_embeds=self.image_embeds(pixel_values),
      image_mask=image_embeds_position_mask,
    )[0]


def load_kosmos2(
  path: str, *, dtype=jnp.float32, attention_impl: str = 'auto', allow_pickle: bool = False
) -> Kosmos2ForConditionalGeneration:
  """Load a transformers Kosmos-2 folder (config.json + model.safetensors)."""
  return kosmos2_from_state_dict(
    read_config(path),
    read_weights(path, 'model', allow_pickle=allow_pickle),
    dtype=dtype,
    attention_impl=attention_impl,
    source=path,
  )


def kosmos2_from_state_dict(
  config: dict, weights: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', source: str = 'weights'
) -> Kosmos2ForConditionalGeneration:
  """The model for a transformers config and (numpy) state dict. As transformers does, the LM head shares
  the token embeddings when the config ties them, unless the weights hold a head with different values."""
  cfg = resolve_kosmos2_config(config)
  weights = dict(weights)
  head, embed = weights.get('text_model.lm_head.weight'), weights.get('text_model.model.embed_tokens.weight')
  tied = cfg['tie_word_embeddings'] and (head is None or embed is None or np.array_equal(head, embed))
  if tied:
    weights.pop('text_model.lm_head.weight', None)
  config = dict(
    config, tie_word_embeddings=tied, text_config=dict(config.get('text_config') or {}, tie_word_embeddings=tied)
  )
  model = abstract_model(
    lambda rngs: Kosmos2ForConditionalGeneration(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
  )
  load_state_dict(model, weights, source=source, ignore=Kosmos2ForConditionalGeneration.IGNORED_KEYS)
  return model


# ----------------------------------------------------------------------------------------------- int8


def quantize_int8(model: Kosmos2ForConditionalGeneration) -> Kosmos2ForConditionalGeneration:
  """Weight-only int8 inference, in place: every Linear (vision tower, resampler, decoder, LM head) and the
  token embeddings keep int8 weights with float32 per-channel scales; activations stay in the model's
  compute dtype. Parameter memory drops about 4x from float32. Returns the model."""
  return int8(model, [model.text_model.model.embed_tokens])
