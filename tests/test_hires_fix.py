"""Hires fix (A1111's enable_hr): latents resized as torch resizes them, the two passes equal to diffusers' txt2img
and img2img chained the webui's way, and the webui's size and step arithmetic."""

import itertools

import numpy as np
import pytest
import torch

from jaxdream import load_pipeline
from jaxdream.diffusion import upscale
from jaxdream.diffusion.sampling import _ENCODE, hires_fix, image_noise

pytestmark = pytest.mark.reference

PROMPT = 'a photo of sks dog'


@pytest.fixture(scope='module')
def pipes(small_sd_folder):
  ref = small_sd_folder[0]
  return type(ref)(**ref.components), load_pipeline(small_sd_folder[1])


def _nchw(x):
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def _nhwc(x):
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('name', list(upscale.LATENT_MODES))
def test_latent_modes_resize_as_torch_interpolate_up_down_and_to_odd_sizes(name):
  mode, antialias = upscale.LATENT_MODES[name]
  rng = np.random.default_rng(0)
  sizes = list(itertools.product([(8, 8), (7, 13), (64, 48)], [(16, 16), (11, 9), (31, 17), (96, 72), (5, 3)]))
  sizes += [((264, 155), (290, 266)), ((257, 268), (108, 258))]  # source coordinates past 128: torch's rounding
  for (h, w), (oh, ow) in sizes:
    x = rng.standard_normal((1, h, w, 4)).astype(np.float32)
    ref = _nhwc(torch.nn.functional.interpolate(_nchw(x), size=(oh, ow), mode=mode, antialias=antialias))
    got = np.asarray(upscale.resize_latents(x, oh, ow, mode, antialias))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=f'{(h, w)} -> {(oh, ow)}')


@pytest.mark.parametrize(
  'size, scale, resize, expected',
  [
    ((64, 48), 1.5, (0, 0), (96, 72)),
    ((64, 48), 1.3, (0, 0), (83, 62)),  # int() of each side, as the webui
    ((64, 48), 2.0, (128, 0), (128, 96)),  # the other side from the aspect ratio
    ((64, 48), 2.0, (0, 120), (160, 120)),
  ],
)
def test_hires_size_is_scale_times_the_first_pass_or_the_resize_with_its_aspect(size, scale, resize, expected):
  assert upscale.hires_size(*size, scale, *resize) == (*expected, 0, 0)


def test_a_resize_of_both_sides_covers_it_and_crops_the_latents_to_it():
  for (w, h), (rx, ry) in itertools.product(
    [(64, 48), (48, 64), (64, 64)], [(128, 64), (64, 128), (96, 96), (200, 72)]
  ):
    up_x, up_y, tx, ty = upscale.hires_size(w, h, 2.0, rx, ry)
    assert up_x >= rx and up_y >= ry and (up_x == rx or up_y == ry)  # covers the target, one side exact
    assert abs(up_x / up_y - w / h) < 0.05  # keeps the first pass's aspect
    ow, oh = upscale.output_size(w, h, 2.0, rx, ry)
    assert abs(ow - rx) < 8 and abs(oh - ry) < 8, (w, h, rx, ry, ow, oh)


def _ref_hires(ref_pipe, monkeypatch, noise, second_noise, *, resize, steps, total, strength, encode_noise=None):
  """diffusers' txt2img, then `resize` (latents -> latents, or images -> PIL image), then its img2img from the result
  with the given noise: the webui's hires pass in diffusers' pipelines."""
  import diffusers.models.autoencoders.vae as vae_module
  import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
  from diffusers import StableDiffusionImg2ImgPipeline

  class Fixed:
    def __init__(self, a):
      self.a = a

    def __call__(self, shape, **_):
      assert tuple(self.a.shape) == tuple(shape)
      return self.a

  monkeypatch.setattr(img2img_module, 'randn_tensor', Fixed(_nchw(second_noise)))
  if encode_noise is not None:
    monkeypatch.setattr(vae_module, 'randn_tensor', Fixed(_nchw(encode_noise)))
  with torch.no_grad():
    kind = 'latent' if encode_noise is None else 'np'
    first = ref_pipe(
      PROMPT, latents=_nchw(noise), output_type=kind, num_inference_steps=steps, height=64, width=64
    ).images
    image = resize(first)
    img2img = StableDiffusionImg2ImgPipeline(**ref_pipe.components)
    out = img2img(PROMPT, image=image, strength=strength, num_inference_steps=total, output_type='latent')
  return _nhwc(out.images)


