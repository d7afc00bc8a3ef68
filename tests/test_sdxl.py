"""SDXL: the UNet's added conditioning, the second text encoder, prompt encoding, txt2img, inpainting and the
refiner's img2img equal diffusers' StableDiffusionXL(Img2Img|Inpaint)Pipeline on tiny random folders saved by
diffusers; a folder jaxdream saves loads in diffusers."""

import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from conftest import TIME_EMBED, UNET_SDXL, jit_call, nchw, nhwc, perturb_, rel_err
from flax import nnx
from PIL import Image

from jaxdream import load_pipeline
from jaxdream.diffusion import sdxl
from jaxdream.diffusion.pipeline import _conditioning, save_pipeline
from jaxdream.diffusion.sampling import _ENCODE, _MASKED_ENCODE, image_noise, img2img, inpaint, refine, txt2img

pytestmark = pytest.mark.reference

PROMPTS = ['a photo of sks dog', 'a red fox in the snow']
NEGATIVES = ['blurry', 'a cat']


def test_sdxl_unet_with_pooled_embedding_and_time_ids_matches_diffusers(sdxl_folder):
  ref, _, pipe = sdxl_folder
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  t = np.array([3, 917])
  context = rng.standard_normal((2, 7, 64)).astype(np.float32)
  pooled = rng.standard_normal((2, 32)).astype(np.float32)
  time_ids = np.array([[1024, 768, 0, 0, 1024, 768], [512, 512, 16, 32, 256, 256]], np.float32)
  with torch.no_grad():
    expected = ref.unet(
      *map(torch.from_numpy, (x, t, context)),
      added_cond_kwargs={'text_embeds': torch.from_numpy(pooled), 'time_ids': torch.from_numpy(time_ids)},
    ).sample.numpy()
  unet = jit_call(pipe.unet)
  out = unet(nhwc(x), t, context, pooled, time_ids)
  assert rel_err(nchw(out), expected) <= 1e-5
  # the added conditioning counts: other time ids change the output
  assert rel_err(nchw(unet(nhwc(x), t, context, pooled, time_ids[::-1])), expected) > 1e-2
  with pytest.raises(ValueError, match='needs text_embeds= and time_ids='):
    pipe.unet(nhwc(x), t, context, text_embeds=pooled)
  with pytest.raises(ValueError, match='expects 80'):
    pipe.unet(nhwc(x), t, context, text_embeds=pooled, time_ids=time_ids[:, :5])


# The refiner's shape: 5 time ids (sizes, crop, aesthetic score), text_encoder_2's 32 features as context; and
# transformer depths given per layer, the up blocks with their own list.
UNET_REFINER = dict(
  UNET_SDXL,
  transformer_layers_per_block=[1, [2]],
  reverse_transformer_layers_per_block=[[2, 1], 1],
  cross_attention_dim=32,
  projection_class_embeddings_input_dim=32 + 5 * TIME_EMBED,
)


@pytest.fixture(scope='module')
def refiner_folder(sdxl_folder, tmp_path_factory):
  """A StableDiffusionXLImg2ImgPipeline refiner folder (no text_encoder, aesthetic scores, no zeroed negatives)
  with the base's VAE, text_encoder_2 and scheduler: (diffusers pipeline, folder, jaxdream pipeline)."""
  from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

  base = sdxl_folder[0]
  torch.manual_seed(5)
  ref = StableDiffusionXLImg2ImgPipeline(
    vae=base.vae,
    text_encoder=None,
    text_encoder_2=base.text_encoder_2,
    tokenizer=None,
    tokenizer_2=base.tokenizer_2,
    unet=perturb_(UNet2DConditionModel(**UNET_REFINER), seed=5),
    scheduler=base.scheduler,
    requires_aesthetics_score=True,
    force_zeros_for_empty_prompt=False,
    add_watermarker=False,
  )
  path = str(tmp_path_factory.mktemp('tiny_sdxl_refiner') / 'model')
  ref.save_pretrained(path)
  return ref, path, load_pipeline(path)


