"""LoRA in the trainer: adapters added to the base pipeline as the run config says, and their export.

The adapters are the run's trainable parameters (the flat paths ending in /lora_a and /lora_b, see
params.param_groups); the base weights are frozen inputs of the step, so they get no gradient and no optimizer
state, and the checkpoints hold only the adapters.
"""

from __future__ import annotations

import os
import zlib

import jax

from jaxdream.nn.adapters import (
  LoRAConv2d,
  LoRALinear,
  add_lora,
  lora_class,
  matches_target,
  merge_lora_layers,
  module_paths,
)
from jaxdream.training.config import RunConfigError


def adapter_key(seed: int):
  """The adapters' init key of a one-adapter run: config.seed's (per-subject runs use
  training.subjects.subject_key(seed, name)); each layer's key is then folded from its name (add_lora)."""
  return jax.random.key(seed)


def _takes(module, kind) -> bool:
  """Whether `module` takes a LoRA adapter of `kind` (LoRALinear: Linear layers and GEGLU's projection)."""
  cls = lora_class(module)
  return cls is not None and issubclass(cls, kind)


def _short(name: str) -> str:
  """A layer's name as a target would give it: its last part, two when the last is an index ('to_out.0')."""
  parts = name.split('.')
  return '.'.join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _is_text_encoder(name: str) -> bool:
  return name == 'text_encoder' or name.startswith('text_encoder_')


def _unmatched(config_key: str, targets, names: list[str], what: str) -> list[str]:
  known = sorted({_short(n) for n in names})
  return [
    f'lora.{config_key}: {t!r} matches no {what} (they are: {", ".join(known[:12])}{", ..." if len(known) > 12 else ""})'
    for t in targets
    if not any(matches_target(n, [t]) for n in names)
  ]


def lora_plan(pipeline, config) -> dict[str, dict]:
  """{component: add_lora's keyword arguments but the key}, checked against the loaded model: every target
  must name a layer (a typo would silently train less). LoCon targets are resolved to the full names of the
  convolutions under `resnets` (a suffix like 'conv1' must not reach other blocks)."""
  lo = config.lora
  wanted = {'unet': ('unet_targets', lo.unet_targets)}
  if lo.text_encoder:  # every text encoder (SDXL's text_encoder_2 too), the same targets
    wanted.update(
      {
        name: ('text_encoder_targets', lo.text_encoder_targets)
        for name in pipeline.components
        if _is_text_encoder(name)
      }
    )
  plan, problems = {}, []
  for component, (config_key, targets) in wanted.items():
    paths = module_paths(pipeline.components[component])
    linears = [n for n, m in paths.items() if _takes(m, LoRALinear)]
    problems += _unmatched(config_key, targets, linears, f'Linear layer of the {component}')
    plan[component] = dict(targets=list(targets), rank=lo.rank, alpha=lo.alpha or None, rslora=lo.rslora, init=lo.init)
    if component == 'unet' and lo.conv_rank:
      convs = [n for n, m in paths.items() if _takes(m, LoRAConv2d) and 'resnets' in n.split('.')]
      problems += _unmatched('conv_targets', lo.conv_targets, convs, 'convolution under resnets of the unet')
      plan[component].update(
        conv_targets=[n for n in convs if matches_target(n, lo.conv_targets)],
        conv_rank=lo.conv_rank,
        conv_alpha=lo.conv_alpha or None,
      )
  if problems:
    raise RunConfigError('the config has problems:\n  - ' + '\n  - '.join(problems))
  return plan


def add_adapters(pipeline, plan: dict, key) -> dict[str, list[str]]:
  """Add the planned adapters to the pipeline's components, in place; {component: adapted layer names}.
  Each component's key is folded from its name, so two components' layers of one name differ."""
  return {
    component: add_lora(
      pipeline.components[component], key=jax.random.fold_in(key, zlib.crc32(component.encode())), **kwargs
    )
    for component, kwargs in plan.items()
  }


def lora_paths(workdir: str, name: str, kohya: bool = False) -> dict[str, str]:
  """Where a run's adapter `name` is written: the diffusers/peft layout (and the kohya/A1111 one)."""
  paths = {'lora': os.path.join(workdir, 'loras', name, 'pytorch_lora_weights.safetensors')}
  if kohya:
    paths['lora_kohya'] = os.path.join(workdir, 'loras', name + '.safetensors')
  return paths


def export_adapters(pipeline, components, paths: dict[str, str]):
  """Write the adapters that `components` of the pipeline carry (their trained or EMA values) to the
  lora_paths() files."""
  from jaxdream.lora.files import save_lora  # jaxdream/lora: LoRA files in the diffusers/peft and kohya layouts

  modules = {c: pipeline.components[c] for c in components}
  os.makedirs(os.path.dirname(paths['lora']), exist_ok=True)
  save_lora(paths['lora'], modules)
  if 'lora_kohya' in paths:
    save_lora(paths['lora_kohya'], modules, format='kohya')


def merge_adapters(pipeline):
  """Fold every component's adapters into its base weights, in place (a plain model to export)."""
  for model in pipeline.components.values():
    merge_lora_layers(model)
