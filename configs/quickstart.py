"""DreamBooth quickstart: jaxdream's own tiny base model, the bundled sample dog, 2 CPU cores, about 2 minutes.

  jaxdream train --config configs/quickstart.py --workdir outputs/quickstart

The base is `builtin:tiny-base` (jaxdream/assets/tiny_base: a 64 px model jaxdream trained on DreamBench photos
that leave this dog out; no download), so "a photo of sks dog" comes out with the dog's colours and setting
while "a photo of dog" stays one of the dogs the base knows: a toy's skill, not a real Stable Diffusion
model's (configs/dreambooth_sd15.py is the real thing). With model 'builtin:tiny' it fine-tunes a random one.

`jaxdream train --help` lists every config key with its meaning; override any with --config.<key>=<value>
(a concept's keys as --config.concepts.0.<key>). Ctrl-C saves a checkpoint; the same command resumes.
"""

import os

import jaxdream
from jaxdream.training.config import BUILTIN_TINY_BASE, base_config, concept

SAMPLE_SUBJECT = os.path.join(os.path.dirname(jaxdream.__file__), 'assets', 'sample_subject', 'dog')


def get_config():
  c = base_config()
  c.model = BUILTIN_TINY_BASE
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
  c.train.learning_rate = 3e-4  # a tiny model learns fast; SD 1.5 wants ~5e-6
  c.train.train_text_encoder = True
  c.train.text_encoder_learning_rate = 1e-4
  c.checkpoint.every_steps = 100
  c.logging.every_steps = 10
  c.validation.steps = 20
  c.validation.num_images = 4
  return c
