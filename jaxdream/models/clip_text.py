"""CLIP text encoders (transformers' CLIPTextModel and CLIPTextModelWithProjection): SD1's ViT-L/14 tower, SD2's
OpenCLIP ViT-H, SDXL's two (ViT-L and OpenCLIP bigG with its text projection)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxdream.models.config import resolve_config
from jaxdream.nn.attention import check_implementation, dot_product_attention, kernel_for, split_heads
from jaxdream.nn.layers import Embed, LayerNorm, Linear, activation
from jaxdream.nn.remat import remat_attention, remat_block

DEFAULTS = dict(
  vocab_size=49408,
  hidden_size=512,
  intermediate_size=2048,
  num_hidden_layers=12,
  num_attention_heads=8,
  max_position_embeddings=77,
  hidden_act='quick_gelu',
  layer_norm_eps=1e-5,
  eos_token_id=49407,
  attention_dropout=0.0,
  dropout=0.0,
  projection_dim=512,
)
SUPPORTED = dict(hidden_act=('quick_gelu', 'gelu'), attention_dropout=(0.0,), dropout=(0.0,))


class CLIPAttention(nnx.Module):
  def __init__(self, dim: int, heads: int, *, attention_impl: str, dtype, rngs):
    col = dict(axes=('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.q_proj = Linear(dim, dim, **col)
    self.k_proj = Linear(dim, dim, **col)
    self.v_proj = Linear(dim, dim, **col)
    self.out_proj = Linear(dim, dim, axes=('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.heads, self.attention_impl = heads, attention_impl
    self.remat = 'none'  # set for training (nn.remat)

  def __call__(self, x, mask, queries=None):
    """Self-attention of `x`; with `queries` (B, Lq, D), only those rows' outputs (their queries against
    every key of `x`)."""
    queries = x if queries is None else queries
    impl = kernel_for(self.attention_impl, masked=mask is not None)
    attend = remat_attention(
      self.remat, lambda q, k, v, mask: dot_product_attention(q, k, v, mask=mask, implementation=impl)
    )
    out = attend(
      split_heads(self.q_proj(queries), self.heads),
      split_heads(self.k_proj(x), self.heads),
      split_heads(self.v_proj(x), self.heads),
      mask,
    )
    return self.out_proj(out.reshape(queries.shape))


class CLIPMLP(nnx.Module):
  def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs):
    self.fc1 = Linear(dim, hidden, axes=('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, dim, axes=('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.act = act

  def __call__(self, x):
    return self.fc2(activation(self.act)(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    d, eps = cfg['hidden_size'], cfg['layer_norm_eps']
    self.self_attn = CLIPAttention(d, cfg['num_attention_heads'], attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.layer_norm1 = LayerNorm(d, eps=eps, dtype=dtype)
    self.mlp = CLIPMLP(d, cfg['intermediate_size'], cfg['hidden_act'], dtype=dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(d, eps=eps, dtype=dtype)
    self.remat = 'none'  # set for training (nn.remat)

  def __call__(self, x, mask):
    return remat_block(self, CLIPEncoderLayer._forward, x, mask)

  def _forward(self, x, mask):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))

  def first_token(self, x):
    """`self(x, None)[:, :1]` computed for that token alone: a pooled embedding reads nothing else of the last
    layer, so its other rows' queries, output projections and MLPs would be thrown away."""
    h = self.layer_norm1(x)
    y = x[:, :1] + self.self_attn(h, None, queries=h[:, :1])
    return y + self.mlp(self.layer_norm2(y))


class CLIPTextEmbeddings(nnx.Module):
  def __init__(self, cfg: dict, *, dtype, rngs):
    self.token_embedding = Embed(cfg['vocab_size'], cfg['hidden_size'], dtype=dtype, rngs=rngs)
    self.position_embedding = Embed(
      cfg['max_position_embeddings'], cfg['hidden_size'], axes=('position', 'embed'), dtype=dtype, rngs=rngs
    )

  def __call__(self, input_ids):
    return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[1]))[None]


