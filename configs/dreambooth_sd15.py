"""DreamBooth on Stable Diffusion 1.5 (512 px, epsilon prediction), one subject, prior preservation.

  jaxdream train --config configs/dreambooth_sd15.py --workdir runs/sd15_dog \
    --config.model=/path/to/stable-diffusion-v1-5 \
    --config.concepts.0.instance_dir=/path/to/dog_photos

The model folder is a local diffusers-format copy (unet/, text_encoder/, vae/, tokenizer/, scheduler/).
Settings follow the DreamBooth paper and diffusers' train_dreambooth.py defaults.
"""

from jaxdream.training.config import base_config, concept


def get_config():
  c = base_config()
  c.model = ''  # set on the command line
  c.resolution = 512
  c.compute_dtype = 'bfloat16'  # float32 master weights; use float32 on CPU
  c.concepts = [
    concept(
      instance_dir='',
      instance_prompt='a photo of sks dog',
      class_prompt='a photo of dog',
      class_dir='{workdir}/class_images',
      num_class_images=200,
    )
  ]
  c.prior.sample_steps = 50
  c.prior.batch_size = 8
  c.train.num_steps = 800
  c.train.batch_size = 1
  c.train.learning_rate = 5e-6
  c.train.train_text_encoder = True
  c.train.text_encoder_learning_rate = 5e-6
  c.train.max_grad_norm = 1.0
  c.checkpoint.every_steps = 200
  c.validation.every_steps = 200
  c.validation.steps = 50
  return c
