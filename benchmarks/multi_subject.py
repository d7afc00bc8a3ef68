"""Per-subject LoRA: S subjects trained in one `jaxdream train` job (lora.per_subject, one compiled step for
all of them) against the same S subjects as S separate `jaxdream train` jobs one after another, each
paying model load and compile as a user's job would (no shared compilation cache). Same base (the tiny
local model), same steps, same settings; the subjects are DreamBench's (../shared/dreambench) or synthetic.

  python benchmarks/multi_subject.py --subjects 8 --steps 20            # one job vs 8 jobs: wall times, ratio
  python benchmarks/multi_subject.py --subjects 1 8 32 --steps 20 --one-job-only   # steps/s per subject

Class images: every subject uses one class folder, filled once by an untimed warm-up run, so neither side
pays for prior sampling (a user's separate jobs would share it too). Prints one line per measurement and
the ratio (separate / one job): how many times faster one job trains the same adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _report
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DREAMBENCH = os.path.join(ROOT, '..', 'shared', 'dreambench')


def _subject_dirs(n: int, tmp: str) -> list[tuple[str, str]]:
  """(name, folder) of n subjects: DreamBench's where available (cycled), else synthetic images."""
  if os.path.isdir(DREAMBENCH):
    names = sorted(d for d in os.listdir(DREAMBENCH) if os.path.isdir(os.path.join(DREAMBENCH, d)))
    return [(f'{names[i % len(names)]}_{i}', os.path.join(DREAMBENCH, names[i % len(names)])) for i in range(n)]
  from PIL import Image

  rng, out = np.random.default_rng(0), []
  for i in range(n):
    folder = os.path.join(tmp, 'subjects', f's{i}')
    os.makedirs(folder, exist_ok=True)
    for j in range(4):
      Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(os.path.join(folder, f'{j}.png'))
    out.append((f's{i}', folder))
  return out


def _concept(name, folder, class_dir):
  return {
    'name': name,
    'instance_dir': folder,
    'instance_prompt': 'a photo of sks thing',
    'class_prompt': 'a photo of thing',
    'class_dir': class_dir,
    'num_class_images': 4,
  }


def _no_validation(config: str, tmp: str, samples: bool) -> str:
  """The config with the default validation prompts (a list cannot be overridden), and without samples at all
  unless `samples`: the one job's subjects are measured without theirs, as when the README's table was
  measured (per-subject runs made none then), the separate jobs with the single run's final ones."""
  path = os.path.join(tmp, 'bench_' + os.path.basename(config))
  with open(path, 'w') as f:
    f.write(
      'from jaxdream.training.config import config_file\n'
      f'def get_config():\n  c = config_file({config!r})\n  c.validation.prompts = []\n'
      + ('' if samples else '  c.validation.num_images = 0\n')
      + '  return c\n'
    )
  return path


def _train(config: str, workdir: str, overrides: list[str]) -> float:
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  t0 = time.perf_counter()
  proc = subprocess.run(
    [sys.executable, '-m', 'jaxdream.cli', 'train', '--config', config, '--workdir', workdir, *overrides],
    env=env,
    capture_output=True,
    text=True,
  )
  if proc.returncode:
    sys.exit(f'jaxdream train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--subjects', type=int, nargs='+', default=[8])
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--resolution', type=int, default=64)
  p.add_argument('--one-job-only', action='store_true', help='skip the separate jobs (steps/s per subject only)')
  p.add_argument('--repeats', type=int, default=1, help='times each measurement runs (each a fresh job or jobs)')
  p.add_argument('--json', help='write the wall times of each run to this file (benchmarks/_report.py)')
  args = p.parse_args()

  from jaxdream.diffusion.tiny_model import create_tiny_pipeline

  tmp = tempfile.mkdtemp(prefix='jaxdream-multi-subject-')
  base = create_tiny_pipeline(os.path.join(tmp, 'base'))
  class_dir = os.path.join(tmp, 'class')
  common = [
    f'--config.model={base}',
    f'--config.resolution={args.resolution}',
    f'--config.train.num_steps={args.steps}',
    '--config.checkpoint.every_steps=100000',
    '--config.prior.sample_steps=2',
  ]
  many = _no_validation(os.path.join(ROOT, 'configs', 'lora_many_subjects.py'), tmp, samples=False)
  one = _no_validation(os.path.join(ROOT, 'configs', 'lora_quickstart.py'), tmp, samples=True)
  subjects = _subject_dirs(max(args.subjects), tmp)

  def concepts_file(n):
    path = os.path.join(tmp, f'concepts-{n}.json')
    with open(path, 'w') as f:
      json.dump([_concept(name, folder, class_dir) for name, folder in subjects[:n]], f)
    return path

  # Untimed: fills the shared class folder.
  _train(
    many,
    os.path.join(tmp, 'warmup'),
    [*common[:2], '--config.train.num_steps=1', f'--config.data.concepts_file={concepts_file(1)}'],
  )
  rows = []
  for n in args.subjects:
    together = []
    for r in range(args.repeats):
      workdir = os.path.join(tmp, f'one-job-{n}-{r}')
      together.append(_train(many, workdir, [*common, f'--config.data.concepts_file={concepts_file(n)}']))
      print(
        f'S={n}: one job {together[-1]:.1f} s, {n * args.steps / together[-1]:.2f} subject-steps/s '
        '(load + compile included)',
        flush=True,
      )
    sides = [_report.side('jaxdream', together, label='one job')]
    if not args.one_job_only:
      separate = []
      for r in range(args.repeats):
        total = 0.0
        for i, (name, folder) in enumerate(subjects[:n]):
          concept = _concept(name, folder, class_dir)
          overrides = [f'--config.concepts.0.{k}={v}' for k, v in concept.items()]
          total += _train(one, os.path.join(tmp, f'alone-{n}-{r}-{i}'), [*common, *overrides])
        separate.append(total)
        print(f'S={n}: {n} separate jobs {total:.1f} s; one job is {total / together[r]:.2f}x faster', flush=True)
      sides.append(_report.side('separate', separate, label=f'{n} separate jobs'))
    work = f'per-subject LoRA, {n} subject(s) x {args.steps} steps, tiny base, {args.resolution} px'
    rows.append(_report.row(work, sides, subject_steps=n * args.steps))  # whole jobs: load + compile included
  _report.write_json(args.json, rows)


if __name__ == '__main__':
  main()