def test_refiner_unet_with_per_layer_transformer_depths_matches_diffusers(refiner_folder):
  ref, _, pipe = refiner_folder
  assert [len(a.transformer_blocks) for a in pipe.unet.up_blocks[0].attentions] == [2, 1]
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
  context = rng.standard_normal((1, 5, 32)).astype(np.float32)
  pooled = rng.standard_normal((1, 32)).astype(np.float32)
  time_ids = np.array([[1024, 1024, 0, 0, 2.5]], np.float32)
  with torch.no_grad():
    expected = ref.unet(
      torch.from_numpy(x),
      torch.tensor([500]),
      torch.from_numpy(context),
      added_cond_kwargs={'text_embeds': torch.from_numpy(pooled), 'time_ids': torch.from_numpy(time_ids)},
    ).sample.numpy()
  out = jit_call(pipe.unet)(nhwc(x), np.array([500]), context, pooled, time_ids)
  assert rel_err(nchw(out), expected) <= 1e-5


def test_prompt_embeddings_and_pooled_embeddings_match_diffusers_encode_prompt(sdxl_folder):
  ref, _, pipe = sdxl_folder
  assert pipe.encode_prompt is sdxl.encode_prompt and set(pipe.tokenizers) == {'text_encoder', 'text_encoder_2'}
  ids = pipe.tokenize(PROMPTS + NEGATIVES)
  assert ids['text_encoder_2'][0, -1] == pipe.tokenizers['text_encoder_2'].convert_tokens_to_ids('!')  # its padding
  graphdefs, params = _split_text_encoders(pipe)
  context, extra = jax.jit(lambda p, ids: sdxl.encode_prompt(_merge(graphdefs, p), ids))(params, ids)
  with torch.no_grad():
    embeds, neg_embeds, pooled, neg_pooled = ref.encode_prompt(
      PROMPTS, device='cpu', do_classifier_free_guidance=True, negative_prompt=NEGATIVES
    )
    projected = ref.text_encoder_2(torch.from_numpy(ids['text_encoder_2'][:2].astype(np.int64))).text_embeds
  assert context.shape == (4, 77, 64) and extra['text_embeds'].shape == (4, 32)
  assert rel_err(context[:2], embeds.numpy()) <= 1e-5
  assert rel_err(context[2:], neg_embeds.numpy()) <= 1e-5
  assert rel_err(extra['text_embeds'][:2], pooled.numpy()) <= 1e-5
  assert rel_err(extra['text_embeds'][2:], neg_pooled.numpy()) <= 1e-5
  assert rel_err(extra['text_embeds'][:2], projected.numpy()) <= 1e-5  # CLIPTextModelWithProjection's text_embeds
  # clip_skip: each encoder's hidden state that many layers before the penultimate, as diffusers'.
  skipped, _ = jax.jit(lambda p, ids: sdxl.encode_prompt(_merge(graphdefs, p), ids, clip_skip=1))(params, ids)
  with torch.no_grad():
    embeds = ref.encode_prompt(PROMPTS, device='cpu', do_classifier_free_guidance=False, clip_skip=1)[0]
  assert rel_err(skipped[:2], embeds.numpy()) <= 1e-5 and rel_err(skipped[:2], context[:2]) > 1e-2


def _split_text_encoders(pipe):
  split = {name: nnx.split(model) for name, model in pipe.components.items() if name.startswith('text_encoder')}
  return {n: s[0] for n, s in split.items()}, {n: s[1] for n, s in split.items()}


def _merge(graphdefs, params):
  return {name: nnx.merge(graphdefs[name], params[name]) for name in graphdefs}


