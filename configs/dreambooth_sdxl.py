"""DreamBooth on Stable Diffusion XL base 1.0 (1024 px), one subject, prior preservation, the UNet trained.

  jaxdream train --config configs/dreambooth_sdxl.py --workdir runs/sdxl_dog \
    --config.model=/path/to/stable-diffusion-xl-base-1.0 \
    --config.concepts.0.instance_dir=/path/to/dog_photos

Each example's SDXL time ids are its photo's size before resizing, its crop's top-left corner and 1024 x 1024, as
diffusers' SDXL DreamBooth scripts make them. The full UNet (2.6 B parameters) needs FSDP over several chips
(config.mesh.fsdp); train.train_text_encoder=True trains both text encoders too. The SDXL refiner cannot be
trained (its time ids take an aesthetic score). For one chip, see configs/lora_sdxl.py.
"""

import os

from jaxdream.training.config import config_file


def get_config():
  c = config_file(os.path.join(os.path.dirname(__file__), 'dreambooth_sd15.py'))
  c.resolution = 1024
  c.compute_dtype = 'bfloat16'  # float32 master weights; use float32 on CPU
  c.concepts[0].num_class_images = 100
  c.prior.batch_size = 4
  c.prior.guidance_scale = 5.0  # SDXL base's usual guidance
  c.train.learning_rate = 5e-6
  c.train.train_text_encoder = False  # two encoders (820 M parameters) more in memory and optimizer state
  c.train.text_encoder_learning_rate = 5e-6
  c.train.num_steps = 500
  c.train.remat = 'blocks'  # 1024 px activations
  c.validation.every_steps = 100
  c.validation.steps = 30
  return c
