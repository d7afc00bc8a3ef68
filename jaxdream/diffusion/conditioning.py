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

import jax
import jax.numpy as jnp


def encode_prompt(models: dict, ids: dict, clip_skip: int = 0, weights: dict | None = None) -> tuple[jax.Array, dict]:
  """Stable Diffusion 1.x/2.x: the text encoder's last hidden state (with `clip_skip`, the output of the layer
  that many before the last, through the final layer norm, as diffusers' clip_skip); no extra UNet inputs.
  `weights`: per-token emphasis per text encoder (A1111 prompts: `emphasize`)."""
  hidden = models['text_encoder'](ids['text_encoder'], clip_skip=clip_skip)
  return (hidden if weights is None else emphasize(hidden, weights['text_encoder'])), {}


def emphasize(hidden: jax.Array, weights: jax.Array) -> jax.Array:
  """A1111's 'Original' emphasis: each token's vector (B, L, D) times its weight (B, L), then the whole rescaled
  so that its mean over (L, D) is what it was, per prompt."""
  z = hidden.astype(jnp.float32)
  before = z.mean(axis=(1, 2), keepdims=True)
  z = z * weights[..., None].astype(jnp.float32)
  return (z * (before / z.mean(axis=(1, 2), keepdims=True))).astype(hidden.dtype)


def encode_chunks(encode_prompt, models: dict, ids: dict, counts, weights: dict | None = None, **kwargs):
  """`encode_prompt` over chunked token ids {encoder: (B, K, L)} (io.prompt_syntax): each chunk encoded on its own
  and the contexts concatenated on the token axis (B, K * L, D); a prompt of counts[b] < K chunks continues with its
  last token's vector, as A1111 stacks conditionings of different lengths. The other outputs (SDXL's pooled
  embedding) are the first chunk's, as A1111's."""
  k = next(iter(ids.values())).shape[1]
  contexts, first = [], None
  for i in range(k):
    if weights is not None:
      kwargs['weights'] = {name: w[:, i] for name, w in weights.items()}
    context, extra = encode_prompt(models, {name: v[:, i] for name, v in ids.items()}, **kwargs)
    contexts.append(context)
    first = extra if first is None else first
  context = jnp.concatenate(contexts, axis=1)
  if k > 1:
    length = context.shape[1] // k
    last = jnp.take_along_axis(context, (counts * length - 1)[:, None, None], axis=1)
    context = jnp.where(jnp.arange(context.shape[1])[None, :, None] < (counts * length)[:, None, None], context, last)
  return context, first


def tokenizer_folder(encoder: str) -> str:
  """The tokenizer folder of a text encoder, as diffusers names them (text_encoder_2 -> tokenizer_2)."""
  return 'tokenizer' + encoder.removeprefix('text_encoder')


def no_micro_conditioning(height: int, width: int, *, negative: bool = False, **settings) -> dict:
  """Stable Diffusion 1.x/2.x: no UNet inputs besides the prompt's (and no settings for them)."""
  del height, width, negative
  if settings:
    raise ValueError(f'this model takes no micro-conditioning (SDXL does): got {", ".join(sorted(settings))}')
  return {}
