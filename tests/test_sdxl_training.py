"""SDXL DreamBooth training: the step (full fine-tuning of the UNet and both text encoders, and LoRA) equals
diffusers' train_dreambooth(_lora)_sdxl.py computation in PyTorch, with the time ids the data pipeline makes per
example (original size, crop's top-left corner, target size)."""

import jax
import numpy as np
import pytest
from conftest import rel_err
from PIL import Image
from test_train_step import _ZERO_GRADIENT, _our_weights, _Reference, _setup, _weights

from jaxdream.training.data import make_iterator, resized_png_and_size
from jaxdream.training.inputs import _next_batch

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


def test_sdxl_full_step_with_both_text_encoders_and_prior_equals_pytorch(sdxl_folder, tmp_path):
  """The data's time ids are (original height, width, crop top, left, target height, width) per example; one
  step training the UNet and both text encoders (prior preservation, clipping, AdamW) gives diffusers' loss,
  gradient norm and updated weights."""
  _, path, _ = sdxl_folder
  pipe, c, fn, state, frozen = _setup(path, train_text_encoder=True)
  batch = _sdxl_batch(pipe, tmp_path)
  time_ids = batch['micro_conditioning']['time_ids']
  # Shorter side resized to 32: 40x56 -> 32x45 (crop left in 0..13), 72x48 -> 48x32 (crop top in 0..16).
  assert time_ids.shape == (2, 6) and time_ids.dtype == np.float32
  np.testing.assert_array_equal(time_ids[:, [0, 1, 4, 5]], [[40, 56, 32, 32], [72, 48, 32, 32]])
  assert time_ids[0, 2] == 0 and 0 <= time_ids[0, 3] <= 13 and 0 <= time_ids[1, 2] <= 16 and time_ids[1, 3] == 0
  assert time_ids[0, 3] + time_ids[1, 2] > 0, 'random crops at the corner both times: pick another seed'
  groups = {k.split('/')[0] for k in state['trainable']}
  assert groups == {'unet', 'text_encoder', 'text_encoder_2'}

  ref = _Reference(path, c, pipe.scheduler_config, 'epsilon')
  before = _weights(ref.state_dicts())
  key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
  draws = jax.device_get(fn.draws(key, (2, 16, 16, 4)))
  state, metrics = jax.jit(fn)(state, frozen, batch)
  ref_loss, ref_norm = ref.step(batch, draws)
  assert rel_err(metrics['loss'], ref_loss) <= 1e-5
  assert rel_err(metrics['grad_norm'], ref_norm) <= 1e-4
  ours, theirs = _our_weights(pipe, state['trainable']), _weights(ref.state_dicts())
  lr = {'unet': c.train.learning_rate, 'text_encoder': c.train.text_encoder_learning_rate}
  for m in ('unet', 'text_encoder', 'text_encoder_2'):
    assert set(ours[m]) == set(theirs[m]) == set(before[m]), m
    keys = sorted(k for k in theirs[m] if not _ZERO_GRADIENT.search(k))
    trained = [k for k in keys if np.any(theirs[m][k] != before[m][k])]
    assert len(trained) >= len(keys) // 2, m  # the step did train this component (2-layer encoders)
    # The first encoder's last layer (SDXL reads its penultimate one) has no gradient: torch's AdamW skips it,
    # optax's applies AdamW's decoupled weight decay alone.
    unused = [k for k in keys if k not in trained]
    assert all(k.startswith(('encoder.layers.1.', 'final_layer_norm.')) for k in unused) and (
      m == 'text_encoder'
    ) == bool(unused), (m, unused)
    for k in unused:
      decayed = before[m][k] * (1 - lr[m.rstrip('_2')] * c.train.weight_decay)
      assert rel_err(ours[m][k], decayed) <= 1e-6, (m, k)
    # The updated weights; and their changes (one AdamW step of lr: rounding of the gradients' signs).
    flat = lambda w: np.concatenate([w[k].ravel() for k in trained])
    assert rel_err(flat(ours[m]), flat(theirs[m])) <= 1e-5, m
    delta = lambda w: np.concatenate([(w[k] - before[m][k]).ravel() for k in trained])
    assert rel_err(delta(ours[m]), delta(theirs[m])) <= 5e-4, m
