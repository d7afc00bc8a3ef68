"""How prompts become UNet conditioning: the one place that knows which encoders read which token ids.

A pipeline owns its `encode_prompt(models, ids) -> (context, extra)`: `models` are its components by
name, `ids` the token ids per text encoder (as `Pipeline.tokenize` gives them). The UNet is called as
`unet(x, t, context, **extra)`, so a model family with more conditioning (SDXL's pooled embeddings:
diffusion/sdxl.py) brings its own function and no caller changes.

UNet inputs that do not come from the prompt (SDXL's micro-conditioning `time_ids`: sizes, crop, aesthetic score)
come from the pipeline's `micro_conditioning(height, width, *, negative, **settings) -> {name: (K,) array}`, one
value per image (`negative`: for the negative prompt's half of a guided batch; `settings`: the caller's, e.g. SDXL's
original_size); they join `extra`.
"""

from __future__ import annotations

import jax


def encode_prompt(models: dict, ids: dict) -> tuple[jax.Array, dict]:
  """Stable Diffusion 1.x/2.x: the text encoder's last hidden state; no extra UNet inputs."""
  return models['text_encoder'](ids['text_encoder']), {}


def tokenizer_folder(encoder: str) -> str:
  """The tokenizer folder of a text encoder, as diffusers names them (text_encoder_2 -> tokenizer_2)."""
  return 'tokenizer' + encoder.removeprefix('text_encoder')


def no_micro_conditioning(height: int, width: int, *, negative: bool = False, **settings) -> dict:
  """Stable Diffusion 1.x/2.x: no UNet inputs besides the prompt's (and no settings for them)."""
  del height, width, negative
  if settings:
    raise ValueError(f'this model takes no micro-conditioning (SDXL does): got {", ".join(sorted(settings))}')
  return {}
