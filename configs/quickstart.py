"""DreamBooth quickstart: a tiny base model made locally, the bundled sample dog, 2 CPU cores, minutes.

  jaxdream train --config configs/quickstart.py --workdir outputs/quickstart

The base model is random (no download), so the samples show what fine-tuning learned from five photos,
not a real Stable Diffusion model's skill: see configs/dreambooth_sd15.py for the real thing.

`jaxdream train --help` lists every config key with its meaning; override any with --config.<key>=<value>
(a concept's keys as --config.concepts.0.<key>). Ctrl-C saves a checkpoint; the same command resumes.
"""

import os

import jaxdream
from jaxdream.training.config import BUILTIN_TINY, base_config, concept

SAMPLE_SUBJECT = os.path.join(os.path.dirname(jaxdream.__file__), 'assets', 'sample_subject', 'dog')


def get_config():
  c = base_config()
  c.model = BUILTIN_TINY
  c.resolution = 64
  c.concepts = [
    concept(
      instance_dir=SAMPLE_SUBJECT,
      instance_prompt='a photo of sks dog',
      class_prompt='a photo of dog',
      class_dir='{workdir}/class_images',
      num_class_images=8,
    )
  ]
  c.data.flip_p = 0.5
  c.prior.sample_steps = 10
  c.prior.batch_size = 8
  c.train.num_steps = 400
  c.train.batch_size = 1
  c.train.learning_rate = 3e-4  # a tiny random model learns fast; SD 1.5 wants ~5e-6
  c.train.train_text_encoder = True
  c.train.text_encoder_learning_rate = 1e-4
  c.checkpoint.every_steps = 100
  c.logging.every_steps = 10
  c.validation.steps = 20
  c.validation.num_images = 4
  return c
