"""The DreamBooth step equals a PyTorch reference step (diffusers models + torch AdamW), and computes no
gradient for frozen parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import jit_call, rel_err

from jaxdream import load_pipeline
from jaxdream.models import state_dict
from jaxdream.schedulers import NoiseSchedule
from jaxdream.training.config import base_config
from jaxdream.training.params import _set_params, make_optimizer, param_groups, split_models, split_trainable
from jaxdream.training.step import StepFn, init_state

PRIOR_WEIGHT = 0.7


def _setup(path, *, train_text_encoder, snr_gamma=0.0, offset_noise=0.0):
  pipe = load_pipeline(path)
  c = base_config()
  c.train.learning_rate, c.train.text_encoder_learning_rate = 1e-3, 5e-4
  c.train.train_text_encoder = train_text_encoder
  c.train.max_grad_norm = 0.5
  graphdefs, templates, flat = split_models(pipe)
  groups = param_groups(c)
  trainable, frozen, labels = split_trainable(flat, groups)
  tx = make_optimizer(c, groups, labels)
  fn = StepFn(
    graphdefs=graphdefs,
    templates=templates,
    schedule=NoiseSchedule.from_config(pipe.scheduler_config),
    tx=tx,
    num_instance=1,
    prior_weight=PRIOR_WEIGHT,
    snr_gamma=snr_gamma,
    offset_noise=offset_noise,
    ema_decay=0.0,
    encode_prompt=pipe.encode_prompt,
  )
  return pipe, c, fn, init_state(trainable, tx, 0, False), frozen


def _batch(pipe, seed):
  rng = np.random.default_rng(seed)
  return {
    'pixels': jnp.asarray(rng.uniform(-1, 1, (2, 64, 64, 3)), jnp.float32),
    'input_ids': jax.tree.map(jnp.asarray, pipe.tokenize(['a photo of sks dog', 'a photo of dog'])),
  }


def _torch_step(models, opt, sched, batch, draws, params):
  unet, te, vae = models
  t = lambda x: torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    dist = vae.encode(t(batch['pixels'])).latent_dist
    latents = (dist.mean + dist.std * t(draws['latent_noise'])) * vae.config.scaling_factor
  noise, steps = t(draws['noise']), torch.from_numpy(np.asarray(draws['timesteps'])).long()
  noisy = sched.add_noise(latents, noise, steps)
  context = te(torch.from_numpy(np.asarray(batch['input_ids']['text_encoder'])).long())[0]
  pred = unet(noisy, steps, context).sample
  mse = torch.nn.functional.mse_loss
  loss = mse(pred[:1], noise[:1]) + PRIOR_WEIGHT * mse(pred[1:], noise[1:])
  opt.zero_grad()
  loss.backward()
  grad_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
  opt.step()
  return float(loss), float(grad_norm)


@pytest.mark.parametrize('train_text_encoder', [False, True])
def test_two_steps_equal_the_pytorch_reference(tiny_sd_folder, train_text_encoder):
  from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
  from transformers import CLIPTextModel

  _, path = tiny_sd_folder
  pipe, c, fn, state, frozen = _setup(path, train_text_encoder=train_text_encoder)
  unet = UNet2DConditionModel.from_pretrained(path, subfolder='unet')
  te = CLIPTextModel.from_pretrained(path, subfolder='text_encoder')
  vae = AutoencoderKL.from_pretrained(path, subfolder='vae')
  te.requires_grad_(train_text_encoder)
  vae.requires_grad_(False)
  groups = [{'params': list(unet.parameters()), 'lr': c.train.learning_rate}]
  if train_text_encoder:
    groups.append({'params': list(te.parameters()), 'lr': c.train.text_encoder_learning_rate})
  opt = torch.optim.AdamW(
    groups, betas=(c.train.adam_b1, c.train.adam_b2), eps=c.train.adam_eps, weight_decay=c.train.weight_decay
  )
  sched = DDPMScheduler.from_config(pipe.scheduler_config)
  before = {
    'unet': {k: v.numpy().copy() for k, v in unet.state_dict().items()},
    'text_encoder': {k: v.numpy().copy() for k, v in te.state_dict().items()},
  }
  step = jax.jit(fn)
  for i in range(2):
    batch = _batch(pipe, i)
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    draws = jax.device_get(fn.draws(key, (2, 16, 16, 4)))
    state, metrics = step(state, frozen, batch)
    ref_loss, ref_norm = _torch_step(
      (unet, te, vae), opt, sched, batch, draws, [p for g in groups for p in g['params']]
    )
    assert rel_err(metrics['loss'], ref_loss) <= 1e-5
    assert rel_err(metrics['grad_norm'], ref_norm) <= 1e-4
  _set_params(pipe, jax.device_get(state['trainable']))
  trained = {'unet': unet, 'text_encoder': te}
  for name in ('unet', 'text_encoder'):
    strip = lambda sd: {k.removeprefix('text_model.'): v for k, v in sd.items()}  # transformers 5 drops it
    ours = strip(state_dict(getattr(pipe, name)))
    ref = strip({k: v.detach().numpy() for k, v in trained[name].state_dict().items()})
    before[name] = strip(before[name])
    keys = sorted(set(ours) & set(ref))
    ours_delta = np.concatenate([(ours[k] - before[name][k]).ravel() for k in keys])
    ref_delta = np.concatenate([(ref[k] - before[name][k]).ravel() for k in keys])
    if name == 'unet' or train_text_encoder:
      assert np.abs(ref_delta).max() > 0
      assert rel_err(ours_delta, ref_delta) <= 1e-4
    else:
      assert not np.any(ours_delta) and not np.any(ref_delta)


def _flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def test_no_gradient_is_computed_for_frozen_parameters(tiny_sd_folder):
  """The compiled step's cost: training the text encoder adds its backward pass; the VAE (always
  frozen) costs one forward encode and nothing more."""
  _, path = tiny_sd_folder
  pipe, _, fn, state, frozen = _setup(path, train_text_encoder=False)
  _, _, fn_te, state_te, frozen_te = _setup(path, train_text_encoder=True)
  batch = _batch(pipe, 0)
  assert not any(k.startswith(('vae/', 'text_encoder/')) for k in state['trainable'])
  assert not any(k.startswith('vae/') for k in state_te['trainable'])
  frozen_te_cost = _flops(fn, state, frozen, batch)
  trained_te_cost = _flops(fn_te, state_te, frozen_te, batch)
  te_forward = _flops(lambda ids: pipe.text_encoder(ids), batch['input_ids']['text_encoder'])
  assert trained_te_cost - frozen_te_cost >= 1.5 * te_forward  # a backward pass costs ~2 forwards
  # The same step fed cached latents instead of pixels differs by exactly the VAE encoder's forward.
  vae_forward = _flops(lambda x: pipe.vae.encode(x), batch['pixels'])
  dist = jit_call(pipe.vae, 'encode')(batch['pixels'])  # jitted: eager NNX compiles op by op
  cached = {
    'input_ids': batch['input_ids'],
    'latent_mean': dist.mean * pipe.vae.scaling_factor,
    'latent_std': dist.std * pipe.vae.scaling_factor,
  }
  with_vae = frozen_te_cost - _flops(fn, state, frozen, cached)
  assert 0.8 * vae_forward <= with_vae <= 1.2 * vae_forward
