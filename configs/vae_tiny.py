"""VAE training: the tiny built-in AutoencoderKL architecture from random weights, on an image folder.

  jaxdream train --config configs/vae_tiny.py --workdir outputs/vae_tiny

By default it trains on the photos the package ships (jaxdream/assets/sample_subject), so it runs on a
fresh clone in minutes on CPU; train on your own images (any folder, searched recursively) with
--config.vae.data_dir=FOLDER, and with an L2 reconstruction loss with --config.vae.recon_loss=l2.

It writes workdir/vae (a diffusers AutoencoderKL folder: AutoencoderKL.from_pretrained loads it),
workdir/samples/reconstructions.png (input | reconstruction) and TensorBoard logs with the reconstructions.
To fine-tune an existing VAE, set config.model to a diffusers model folder (its vae/ is trained) or to an
AutoencoderKL folder.
"""

import os

import jaxdream
from jaxdream.training.config import BUILTIN_TINY, base_config

SAMPLE_IMAGES = os.path.join(os.path.dirname(jaxdream.__file__), 'assets', 'sample_subject')


def get_config():
  c = base_config()
  c.task = 'vae'
  c.model = BUILTIN_TINY  # the tiny model's VAE architecture (jaxdream/diffusion/tiny_model.py), random
  c.resolution = 64
  c.concepts = []  # a VAE run has no concepts
  c.prior.enabled = False
  c.vae.data_dir = SAMPLE_IMAGES
  c.vae.recon_loss = 'l1'
  c.vae.kl_weight = 1e-6  # LDM's autoencoders: the latents stay close to the posterior's mean
  c.vae.sample_posterior = True
  c.data.center_crop = False  # random crops and flips: more views of few images
  c.data.flip_p = 0.5
  c.train.num_steps = 400
  c.train.batch_size = 1
  c.train.learning_rate = 1e-4
  c.checkpoint.every_steps = 100
  c.logging.every_steps = 10
  c.validation.every_steps = 100  # reconstructions in TensorBoard
  c.validation.num_images = 4  # dataset images reconstructed
  return c
