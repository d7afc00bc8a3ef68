"""Many LoRA adapters in one sampling batch (what a server needs): each image its own adapter, unmerged.

`stack_adapters` gathers N adapted models' LoRA factors into one tree with a leading adapter axis. The
sampler takes it as an argument with per-image `adapter_ids` and `adapter_scales` (arrays, so new ones
never recompile, and nothing is stored on the pipeline: concurrent calls with different adapters do not
meet). Inside the compiled loop, `set_per_example` gives each LoRA layer of the UNet and text encoders the
rows its images chose, and the layer computes its low-rank update with a per-example einsum
(jaxdream.nn.adapters) while the base weights stay shared. We chose that over vmapping the whole UNet over
the batch: the base network runs as one ordinary batched call (its attention kernels and convolutions
untouched), and only the small low-rank products are per example, as many flops as one shared adapter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdream.nn.adapters import LoRAParam, lora_layers


def _components(item) -> dict:
  """A pipeline's or a component dict's models by name."""
  return dict(item.components) if hasattr(item, 'components') else dict(item)


def _runs_per_prompt(name: str) -> bool:
  """Components called once per prompt of the guided batch (both halves), where per-image adapters apply."""
  return name == 'unet' or name.startswith('text_encoder')


def _adapter_shapes(components: dict) -> dict:
  """{component: {layer name: (A shape, B shape)}} of the models' LoRA layers."""
  shapes = {}
  for name, model in components.items():
    layers = lora_layers(model)
    if layers and not _runs_per_prompt(name):
      raise ValueError(f'{name} has LoRA layers: per-image adapters apply to the UNet and text encoders only')
    if layers:
      shapes[name] = {n: (tuple(m.lora_a.shape), tuple(m.lora_b.shape)) for n, m in layers.items()}
  return shapes


def _describe_difference(a: dict, b: dict) -> str:
  for comp in sorted(set(a) | set(b)):
    if comp not in a or comp not in b:
      return f'{comp} has LoRA layers in one and not the other'
    la, lb = a[comp], b[comp]
    if set(la) != set(lb):
      only = sorted(set(la) ^ set(lb))
      return f'{comp}: different targets ({", ".join(only[:3])}{", ..." if len(only) > 3 else ""} in only one)'
    for layer in sorted(la):
      if la[layer] != lb[layer]:
        return f'{comp}.{layer}: factor shapes {la[layer]} vs {lb[layer]} (different ranks)'
  return ''


def stack_adapters(items: list) -> dict:
  """N pipelines (or component dicts) whose UNet/text encoders carry LoRA layers with the same targets and
  ranks (nn.adapters.add_lora) -> {component: {layer name: {'a': (N, *A), 'b': (N, *B)}}}, float32, each
  adapter's `lora_scale` folded into its B (so the tree holds everything; alpha may differ per adapter)."""
  items = list(items)
  if not items:
    raise ValueError('stack_adapters: give at least one adapted pipeline')
  components = [_components(item) for item in items]
  shapes = _adapter_shapes(components[0])
  if not shapes:
    raise ValueError('stack_adapters: the first pipeline has no LoRA layers (nn.adapters.add_lora adds them)')
  for i, comps in enumerate(components[1:], 1):
    diff = _describe_difference(shapes, _adapter_shapes(comps))
    if diff:
      raise ValueError(f'stack_adapters: adapter {i} does not match adapter 0: {diff}')
  stacked = {}
  for comp in shapes:
    per_item = [lora_layers(c[comp]) for c in components]
    stacked[comp] = {
      name: {
        'a': jnp.stack([jnp.asarray(p[name].lora_a[...], jnp.float32) for p in per_item]),
        'b': jnp.stack([p[name].lora_scale * jnp.asarray(p[name].lora_b[...], jnp.float32) for p in per_item]),
      }
      for name in shapes[comp]
    }
  return stacked


def combine_adapters(weighted: list) -> dict:
  """[(tree of one adapter, weight), ...] (stack_adapters' trees, N = 1) -> one adapter that applies them all, as
  several LoRAs at once do (A1111's several tags in a prompt): each layer's update is the weighted sum of theirs.
  The factors are concatenated along the rank, A (.., r1 + r2) and B (r1 + r2, ..) with each weight folded into
  its B, so the sum is exact; a layer that only some of them adapt takes theirs. Stackable with other
  combinations of the same ranks and targets."""
  if not weighted:
    raise ValueError('combine_adapters: give at least one (adapter, weight)')
  parts: dict = {}
  for i, (tree, weight) in enumerate(weighted):
    if num_adapters(tree) != 1:
      raise ValueError(f'combine_adapters: adapter {i} stacks {num_adapters(tree)} adapters; give one each')
    for comp, layers in tree.items():
      for name, f in layers.items():
        parts.setdefault(comp, {}).setdefault(name, []).append((f['a'], weight * f['b']))
  return {
    comp: {
      name: {'a': jnp.concatenate([a for a, _ in fs], axis=-1), 'b': jnp.concatenate([b for _, b in fs], axis=1)}
      for name, fs in sorted(layers.items())
    }
    for comp, layers in sorted(parts.items())
  }


def num_adapters(adapters: dict) -> int:
  return int(jax.tree.leaves(adapters)[0].shape[0])


def check_adapters(pipeline, adapters: dict):
  """A stacked tree fits the pipeline: the same LoRA layers with the same factor shapes (any values)."""
  ours = _adapter_shapes(_components(pipeline))
  theirs = {
    comp: {name: (tuple(f['a'].shape[1:]), tuple(f['b'].shape[1:])) for name, f in layers.items()}
    for comp, layers in adapters.items()
  }
  diff = _describe_difference(theirs, ours)
  if diff:
    raise ValueError(
      'the stacked adapters do not fit the pipeline (attach LoRA layers with the same targets and ranks to it, '
      f'nn.adapters.add_lora): {diff}'
    )


def per_image(values, n_images: int, per_prompt: int, what: str) -> list:
  """One value per image: a scalar for all, or one per prompt (repeated num_images_per_prompt times)."""
  if np.ndim(values) == 0:
    return [values] * n_images
  values, n_prompts = list(values), n_images // per_prompt
  if len(values) != n_prompts:
    raise ValueError(f'{len(values)} {what} for {n_prompts} prompts: give one per prompt, or one for all')
  return [v for v in values for _ in range(per_prompt)]


def set_per_example(models: dict, adapters: dict, ids, scales):
  """Inside a traced call: each LoRA layer of `models` gets per-example factors, example i adapter ids[i]
  at weight scales[i] (the scales times the adapters' own, folded into B; the layer's scale becomes 1)."""
  for comp, layers in adapters.items():
    own = lora_layers(models[comp])
    for name, f in layers.items():
      b = jnp.take(f['b'], ids, axis=0)
      layer = own[name]
      layer.lora_a = LoRAParam(jnp.take(f['a'], ids, axis=0))
      layer.lora_b = LoRAParam(b * scales.reshape((-1,) + (1,) * (b.ndim - 1)).astype(b.dtype))
      layer.lora_scale = 1.0
