"""VAE training (config.task='vae'): an AutoencoderKL trained on a folder of images.

    jaxdream train --config configs/vae_tiny.py --workdir DIR [--config.vae.data_dir=FOLDER]

The loss is LDM's autoencoder loss without its discriminator: an L1 or L2 reconstruction of the image from a
posterior sample (or its mean), plus `vae.kl_weight` times the KL divergence of the posterior from N(0, I)
(diffusers' DiagonalGaussianDistribution.kl(), summed over each latent, averaged over the batch). The run is
a DreamBooth run's in every other way: the same image preparation and iterator, optimizer, jitted step
(training/step.py's TrainStep), checkpoints with exact resume and logs (training/runner.py's run_steps). It
writes the trained VAE as a diffusers AutoencoderKL folder (workdir/vae) and reconstructions of dataset
images beside their inputs (TensorBoard, workdir/samples/reconstructions.png).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.diffusion.pipeline import Pipeline
from jaxdream.diffusion.tiny_model import TINY_VAE, builtin_model_folder
from jaxdream.distributed import multihost
from jaxdream.distributed.mesh import make_mesh
from jaxdream.distributed.sharding import batch_sharding, process_rows
from jaxdream.models import AutoencoderKL, init_model, load_vae, save_component
from jaxdream.nn.attention import training_implementation
from jaxdream.nn.remat import set_training_mode
from jaxdream.training import config as config_lib
from jaxdream.training.data import DataError, _crop_flip, data_source, make_iterator, prepare_dataset, scan_images
from jaxdream.training.lock import workdir_lock
from jaxdream.training.params import _set_params, lr_schedule, make_optimizer, split_models, unflatten
from jaxdream.training.runner import run_steps
from jaxdream.training.step import TrainStep, _place
from jaxdream.training.writers import loss_curve_image


def reconstruction_loss(reconstruction, target, kind: str):
  """Mean absolute ('l1') or squared ('l2') error over every pixel of the batch, in float32."""
  err = reconstruction.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.abs(err) if kind == 'l1' else jnp.square(err))


def kl_divergence(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) of each example, summed over its latent (diffusers' kl())."""
  return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def vae_loss(vae: AutoencoderKL, pixels, noise, *, recon_loss: str, kl_weight: float):
  """(loss, {'recon_loss', 'kl'}) of images (NHWC in [-1, 1]) decoded from the posterior's mean + std * noise
  (noise None: from its mean)."""
  posterior = vae.encode(pixels)
  z = posterior.mean if noise is None else posterior.mean + posterior.std * noise
  recon = reconstruction_loss(vae.decode(z), pixels, recon_loss)
  kl = jnp.mean(kl_divergence(posterior.mean, posterior.logvar))
  return recon + kl_weight * kl, {'recon_loss': recon, 'kl': kl}


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jax.jit caches on it
class VaeStep(TrainStep):
  """The VAE's training step: every parameter of the model named 'vae' is trainable."""

  graphdefs: dict
  templates: dict
  tx: object
  recon_loss: str
  kl_weight: float
  sample_posterior: bool
  ema_decay: float
  attention: str | None = None  # None: as the model was built
  remat: str = 'none'

  @classmethod
  def from_config(cls, config, graphdefs, templates, tx) -> VaeStep:
    v = config.vae
    return cls(
      graphdefs=graphdefs,
      templates=templates,
      tx=tx,
      recon_loss=v.recon_loss,
      kl_weight=v.kl_weight,
      sample_posterior=v.sample_posterior,
      ema_decay=config.train.ema_decay,
      attention=training_implementation(config.attention),
      remat=config.train.remat,
    )

  @staticmethod
  def posterior_noise(key, latent_shape):
    """The step's posterior sample noise, drawn from its key (tests draw the same)."""
    return jax.random.normal(key, latent_shape)

  def loss(self, trainable, frozen, batch, key):
    params = unflatten({**trainable, **frozen}, self.templates)['vae']
    vae = set_training_mode(nnx.merge(self.graphdefs['vae'], params), remat=self.remat, attention=self.attention)
    noise = None
    if self.sample_posterior:
      h, w = (s // vae.downsampling_factor for s in batch['pixels'].shape[1:3])
      noise = self.posterior_noise(key, (batch['pixels'].shape[0], h, w, vae.latent_channels))
    return vae_loss(vae, batch['pixels'], noise, recon_loss=self.recon_loss, kl_weight=self.kl_weight)


def load_base_vae(config) -> AutoencoderKL:
  """The VAE to train: the built-in tiny architecture at random (config.seed), a diffusers model folder's
  vae/, or an AutoencoderKL folder."""
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.compute_dtype]
  if config.model == config_lib.BUILTIN_TINY:
    return init_model(
      lambda rngs: AutoencoderKL(TINY_VAE, dtype=dtype, attention_impl=config.attention, rngs=rngs), config.seed
    )
  path = builtin_model_folder(config.model)  # builtin:tiny-base: the shipped folder
  if os.path.isfile(os.path.join(path, 'model_index.json')):
    path = os.path.join(path, 'vae')
  return load_vae(path, dtype=dtype, attention_impl=config.attention, allow_pickle=config.allow_pickle)


def train_vae(config, workdir: str) -> dict:
  """Run (or resume) a VAE training (config validated); returns a summary whose outputs name the trained
  VAE (workdir/vae, diffusers format), its reconstructions and the loss curve. Every image is checked
  before anything is built; the workdir is locked for the run."""
  d = config.data
  paths = scan_images(config.vae.data_dir, min_size=d.min_image_size, on_bad=d.on_bad_image, recursive=True)
  if not paths:
    raise DataError(f'{config.vae.data_dir}: no usable images (searched recursively)')
  os.makedirs(workdir, exist_ok=True)
  multihost.check_shared_folder(workdir)
  with workdir_lock(workdir):
    return _run(config, workdir, paths)


