"""jaxdream: DreamBooth personalisation of Stable Diffusion and a vision-language model, in pure JAX."""

__version__ = '0.1.0'


def load_pipeline(path: str, **kwargs):
  """Load a whole diffusers-format model folder (unet, text_encoder, vae, tokenizer, scheduler)."""
  from jaxdream.diffusion.pipeline import load_pipeline as _load

  return _load(path, **kwargs)
