"""LoRA DreamBooth quickstart: jaxdream's tiny base model (builtin:tiny-base), the bundled sample dog, rank-4 adapters; about two
minutes on 2 CPU cores (115 s measured from a cold compilation cache).

  jaxdream train --config configs/lora_quickstart.py --workdir outputs/lora_quickstart

Only the adapters train (the base model's files are left as they are); the run writes them to
outputs/lora_quickstart/loras/dog/pytorch_lora_weights.safetensors, the layout diffusers' load_lora_weights
reads. As overrides, lora.text_encoder=True adapts the text encoder too,
lora.export_kohya=True adds an A1111/kohya file, lora.export_merged=True a merged diffusers model in
outputs/lora_quickstart/model. See configs/lora_sd15.py for Stable Diffusion 1.5.
"""

import os

from jaxdream.training.config import config_file


def get_config():
  c = config_file(os.path.join(os.path.dirname(__file__), 'quickstart.py'))
  c.lora.rank = 4
  c.train.train_text_encoder = False  # LoRA adapts it instead: lora.text_encoder
  c.train.learning_rate = 1e-3  # adapters start at zero and take larger steps than full fine-tuning
  c.train.num_steps = 200
  c.checkpoint.every_steps = 100
  return c