def _run(config, workdir, paths) -> dict:
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  b = config.train.batch_size
  n_dev = mesh.shape['data'] * mesh.shape['fsdp']
  if b % n_dev:
    raise config_lib.RunConfigError(
      f'train.batch_size={b} does not split over the {n_dev} devices of the data axes (mesh.data, mesh.fsdp)'
    )
  vae = load_base_vae(config)
  if config.resolution % vae.downsampling_factor:
    raise config_lib.RunConfigError(
      f'resolution {config.resolution} is not a multiple of the VAE factor {vae.downsampling_factor}'
    )
  pipeline = Pipeline(components={'vae': vae}, tokenizers={}, scheduler_config={})  # what the helpers take
  examples = {'instance': [{'file': p, 'prompt': '', 'concept': 0} for p in paths]}
  data_folder = multihost.primary_first(
    lambda: prepare_dataset(os.path.join(workdir, 'data'), examples, config.resolution), 'dataset'
  )
  source = data_source(data_folder, 'instance')
  batch_sh = batch_sharding(mesh)
  iterators = {'images': image_batches(config, source, process_rows(batch_sh, b))}
  graphdefs, templates, trainable = split_models(pipeline)
  groups = {'vae': (r'^vae/', config.train.learning_rate)}
  tx = make_optimizer(config, groups, {path: 'vae' for path in trainable})
  step_fn = VaeStep.from_config(config, graphdefs, templates, tx)
  state, frozen, jstep, _ = _place(step_fn, pipeline, trainable, {}, tx, mesh, config)
  shown = _shown_images(source, config)
  reconstruct = _reconstructor(graphdefs['vae'], templates)

  def next_batch():
    pixels = next(iterators['images'])['pixels']
    return {'pixels': jax.make_array_from_process_local_data(batch_sh, pixels, (b,) + pixels.shape[1:])}

  def visit(done, state, writer):  # every process: the reconstruction is a collective over the mesh
    images = reconstruct(state['trainable'], shown)
    if writer:
      writer.images(done, images, prefix='reconstructions')

  state, losses, stopped, writer = run_steps(
    config, workdir, state, frozen, jstep, next_batch, iterators, lr_schedule(config, config.train.learning_rate), visit
  )
  if stopped:
    return {'step': stopped, 'preempted': True}
  final = state['ema'] if config.train.ema_decay > 0 else state['trainable']
  images = reconstruct(final, shown)
  _set_params(pipeline, multihost.to_host(final))  # every process: gathering is a collective
  folder = os.path.join(workdir, 'samples')
  outputs = {
    'vae': os.path.join(workdir, 'vae'),
    'reconstructions': os.path.join(folder, 'reconstructions.png'),
    'loss_curve': os.path.join(folder, 'loss_curve.png'),
  }
  if multihost.is_primary():
    from jaxdream.io.images import make_grid, save_png

    save_component(pipeline.vae, outputs['vae'])
    os.makedirs(folder, exist_ok=True)
    if images:
      pairs = [im for pair in images.values() for im in pair]
      save_png(outputs['reconstructions'], make_grid(pairs, len(images), 2), 'input | reconstruction')
    else:
      del outputs['reconstructions']
    save_png(outputs['loss_curve'], loss_curve_image(losses), 'training loss')
  if writer:
    if images:
      writer.images(int(state['step']), images, prefix='reconstructions')
    writer.close()
  multihost.barrier('exported')
  return {'step': int(state['step']), 'bad_steps': int(state['bad_steps']), 'losses': losses, 'outputs': outputs}


def image_batches(config, source, rows=slice(None)):
  """The run's endless, checkpointable iterator of training batches (`rows` of each: this process's)."""
  return make_iterator(
    source,
    batch_size=config.train.batch_size,
    seed=config.seed,
    resolution=config.resolution,
    center_crop=config.data.center_crop,
    flip_p=config.data.flip_p,
    tokenize=lambda prompts: {},
    rows=rows,
  )


def _shown_images(source, config) -> dict:
  """The first validation.num_images dataset images, centre-cropped: {path under vae.data_dir: float32 HWC in
  [-1, 1]}."""
  out = {}
  for i in range(min(config.validation.num_images, len(source))):
    ex = source[i]
    name = ex['file'].decode() if isinstance(ex['file'], bytes) else str(ex['file'])
    im = _crop_flip(ex['png'], config.resolution, True, 0.0, None)
    out[os.path.relpath(name, config.vae.data_dir)] = im.astype(np.float32) / 127.5 - 1.0
  return out


def _reconstructor(graphdef, templates):
  """fn(flat trainable parameters, {name: image}) -> {name: (input, reconstruction) uint8 HWC}: the
  posterior mean decoded, under one jit."""

  @jax.jit
  def run(trainable, pixels):
    vae = nnx.merge(graphdef, unflatten(trainable, templates)['vae'])
    out = vae(pixels).astype(jnp.float32)
    return jnp.round(jnp.clip(out / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8)

  def reconstruct(trainable, images: dict) -> dict:
    if not images:
      return {}
    pixels = np.stack(list(images.values()))
    out = multihost.to_host(run(trainable, pixels))
    inputs = np.round((pixels + 1.0) * 127.5).astype(np.uint8)
    return {name: (inputs[k], out[k]) for k, name in enumerate(images)}

  return reconstruct
