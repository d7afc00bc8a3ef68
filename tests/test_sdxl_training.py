"""SDXL DreamBooth training: the step (full fine-tuning of the UNet and both text encoders, and LoRA) equals
diffusers' train_dreambooth(_lora)_sdxl.py computation in PyTorch, with the time ids the data pipeline makes per
example (original size, crop's top-left corner, target size)."""

import os
import types

import jax
import numpy as np
import pytest
import torch
from conftest import jit_call, nchw, nhwc, rel_err
from PIL import Image
from test_train_step import _ZERO_GRADIENT, PRIOR_WEIGHT, _our_weights, _Reference, _setup, _weights

from jaxdream.io.weights import read_safetensors
from jaxdream.training.data import make_iterator, resized_png_and_size
from jaxdream.training.inputs import _next_batch
from jaxdream.training.lora import export_adapters, lora_paths

pytestmark = pytest.mark.reference

RESOLUTION = 32  # the tiny VAE halves it: 16 x 16 latents, the tiny UNet's sample size


def _images(tmp_path, sizes, resolution):
  """A data source (what data_source gives) of random images of these (height, width) sizes, stored as
  prepare_dataset stores them."""
  rng = np.random.default_rng(0)
  source = []
  for i, (h, w) in enumerate(sizes):
    path = str(tmp_path / f'{i}.png')
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    png, original = resized_png_and_size(path, resolution)
    source.append(
      dict(png=np.frombuffer(png, np.uint8), prompt='', concept=0, index=i, original_size=np.int32(original))
    )
  return source


def _sdxl_batch(pipe, tmp_path):
  """A prior-preservation batch (one instance, one class example) read as the trainer reads it: random crops
  of a landscape and a portrait photo, with their time ids."""
  sources = {
    'instance': _images(tmp_path, [(40, 56)], RESOLUTION),
    'class': _images(tmp_path, [(72, 48)], RESOLUTION),
  }
  prompts = {'instance': 'a photo of sks dog', 'class': 'a photo of dog'}
  for split, source in sources.items():
    for ex in source:
      ex['prompt'] = prompts[split]
  iterators = {
    split: make_iterator(
      source,
      batch_size=1,
      seed=3 + 17 * k,
      resolution=RESOLUTION,
      center_crop=False,
      flip_p=0.5,
      tokenize=pipe.tokenize,
      micro_conditioning=pipe.micro_conditioning,
    )
    for k, (split, source) in enumerate(sources.items())
  }
  return _next_batch(iterators, prior=True)


def _check_unused_decayed(ours, before, unused, m, c, steps=1):
  """The first encoder's last layer (SDXL reads its penultimate one) has no gradient: torch's AdamW skips its
  parameters, optax's AdamW applies its decoupled weight decay alone (each of `steps` steps). No other parameter
  goes unused."""
  assert all(k.startswith(('encoder.layers.1.', 'final_layer_norm.')) for k in unused), (m, unused)
  assert (m == 'text_encoder') == bool(unused), (m, unused)
  lr = c.train.learning_rate if m == 'unet' else c.train.text_encoder_learning_rate
  for k in unused:
    np.testing.assert_allclose(
      ours[k], before[k] * (1 - lr * c.train.weight_decay) ** steps, rtol=1e-6, err_msg=f'{m} {k}'
    )