def test_txt2img_matches_diffusers_from_the_same_noise_with_and_without_negative_prompts(sdxl_folder):
  """Both CFG halves with their time ids (the output size, or the sizes and crop given); without negative prompts
  diffusers' force_zeros_for_empty_prompt (zero negative embeddings, not the empty prompt's). Our uint8 images are
  diffusers' float images rounded."""
  ref, _, pipe = sdxl_folder
  assert pipe.force_zeros_for_empty_prompt and pipe.micro_conditioning is sdxl.size_time_ids
  latents = np.asarray(image_noise([11, 12], (16, 16, 4)))
  kw = dict(num_inference_steps=2, guidance_scale=5.0)
  micro = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(40, 32))
  cases = {'no negatives': (None, {}), 'negatives': (NEGATIVES, {}), 'sizes and crop': (NEGATIVES, micro)}
  expected = {}
  for case, (negatives, settings) in cases.items():
    with torch.no_grad():
      expected[case] = ref(
        PROMPTS, negative_prompt=negatives, latents=torch.from_numpy(nchw(latents)), output_type='np', **kw, **settings
      ).images
  for case in ('no negatives', 'sizes and crop'):  # each setting counts
    assert np.abs(expected[case] - expected['negatives']).max() > 0.05, case
  for case, (negatives, settings) in cases.items():
    ours = txt2img(pipe, PROMPTS, negative_prompts=negatives, latents=latents, micro_conditioning=settings, **kw)
    assert ours.shape == (2, 32, 32, 3) and ours.dtype == np.uint8
    diff = np.abs(ours / 255.0 - expected[case]).max()
    assert diff <= 0.51 / 255, (case, diff)  # rounding to uint8 (half a level) plus float error (measured: 0.0003)
  with pytest.raises(ValueError, match='aesthetic_score is not a setting'):  # the base model has no aesthetic score
    txt2img(pipe, PROMPTS, latents=latents, micro_conditioning=dict(aesthetic_score=6.0), **kw)
  # Per image: a None entry is no negative prompt (zeros), the others are encoded (A1111's empty negative: None).
  mixed = txt2img(pipe, PROMPTS, negative_prompts=[None, NEGATIVES[1]], latents=latents, **kw)
  assert np.abs(mixed[0] / 255.0 - expected['no negatives'][0]).max() <= 0.51 / 255
  assert np.abs(mixed[1] / 255.0 - expected['negatives'][1]).max() <= 0.51 / 255


def test_prompt_2_and_negative_prompt_2_go_to_the_second_text_encoder_as_diffusers(sdxl_folder):
  ref, _, pipe = sdxl_folder
  latents = np.asarray(image_noise([11, 12], (16, 16, 4)))
  kw = dict(num_inference_steps=2, guidance_scale=5.0)
  second, negative_second = ['a castle at night', 'a boat'], ['grainy', 'dark']
  with torch.no_grad():
    expected = ref(
      PROMPTS, prompt_2=second, negative_prompt=NEGATIVES, negative_prompt_2=negative_second,
      latents=torch.from_numpy(nchw(latents)), output_type='np', **kw,
    ).images  # fmt: skip
    plain = ref(PROMPTS, negative_prompt=NEGATIVES, latents=torch.from_numpy(nchw(latents)), output_type='np', **kw)
  assert np.abs(expected - plain.images).max() > 0.05  # the second texts count
  ours = txt2img(
    pipe, PROMPTS, prompts_2=second, negative_prompts=NEGATIVES, negative_prompts_2=negative_second, latents=latents,
    **kw,
  )  # fmt: skip
  assert np.abs(ours / 255.0 - expected).max() <= 0.51 / 255
  with pytest.raises(ValueError, match="prompt_syntax='plain'"):
    txt2img(pipe, PROMPTS, prompts_2=second, prompt_syntax='a1111', **kw)


def test_the_server_zeroes_an_empty_negative_prompt_for_sdxl_as_a1111(sdxl_folder):
  """A1111's SDXL conditioning zeroes the negative half when the negative prompt is empty
  (force_zero_negative_prompt): the A1111 API's default '' is no negative prompt, not the empty prompt's encoding."""
  import base64
  import io

  from fastapi.testclient import TestClient

  from jaxdream.serve.app import create_app, make_server

  _, path, pipe = sdxl_folder
  server = make_server(path, max_batch=1)
  try:
    r = TestClient(create_app(server)).post(
      '/sdapi/v1/txt2img',
      json={
        'prompt': PROMPTS[0],
        'seed': 3,
        'steps': 2,
        'cfg_scale': 5,
        'width': 32,
        'height': 32,
        'sampler_name': 'Euler',
      },
    )
  finally:
    server.queue.close()
  assert r.status_code == 200, r.text
  served = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()['images'][0]))), np.int32)
  kw = dict(num_inference_steps=2, guidance_scale=5.0, seed=3, height=32, width=32, scheduler='euler')
  zeroed = txt2img(pipe, PROMPTS[:1], negative_prompts=None, prompt_syntax='a1111', **kw)[0]
  empty = txt2img(pipe, PROMPTS[:1], negative_prompts=[''], prompt_syntax='a1111', **kw)[0]
  assert np.abs(served - zeroed).max() <= 1 < np.abs(served - empty).max()


