"""The sampler gives diffusers' images from the same noise, compiles once, and keeps images independent."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

from jaxdream import load_pipeline
from jaxdream.diffusion.sampling import _ENCODE, _MASKED_ENCODE, image_noise, img2img, inpaint, txt2img

pytestmark = pytest.mark.reference

PROMPTS = ['a photo of sks dog', 'a red fox in the snow']
NEGATIVES = ['blurry', '']
STEPS = 10
DIFFUSERS_CLASS = {
  'ddim': 'DDIMScheduler',
  'euler': 'EulerDiscreteScheduler',
  'dpmpp_2m': 'DPMSolverMultistepScheduler',
  'pndm': 'PNDMScheduler',
  'heun': 'HeunDiscreteScheduler',
  'unipc': 'UniPCMultistepScheduler',
}


@pytest.fixture(scope='module')
def pipes(small_sd_folder):
  # A pipeline object of this module's own (sharing the session's modules): the tests replace its scheduler.
  ref = small_sd_folder[0]
  return type(ref)(**ref.components), load_pipeline(small_sd_folder[1])


def _with_scheduler(ref_pipe, pipe, name, prediction_type):
  import diffusers

  cls = getattr(diffusers, DIFFUSERS_CLASS[name])
  kw = dict(prediction_type=prediction_type)
  if name == 'dpmpp_2m':
    kw.update(algorithm_type='dpmsolver++', solver_order=2)
  # From the folder's scheduler_config.json, as a user loading the folder gets it (an in-memory
  # diffusers config also remembers which keys were defaults, which the file does not).
  ref_pipe.scheduler = cls.from_config(dict(pipe.scheduler_config), **kw)
  ours = dataclasses.replace(pipe, scheduler_config=dict(pipe.scheduler_config, prediction_type=prediction_type))
  return ours


def _nchw(x):
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def _ref_uint8(images):
  return np.round(np.clip(images, 0, 1) * 255).astype(np.int32)


def _max_diff(a, b):
  return int(np.abs(a.astype(np.int32) - b).max())


# Final latents, before decoding: the decoder squashes differences unevenly (2/255 of the images is strict
# for DDIM and loose for DPM++ 2M), the latents do not. 1e-4 still tells guidance 7.4 from 7.5 for every
# scheduler, which each test checks.
LATENT_RTOL = 1e-4


def _assert_same_latents(ours, ref_pipe, latents, **kw):
  """`ours` (NHWC latents) are diffusers' final latents from the same initial noise, and diffusers'
  latents for guidance 7.4 instead of 7.5 are not."""
  from conftest import nhwc, rel_err

  guidance = kw.pop('guidance_scale', 7.5)
  ref = {}
  for g in (guidance, guidance - 0.1):
    with torch.no_grad():
      ref[g] = nhwc(ref_pipe(guidance_scale=g, latents=_nchw(latents), output_type='latent', **kw).images)
  assert ours.shape == ref[guidance].shape and ours.dtype == np.float32
  assert rel_err(ours, ref[guidance]) <= LATENT_RTOL, rel_err(ours, ref[guidance])
  assert rel_err(ours, ref[guidance - 0.1]) > LATENT_RTOL, 'the tolerance cannot tell guidance 7.4 from 7.5'


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
@pytest.mark.parametrize('name', ['ddim', 'euler', 'dpmpp_2m'])
def test_txt2img_matches_diffusers_latents_from_the_same_noise(pipes, name, prediction_type):
  ref_pipe, pipe = pipes
  pipe = _with_scheduler(ref_pipe, pipe, name, prediction_type)
  latents = np.asarray(image_noise([11, 12], (16, 16, 4)))
  ours = txt2img(
    pipe,
    PROMPTS,
    negative_prompts=NEGATIVES,
    num_inference_steps=STEPS,
    guidance_scale=7.5,
    scheduler=name,
    latents=latents,
    output_type='latent',
  )
  _assert_same_latents(
    ours, ref_pipe, latents, prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=STEPS, guidance_scale=7.5
  )


def test_denoised_previews_are_the_prompts_clean_latents_of_each_diffusers_step(pipes):
  """progress_latents='denoised' (A1111's live preview, and what an interrupted server run decodes): at each step
  the clean latents the prompt's half of the UNet output predicts, before guidance (here Euler: sample - sigma *
  eps_cond), from diffusers' own trajectory with the same noise."""
  ref_pipe, pipe = pipes
  pipe = _with_scheduler(ref_pipe, pipe, 'euler', 'epsilon')
  latents = np.asarray(image_noise([11, 12], (16, 16, 4)))
  kw = dict(negative_prompts=NEGATIVES, num_inference_steps=4, guidance_scale=7.5, scheduler='euler', latents=latents)
  shown = {}
  txt2img(pipe, PROMPTS, progress=lambda i, x: shown.setdefault(i, x), progress_latents='denoised', **kw)
  outputs, samples = [], []
  hook = ref_pipe.unet.register_forward_hook(lambda module, args, out: outputs.append(out[0].detach().clone()))
  step = ref_pipe.scheduler.step
  ref_pipe.scheduler.step = lambda out, t, sample, **k: samples.append(sample.clone()) or step(out, t, sample, **k)
  try:
    with torch.no_grad():
      ref_pipe(
        PROMPTS,
        negative_prompt=NEGATIVES,
        num_inference_steps=4,
        guidance_scale=7.5,
        latents=_nchw(latents),
        output_type='latent',
      )
  finally:
    hook.remove()
    del ref_pipe.scheduler.step
  from conftest import nhwc, rel_err

  assert sorted(shown) == [0, 1, 2, 3]
  for i in range(4):
    cond = outputs[i].chunk(2)[1]  # diffusers batches [negative, prompt]
    expected = nhwc(samples[i] - ref_pipe.scheduler.sigmas[i] * cond)
    assert rel_err(shown[i], expected) <= LATENT_RTOL, (i, rel_err(shown[i], expected))
    guided = nhwc(
      samples[i] - ref_pipe.scheduler.sigmas[i] * (outputs[i].chunk(2)[0] + 7.5 * (cond - outputs[i].chunk(2)[0]))
    )
    assert rel_err(shown[i], guided) > 10 * LATENT_RTOL, 'the preview is the guided estimate'
  with pytest.raises(ValueError, match='progress_latents'):
    txt2img(pipe, PROMPTS, progress=print, progress_latents='noisy', **kw)


