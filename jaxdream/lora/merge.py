"""LoRA files onto models: merged into the base kernels (a new model), or attached as adapters (in place)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdream.io.weights import WeightsError, torch_slots
from jaxdream.lora.files import LoRAModule, LoRAWeights, load_lora
from jaxdream.nn.adapters import LoRAConv2d, LoRALinear, add_lora, lora_class, module_paths


def _as_weights(lora) -> LoRAWeights:
  return lora if isinstance(lora, LoRAWeights) else load_lora(lora)


def _check(lora: LoRAWeights, components: Mapping[str, nnx.Module], strict: bool):
  """The file's adapters by component and model module name, with their kernel slots; keys that match no
  module, or whose shapes are another model's, are an error naming them (strict) or skipped and returned."""
  found, skipped = lora.resolve(components)
  plan = {}
  for comp, mods in found.items():
    slots = torch_slots(components[comp])
    for name, mod in mods.items():
      slot = slots.get(f'{name}.weight')
      want = None if slot is None else tuple(slot.to_torch(np.zeros(slot.variable.shape, np.float32)).shape)
      got = (mod.up.shape[0], *mod.down.shape[1:])
      if want is None or want != got:
        skipped.append(f'{comp}.{name} ({"not a weight layer" if want is None else f"update {got}, model {want}"})')
      else:
        plan.setdefault(comp, {})[name] = (mod, slot)
  if skipped and strict:
    raise WeightsError(
      f'{lora.path or "LoRA"}: {len(skipped)} adapter(s) do not fit this model (a LoRA for another base model?): '
      + ', '.join(skipped[:10])
      + ('' if len(skipped) <= 10 else ', ...')
    )
  return plan, skipped


def check_lora(components: Mapping[str, nnx.Module], lora, *, strict: bool = True) -> list[str]:
  """The file's adapters that fit no module of `components` (strict: a WeightsError naming them), merging nothing."""
  return _check(_as_weights(lora), components, strict)[1]


def merge_lora_components(
  components: Mapping[str, nnx.Module], loras: Sequence, *, strict: bool = True
) -> tuple[dict[str, nnx.Module], list[str]]:
  """New components with W += scale * alpha / r * up @ down per (lora, scale) pair (a LoRAWeights or a path);
  components no file touches are the same objects, touched ones are copies sharing their untouched arrays.
  Returns (components, skipped adapters); see merge_lora."""
  deltas: dict[str, dict[str, np.ndarray]] = {}
  skipped = []
  for lora, weight in loras:
    lora = _as_weights(lora)
    plan, skip = _check(lora, components, strict)
    skipped += skip
    for comp, mods in plan.items():
      for name, (mod, _) in mods.items():
        d = deltas.setdefault(comp, {})
        d[name] = d.get(name, 0) + weight * mod.delta()
  out = dict(components)
  for comp, mods in deltas.items():
    out[comp] = model = nnx.clone(components[comp])
    new_slots = torch_slots(model)
    for name, delta in mods.items():
      var = new_slots[f'{name}.weight'].variable
      update = jnp.asarray(new_slots[f'{name}.weight'].to_jax(delta), jnp.float32)
      old = var[...]
      new = (old.astype(jnp.float32) + update).astype(old.dtype)
      # Keep its layout; an uncommitted kernel stays uncommitted: jit keys programs on committedness too, so a
      # committed copy would recompile every loop the base pipeline already compiled.
      var.set_value(jax.device_put(new, old.sharding) if old.committed else new)
  return out, skipped


def merge_lora(pipeline, loras: Sequence, *, strict: bool = True):
  """A NEW pipeline (any dataclass with `components`, e.g. jaxdream.diffusion.Pipeline; the input is untouched)
  whose kernels have each (lora, scale) pair's update added: W + scale * alpha / r * up @ down.

  strict: adapters naming no module of the pipeline, or shaped for another base model, raise a WeightsError
  naming them; with strict=False they are skipped, a warning names them, and the new pipeline's
  `lora_skipped` attribute lists them."""
  components, skipped = merge_lora_components(pipeline.components, loras, strict=strict)
  new = dataclasses.replace(pipeline, components=components)
  if skipped:
    warnings.warn(f'merge_lora skipped {len(skipped)} adapter(s): {", ".join(skipped)}', stacklevel=2)
  new.__dict__['lora_skipped'] = skipped
  return new


def apply_lora(
  components: Mapping[str, nnx.Module], lora, scale: float = 1.0, *, strict: bool = True
) -> dict[str, list[str]]:
  """Attach the file's adapters unmerged, in place: each named Linear/Conv2d becomes a LoRALinear/LoRAConv2d
  with the file's factors and scale * alpha / r. Returns {component: adapted module names}. Layers that already
  carry an adapter, or take none (nn.adapters.lora_class), are errors (merge those). With strict=False, adapters
  that fit no module are skipped with a warning naming them (as merge_lora)."""
  lora = _as_weights(lora)
  plan, skipped = _check(lora, components, strict)
  if skipped:
    warnings.warn(f'apply_lora skipped {len(skipped)} adapter(s): {", ".join(skipped)}', stacklevel=2)
  done = {}
  for comp, mods in plan.items():
    model = components[comp]
    paths = module_paths(model)
    kinds = {n: lora_class(paths[n]) for n in mods}
    bad = [n for n, cls in kinds.items() if cls is None]
    if bad:
      raise WeightsError(
        f'{lora.path or "LoRA"}: cannot attach adapters to {comp} layer(s) {", ".join(bad[:10])} '
        f'({", ".join(sorted({type(paths[n]).__name__ for n in bad}))}); merge the file instead'
      )
    for rank in sorted({m.rank for m, _ in mods.values()}):
      lin = [n for n, (m, _) in mods.items() if m.rank == rank and issubclass(kinds[n], LoRALinear)]
      conv = [n for n, (m, _) in mods.items() if m.rank == rank and issubclass(kinds[n], LoRAConv2d)]
      add_lora(model, targets=lin, rank=rank, conv_targets=conv, conv_rank=rank, key=jax.random.key(0))
    layers = module_paths(model)
    for name, (mod, _) in mods.items():
      _set_factors(layers[name], mod, scale)
    done[comp] = sorted(mods)
  return done


def _set_factors(layer: LoRALinear | LoRAConv2d, mod: LoRAModule, scale: float):
  layer.set_torch_factors(mod.down, mod.up)
  layer.lora_scale = scale * mod.scale
