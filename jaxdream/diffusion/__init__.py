"""Diffusion pipelines: a model folder's named components, prompt encoding, and the samplers."""

from jaxdream.diffusion.adapters import stack_adapters  # noqa: F401
from jaxdream.diffusion.pipeline import Pipeline, load_pipeline, save_pipeline  # noqa: F401
from jaxdream.diffusion.sampling import img2img, inpaint, txt2img  # noqa: F401
