"""VAE training (config.task='vae'): one step equals diffusers' AutoencoderKL trained by torch (loss, gradients,
clipped AdamW update); a whole run exports a VAE that diffusers loads and resumes to bitwise-identical
weights; bad VAE settings are refused before anything is built."""

import contextlib
import copy
import glob
import os

import jax
import numpy as np
import pytest
import torch
from conftest import VAE, nchw, perturb_, rel_err

import jaxdream
from jaxdream.diffusion.pipeline import Pipeline
from jaxdream.io.weights import read_safetensors, state_dict
from jaxdream.models import load_vae
from jaxdream.training import config as config_lib
from jaxdream.training import vae as vae_lib
from jaxdream.training.data import data_source
from jaxdream.training.params import _set_params, split_models
from jaxdream.training.step import step_key
from jaxdream.training.vae import VaeStep, image_batches, kl_divergence, reconstruction_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE_TINY = os.path.join(ROOT, 'configs', 'vae_tiny.py')
SAMPLE = os.path.join(os.path.dirname(jaxdream.__file__), 'assets', 'sample_subject')
VAE_FILE = os.path.join('vae', 'diffusion_pytorch_model.safetensors')
VAE_TWO_LEVELS = dict(
  VAE,
  block_out_channels=(32, 64),
  down_block_types=('DownEncoderBlock2D',) * 2,
  up_block_types=('UpDecoderBlock2D',) * 2,
)


def _torch_named(pipe, flat: dict) -> dict:
  """Flat jaxdream 'vae/...' arrays as diffusers names them (torch layout), written into `pipe`'s VAE: the
  export's own conversion."""
  _set_params(pipe, jax.device_get(flat))
  return {k: np.asarray(v) for k, v in state_dict(pipe.vae).items()}


def _run_config(model_path, num_steps):
  """A whole VAE run's config: 2 images a step, EMA, a checkpoint every step."""
  c = config_lib.config_file(VAE_TINY)
  c.model = model_path  # conftest's tiny AutoencoderKL (the built-in tiny VAE's architecture): no init to compile
  c.resolution = 32
  c.vae.data_dir = SAMPLE
  c.vae.kl_weight = 0.1  # large enough for the KL term to show in the loss and gradients
  c.train.num_steps, c.train.batch_size, c.train.learning_rate = num_steps, 2, 1e-3
  c.train.max_grad_norm = 0.05  # below the gradient's norm: the clipping acts
  c.train.ema_decay = 0.9  # the exported weights are the EMA ones: they resume too
  c.checkpoint.every_steps, c.logging.every_steps = 1, 1
  c.validation.every_steps, c.validation.num_images = 2, 2
  return c


@pytest.fixture(scope='module')
def small_vae(tmp_path_factory):
  """conftest's tiny VAE cut to two levels: every kind of block, fewer parameters to trace, compile and save."""
  from diffusers import AutoencoderKL

  torch.manual_seed(2)
  model = perturb_(AutoencoderKL(**VAE_TWO_LEVELS), seed=2)
  path = str(tmp_path_factory.mktemp('vae_two_levels'))
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope='module')
def straight(small_vae, tmp_path_factory):
  """A 2-step VAE run from conftest's tiny VAE: (config, workdir, summary)."""
  from jaxdream.training.loop import train

  config = _run_config(small_vae[1], 2)
  workdir = str(tmp_path_factory.mktemp('vae_runs') / 'straight')
  with _one_device():
    return config, workdir, train(config, workdir)


@contextlib.contextmanager
def _one_device():
  """Runs on one device: on the 8-device mesh the step compiles a third slower and computes 8 times over (the
  sharded loop, shared with DreamBooth runs, is tested on 8 devices in test_train_run.py)."""
  from jaxdream.distributed.mesh import make_mesh

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(vae_lib, 'make_mesh', lambda *sizes: make_mesh(*sizes, devices=jax.devices()[:1]))
    yield


def _restored(workdir, step) -> dict:
  """The run state saved at `step`, as host arrays."""
  import orbax.checkpoint as ocp

  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state',)) as mngr:
    return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))['state']


