"""Many subjects, one LoRA adapter each (lora.per_subject): every subject trains exactly as it would alone, many
of them in one compiled step. The tiny local base model by default; give a real one with --config.model.

  jaxdream train --config configs/lora_many_subjects.py --workdir outputs/many \
    --config.data.concepts_file=subjects.json --config.train.subjects_per_step=8

subjects.json lists the concepts; each needs a distinct name (it names the adapter file), e.g.
  [{"name": "rex", "instance_dir": "photos/rex", "instance_prompt": "a photo of sks dog",
    "class_prompt": "a photo of dog", "class_dir": "{workdir}/class/dog", "num_class_images": 8}, ...]
Subjects of one class share a class_dir: its images are generated once. Each subject's adapter goes to
outputs/many/loras/NAME/pytorch_lora_weights.safetensors. train.subjects_per_step subjects train together
(0: all), groups one after another; a subject whose photos are unusable is skipped and listed in
outputs/many/loras/skipped.json (data.on_bad_subject='fail' stops the run instead).
"""

import os

from jaxdream.training.config import config_file


def get_config():
  c = config_file(os.path.join(os.path.dirname(__file__), 'lora_quickstart.py'))
  c.concepts = []
  c.data.concepts_file = ''  # set on the command line
  c.data.on_bad_subject = 'skip'
  c.lora.per_subject = True
  c.train.subjects_per_step = 0  # all subjects in one step; lower it when they do not fit in memory
  c.train.num_steps = 200
  return c
