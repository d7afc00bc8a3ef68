"""The DreamBench evaluation protocol around the scores: which prompts each subject gets, the seed of every
generated image, where it is kept, and the checks that run before anything is loaded or compiled.

Each subject gets the first `num_prompts` prompts of its list (live-subject for dogs and cats, object
otherwise), written with its identifier and class for generation and without the identifier for CLIP-T
('a dog in the jungle'). Image k of prompt p of subject s is `<dir>/<s>/<p>_<k>.png`, generated with
`image_seed(seed, s, p, k)`: a stable hash of those four, so any subset of subjects or prompts regenerates the
same pixels, and images already on disk are not generated again. (A prompt's images are one batch: another
images_per_prompt may round some pixels differently, by 1/255.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from jaxdream.io.dreambench import DreamBench, DreamBenchError, read_dreambench
from jaxdream.io.images import list_images

NUM_PROMPTS = 25  # each DreamBench prompt list
IMAGES_PER_PROMPT = 4


def image_seed(seed: int, subject: str, prompt_index: int, image_index: int) -> int:
  """The sampling seed of one generated image: 32 bits of sha256 over (seed, subject, prompt, image), the same
  on every machine and Python (not `hash()`, which is salted per process)."""
  digest = hashlib.sha256(f'{seed}/{subject}/{prompt_index}/{image_index}'.encode()).digest()
  return int.from_bytes(digest[:4], 'big') >> 1  # 31 bits: the sampler's seed + b stays below 2**32


def image_name(prompt_index: int, image_index: int) -> str:
  return f'{prompt_index}_{image_index}.png'


def without_identifier(template: str, class_noun: str) -> str:
  """A DreamBench prompt template written with the class alone: 'a {0} {1} in the jungle' -> 'a dog in the jungle'."""
  return ' '.join(template.format('', class_noun).split())


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
  """One generated image of the protocol."""

  subject: str
  prompt_index: int
  image_index: int
  prompt: str  # with the identifier: what the model is sampled with
  prompt_without_identifier: str  # CLIP-T's text
  seed: int

  @property
  def name(self) -> str:
    return image_name(self.prompt_index, self.image_index)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A checked evaluation setting: the dataset, its chosen subjects and how many images each gets."""

  bench: DreamBench
  subjects: tuple[str, ...]
  num_prompts: int = NUM_PROMPTS
  images_per_prompt: int = IMAGES_PER_PROMPT
  seed: int = 0
  identifier: str = 'sks'

  def class_noun(self, subject: str) -> str:
    return self.bench.classes[subject]

  def real_images(self, subject: str) -> list[str]:
    return list_images(os.path.join(self.bench.folder, subject))

  def images(self, subject: str) -> list[GeneratedImage]:
    """The subject's generated images in order: prompt by prompt, image by image."""
    cls = self.class_noun(subject)
    return [
      GeneratedImage(
        subject, p, k, t.format(self.identifier, cls), without_identifier(t, cls), image_seed(self.seed, subject, p, k)
      )
      for p, t in enumerate(self.bench.prompts(subject)[: self.num_prompts])
      for k in range(self.images_per_prompt)
    ]

  def describe(self) -> dict:
    return {
      'dataset': self.bench.folder,
      'subjects': list(self.subjects),
      'num_prompts': self.num_prompts,
      'images_per_prompt': self.images_per_prompt,
      'seed': self.seed,
      'identifier': self.identifier,
    }


def make_protocol(
  dataset: str,
  subjects=None,
  *,
  num_prompts: int = NUM_PROMPTS,
  images_per_prompt: int = IMAGES_PER_PROMPT,
  seed: int = 0,
  identifier: str = 'sks',
) -> Protocol:
  """The protocol on a DreamBench-layout folder (all its subjects by default). Unknown subjects, subjects
  without real images and impossible counts are errors naming them."""
  if not os.path.isdir(dataset):
    raise DreamBenchError(f'--dataset {dataset}: no such folder')
  bench = read_dreambench(dataset)
  subjects = tuple(bench.classes) if not subjects else tuple(subjects)
  unknown = [s for s in subjects if s not in bench.classes]
  if unknown:
    raise DreamBenchError(f'{dataset}: no subject {", ".join(unknown)} (it has {", ".join(bench.classes)})')
  if len(set(subjects)) < len(subjects):
    raise ValueError(f'subjects listed twice: {", ".join(sorted({s for s in subjects if subjects.count(s) > 1}))}')
  longest = min(len(bench.object_prompts), len(bench.live_prompts))
  if not 1 <= num_prompts <= longest:
    raise ValueError(f'num_prompts must be in [1, {longest}] (the prompt lists of {dataset}), got {num_prompts}')
  if images_per_prompt < 1:
    raise ValueError(f'images_per_prompt must be at least 1, got {images_per_prompt}')
  if not 0 <= seed < 2**63:
    raise ValueError(f'seed must be in [0, 2**63), got {seed}')
  if not identifier.strip():
    raise ValueError('identifier must not be empty')
  protocol = Protocol(bench, subjects, num_prompts, images_per_prompt, seed, identifier)
  empty = [s for s in subjects if not protocol.real_images(s)]
  if empty:
    raise DreamBenchError(f'{dataset}: no images in the folder of {", ".join(empty)}')
  return protocol