def test_a_vae_runs_first_step_equals_diffusers_loss_gradients_and_clipped_adamw_update(straight, small_vae):
  """The run's own first step (its batch, its posterior draw, its checkpoint) against diffusers' AutoencoderKL
  trained by torch on the same batch and noise: loss and gradients to 1e-5, the AdamW update to 1e-4."""
  config, workdir, summary = straight
  model, path = small_vae
  model = copy.deepcopy(model).train()  # the session's model stays as it is
  t = config.train
  (folder,) = glob.glob(os.path.join(workdir, 'data', '*'))
  x = next(image_batches(config, data_source(folder, 'instance')))['pixels']  # the run's first batch
  step1 = _restored(workdir, 1)
  key = step_key({'rng': step1['rng'], 'step': 0})  # the first step's key
  pipe = Pipeline(components={'vae': load_vae(path)}, tokenizers={}, scheduler_config={})
  graphdefs, templates, trainable = split_models(pipe)
  step_fn = VaeStep.from_config(config, graphdefs, templates, None)
  noise = step_fn.posterior_noise(key, (2, 16, 16, 4))
  (loss, aux), grads = jax.jit(jax.value_and_grad(step_fn.loss, has_aux=True))(trainable, {}, {'pixels': x}, key)
  norm = float(np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in grads.values())))
  assert norm > 2 * t.max_grad_norm, norm  # the clipping acts

  # diffusers, with the same posterior noise, torch's clipping and AdamW.
  xt = torch.tensor(nchw(x))
  posterior = model.encode(xt).latent_dist
  rec = model.decode(posterior.mean + posterior.std * torch.tensor(nchw(noise))).sample
  t_recon, t_kl = (rec - xt).abs().mean(), posterior.kl().mean()
  t_loss = t_recon + config.vae.kl_weight * t_kl
  t_loss.backward()
  for ours, theirs in (
    (loss, t_loss),
    (aux['recon_loss'], t_recon),
    (aux['kl'], t_kl),
    (summary['losses'][0][1], t_loss),
  ):
    assert rel_err(ours, theirs.item()) <= 1e-5, (float(ours), theirs.item())
  assert t_kl.item() * config.vae.kl_weight > 1e-3 * t_loss.item()  # the KL term is part of what was compared
  names = sorted(n for n, _ in model.named_parameters())
  ours = _torch_named(pipe, grads)
  theirs = {n: p.grad.numpy() for n, p in model.named_parameters()}
  assert sorted(ours) == names
  assert (
    rel_err(np.concatenate([ours[n].ravel() for n in names]), np.concatenate([theirs[n].ravel() for n in names]))
    <= 1e-5
  )

  before = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
  torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
  torch.optim.AdamW(
    model.parameters(), lr=t.learning_rate, betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps, weight_decay=t.weight_decay
  ).step()
  after, torch_after = _torch_named(pipe, step1['trainable']), dict(model.named_parameters())
  ours = np.concatenate([(after[n] - before[n]).ravel() for n in names])
  theirs = np.concatenate([(torch_after[n].detach().numpy() - before[n]).ravel() for n in names])
  assert rel_err(ours, theirs) <= 1e-4  # of the update (3.8e-5 measured; gradients 1.1e-6)
  assert int(step1['step']) == 1 and int(step1['bad_steps']) == 0

  # The other reconstruction loss and the KL divergence against torch's on the same posterior.
  m, lv = posterior.mean.detach().numpy(), posterior.logvar.detach().numpy()
  assert rel_err(kl_divergence(m, lv), posterior.kl().detach().numpy()) <= 1e-6
  r = rec.detach().numpy()
  assert rel_err(reconstruction_loss(r, nchw(x), 'l2'), torch.nn.functional.mse_loss(rec, xt).item()) <= 1e-6


