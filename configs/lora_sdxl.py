"""LoRA DreamBooth on Stable Diffusion XL base 1.0 (1024 px): rank-4 adapters on the UNet's attention projections,
with the settings of diffusers' SDXL DreamBooth LoRA README (train_dreambooth_lora_sdxl.py: learning rate 1e-4,
constant schedule, batch 1 with 4 accumulation steps, 500 steps, gaussian init, alpha = rank), prior preservation
and bfloat16 compute.

  jaxdream train --config configs/lora_sdxl.py --workdir runs/sdxl_dog_lora \
    --config.model=/path/to/stable-diffusion-xl-base-1.0 \
    --config.concepts.0.instance_dir=/path/to/dog_photos

The adapter is written to runs/sdxl_dog_lora/loras/NAME/pytorch_lora_weights.safetensors, which diffusers'
StableDiffusionXLPipeline.load_lora_weights() reads. lora.text_encoder=True adapts both text encoders (the script's
--train_text_encoder, its text-encoder rate 5e-6). The README's fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix) is
config.vae_model.
"""

import os

from jaxdream.training.config import config_file


def get_config():
  c = config_file(os.path.join(os.path.dirname(__file__), 'dreambooth_sdxl.py'))
  c.lora.rank = 4
  c.lora.alpha = 4.0
  c.lora.init = 'gaussian'  # train_dreambooth_lora_sdxl.py: init_lora_weights='gaussian'
  c.train.train_text_encoder = False
  c.train.learning_rate = 1e-4
  c.train.text_encoder_learning_rate = 5e-6  # the script's --text_encoder_lr default
  c.train.grad_accum_steps = 4
  c.train.num_steps = 2000  # micro-batches: 500 optimizer steps of 4
  c.train.remat = 'none'
  c.validation.every_steps = 400
  return c