@pytest.mark.parametrize(
  'settings',
  [
    dict(aesthetic_score=7.0, negative_aesthetic_score=2.0),
    # the negative half's crop is (0, 0) unless given: not the prompt's
    dict(aesthetic_score=7.0, original_size=(100, 60), crops_coords_top_left=(3, 4)),
    dict(crops_coords_top_left=(3, 4), negative_crops_coords_top_left=(5, 1), negative_original_size=(40, 90)),
  ],
  ids=['scores', 'crop', 'negative-sizes'],
)
def test_refiner_img2img_with_aesthetic_scores_matches_diffusers(refiner_folder, monkeypatch, settings):
  """text_encoder_2 alone as context, time ids with the aesthetic score and the negative one for the negative
  half, the empty negative prompt encoded (force_zeros_for_empty_prompt false)."""
  import diffusers.models.autoencoders.vae as vae_module
  import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module
  from PIL import Image

  ref, _, pipe = refiner_folder
  assert set(pipe.tokenizers) == {'text_encoder_2'} and not pipe.force_zeros_for_empty_prompt
  assert pipe.micro_conditioning is sdxl.aesthetic_time_ids
  image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  seeds = [21]
  noise = np.asarray(image_noise(seeds, (16, 16, 4)))
  monkeypatch.setattr(vae_module, 'randn_tensor', _FixedNoise(image_noise(seeds, (16, 16, 4), _ENCODE)))
  monkeypatch.setattr(img2img_module, 'randn_tensor', _FixedNoise(noise))
  kw = dict(strength=0.6, num_inference_steps=3, guidance_scale=5.0)
  with torch.no_grad():
    expected = ref(PROMPTS[0], image=Image.fromarray(image), output_type='np', **kw, **settings).images
  ours = img2img(pipe, PROMPTS[0], image, seed=seeds, latents=noise, micro_conditioning=settings, **kw)
  diff = np.abs(ours / 255.0 - expected).max()
  assert diff <= 0.51 / 255, diff


@pytest.mark.parametrize(
  'settings, match',
  [
    (dict(aesthetic_score=None), 'aesthetic_score must be a finite number'),
    (dict(original_size=8), 'original_size must be two finite numbers'),
    (dict(crops_coords_top_left=(0, float('nan'))), 'crops_coords_top_left must be two'),
    (dict(target_size=(1, 2)), 'target_size is not a setting of this model; it takes original_size'),
  ],
)
def test_bad_micro_conditioning_settings_are_named_before_sampling(refiner_folder, settings, match):
  with pytest.raises(ValueError, match=match):
    txt2img(refiner_folder[2], PROMPTS[0], num_inference_steps=1, height=32, width=32, micro_conditioning=settings)


def test_inpainting_with_the_base_model_matches_diffusers_latent_blending(sdxl_folder, monkeypatch):
  import diffusers.models.autoencoders.vae as vae_module
  import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint_module
  from diffusers import StableDiffusionXLInpaintPipeline
  from PIL import Image

  ref, _, pipe = sdxl_folder
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[8:24, 10:26] = 255
  seeds = [31]
  noise = np.asarray(image_noise(seeds, (16, 16, 4)))
  # diffusers encodes the image, then the masked image (which a 4-channel UNet does not use)
  encode_noise = [image_noise(seeds, (16, 16, 4), stream) for stream in (_ENCODE, _MASKED_ENCODE)]
  monkeypatch.setattr(vae_module, 'randn_tensor', _FixedNoise(*encode_noise))
  monkeypatch.setattr(inpaint_module, 'randn_tensor', _FixedNoise(noise))
  kw = dict(strength=0.7, num_inference_steps=3, guidance_scale=5.0)
  with torch.no_grad():
    expected = StableDiffusionXLInpaintPipeline(**ref.components)(
      PROMPTS[1], image=Image.fromarray(image), mask_image=Image.fromarray(mask), output_type='np', **kw
    ).images
  ours = inpaint(pipe, PROMPTS[1], image, mask, seed=seeds, latents=noise, **kw)
  diff = np.abs(ours / 255.0 - expected).max()
  assert diff <= 0.51 / 255, diff