def test_clip_skip_encodes_the_prompt_as_diffusers_clip_skip(pipes):
  ref_pipe, pipe = pipes
  pipe = _with_scheduler(ref_pipe, pipe, 'ddim', 'epsilon')
  latents = np.asarray(image_noise([5], (16, 16, 4)))
  kw = dict(num_inference_steps=STEPS, guidance_scale=7.5)
  ours = txt2img(pipe, PROMPTS[:1], scheduler='ddim', latents=latents, output_type='latent', clip_skip=1, **kw)
  # diffusers' clip_skip reads text_encoder.text_model, which transformers 5's CLIPTextModel no longer has: its
  # computation (the hidden state one layer before the last, through the final layer norm), by hand.
  te, tok = ref_pipe.text_encoder, ref_pipe.tokenizer

  def embeds(text, skip=True):
    ids = tok([text], padding='max_length', max_length=tok.model_max_length, return_tensors='pt').input_ids
    with torch.no_grad():
      out = te(ids, output_hidden_states=True)
      return te.final_layer_norm(out.hidden_states[-2]) if skip else out.last_hidden_state

  # diffusers skips layers for the prompt only: the negative (here empty) prompt is encoded in full.
  _assert_same_latents(
    ours, ref_pipe, latents, prompt_embeds=embeds(PROMPTS[0]), negative_prompt_embeds=embeds('', False), **kw
  )
  plain = txt2img(pipe, PROMPTS[:1], scheduler='ddim', latents=latents, output_type='latent', **kw)
  assert np.abs(ours - plain).max() > 1e-3  # it changes the prompt's encoding
  # A1111 prompts (the server's CLIP_stop_at_last_layers) skip the layers for the negative prompt too, as A1111.
  a1111 = txt2img(
    pipe, PROMPTS[:1], scheduler='ddim', latents=latents, output_type='latent', clip_skip=1, prompt_syntax='a1111', **kw
  )
  _assert_same_latents(
    a1111, ref_pipe, latents, prompt_embeds=embeds(PROMPTS[0]), negative_prompt_embeds=embeds(''), **kw
  )
  with pytest.raises(ValueError, match='clip_skip'):
    txt2img(pipe, PROMPTS[:1], clip_skip=99, **kw)


