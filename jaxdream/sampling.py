"""Old import path of the samplers: `jaxdream.sampling.txt2img/img2img/inpaint` keep working."""

from jaxdream.diffusion.sampling import *  # noqa: F401,F403
from jaxdream.diffusion.sampling import img2img, inpaint, txt2img  # noqa: F401