def test_base_to_refiner_hand_off_matches_diffusers_ensemble_of_experts(sdxl_folder, refiner_folder):
  """The base denoises to denoising_end=0.8 and returns latents (6 Euler steps: 4 at timesteps >= 200), the refiner
  takes them over at denoising_start=0.8 (the last 2) with its aesthetic scores, as diffusers' documented pair of
  calls; `refine` is that pair, and other fractions reuse the compiled loops."""

  ref, _, base = sdxl_folder
  ref_refiner, _, refiner = refiner_folder
  noise = np.asarray(image_noise([41, 42], (16, 16, 4)))
  kw = dict(num_inference_steps=6, guidance_scale=5.0, negative_prompts=NEGATIVES)
  scores = dict(aesthetic_score=7.0, negative_aesthetic_score=2.0)
  with torch.no_grad():
    ref_latents = ref(
      PROMPTS,
      negative_prompt=NEGATIVES,
      latents=torch.from_numpy(nchw(noise).copy()),
      denoising_end=0.8,
      output_type='latent',
      num_inference_steps=6,
      guidance_scale=5.0,
    ).images
    expected = ref_refiner(
      PROMPTS,
      negative_prompt=NEGATIVES,
      image=ref_latents,
      denoising_start=0.8,
      output_type='np',
      num_inference_steps=6,
      guidance_scale=5.0,
      **scores,
    ).images
  steps = []
  latents = txt2img(base, PROMPTS, latents=noise, denoising_end=0.8, output_type='latent', progress=steps.append, **kw)
  assert steps == [0, 1, 2, 3]
  assert rel_err(nchw(latents), ref_latents.numpy()) <= 1e-5
  ours = img2img(refiner, PROMPTS, latents, denoising_start=0.8, micro_conditioning=scores, progress=steps.append, **kw)
  assert steps[4:] == [4, 5] and ours.shape == (2, 32, 32, 3)
  diff = np.abs(ours / 255.0 - expected).max()
  assert diff <= 0.51 / 255, diff
  compiled = len(base.compiled), len(refiner.compiled)
  again = refine(base, refiner, PROMPTS, latents=noise, refiner_micro_conditioning=scores, progress=steps.append, **kw)
  np.testing.assert_array_equal(again, ours)
  assert steps[6:] == [0, 1, 2, 3, 4, 5]
  later = refine(
    base,
    refiner,
    PROMPTS,
    refiner_start=0.5,
    latents=noise,
    refiner_micro_conditioning=scores,
    progress=steps.append,
    **kw,
  )
  assert steps[12:] == [0, 1, 2, 3, 4, 5]  # now 2 base steps (timesteps >= 500) and 4 refiner steps, same programs
  assert (len(base.compiled), len(refiner.compiled)) == compiled and np.abs(later.astype(int) - ours).max() > 0
  for bad, message in (
    (dict(refiner_start=1.0), r'refiner_start must be in \(0, 1\)'),
    (dict(base=refiner), 'takes over from an SDXL base model'),
    (dict(refiner=base), 'must be an SDXL refiner .* not a StableDiffusionXLPipeline base'),
  ):
    args = dict(dict(base=base, refiner=refiner), **bad)
    with pytest.raises(ValueError, match=message):
      refine(args.pop('base'), args.pop('refiner'), PROMPTS, **args, **kw)


def test_inpainting_hand_off_matches_diffusers_base_and_refiner_inpaint_pipelines(
  sdxl_folder, refiner_folder, monkeypatch
):
  """diffusers' documented inpainting pair: the base inpaints to denoising_end=0.8 (the known region blended back
  after every step but the last, which gets the encoded image as it is), the refiner inpaints from its latents at
  denoising_start=0.8, blending the known region from those latents with fresh noise."""
  import diffusers.models.autoencoders.vae as vae_module
  import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint as inpaint_module
  from diffusers import StableDiffusionXLInpaintPipeline

  (ref, _, base), (ref_refiner, _, refiner) = sdxl_folder, refiner_folder
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  mask = np.zeros((32, 32), np.uint8)
  mask[4:20, 8:28] = 255
  seeds = [51]
  noise = np.asarray(image_noise(seeds, (16, 16, 4)))  # the base's initial noise and the refiner's blending noise
  encode_noise = [image_noise(seeds, (16, 16, 4), stream) for stream in (_ENCODE, _MASKED_ENCODE)]
  monkeypatch.setattr(vae_module, 'randn_tensor', _FixedNoise(*encode_noise))
  monkeypatch.setattr(inpaint_module, 'randn_tensor', _FixedNoise(noise, noise))
  kw = dict(num_inference_steps=6, guidance_scale=5.0, strength=1.0)
  with torch.no_grad():
    latents = StableDiffusionXLInpaintPipeline(**ref.components)(
      PROMPTS[0],
      image=Image.fromarray(image),
      mask_image=Image.fromarray(mask),
      denoising_end=0.8,
      output_type='latent',
      **kw,
    ).images
    expected = StableDiffusionXLInpaintPipeline(
      **ref_refiner.components, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
    )(PROMPTS[0], image=latents, mask_image=Image.fromarray(mask), denoising_start=0.8, output_type='np', **kw).images
  steps = dict(num_inference_steps=6, guidance_scale=5.0, seed=seeds)
  ours = inpaint(base, PROMPTS[0], image, mask, denoising_end=0.8, output_type='latent', **steps)
  assert rel_err(nchw(ours), latents.numpy()) <= 1e-5
  ours = refine(base, refiner, PROMPTS[0], init_images=image, masks=mask, **steps)
  diff = np.abs(ours / 255.0 - expected).max()
  assert diff <= 0.51 / 255, diff


