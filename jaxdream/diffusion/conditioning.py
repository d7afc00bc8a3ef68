"""How prompts become UNet conditioning: the one place that knows which encoders read which token ids.

A pipeline owns its `encode_prompt(models, ids[, clip_skip]) -> (context, extra)`: `models` are its components
by name, `ids` the token ids per text encoder (as `Pipeline.tokenize` gives them), `clip_skip` (diffusers'; A1111's
CLIP_stop_at_last_layers - 1) how many of the last encoder layers to skip. The UNet is called as
`unet(x, t, context, **extra)`, so a model family with more conditioning (SDXL's pooled embeddings:
diffusion/sdxl.py) brings its own function and no caller changes.

UNet inputs that do not come from the prompt (SDXL's micro-conditioning `time_ids`: sizes, crop, aesthetic score)
come from the pipeline's `micro_conditioning(height, width, *, negative, **settings) -> {name: (K,) array}`, one
value per image (`negative`: for the negative prompt's half of a guided batch; `settings`: the caller's, e.g. SDXL's
original_size); they join `extra`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def encode_prompt(models: dict, ids: dict, clip_skip: int = 0, emphasis=None) -> tuple[jax.Array, dict]:
  """Stable Diffusion 1.x/2.x: the text encoder's last hidden state (with `clip_skip`, the output of the layer
  that many before the last, through the final layer norm, as diffusers' clip_skip); no extra UNet inputs.
  `emphasis`: A1111 prompts' per-token weights (an `Emphasis`), applied to the encoder's states."""
  hidden = models['text_encoder'](ids['text_encoder'], clip_skip=clip_skip)
  return (hidden if emphasis is None else emphasis(hidden, 'text_encoder')), {}


def tokenizer_folder(encoder: str) -> str:
  """The tokenizer folder of a text encoder, as diffusers names them (text_encoder_2 -> tokenizer_2)."""
  return 'tokenizer' + encoder.removeprefix('text_encoder')


def no_micro_conditioning(height: int, width: int, *, negative: bool = False, **settings) -> dict:
  """Stable Diffusion 1.x/2.x: no UNet inputs besides the prompt's (and no settings for them)."""
  del height, width, negative
  if settings:
    raise ValueError(f'this model takes no micro-conditioning (SDXL does): got {", ".join(sorted(settings))}')
  return {}


@dataclasses.dataclass(frozen=True)
class Emphasis:
  """A1111 prompts' per-token weights {text encoder: (R, L)} for R rows of token ids, and which rows share their
  rescaling: the webui encodes all texts of one prompt's schedule (prompt editing) in one batch and keeps the mean
  of that batch, so rows of equal `groups` pool their sums; rows with `counted` False (padding) are left out."""

  weights: dict
  groups: jax.Array | None = None  # (R,) int
  counted: jax.Array | None = None  # (R,) bool

  def __call__(self, hidden: jax.Array, encoder: str) -> jax.Array:
    return emphasize(hidden, self.weights[encoder], self.groups, self.counted)

  def chunk(self, i: int) -> Emphasis:
    """The weights of chunk i of chunked ids (R, K, L)."""
    return dataclasses.replace(self, weights={name: w[:, i] for name, w in self.weights.items()})


def emphasize(hidden: jax.Array, weights: jax.Array, groups=None, counted=None) -> jax.Array:
  """A1111's 'Original' emphasis: each token's vector (R, L, D) times its weight (R, L), then rescaled so that its
  mean over (L, D) is what it was: per row, or over the counted rows of each group."""
  z = hidden.astype(jnp.float32)
  w = weights[..., None].astype(jnp.float32)
  rows = z.shape[0]
  groups = jnp.arange(rows) if groups is None else groups
  keep = jnp.ones((rows,), jnp.float32) if counted is None else counted.astype(jnp.float32)
  # The sum after weighting as the sum before plus what the weights add: with every weight 1 the two are equal
  # exactly and the ratio is 1, however close to zero the mean is (an encoder's final layer norm can put it at
  # 1e-8, where two separately rounded sums would give any ratio, even NaN).
  before = jax.ops.segment_sum(z.sum(axis=(1, 2)) * keep, groups, rows)
  added = jax.ops.segment_sum((z * (w - 1.0)).sum(axis=(1, 2)) * keep, groups, rows)
  after = before + added
  ratio = jnp.where((added == 0) | (after == 0), 1.0, before / jnp.where(after == 0, 1.0, after))[groups]
  return (z * w * ratio[:, None, None]).astype(hidden.dtype)


def encode_chunks(encode_prompt, models: dict, ids: dict, counts, emphasis: Emphasis | None = None, **kwargs):
  """`encode_prompt` over chunked token ids {encoder: (B, K, L)} (io.prompt_syntax): each chunk encoded on its own
  and the contexts concatenated on the token axis (B, K * L, D); a prompt of counts[b] < K chunks continues with its
  last token's vector, as A1111 stacks conditionings of different lengths. The other outputs (SDXL's pooled
  embedding) are the first chunk's, as A1111's."""
  k = next(iter(ids.values())).shape[1]
  contexts, first = [], None
  for i in range(k):
    if emphasis is not None:
      kwargs['emphasis'] = emphasis.chunk(i)
    context, extra = encode_prompt(models, {name: v[:, i] for name, v in ids.items()}, **kwargs)
    contexts.append(context)
    first = extra if first is None else first
  context = jnp.concatenate(contexts, axis=1)
  if k > 1:
    length = context.shape[1] // k
    last = jnp.take_along_axis(context, (counts * length - 1)[:, None, None], axis=1)
    context = jnp.where(jnp.arange(context.shape[1])[None, :, None] < (counts * length)[:, None, None], context, last)
  return context, first
