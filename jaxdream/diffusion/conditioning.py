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


def encode_prompt(models: dict, ids: dict, clip_skip: int = 0) -> tuple[jax.Array, dict]:
  """Stable Diffusion 1.x/2.x: the text encoder's last hidden state (with `clip_skip`, the output of the layer
  that many before the last, through the final layer norm, as diffusers' clip_skip); no extra UNet inputs."""
  return models['text_encoder'](ids['text_encoder'], clip_skip=clip_skip), {}


def tokenizer_folder(encoder: str) -> str:
  """The tokenizer folder of a text encoder, as diffusers names them (text_encoder_2 -> tokenizer_2)."""
  return 'tokenizer' + encoder.removeprefix('text_encoder')


def no_micro_conditioning(height: int, width: int, *, negative: bool = False, **settings) -> dict:
  """Stable Diffusion 1.x/2.x: no UNet inputs besides the prompt's (and no settings for them)."""
  del height, width, negative
  if settings:
    raise ValueError(f'this model takes no micro-conditioning (SDXL does): got {", ".join(sorted(settings))}')
  return {}