def _names(items: list[str], limit: int = 5) -> str:
  more = f' and {len(items) - limit} more' if len(items) > limit else ''
  return ', '.join(items[:limit]) + more


def check_generated(protocol: Protocol, folder: str) -> dict[str, list[str]]:
  """{subject: image paths in protocol order} of a folder of generated images laid out as
  `folder/<subject>/<prompt_index>_<image_index>.png`; missing and unexpected files are one error naming them."""
  if not os.path.isdir(folder):
    raise ValueError(f'--images {folder}: no such folder')
  out, problems = {}, []
  for s in protocol.subjects:
    sub = os.path.join(folder, s)
    want = [im.name for im in protocol.images(s)]
    have = sorted(f for f in os.listdir(sub) if not f.startswith('.')) if os.path.isdir(sub) else []
    missing, extra = [n for n in want if n not in have], sorted(set(have) - set(want))
    if not os.path.isdir(sub):
      problems.append(f'{s}/ is missing')
    elif missing or extra:
      parts = [f'missing {_names(missing)}'] * bool(missing) + [f'unexpected {_names(extra)}'] * bool(extra)
      problems.append(f'{s}/: {"; ".join(parts)}')
    out[s] = [os.path.join(sub, n) for n in want]
  if problems:
    n, k = protocol.num_prompts, protocol.images_per_prompt
    raise ValueError(
      f'--images {folder}: expected <subject>/<prompt>_<image>.png for {n} prompt(s) x {k} image(s): '
      + ' | '.join(problems)
    )
  return out


def check_readable(paths) -> None:
  """Decode every image once, so that a broken file is an error naming it before any model is loaded."""
  from PIL import Image as PILImage

  for path in paths:
    try:
      with PILImage.open(path) as im:
        im.load()
    except (OSError, ValueError, PILImage.DecompressionBombError) as e:
      raise ValueError(f'{path}: not a readable image ({e})') from None


def missing_images(protocol: Protocol, folder: str) -> dict[str, list[GeneratedImage]]:
  """{subject: its images not yet in `folder`} (generation resumes from what is there)."""
  return {
    s: [im for im in protocol.images(s) if not os.path.exists(os.path.join(folder, s, im.name))]
    for s in protocol.subjects
  }


def generate(protocol: Protocol, pipeline_for, folder: str, *, progress=None, parameters=None, **sampling) -> int:
  """Generate the protocol's missing images into `folder/<subject>/`; returns how many were written.

  pipeline_for(subject) -> the pipeline to sample the subject with (e.g. its LoRA merged), asked only for
  subjects with missing images. Each prompt's missing images are one txt2img call with their own seeds
  (the same batch shape every call: one compile). `sampling`: txt2img's keywords (steps, guidance, ...);
  parameters(image) -> the PNG's parameters text; progress(n) is told each batch's size.
  """
  from jaxdream.diffusion.sampling import txt2img
  from jaxdream.io.images import save_png

  written = 0
  for subject, todo in missing_images(protocol, folder).items():
    if not todo:
      continue
    pipe = pipeline_for(subject)
    os.makedirs(os.path.join(folder, subject), exist_ok=True)
    by_prompt = {}
    for im in todo:
      by_prompt.setdefault(im.prompt_index, []).append(im)
    for ims in by_prompt.values():
      # Always the full per-prompt batch (missing images' seeds, padded with the first): one program.
      seeds = [im.seed for im in ims] + [ims[0].seed] * (protocol.images_per_prompt - len(ims))
      out = txt2img(pipe, [ims[0].prompt], seed=seeds, num_images_per_prompt=len(seeds), **sampling)
      for im, pixels in zip(ims, out):
        save_png(os.path.join(folder, subject, im.name), pixels, parameters(im) if parameters else None)
      written += len(ims)
      if progress is not None:
        progress(len(ims))
  return written