@pytest.mark.parametrize('upscaler', ['Latent', 'Latent (bicubic antialiased)'])
def test_latent_hires_fix_is_diffusers_txt2img_then_torch_interpolate_then_img2img(pipes, monkeypatch, upscaler):
  from conftest import rel_err

  ref_pipe, pipe = pipes
  seeds = [5]
  noise = np.asarray(image_noise(seeds, (16, 16, 4)))
  ours = hires_fix(
    pipe, PROMPT, scale=1.5, upscaler=upscaler, strength=0.6, hires_steps=3, num_inference_steps=4, seed=seeds,
    height=64, width=64, latents=noise, output_type='latent', guidance_scale=7.5,
  )  # fmt: skip
  assert ours.shape == (1, 24, 24, 4)
  mode, aa = upscale.LATENT_MODES[upscaler]
  total = int(3 / 0.6)  # the webui runs hires_steps steps at the end of a schedule of steps / strength
  expected = _ref_hires(
    ref_pipe, monkeypatch, noise, image_noise(seeds, (24, 24, 4)),
    resize=lambda x: torch.nn.functional.interpolate(x, size=(24, 24), mode=mode, antialias=aa),
    steps=4, total=total, strength=3 / total,
  )  # fmt: skip
  assert rel_err(ours, expected) <= 1e-4, rel_err(ours, expected)


def test_image_upscaler_hires_fix_decodes_resizes_with_pil_and_encodes(pipes, monkeypatch):
  from conftest import rel_err
  from PIL import Image

  ref_pipe, pipe = pipes
  seeds = [7]
  noise = np.asarray(image_noise(seeds, (16, 16, 4)))
  ours = hires_fix(
    pipe, PROMPT, scale=1.5, upscaler='Lanczos', strength=0.5, hires_steps=2, num_inference_steps=3, seed=seeds,
    height=64, width=64, latents=noise, output_type='latent',
  )  # fmt: skip

  def resize(images):  # diffusers' float images truncated to uint8 as A1111 does it, then A1111's Lanczos upscaler
    im = Image.fromarray((np.clip(images[0], 0, 1) * 255).astype(np.uint8))
    im = im.resize((96, 96), Image.Resampling.LANCZOS)  # 96 is a multiple of 8: one Lanczos pass
    return im

  expected = _ref_hires(
    ref_pipe, monkeypatch, noise, image_noise(seeds, (24, 24, 4)), resize=resize, total=4, strength=2 / 4,
    encode_noise=image_noise(seeds, (24, 24, 4), _ENCODE), steps=3,
  )  # fmt: skip
  assert rel_err(ours, expected) <= 1e-4, rel_err(ours, expected)


def test_second_pass_runs_hires_steps_and_crops_to_the_resize(pipes):
  _, pipe = pipes
  calls = []
  images = hires_fix(
    pipe, [PROMPT, 'a cat'], resize_x=80, resize_y=64, strength=0.3, hires_steps=2, num_inference_steps=3,
    height=64, width=48, progress=lambda i: calls.append(i), scheduler='ddim',
  )  # fmt: skip
  assert images.shape == (2, 64, 80, 3) and images.dtype == np.uint8
  assert calls == [0, 1, 2, 4, 5]  # 3 steps, then the last 2 of a schedule of int(2 / 0.3) = 6


@pytest.mark.parametrize(
  'kw, match',
  [
    (dict(upscaler='ESRGAN_4x'), 'not one of'),
    (dict(strength=0.0), 'strength'),
    (dict(scale=float('nan')), 'scale'),
    (dict(hires_steps=0), 'hires_steps'),
    (dict(scale=0.05), 'leaves no image'),
    (dict(strength=0.001), 'hires strength 0.001 with 2 hires steps needs a schedule of'),
    (dict(strength=5e-324), 'needs a schedule of'),
  ],
)
def test_bad_hires_settings_are_named_before_sampling(pipes, kw, match):
  with pytest.raises(ValueError, match=match):
    hires_fix(pipes[1], PROMPT, num_inference_steps=2, **kw)
