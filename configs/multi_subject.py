"""Many subjects in one run: each has its own identifier; batches mix subjects.

  jaxdream train --config configs/multi_subject.py --workdir runs/many \
    --config.model=/path/to/stable-diffusion-v1-5 --config.data.concepts_file=subjects.json

subjects.json is a list of concepts, e.g.
  [{"instance_dir": "photos/dog", "instance_prompt": "a photo of zwx dog", "identifier": "zwx",
    "class_prompt": "a photo of dog", "class_dir": "class/dog", "num_class_images": 100}, ...]
Subjects of the same class can share a class_dir (its images are generated once). With hundreds of
subjects, train on a mesh (--config.mesh.data=-1 --config.mesh.fsdp=...) and raise train.batch_size.
"""

import os

from jaxdream.training.config import config_file


def get_config():
  c = config_file(os.path.join(os.path.dirname(__file__), 'dreambooth_sd15.py'))
  c.concepts = []
  c.data.concepts_file = ''  # set on the command line
  c.train.batch_size = 4
  c.train.num_steps = 4000
  c.train.train_text_encoder = False
  c.train.cache_latents = True  # each image is encoded once: the VAE leaves the step
  c.train.cache_text_embeddings = True  # and each prompt (the text encoder is frozen here)
  c.validation.prompts = []  # defaults to the first subjects' prompts
  return c
