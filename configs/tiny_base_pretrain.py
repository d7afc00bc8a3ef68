"""Text-to-image pretraining of the tiny base model: the built-in tiny UNet and text encoder from random weights,
on DreamBench without the quickstart's dog, each photo captioned "a photo of CLASS" (training/pretrain_data.py).

  jaxdream train --config configs/tiny_base_pretrain.py --workdir outputs/tiny_base_pretrain \
    [--config.vae_model=outputs/tiny_vae/vae]

DreamBench is read from ../shared/dreambench (beside the clone); another copy with
--config=configs/tiny_base_pretrain.py:DIR. No prior preservation and no identifier: every subject is a concept
whose prompt is its caption (a caption sidecar, photo.txt, replaces it: caption_mode='replace', so a folder of
captioned photos trains the same way, as --config.data.concepts_file or concepts.N.instance_dir). One prompt in
ten is dropped to the empty one, which classifier-free guidance samples against.

--config.vae_model puts a trained VAE (a task='vae' run's workdir/vae, configs/vae_tiny.py) in place of the
random one; it stays frozen and is exported in workdir/model, the diffusers folder of the new base.
scripts/make_tiny_base.sh runs both: the VAE, then this. Overrides worth knowing: train.num_steps,
train.batch_size, train.learning_rate (the UNet's) and train.text_encoder_learning_rate.
"""

import os

from jaxdream.training.config import BUILTIN_TINY, base_config, concept
from jaxdream.training.pretrain_data import pretraining_concepts

DREAMBENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'dreambench')


def get_config(dreambench=None):
  dreambench = dreambench or DREAMBENCH
  if not os.path.isdir(dreambench):
    raise FileNotFoundError(
      f'no DreamBench at {os.path.normpath(dreambench)}: give its folder as --config=configs/tiny_base_pretrain.py:DIR'
    )
  c = base_config()
  c.model = BUILTIN_TINY  # random UNet and text encoder (jaxdream/diffusion/tiny_model.py)
  c.resolution = 64
  c.concepts = [concept(**subject) for subject in pretraining_concepts(dreambench)]
  c.prior.enabled = False
  c.data.caption_mode = 'replace'
  c.data.center_crop = False  # random crops and flips: more views of ~150 photos
  c.data.flip_p = 0.5
  c.data.min_instance_images = 1
  c.train.num_steps = 4000
  c.train.batch_size = 8
  c.train.learning_rate = 2e-4  # from scratch: far above fine-tuning's
  c.train.train_text_encoder = True
  c.train.text_encoder_learning_rate = 1e-4
  c.train.lr_schedule = 'warmup_constant'
  c.train.warmup_steps = 100
  c.train.caption_dropout = 0.1
  c.train.snr_gamma = 5.0  # min-SNR weighting: faster convergence from scratch
  c.train.ema_decay = 0.999  # the exported weights
  c.checkpoint.every_steps = 250
  c.logging.every_steps = 25
  c.validation.every_steps = 500
  c.validation.prompts = ['a photo of backpack', 'a photo of teapot', 'a photo of cat', 'a photo of dog']
  c.validation.num_images = 2
  c.validation.steps = 20
  return c
