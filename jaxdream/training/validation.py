"""Validation samples of a run (config.validation): of the trained model, or of each subject of a per-subject
run with its own adapter."""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxdream.distributed import multihost
from jaxdream.nn.adapters import lora_layers
from jaxdream.training.subjects import padded


def _validation_prompts(config, concepts) -> list[str]:
  if config.validation.prompts:
    return list(config.validation.prompts)
  prompts = []
  for c in concepts[:4]:
    prompts += [c['instance_prompt']] + ([c['class_prompt']] if c['class_prompt'] else [])
  return prompts


def validation_samples(pipeline, config, prompts, mesh, **adapter_args) -> np.ndarray:
  """validation.num_images images of each prompt, (len(prompts) * num_images, H, W, 3); every prompt's
  images have the seeds validation.seed, + 1, ... (as if sampled alone)."""
  from jaxdream.diffusion.sampling import txt2img

  v = config.validation
  return txt2img(
    pipeline,
    prompts,
    num_images_per_prompt=v.num_images,
    negative_prompts=[v.negative_prompt] * len(prompts),
    num_inference_steps=v.steps,
    guidance_scale=v.guidance_scale,
    scheduler=v.scheduler or None,
    seed=[v.seed + k for _ in prompts for k in range(v.num_images)],
    height=config.resolution,
    width=config.resolution,
    mesh=mesh,
    **adapter_args,
  )


def _validation_images(pipeline, config, concepts, mesh) -> dict[str, np.ndarray]:
  """{prompt: images} of the run's validation prompts ({} with validation.num_images=0)."""
  out = {}
  if not config.validation.num_images:
    return out
  for prompt in _validation_prompts(config, concepts):
    out[prompt] = validation_samples(pipeline, config, [prompt], mesh)
  return out


def concept_images(concepts, images: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """{concept name: {prompt: images}} of the validation prompts that name exactly one concept's identifier
  (as a word): the images validation.metrics scores against that concept's photos."""
  out = {}
  for prompt, ims in images.items():
    owners = [c for c in concepts if c['identifier'] and c['identifier'] in prompt.split()]
    if len(owners) == 1:
      out.setdefault(owners[0]['name'], {})[prompt] = ims
  return out


class ValidationMetrics:
  """validation.metrics: DreamBench's DINO, CLIP-I and CLIP-T (jaxdream.evaluation) of each concept's
  validation images against its photos, CLIP-T with the prompt's identifier removed (the DreamBooth paper's
  protocol, docs/evaluation.md). Made before the first step: a run whose validation prompts would score nothing,
  or whose scoring weights do not load, stops there and not at its first validation, hours in. The models
  compile once, at the first call."""

  def __init__(self, config, concepts, mesh):
    from jaxdream.evaluation import load_clip, load_dino
    from jaxdream.training.config import RunConfigError

    self.config, self.concepts, self.mesh = config, {c['name']: c for c in concepts}, mesh
    groups = [[c] for c in concepts] if config.lora.per_subject else [concepts]  # each subject: its own prompts
    if not any(concept_images(g, dict.fromkeys(_validation_prompts(config, g))) for g in groups):
      raise RunConfigError(
        "validation.metrics: no validation prompt names exactly one concept's identifier (as a word), so nothing "
        'would be scored; give concepts their own identifiers, or validation.prompts that name one'
      )
    v = config.validation
    self.scorers = load_clip(v.clip_model), load_dino(v.dino_model)

  def __call__(self, by_concept: dict[str, dict[str, np.ndarray]]) -> dict | None:
    """dreambench_scores' dict ('overall', 'subjects', 'ci', ...) of {concept name: {prompt: images}}; None
    when no validation prompt names a concept."""
    from jaxdream.evaluation import dreambench_scores
    from jaxdream.io.images import list_images

    by_concept = {name: p for name, p in by_concept.items() if p}
    if not by_concept:
      return None
    real, generated, prompts = {}, {}, {}
    for name, by_prompt in by_concept.items():
      ident = self.concepts[name]['identifier']
      real[name] = list_images(self.concepts[name]['instance_dir'])
      generated[name] = [im for ims in by_prompt.values() for im in ims]
      prompts[name] = [' '.join(w for w in p.split() if w != ident) for p, ims in by_prompt.items() for _ in ims]
    return dreambench_scores(real, generated, prompts, *self.scorers, seed=self.config.seed, mesh=self.mesh)


def stacked_adapters(pipe, trainable: dict) -> dict:
  """A group's adapters (the trainer's flat paths, a leading subject axis) as the sampler's stacked tree
  (diffusion.adapters.stack_adapters'): {component: {layer: {'a', 'b'}}}, each layer's scale folded into B."""
  out = {}
  for comp, model in pipe.components.items():
    for name, layer in lora_layers(model).items():
      path = f'{comp}/{name.replace(".", "/")}/'
      a, b = np.asarray(trainable[path + 'lora_a']), np.asarray(trainable[path + 'lora_b'])
      out.setdefault(comp, {})[name] = {'a': a, 'b': np.float32(layer.lora_scale) * b}
  return out


def subject_validation_images(pipe, config, concepts, trainable, mesh) -> dict[str, dict[str, np.ndarray]]:
  """{subject name: {prompt: images}} of a group of a per-subject run: each subject's validation prompts
  (validation.prompts, or its own instance and class prompts) with its own adapter, unmerged, all subjects'
  images in one sampling call. `pipe` carries LoRA layers of the run's targets; `trainable` is the group's
  stacked adapters, its first rows those of `concepts` in order (the rest: padding, sampled too, so that a
  short last group's call has the shapes of the others' and compiles nothing new). A subject's images have
  the seeds a run of it alone gives them."""
  trainable = jax.device_get(trainable)
  prompts, ids = [], []
  for i, c in enumerate(padded(concepts, jax.tree.leaves(trainable)[0].shape[0])):
    own = _validation_prompts(config, [c])
    prompts += own
    ids += [i] * len(own)
  images = validation_samples(pipe, config, prompts, mesh, adapters=stacked_adapters(pipe, trainable), adapter_ids=ids)
  n = config.validation.num_images
  out = {}
  for k, (prompt, i) in enumerate(zip(prompts, ids)):
    if i < len(concepts):
      out.setdefault(concepts[i]['name'], {})[prompt] = images[k * n : (k + 1) * n]
  return out


def subject_sample_path(workdir, name: str, step: int) -> str:
  return os.path.join(workdir, 'samples', name, f'step_{step}.png')


def save_subject_samples(workdir, step: int, images: dict, writer=None) -> dict[str, str]:
  """Write each subject's validation images as one grid (a row per prompt) to
  workdir/samples/NAME/step_STEP.png, and to the run log's images; {name: path}."""
  from jaxdream.io.images import make_grid, save_png

  paths = {}
  for name, by_prompt in images.items():
    paths[name] = subject_sample_path(workdir, name, step)
    if multihost.is_primary():
      os.makedirs(os.path.dirname(paths[name]), exist_ok=True)
      rows = list(by_prompt.values())
      grid = make_grid(np.concatenate(rows), len(rows), len(rows[0]))
      save_png(paths[name], grid, '\n'.join(by_prompt))
  if writer:
    writer.images(step, {f'{name}: {p}': ims for name, by_prompt in images.items() for p, ims in by_prompt.items()})
  return paths