@pytest.mark.parametrize('name', ['heun', 'unipc'])  # two calls a step interleaved; a corrector with each call
def test_heun_and_unipc_match_diffusers_latents_from_the_same_noise(pipes, name):
  ref_pipe, pipe = pipes
  pipe = _with_scheduler(ref_pipe, pipe, name, 'epsilon')
  latents = np.asarray(image_noise([11, 12], (16, 16, 4)))
  ours = txt2img(pipe, PROMPTS, negative_prompts=NEGATIVES, num_inference_steps=4, scheduler=name, latents=latents,
                 output_type='latent')  # fmt: skip
  _assert_same_latents(ours, ref_pipe, latents, prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4)


def test_guidance_rescale_matches_diffusers_and_zero_is_the_plain_loop(pipes):
  from conftest import rel_err

  ref_pipe, pipe = pipes
  pipe = _with_scheduler(ref_pipe, pipe, 'euler', 'v_prediction')
  latents = np.asarray(image_noise([11, 12], (16, 16, 4)))
  kw = dict(negative_prompts=NEGATIVES, num_inference_steps=4, scheduler='euler', latents=latents, output_type='latent')
  ours = txt2img(pipe, PROMPTS, guidance_rescale=0.7, **kw)
  _assert_same_latents(
    ours, ref_pipe, latents, prompt=PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_rescale=0.7
  )
  plain = txt2img(pipe, PROMPTS, **kw)
  assert rel_err(ours, plain) > LATENT_RTOL  # it does something
  # Per prompt: 0 leaves that image as the plain loop makes it.
  mixed = txt2img(pipe, PROMPTS, guidance_rescale=[0.7, 0.0], **kw)
  assert rel_err(mixed[:1], ours[:1]) < 1e-6 and rel_err(mixed[1:], plain[1:]) < 1e-6
  with pytest.raises(ValueError, match='guidance_rescale must be numbers >= 0'):
    txt2img(pipe, PROMPTS, guidance_rescale=float('nan'), **kw)


def _a1111_slerp(val, low, high):
  """A1111's slerp (modules/rng.py) on its (C, H, W) noise, as written there."""
  low_norm = low / torch.norm(low, dim=1, keepdim=True)
  high_norm = high / torch.norm(high, dim=1, keepdim=True)
  dot = (low_norm * high_norm).sum(1)
  if dot.mean() > 0.9995:
    return low * val + high * (1 - val)
  omega = torch.acos(dot)
  so = torch.sin(omega)
  return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def _a1111_resized(noise, full, shape):
  """A1111's ImageRNG.first: `noise` of another size pasted into the middle of `full` ((C, H, W) each)."""
  x = full.clone()
  dx, dy = (shape[2] - noise.shape[2]) // 2, (shape[1] - noise.shape[1]) // 2
  w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
  h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
  tx, ty, dx, dy = (0 if dx < 0 else dx), (0 if dy < 0 else dy), max(-dx, 0), max(-dy, 0)
  x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
  return x


@pytest.mark.parametrize('resize_from', [None, (6, 9), (14, 4)])
@pytest.mark.parametrize('strength', [0.0, 0.3, 1.0])
def test_variation_noise_is_a1111s_slerp_toward_the_subseed_and_its_seed_resize(strength, resize_from):
  from jaxdream.diffusion.sampling import variation_noise

  shape = (10, 8, 4)
  ours = np.asarray(variation_noise([7, 8], [30, 31], strength, shape, resize_from))
  chw = lambda a: torch.from_numpy(np.asarray(a)).permute(2, 0, 1)
  small = shape if resize_from is None else (*resize_from, 4)
  for b, (seed, subseed) in enumerate([(7, 30), (8, 31)]):
    noise, sub = chw(image_noise([seed], small)[0]), chw(image_noise([subseed], small)[0])
    expected = _a1111_slerp(strength, noise, sub) if strength else noise
    if resize_from is not None:
      expected = _a1111_resized(expected, chw(image_noise([seed], shape)[0]), (4, *shape[:2]))
    np.testing.assert_allclose(ours[b], expected.permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-6)
  one_row = np.asarray(variation_noise([7], [8], 0.3, shape, (1, 8)))  # A1111's 0/0 there: mixed linearly here
  assert np.isfinite(one_row).all()
  same = np.asarray(variation_noise([7], [7], 0.5, shape))  # a subseed equal to the seed: nearly parallel columns
  np.testing.assert_allclose(
    same, np.asarray(image_noise([7], shape)) * 0.5 + np.asarray(image_noise([7], shape)) * 0.5
  )