def test_sample_cli_hands_over_to_the_refiner_with_micro_conditioning_flags(
  sdxl_folder, refiner_folder, tmp_path, monkeypatch, capsys
):
  """`jaxdream sample --refiner DIR --refiner-start F` is `refine` with the flags' sizes, crop and scores (W H and X Y
  on the command line); the session loads the fixtures' pipelines, so the hand-off test's loops are reused."""
  import shutil

  import jaxdream.diffusion.pipeline as pipeline_module
  from jaxdream.cli import main
  from jaxdream.io.images import parse_parameters, read_parameters

  (_, base_dir, base), (_, refiner_dir, refiner) = sdxl_folder, refiner_folder
  loaded = {os.path.realpath(base_dir): base, os.path.realpath(refiner_dir): refiner}
  monkeypatch.setattr(pipeline_module, 'load_pipeline', lambda path, **kw: loaded[os.path.realpath(path)])
  sd1 = tmp_path / 'sd1'  # an SD 1.x folder as the CLI checks it: configs only
  shutil.copytree(base_dir, sd1, ignore=shutil.ignore_patterns('*.safetensors', 'text_encoder_2', 'tokenizer_2'))
  index = json.loads((sd1 / 'model_index.json').read_text())  # its components but the second encoder, as SD 1.x's
  index = {k: v for k, v in index.items() if not k.endswith('_2')}
  (sd1 / 'model_index.json').write_text(json.dumps(dict(index, _class_name='StableDiffusionPipeline')))

  def sample(*argv, model=base_dir, out=tmp_path / 'out'):
    return main(['sample', '--model', str(model), '--prompt', PROMPTS[0], '--out', str(out), *map(str, argv)])

  flags = ('--original-size', 40, 48, '--crop-top-left', 4, 8, '--aesthetic-score', 7, '--negative-aesthetic-score', 2)
  argv = ('--steps', 6, '--guidance', 5, '--seed', 7, '--num-images', 2, '--negative-prompt', NEGATIVES[0])
  assert sample(*argv, '--refiner', refiner_dir, '--refiner-start', 0.5, *flags) == 0
  assert '6/6' in capsys.readouterr().err  # the base's 2 steps (timesteps >= 500) and the refiner's 4
  info = parse_parameters(read_parameters(str(tmp_path / 'out' / '00001.png')))
  assert (info['Refiner'], info['Refiner switch at'], info['Seed']) == ('model', '0.5', '8')
  expected = refine(
    base,
    refiner,
    PROMPTS[0],
    refiner_start=0.5,
    negative_prompts=NEGATIVES[0],
    num_inference_steps=6,
    guidance_scale=5.0,
    seed=7,
    num_images_per_prompt=2,
    progress=lambda i: None,
    micro_conditioning=dict(original_size=(48, 40), crops_coords_top_left=(8, 4)),
    refiner_micro_conditioning=dict(
      original_size=(48, 40), crops_coords_top_left=(8, 4), aesthetic_score=7.0, negative_aesthetic_score=2.0
    ),
  )
  for b in range(2):
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / f'{b:05d}.png')), expected[b])
  # --prompt-2 is the base's second encoder's text: other images from the same seeds (the loops already compiled)
  assert (
    sample(
      *argv, '--refiner', refiner_dir, '--refiner-start', 0.5, *flags, '--prompt-2', 'a castle', out=tmp_path / 'p2'
    )
    == 0
  )
  assert not np.array_equal(np.asarray(Image.open(tmp_path / 'p2' / '00000.png')), expected[0])
  for args, message in (
    (('--refiner', refiner_dir, '--model', sd1), 'takes over from an SDXL base model, not from a StableDiffusionPip'),
    (('--refiner', base_dir), 'must be an SDXL refiner'),
    (('--refiner', refiner_dir, '--refiner-start', 1), r'--refiner-start 1.0: must be in \(0, 1\)'),
    (('--refiner-start', 0.5), '--refiner-start needs --refiner'),
    (('--aesthetic-score', 6), '--aesthetic-score and --negative-aesthetic-score condition an SDXL refiner'),
    (('--model', sd1, '--original-size', 64, 64), '--original-size: SDXL micro-conditioning, but .* is a Stable'),
  ):
    args = list(args)
    model = args.pop(args.index('--model') + 1) if '--model' in args else base_dir
    args = [a for a in args if a != '--model']
    assert sample(*args, model=model, out=tmp_path / 'bad') == 2, message
    err = capsys.readouterr().err
    assert re.search(message, err) and 'Traceback' not in err, err
  assert not (tmp_path / 'bad').exists()