class CLIPEncoder(nnx.Module):
  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    self.layers = nnx.List(
      [
        CLIPEncoderLayer(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
        for _ in range(cfg['num_hidden_layers'])
      ]
    )


class CLIPTextTransformer(nnx.Module):
  def __init__(self, cfg: dict, *, attention_impl: str, dtype, rngs):
    self.embeddings = CLIPTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.encoder = CLIPEncoder(cfg, attention_impl=attention_impl, dtype=dtype, rngs=rngs)
    self.final_layer_norm = LayerNorm(cfg['hidden_size'], eps=cfg['layer_norm_eps'], dtype=dtype)

  def forward(self, input_ids, attention_mask, eos_token_id: int, pool_ids=None) -> dict:
    """{'last_hidden_state', 'pooler_output' (at the EOS token), 'hidden_states' (embeddings and every layer)}.
    `pool_ids`: the ids that place the EOS token, if not `input_ids` (A1111 pools with embeddings' ids as 0)."""
    b, n = input_ids.shape
    mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
    if attention_mask is not None:
      mask = mask & attention_mask.astype(bool)[:, None, None, :]
    x = self.embeddings(input_ids)
    hidden = [x]
    for layer in self.encoder.layers:
      x = layer(x, mask)
      hidden.append(x)
    last = self.final_layer_norm(x)
    # Old CLIP configs have eos_token_id=2 while the real EOS is the largest id: transformers then
    # pools at argmax(input_ids), otherwise at the first EOS.
    where = input_ids if pool_ids is None else pool_ids
    eos = where.argmax(-1) if eos_token_id == 2 else (where == eos_token_id).astype(jnp.int32).argmax(-1)
    pooled = last[jnp.arange(b), eos]
    return dict(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


class CLIPTextModel(nnx.Module):
  """`text_encoder(input_ids)` -> last hidden state (B, L, D).

  clip_skip=k uses the output of the k-th layer from the end (passed through the final layer norm),
  as diffusers' pipelines and A1111 do; forward() also gives the pooled output and every hidden state.
  """

  CONFIG_NAME = 'config.json'
  WEIGHTS_NAME = 'model'
  CLASS_NAME = 'CLIPTextModel'
  IGNORED_KEYS = (r'text_model\.embeddings\.position_ids', r'text_projection\.weight')
  # transformers 5 saves CLIPTextModel without the `text_model.` prefix; every older file has it.
  LEGACY_RENAMES = ((r'^(embeddings|encoder|final_layer_norm)\.', r'text_model.\1.'),)

  @staticmethod
  def resolve_config(config: dict) -> dict:
    return resolve_config(config, DEFAULTS, model='CLIPTextModel', supported=SUPPORTED, strict=False)

  def __init__(self, config: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    cfg = self.resolve_config(config)
    self.config = dict(config)
    self.eos_token_id = cfg['eos_token_id']
    self.text_model = CLIPTextTransformer(
      cfg, attention_impl=check_implementation(attention_impl), dtype=dtype, rngs=rngs
    )

  def forward(self, input_ids, attention_mask=None, pool_ids=None):
    return self.text_model.forward(input_ids, attention_mask, self.eos_token_id, pool_ids)

  def __call__(self, input_ids, attention_mask=None, clip_skip: int = 0):
    out = self.forward(input_ids, attention_mask)
    if not clip_skip:
      return out['last_hidden_state']
    return self.text_model.final_layer_norm(out['hidden_states'][-(clip_skip + 1)])


class CLIPTextModelWithProjection(CLIPTextModel):
  """CLIPTextModel with its `text_projection` (no bias): forward() also gives `text_embeds`, the projected pooled
  output (SDXL's pooled prompt embedding, from its second text encoder)."""

  CLASS_NAME = 'CLIPTextModelWithProjection'
  IGNORED_KEYS = (r'text_model\.embeddings\.position_ids',)

  @staticmethod
  def resolve_config(config: dict) -> dict:
    return resolve_config(config, DEFAULTS, model='CLIPTextModelWithProjection', supported=SUPPORTED, strict=False)

  def __init__(self, config: dict, *, dtype=jnp.float32, attention_impl: str = 'auto', rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    cfg = self.resolve_config(config)
    self.text_projection = Linear(cfg['hidden_size'], cfg['projection_dim'], use_bias=False, dtype=dtype, rngs=rngs)

  def forward(self, input_ids, attention_mask=None, pool_ids=None):
    out = super().forward(input_ids, attention_mask, pool_ids)
    return dict(out, text_embeds=self.text_projection(out['pooler_output']))