def test_model_folders_own_scheduler_is_the_default(pipes):
  ref_pipe, pipe = pipes
  pipe = _with_scheduler(ref_pipe, pipe, 'pndm', 'epsilon')
  latents = np.asarray(image_noise([3], (16, 16, 4)))
  ours = txt2img(pipe, PROMPTS[:1], num_inference_steps=STEPS, latents=latents, output_type='latent')
  _assert_same_latents(ours, ref_pipe, latents, prompt=PROMPTS[:1], num_inference_steps=STEPS)


def test_latent_output_is_what_the_images_decode_from(pipes):
  from conftest import jit_call

  _, pipe = pipes
  kw = dict(num_inference_steps=2, scheduler='ddim', seed=[4])
  latents = txt2img(pipe, PROMPTS[:1], output_type='latent', **kw)
  decoded = np.asarray(jit_call(pipe.vae, 'decode')(latents / pipe.vae.scaling_factor + pipe.vae.shift_factor))
  expected = np.round(np.clip(decoded / 2 + 0.5, 0, 1) * 255).astype(np.int32)
  assert _max_diff(txt2img(pipe, PROMPTS[:1], **kw), expected) <= 1
  with pytest.raises(ValueError, match="output_type must be 'uint8' or 'latent'"):
    txt2img(pipe, PROMPTS[:1], output_type='pil', **kw)


def test_new_prompts_seeds_and_guidance_do_not_recompile(pipes):
  _, pipe = pipes
  pipe = dataclasses.replace(pipe)  # a fresh compile cache
  a = txt2img(pipe, PROMPTS, num_inference_steps=3, guidance_scale=7.5, scheduler='ddim', seed=0)
  b = txt2img(
    pipe,
    ['a cat', 'a house'],
    negative_prompts=['ugly', 'dark'],
    num_inference_steps=3,
    guidance_scale=3.0,
    scheduler='ddim',
    seed=[42, 7],
  )
  (fn,) = pipe.compiled.values()
  assert fn._cache_size() == 1
  assert not np.array_equal(a, b)


def test_an_image_depends_only_on_its_own_seed_and_prompt(pipes):
  _, pipe = pipes
  batch = txt2img(pipe, PROMPTS, num_inference_steps=4, scheduler='euler_a', seed=[5, 9])
  alone = txt2img(pipe, PROMPTS[1:], num_inference_steps=4, scheduler='euler_a', seed=[9])
  assert _max_diff(alone[0], batch[1].astype(np.int32)) <= 1
  other = txt2img(pipe, PROMPTS[1:], num_inference_steps=4, scheduler='euler_a', seed=[10])
  assert _max_diff(other[0], batch[1].astype(np.int32)) > 1


def test_a_guidance_at_most_one_is_the_prompt_alone_in_any_batch_and_ddim_eta_is_part_of_the_loop(pipes):
  """diffusers guides only with a scale > 1: an image at <= 1 is its prompt's prediction alone, also in a batch
  guided for the others; a non-finite scale is an error. A pipeline that compiled DDIM at one eta samples another
  eta with that eta's noise (the compile cache told them apart only by config)."""
  _, pipe = pipes
  latents = np.asarray(image_noise([3, 4], (16, 16, 4)))
  kw = dict(num_inference_steps=3, scheduler='ddim', output_type='latent', negative_prompts='blurry')
  alone = txt2img(pipe, PROMPTS[:1], guidance_scale=0.0, latents=latents[:1], **kw)
  mixed = txt2img(pipe, PROMPTS, guidance_scale=[0.0, 7.5], latents=latents, **kw)  # one negative for both
  np.testing.assert_allclose(mixed[0], alone[0], rtol=1e-5, atol=1e-5)
  for bad in (float('nan'), [float('inf'), 7.5]):
    with pytest.raises(ValueError, match='guidance scales must be finite'):
      txt2img(pipe, PROMPTS, guidance_scale=bad, **kw)
  fresh = dataclasses.replace(pipe)  # its own compile cache
  eta = {e: txt2img(fresh, PROMPTS[:1], eta=e, latents=latents[:1], **kw) for e in (0.0, 1.0)}
  assert np.abs(eta[0.0] - eta[1.0]).max() > 1e-2
  np.testing.assert_array_equal(
    eta[1.0], txt2img(dataclasses.replace(pipe), PROMPTS[:1], eta=1.0, latents=latents[:1], **kw)
  )


