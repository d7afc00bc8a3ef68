"""LoRA DreamBooth on Stable Diffusion 1.5 (512 px): rank-4 adapters on the UNet's attention projections,
with the defaults of diffusers' train_dreambooth_lora.py (learning rate 1e-4, gaussian init).

  jaxdream train --config configs/lora_sd15.py --workdir runs/sd15_dog_lora \
    --config.model=/path/to/stable-diffusion-v1-5 \
    --config.concepts.0.instance_dir=/path/to/dog_photos

The adapter is written to runs/sd15_dog_lora/loras/NAME/pytorch_lora_weights.safetensors (NAME: the photo
folder's name, or --config.concepts.0.name=...), which diffusers' pipe.load_lora_weights() reads; the base
model folder is never written. The override lora.text_encoder=True adapts the text encoder too.
"""

import os

from jaxdream.training.config import config_file


def get_config():
  c = config_file(os.path.join(os.path.dirname(__file__), 'dreambooth_sd15.py'))
  c.lora.rank = 4
  c.lora.alpha = 4.0
  c.lora.init = 'gaussian'  # train_dreambooth_lora.py: init_lora_weights='gaussian'
  c.train.train_text_encoder = False
  c.train.learning_rate = 1e-4
  c.train.text_encoder_learning_rate = 1e-4  # with lora.text_encoder=True: the script trains both at one rate
  c.train.num_steps = 500
  c.validation.every_steps = 100
  return c