@pytest.mark.slow  # the fast subset keeps the SD step reference case
def test_sdxl_lora_step_on_unet_and_both_encoders_equals_peft_and_its_file_loads_in_diffusers(sdxl_folder, tmp_path):
  """One LoRA step (adapters on the UNet and both text encoders, prior preservation) equals peft's on diffusers'
  models; the exported file loads in StableDiffusionXLPipeline.load_lora_weights, whose adapted UNet and second
  encoder give jaxdream's outputs."""
  from diffusers import StableDiffusionXLPipeline

  _, path, _ = sdxl_folder
  pipe, c, fn, state, frozen = _setup(path, train_text_encoder=False, lora=dict(rank=4, alpha=8.0, text_encoder=True))
  assert {k.split('/')[0] for k in state['trainable']} == {'unet', 'text_encoder', 'text_encoder_2'}
  assert all(k.endswith(('/lora_a', '/lora_b')) for k in state['trainable'])
  batch = _sdxl_batch(pipe, tmp_path)
  time_ids = batch['micro_conditioning']['time_ids']
  # Shorter side resized to 32: 40x56 -> 32x45 (crop left in 0..13), 72x48 -> 48x32 (crop top in 0..16).
  assert time_ids.shape == (2, 6) and time_ids.dtype == np.float32
  np.testing.assert_array_equal(time_ids[:, [0, 1, 4, 5]], [[40, 56, 32, 32], [72, 48, 32, 32]])
  assert time_ids[0, 2] == 0 and 0 <= time_ids[0, 3] <= 13 and 0 <= time_ids[1, 2] <= 16 and time_ids[1, 3] == 0
  assert time_ids[0, 3] + time_ids[1, 2] > 0, 'random crops at the corner both times: pick another seed'
  ref = _Reference(path, c, pipe.scheduler_config, 'epsilon', state['trainable'])
  before = _weights(ref.state_dicts())
  key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
  draws = jax.device_get(fn.draws(key, (2, 16, 16, 4)))
  state, metrics = jax.jit(fn)(state, frozen, batch)
  ref_loss, ref_norm = ref.step(batch, draws)
  assert rel_err(metrics['loss'], ref_loss) <= 1e-5
  assert rel_err(metrics['grad_norm'], ref_norm) <= 1e-4
  ours, theirs = _our_weights(pipe, state['trainable']), _weights(ref.state_dicts())
  for m in ('unet', 'text_encoder', 'text_encoder_2'):
    adapters = sorted(k for k in theirs[m] if '.lora_' in k)
    assert adapters and set(ours[m]) == set(theirs[m]), m
    changed = [k for k in adapters if np.any(theirs[m][k] != before[m][k])]
    assert any('lora_B' in k for k in changed), m  # B starts at zero: the step trained this component's adapters
    _check_unused_decayed(ours[m], before[m], [k for k in adapters if k not in changed], m, c)
    delta = lambda w: np.concatenate([(w[k] - before[m][k]).ravel() for k in changed])
    assert rel_err(delta(ours[m]), delta(theirs[m])) <= 1e-4, m

  # The trained adapters (written into `pipe` by _our_weights), exported and loaded by diffusers.
  exported = lora_paths(str(tmp_path), 'sks', kohya=True)
  export_adapters(pipe, ['unet', 'text_encoder', 'text_encoder_2'], exported)
  kohya = {k.split('_', 2)[1] for k in read_safetensors(exported['lora_kohya'])}
  assert kohya == {'unet', 'te1', 'te2'}  # kohya's SDXL names: lora_unet_, lora_te1_, lora_te2_
  diffusers_pipe = StableDiffusionXLPipeline.from_pretrained(path)
  diffusers_pipe.load_lora_weights(exported['lora'])
  rng = np.random.default_rng(5)
  x = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
  context = rng.standard_normal((1, 7, 64)).astype(np.float32)
  pooled = rng.standard_normal((1, 32)).astype(np.float32)
  time_ids = np.array([[40, 56, 0, 7, 32, 32]], np.float32)
  ids = pipe.tokenize(['a photo of sks dog'])['text_encoder_2']
  with torch.no_grad():
    expected = diffusers_pipe.unet(
      *map(torch.from_numpy, (x, np.array([321]), context)),
      added_cond_kwargs={'text_embeds': torch.from_numpy(pooled), 'time_ids': torch.from_numpy(time_ids)},
    ).sample.numpy()
    expected_pooled = diffusers_pipe.text_encoder_2(torch.from_numpy(ids).long()).text_embeds.numpy()
    diffusers_pipe.disable_lora()
    base = diffusers_pipe.unet(
      *map(torch.from_numpy, (x, np.array([321]), context)),
      added_cond_kwargs={'text_embeds': torch.from_numpy(pooled), 'time_ids': torch.from_numpy(time_ids)},
    ).sample.numpy()
    base_pooled = diffusers_pipe.text_encoder_2(torch.from_numpy(ids).long()).text_embeds.numpy()
  # One step's adapters change the outputs (by ~1e-2) far beyond the tolerance: the file's adapters were applied.
  assert rel_err(expected, base) > 1e-3 and rel_err(expected_pooled, base_pooled) > 1e-3
  out = jit_call(pipe.unet)(nhwc(x), np.array([321]), context, pooled, time_ids)
  assert rel_err(nchw(out), expected) <= 1e-5
  assert rel_err(jit_call(pipe.text_encoder_2, 'forward')(ids)['text_embeds'], expected_pooled) <= 1e-5