def test_num_images_per_prompt_repeats_prompts_with_their_own_seeds(pipes):
  _, pipe = pipes
  images = txt2img(pipe, PROMPTS[0], num_images_per_prompt=2, num_inference_steps=2, scheduler='ddim')
  assert images.shape[0] == 2 and not np.array_equal(images[0], images[1])


def test_size_not_a_multiple_of_the_vae_factor_is_an_error(pipes):
  with pytest.raises(ValueError, match='multiples of 4'):
    txt2img(pipes[1], PROMPTS, height=66, width=64, num_inference_steps=2)


@pytest.mark.parametrize('seed', [-1, 2**32 - 1, [0, 2**32]])  # 2**32 - 1 with two prompts: the second is 2**32
def test_seeds_outside_uint32_are_an_error_naming_the_range(pipes, seed):
  with pytest.raises(ValueError, match=r'seeds must be in \[0, 2\*\*32\)'):
    txt2img(pipes[1], PROMPTS, seed=seed, num_inference_steps=2)


def test_unknown_scheduler_lists_the_valid_names(pipes):
  with pytest.raises(ValueError, match='dpmpp_2m_karras'):
    txt2img(pipes[1], PROMPTS, scheduler='restart', num_inference_steps=2)


class _FixedNoise:
  """Stand-in for diffusers' randn_tensor that hands out given tensors in order."""

  def __init__(self, *arrays):
    self.queue = [_nchw(a) for a in arrays]

  def __call__(self, shape, **kwargs):
    out = self.queue.pop(0)
    assert tuple(out.shape) == tuple(shape), (out.shape, shape)
    return out


