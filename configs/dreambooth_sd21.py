"""DreamBooth on Stable Diffusion 2.1 (768 px, v-prediction: read from the model's scheduler config).

  jaxdream train --config configs/dreambooth_sd21.py --workdir runs/sd21_dog \
    --config.model=/path/to/stable-diffusion-2-1 \
    --config.concepts.0.instance_dir=/path/to/dog_photos
"""

import os

from jaxdream.training.config import config_file


def get_config():
  c = config_file(os.path.join(os.path.dirname(__file__), 'dreambooth_sd15.py'))
  c.resolution = 768
  c.train.learning_rate = 2e-6  # SD 2.x's larger text encoder and v-objective prefer a gentler rate
  c.train.text_encoder_learning_rate = 2e-6
  c.train.snr_gamma = 5.0  # min-SNR weighting, v-prediction form
  return c
