"""How prompts become UNet conditioning: the one place that knows which encoders read which token ids.

A pipeline owns its `encode_prompt(models, ids) -> (context, extra)`: `models` are its components by
name, `ids` the token ids per text encoder (as `Pipeline.tokenize` gives them). The UNet is called as
`unet(x, t, context, **extra)`, so a model family with more conditioning (SDXL's pooled embeddings and
time ids) brings its own function and no caller changes.
"""

from __future__ import annotations

import jax


def encode_prompt(models: dict, ids: dict) -> tuple[jax.Array, dict]:
  """Stable Diffusion 1.x/2.x: the text encoder's last hidden state; no extra UNet inputs."""
  return models['text_encoder'](ids['text_encoder']), {}


def tokenizer_folder(encoder: str) -> str:
  """The tokenizer folder of a text encoder, as diffusers names them (text_encoder_2 -> tokenizer_2)."""
  return 'tokenizer' + encoder.removeprefix('text_encoder')