@pytest.mark.slow  # a whole training run
def test_sdxl_run_equals_pytorch_steps_and_exports_a_model_diffusers_loads(sdxl_folder, tmp_path):
  """A 2-step DreamBooth run on the tiny SDXL base, in-process on one device: the UNet and both text encoders
  trained, prior preservation, random crops and flips (per-example time ids from each photo's size and crop).
  Each step's loss and gradient norm equal diffusers' SDXL computation in PyTorch on the step's batch and random
  draws (recorded from the run), the run samples its validation image, and the folder it exports loads in
  StableDiffusionXLPipeline with the weights of PyTorch's two AdamW steps."""
  from diffusers import StableDiffusionXLPipeline

  from jaxdream.distributed.mesh import make_mesh
  from jaxdream.training import config as config_lib
  from jaxdream.training import loop
  from jaxdream.training.step import step_key

  _, path, _ = sdxl_folder
  rng = np.random.default_rng(1)
  sizes = {'photos': [(40, 48), (48, 36), (36, 36)], 'class': [(72, 48), (32, 40)]}
  for folder, shapes in sizes.items():
    (tmp_path / folder).mkdir()
    for i, size in enumerate(shapes):
      Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / folder / f'{i}.png')
  c = config_lib.base_config()
  c.model, c.resolution = path, RESOLUTION
  c.concepts = [
    config_lib.concept(
      instance_dir=str(tmp_path / 'photos'),
      instance_prompt='a photo of sks dog',
      class_prompt='a photo of dog',
      class_dir=str(tmp_path / 'class'),  # as many images as asked for: none is generated
      num_class_images=2,
    )
  ]
  c.prior.loss_weight = PRIOR_WEIGHT
  c.data.center_crop, c.data.flip_p = False, 0.5
  c.train.num_steps, c.train.train_text_encoder = 2, True
  c.train.learning_rate, c.train.text_encoder_learning_rate, c.train.max_grad_norm = 1e-3, 5e-4, 0.5
  c.checkpoint.async_save = False
  c.logging.tensorboard = False
  c.validation.prompts, c.validation.num_images, c.validation.steps = ['a photo of sks dog'], 1, 2
  c.mesh.data = 1
  ref = _Reference(path, c, sdxl_folder[2].scheduler_config, 'epsilon')
  before = _weights(ref.state_dicts())

  seen, real_place = [], loop._place

  def recording(step_fn, jstep):  # the run's step, recording each step's batch, random draws and metrics
    def step(state, frozen, batch):
      draws = jax.device_get(step_fn.draws(step_key(state), (2, 16, 16, 4)))
      new, metrics = jstep(state, frozen, batch)
      seen.append((jax.device_get(batch), draws, jax.device_get(metrics)))
      return new, metrics

    # the runner compiles it ahead: jstep.lower(...).compile()
    step.lower = lambda *args: types.SimpleNamespace(compile=lambda: recording(step_fn, jstep.lower(*args).compile()))
    return step

  def place(step_fn, *args):
    state, frozen, jstep, batch_sh = real_place(step_fn, *args)
    return state, frozen, recording(step_fn, jstep), batch_sh

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, 'make_mesh', lambda *sizes: make_mesh(*sizes, devices=jax.devices()[:1]))
    mp.setattr(loop, '_place', place)
    summary = loop.train(c, str(tmp_path / 'run'))
  assert summary['step'] == 2 and summary['bad_steps'] == 0 and len(seen) == 2
  assert os.path.isfile(summary['outputs']['samples']['a photo of sks dog'])

  originals = {split: {tuple(s) for s in shapes} for split, shapes in sizes.items()}
  for i, (batch, draws, metrics) in enumerate(seen):
    time_ids = batch['micro_conditioning']['time_ids']
    assert tuple(time_ids[0, :2]) in originals['photos'] and tuple(time_ids[1, :2]) in originals['class'], i
    assert (time_ids[:, 4:] == RESOLUTION).all() and (time_ids[:, 2:4] >= 0).all(), i
    ref_loss, ref_norm = ref.step(batch, draws)
    assert rel_err(metrics['loss'], ref_loss) <= 1e-5, i
    assert rel_err(metrics['grad_norm'], ref_norm) <= 1e-4, i
  assert any(batch['micro_conditioning']['time_ids'][:, 2:4].any() for batch, _, _ in seen)  # some crop moved

  exported = StableDiffusionXLPipeline.from_pretrained(summary['outputs']['model'])
  assert exported.unet.config.addition_embed_type == 'text_time'
  names = ('unet', 'text_encoder', 'text_encoder_2')
  ours = _weights({m: getattr(exported, m).state_dict() for m in names})
  theirs = _weights(ref.state_dicts())
  # Two steps' changes: Adam's second step magnifies rounding where two gradients nearly cancel
  # (test_train_step.py's tolerances).
  delta_tol = {'unet': 2e-4, 'text_encoder': 5e-4, 'text_encoder_2': 5e-4}
  for m in names:
    assert set(ours[m]) == set(theirs[m]) == set(before[m]), m
    keys = sorted(k for k in theirs[m] if not _ZERO_GRADIENT.search(k))
    trained = [k for k in keys if np.any(theirs[m][k] != before[m][k])]
    assert len(trained) >= len(keys) // 2, m  # the run did train this component (2-layer encoders)
    _check_unused_decayed(ours[m], before[m], [k for k in keys if k not in trained], m, c, steps=2)
    flat = lambda w: np.concatenate([w[k].ravel() for k in trained])
    assert rel_err(flat(ours[m]), flat(theirs[m])) <= 1e-5, m
    delta = lambda w: np.concatenate([(w[k] - before[m][k]).ravel() for k in trained])
    assert rel_err(delta(ours[m]), delta(theirs[m])) <= delta_tol[m], m