def _init_image(seed=0):
  rng = np.random.default_rng(seed)
  base = np.linspace(0, 255, 64)[None, :, None] * np.ones((64, 64, 3))
  return np.clip(base + rng.normal(0, 30, (64, 64, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize('name', ['ddim', 'euler', 'heun', 'unipc'])  # heun: twice the index; unipc: a cold start
def test_img2img_matches_diffusers_with_the_same_noise(pipes, monkeypatch, name):
  import diffusers.models.autoencoders.vae as vae_module
  import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
  from diffusers import StableDiffusionImg2ImgPipeline
  from PIL import Image

  ref_pipe, pipe = pipes
  pipe = _with_scheduler(ref_pipe, pipe, name, 'epsilon')
  image = _init_image()
  seeds = [21]
  noise = np.asarray(image_noise(seeds, (16, 16, 4)))
  monkeypatch.setattr(vae_module, 'randn_tensor', _FixedNoise(image_noise(seeds, (16, 16, 4), _ENCODE)))
  monkeypatch.setattr(img2img_module, 'randn_tensor', _FixedNoise(noise))
  ref = StableDiffusionImg2ImgPipeline(**ref_pipe.components)
  with torch.no_grad():
    expected = ref(
      PROMPTS[0],
      image=Image.fromarray(image),
      strength=0.6,
      num_inference_steps=STEPS,
      guidance_scale=7.5,
      output_type='np',
    ).images
  ours = img2img(
    pipe,
    PROMPTS[0],
    image,
    strength=0.6,
    num_inference_steps=STEPS,
    guidance_scale=7.5,
    scheduler=name,
    seed=seeds,
    latents=noise,
  )
  assert _max_diff(ours, _ref_uint8(expected)) <= 2


def _mask():
  m = np.zeros((64, 64), np.uint8)
  m[16:48, 20:52] = 255
  return m


def test_init_images_and_masks_in_every_array_form_read_as_their_uint8_and_pil_forms(pipes):
  """Float images in [0, 1] (diffusers' numpy convention) as their uint8 form; an (H, W, 3) or (H, W, 1) mask array
  as one mask; a mask array of another size resized as a PIL mask is; wrong counts and ranges are named."""
  from PIL import Image

  _, pipe = pipes
  image, mask = _init_image(), _mask()
  kw = dict(num_inference_steps=2, scheduler='ddim', output_type='latent', seed=[4])
  as_uint8 = img2img(pipe, PROMPTS[0], image, strength=0.6, **kw)
  as_float = img2img(pipe, PROMPTS[0], image.astype(np.float32) / 255, strength=0.6, **kw)
  np.testing.assert_allclose(as_float, as_uint8, rtol=1e-5, atol=1e-5)
  base = inpaint(pipe, PROMPTS[0], image, mask, **kw)
  small = mask[::2, ::2]
  for form in (np.dstack([mask] * 3), mask[..., None], small, Image.fromarray(small)):
    np.testing.assert_array_equal(inpaint(pipe, PROMPTS[0], image, form, **kw), base)
  with pytest.raises(ValueError, match='float init images must be in'):
    img2img(pipe, PROMPTS[0], image.astype(np.float32), **kw)
  with pytest.raises(ValueError, match='2 masks for 1 images'):
    inpaint(pipe, PROMPTS[0], image, [mask, mask], **kw)


@pytest.mark.parametrize('strength', [1.0, 0.7])
def test_inpainting_a_standard_model_matches_diffusers_latent_blending(pipes, monkeypatch, strength):
  import diffusers.models.autoencoders.vae as vae_module
  import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
  from diffusers import StableDiffusionInpaintPipeline
  from PIL import Image

  ref_pipe, pipe = pipes
  pipe = _with_scheduler(ref_pipe, pipe, 'ddim', 'epsilon')
  seeds = [31]
  noise = np.asarray(image_noise(seeds, (16, 16, 4)))
  monkeypatch.setattr(
    vae_module,
    'randn_tensor',
    _FixedNoise(image_noise(seeds, (16, 16, 4), _ENCODE), image_noise(seeds, (16, 16, 4), _MASKED_ENCODE)),
  )
  monkeypatch.setattr(inpaint_module, 'randn_tensor', _FixedNoise(noise))
  ref = StableDiffusionInpaintPipeline(**ref_pipe.components)
  with torch.no_grad():
    expected = ref(
      PROMPTS[0],
      image=Image.fromarray(_init_image(1)),
      mask_image=Image.fromarray(_mask()),
      strength=strength,
      num_inference_steps=STEPS,
      guidance_scale=7.5,
      output_type='np',
      height=64,
      width=64,
    ).images
  ours = inpaint(
    pipe,
    PROMPTS[0],
    _init_image(1),
    _mask(),
    strength=strength,
    num_inference_steps=STEPS,
    guidance_scale=7.5,
    scheduler='ddim',
    seed=seeds,
    latents=noise,
  )
  assert _max_diff(ours, _ref_uint8(expected)) <= 2


def test_inpainting_with_a_nine_channel_unet_matches_diffusers(pipes, monkeypatch, tmp_path):
  import diffusers.models.autoencoders.vae as vae_module
  import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
  from conftest import UNET_TWO_LEVEL, perturb_
  from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
  from PIL import Image

  ref_pipe, _ = pipes
  torch.manual_seed(8)
  unet9 = perturb_(UNet2DConditionModel(**dict(UNET_TWO_LEVEL, in_channels=9)), seed=8)
  ref = StableDiffusionInpaintPipeline(**dict(ref_pipe.components, unet=unet9))
  ref.save_pretrained(tmp_path)
  pipe = load_pipeline(str(tmp_path))
  ref.scheduler = type(ref.scheduler).from_config(dict(pipe.scheduler_config))
  seeds = [41]
  noise = np.asarray(image_noise(seeds, (16, 16, 4)))
  # At full strength a 9-channel model never encodes the unmasked image: only the masked one.
  monkeypatch.setattr(vae_module, 'randn_tensor', _FixedNoise(image_noise(seeds, (16, 16, 4), _MASKED_ENCODE)))
  monkeypatch.setattr(inpaint_module, 'randn_tensor', _FixedNoise(noise))
  with torch.no_grad():
    expected = ref(
      PROMPTS[1],
      image=Image.fromarray(_init_image(2)),
      mask_image=Image.fromarray(_mask()),
      num_inference_steps=STEPS,
      guidance_scale=7.5,
      output_type='np',
      height=64,
      width=64,
    ).images
  ours = inpaint(
    pipe, PROMPTS[1], _init_image(2), _mask(), num_inference_steps=STEPS, guidance_scale=7.5, seed=seeds, latents=noise
  )
  assert _max_diff(ours, _ref_uint8(expected)) <= 2


def test_batch_is_split_over_a_mesh_and_gives_the_single_device_images(pipes):
  _, pipe = pipes
  mesh = jax.make_mesh((len(jax.devices()),), ('data',))
  n = len(jax.devices())
  prompts = [PROMPTS[i % 2] for i in range(n)]
  sharded = txt2img(pipe, prompts, num_inference_steps=2, scheduler='ddim', mesh=mesh)
  single = txt2img(pipe, prompts, num_inference_steps=2, scheduler='ddim')
  assert _max_diff(sharded, single.astype(np.int32)) <= 1