def test_vae_run_exports_a_vae_diffusers_loads_and_resumes_to_bitwise_identical_weights(straight, small_vae, tmp_path):
  import shutil

  from diffusers import AutoencoderKL
  from PIL import Image

  from jaxdream.training.loop import train

  config, workdir, summary = straight
  assert summary['step'] == 2 and [s for s, _ in summary['losses']] == [1, 2]
  out = summary['outputs']
  assert out['vae'] == os.path.join(workdir, 'vae')
  model, info = AutoencoderKL.from_pretrained(out['vae'], output_loading_info=True)
  assert not any(info.values()), info  # no missing, unexpected or mismatched weights
  assert list(model.config.block_out_channels) == [32, 64]
  assert Image.open(out['reconstructions']).size == (64, 64)  # 2 images x (input | reconstruction) of 32 px
  folder = os.path.join(workdir, 'tensorboard')
  events = b''.join(open(os.path.join(folder, f), 'rb').read() for f in os.listdir(folder))
  for tag in (b'reconstructions/00', b'reconstructions/01', b'train/recon_loss', b'train/kl', b'train/grad_norm'):
    assert tag in events, tag

  # A run stopped after step 1 (its step-2 checkpoint and export gone), resumed: the straight run's weights.
  resumed = shutil.copytree(workdir, str(tmp_path / 'resumed'))
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '2'))
  shutil.rmtree(os.path.join(resumed, 'vae'))
  with _one_device():
    summary2 = train(config, resumed)
  assert summary2['losses'] == summary['losses'] and summary2['step'] == 2
  a, b = read_safetensors(os.path.join(workdir, VAE_FILE)), read_safetensors(os.path.join(resumed, VAE_FILE))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  initial = read_safetensors(os.path.join(small_vae[1], 'diffusion_pytorch_model.safetensors'))
  assert sum(not np.array_equal(a[k], initial[k]) for k in a) > len(a) // 2  # the run trained the weights


def test_misspelt_or_unused_vae_settings_are_refused_before_anything_is_built(tmp_path, capsys):
  from jaxdream.cli import main

  shipped = config_lib.config_file(VAE_TINY)
  shipped.lock()  # as the command line has it
  config_lib.validate(shipped)  # valid as it is
  c = config_lib.config_file(VAE_TINY)
  c.vae.kl_wieght = 1.0  # a config file's typo (the config is locked only after get_config)
  c.vae.recon_loss, c.vae.data_dir = 'l3', str(tmp_path / 'missing')
  c.train.train_text_encoder = True
  with pytest.raises(config_lib.RunConfigError) as e:
    config_lib.validate(c)
  for message in (
    "unknown config key 'vae.kl_wieght'; did you mean 'vae.kl_weight'?",
    "vae.recon_loss='l3': choose one of ('l1', 'l2')",
    f"vae.data_dir='{tmp_path}/missing' does not exist",
    "train.train_text_encoder=True is a DreamBooth setting that task='vae' does not use",
  ):
    assert message in str(e.value), str(e.value)
  c = config_lib.config_file(os.path.join(ROOT, 'configs', 'quickstart.py'))
  c.vae.data_dir = SAMPLE  # task='vae' forgotten
  with pytest.raises(config_lib.RunConfigError, match=r"vae.data_dir is set but task='dreambooth': set task='vae'"):
    config_lib.validate(c)
  # On the command line the locked config names the nearest key.
  code = main(['train', '--config', VAE_TINY, '--workdir', str(tmp_path / 'w'), '--config.vae.kl_wieght=1.0'])
  assert code == 2 and "did you mean 'vae.kl_weight'?" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / 'w')
  # The vae group defines a VAE run (a changed one is not resumed), and is no part of a DreamBooth run's.
  a, b = config_lib.config_file(VAE_TINY), config_lib.config_file(VAE_TINY)
  b.vae.kl_weight = 1.0
  differences = config_lib.config_differences(config_lib.run_defining(a), config_lib.run_defining(b))
  assert len(differences) == 1 and differences[0].startswith("vae: checkpoint has {'data_dir'"), differences
  quickstart = config_lib.run_defining(config_lib.config_file(os.path.join(ROOT, 'configs', 'quickstart.py')))
  assert 'vae' not in quickstart and 'task' not in quickstart  # checkpoints from before VAE runs stay resumable
