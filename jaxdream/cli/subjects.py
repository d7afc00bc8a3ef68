"""`jaxdream subjects`: a concepts file (data.concepts_file) for every subject of a DreamBench-layout folder,
for per-subject LoRA runs (configs/lora_many_subjects.py)."""

from __future__ import annotations

import json
import os

from jaxdream.cli.args import check_output, int_between


def _add_subjects_parser(sub):
  p = sub.add_parser('subjects', help='write a concepts file for the subjects of a DreamBench-layout folder')
  p.add_argument('--dreambench', required=True, help='folder with <subject>/ image folders and prompts_and_classes.txt')
  p.add_argument('--out', required=True, help='the JSON concepts file to write')
  p.add_argument('--identifier', default='sks', help="each subject's rare token (one adapter per subject)")
  p.add_argument('--num-class-images', type=int_between(0), default=100, help='class-prior images per class')
  p.add_argument(
    '--class-dir', default='{workdir}/class_images', help='where each class gets its folder ({workdir}: the run)'
  )
  p.set_defaults(fn=_subjects)


def dreambench_concepts(folder: str, identifier: str = 'sks', num_class_images: int = 100, class_dir: str = ''):
  """One concept per subject (name, instance folder and prompts); subjects of one class share its class folder."""
  from jaxdream.io.dreambench import read_dreambench
  from jaxdream.training.config import default_name

  if not identifier.strip() or len(identifier.split()) > 1:
    raise ValueError(f'--identifier {identifier!r}: one word, the rare token the prompts carry')
  bench = read_dreambench(folder)
  empty = [subject for subject, cls in bench.classes.items() if not cls.strip()]
  if empty:
    raise ValueError(f'{folder}: prompts_and_classes.txt gives no class for {", ".join(empty)}')
  class_dir = class_dir or '{workdir}/class_images'
  return [
    {
      'name': default_name(subject),  # as the trainer names a folder: letters, digits, _ . -
      'identifier': identifier,
      'instance_dir': os.path.abspath(os.path.join(folder, subject)),
      'instance_prompt': f'a photo of {identifier} {cls}',
      'class_prompt': f'a photo of {cls}',
      'class_dir': os.path.join(class_dir, default_name(cls)),  # one folder per class, never nested
      'num_class_images': num_class_images,
    }
    for subject, cls in bench.classes.items()
  ]


def _subjects(args) -> int:
  from jaxdream.io.files import atomic_write

  check_output('--out', args.out, folder=False, inputs=[os.path.join(args.dreambench, 'prompts_and_classes.txt')])
  concepts = dreambench_concepts(args.dreambench, args.identifier, args.num_class_images, args.class_dir)
  atomic_write(args.out, json.dumps(concepts, indent=2) + '\n')
  classes = sorted({c['class_prompt'] for c in concepts})
  print(f'{args.out}: {len(concepts)} subjects, {len(classes)} classes')
  return 0