class _FixedNoise:
  """Stand-in for diffusers' randn_tensor that hands out given tensors (NHWC) in order."""

  def __init__(self, *arrays):
    self.queue = [torch.from_numpy(nchw(a).copy()) for a in arrays]

  def __call__(self, shape, **kwargs):
    out = self.queue.pop(0)
    assert tuple(out.shape) == tuple(shape), (out.shape, shape)
    return out


def test_saved_sdxl_folder_loads_in_diffusers_and_in_jaxdream(sdxl_folder, tmp_path):
  from diffusers import StableDiffusionXLPipeline

  ref, _, pipe = sdxl_folder
  save_pipeline(pipe, str(tmp_path))
  with open(os.path.join(tmp_path, 'model_index.json')) as f:
    index = json.load(f)
  assert index['_class_name'] == 'StableDiffusionXLPipeline' and index['force_zeros_for_empty_prompt'] is True
  assert index['text_encoder_2'] == ['transformers', 'CLIPTextModelWithProjection'] and 'safety_checker' not in index
  loaded = StableDiffusionXLPipeline.from_pretrained(str(tmp_path))
  for name in ('text_encoder_2.text_projection.weight', 'unet.add_embedding.linear_1.weight'):
    component, key = name.split('.', 1)
    assert torch.equal(getattr(loaded, component).state_dict()[key], getattr(ref, component).state_dict()[key])
  # what load_pipeline reads back from it
  assert _conditioning(index) == dict(
    encode_prompt=sdxl.encode_prompt,
    micro_conditioning=sdxl.size_time_ids,
    force_zeros_for_empty_prompt=True,
    pipeline_class='StableDiffusionXLPipeline',
  )


def test_training_refuses_the_sdxl_refiner_and_per_subject_sdxl_runs_by_name(sdxl_folder, refiner_folder):
  from jaxdream.training.config import RunConfigError
  from jaxdream.training.inputs import check_trainable

  with pytest.raises(RunConfigError, match='an SDXL refiner .requires_aesthetics_score.; jaxdream samples from it'):
    check_trainable(refiner_folder[2])
  check_trainable(sdxl_folder[2])  # the base trains
  with pytest.raises(RunConfigError, match='lora.per_subject runs cannot train a StableDiffusionXLPipeline model'):
    check_trainable(sdxl_folder[2], per_subject=True)


def test_sdxl_unet_configs_missing_a_key_are_errors_naming_it():
  from jaxdream.models import ConfigError, UNet2DConditionModel, presets

  for preset in (presets.SDXL_UNET, presets.SDXL_REFINER_UNET):
    UNet2DConditionModel.resolve_config(preset)
  with pytest.raises(ConfigError, match='needs projection_class_embeddings_input_dim'):
    UNet2DConditionModel.resolve_config(dict(presets.SDXL_UNET, projection_class_embeddings_input_dim=None))
  with pytest.raises(ConfigError, match='needs reverse_transformer_layers_per_block'):
    UNet2DConditionModel.resolve_config(dict(presets.SDXL_UNET, transformer_layers_per_block=[1, [1, 2], 10]))
  # a per-layer list has one depth per layer of its block
  per_layer = dict(
    UNET_SDXL, transformer_layers_per_block=[1, [1, 1, 1]], reverse_transformer_layers_per_block=[[1, 1], 1]
  )
  with pytest.raises(ConfigError, match=r'depths \[1, 1, 1\] given per layer for a block of 1 layers'):
    nnx.eval_shape(lambda: UNet2DConditionModel(per_layer, rngs=nnx.Rngs(0)))
