"""LoRA files: the diffusers/peft layout and the kohya/A1111 one, written from and read into torch-layout factors.

A file holds, per adapted module, the down factor (r, in) / conv (r, in, kh, kw) and the up factor (out, r) /
conv (out, r, 1, 1) in torch layout, and the module's alpha (update scale alpha / r):
- diffusers/peft: `unet.<module>.lora_A.weight` / `.lora_B.weight` (older: `.lora.down.weight`,
  `.lora_linear_layer.down.weight`, `.processor.to_q_lora.down.weight`), alpha in the safetensors metadata
  `lora_adapter_metadata` (peft's LoraConfig as JSON, keys prefixed by the component: `unet.lora_alpha`, ...);
- kohya/A1111: `lora_unet_<module, '.' as '_'>.lora_down.weight` / `.lora_up.weight` / `.alpha`, `lora_te_...` for
  the text encoder (SDXL: `lora_te1_`, `lora_te2_`). SD 1.x/2.x UNet modules go by their diffusers names; SDXL's by
  the original SGM ones (`input_blocks_4_1_...`, `middle_block_1_...`, `label_emb_0_0`), as kohya's sd-scripts train
  it on that UNet and A1111/ComfyUI apply it. Reading takes either spelling for any UNet (`original_unet_names`).
Module names stay as the file spells them (dotted or underscored): they are matched against a model's modules
by `resolve`, which needs the model to undo kohya's underscores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import numpy as np
from flax import nnx

from jaxdream.io.weights import PICKLE_SUFFIXES, WeightsError, read_safetensors, write_safetensors
from jaxdream.models.single_file import key_map
from jaxdream.nn.adapters import lora_layers, module_paths

METADATA_KEY = 'lora_adapter_metadata'  # diffusers' LORA_ADAPTER_METADATA_KEY
FORMATS = ('diffusers', 'kohya')
COMPONENTS = ('unet', 'text_encoder', 'text_encoder_2')
_KOHYA_PREFIX = {'unet': 'lora_unet_', 'text_encoder': 'lora_te_', 'text_encoder_2': 'lora_te2_'}
_KOHYA_READ = {
  'lora_unet_': 'unet',
  'lora_te_': 'text_encoder',
  'lora_te1_': 'text_encoder',
  'lora_te2_': 'text_encoder_2',
}
# (key suffix, factor) of every diffusers/peft spelling: peft, diffusers' older LoRALinearLayer ones, kohya's.
_FACTOR_SUFFIXES = (
  ('.lora_A.weight', 'down'),
  ('.lora_B.weight', 'up'),
  ('.lora.down.weight', 'down'),
  ('.lora.up.weight', 'up'),
  ('.lora_linear_layer.down.weight', 'down'),
  ('.lora_linear_layer.up.weight', 'up'),
  ('.lora_down.weight', 'down'),
  ('.lora_up.weight', 'up'),
  ('.alpha', 'alpha'),
)
# diffusers' oldest attention-processor names: attn1.processor.to_q_lora.down.weight -> attn1.to_q, down
_PROCESSOR = re.compile(r'\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$')
# diffusers' oldest text-encoder LoRA files: CLIP attention named as the UNet's processors name theirs
_OLD_TEXT_ATTENTION = re.compile(r'\.self_attn\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$')
_OLD_TEXT_PROJ = {'to_q': 'q_proj', 'to_k': 'k_proj', 'to_v': 'v_proj', 'to_out': 'out_proj'}


@dataclasses.dataclass(frozen=True)
class LoRAModule:
  """One adapted module's factors in torch layout, and its alpha (None: the rank, scale 1)."""

  down: np.ndarray  # (r, in) or (r, in, kh, kw)
  up: np.ndarray  # (out, r) or (out, r, 1, 1)
  alpha: float | None = None
  rslora: bool = False

  @property
  def rank(self) -> int:
    return int(self.down.shape[0])

  @property
  def scale(self) -> float:
    alpha = self.rank if self.alpha is None else self.alpha
    return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def delta(self) -> np.ndarray:
    """scale * up @ down in the base weight's torch layout, (out, in) or (out, in, kh, kw)."""
    down = self.down.astype(np.float32)
    up = self.up.astype(np.float32).reshape(self.up.shape[0], self.rank)
    return self.scale * np.tensordot(up, down, axes=(1, 0))


@dataclasses.dataclass
class LoRAWeights:
  """A LoRA file's adapters: per component ('unet', 'text_encoder', ...), per module name as the file names it."""

  modules: dict[str, dict[str, LoRAModule]]
  format: str
  path: str | None = None

  def resolve(self, components: Mapping[str, nnx.Module]) -> tuple[dict[str, dict[str, LoRAModule]], list[str]]:
    """({component: {the model's module name: adapter}}, the file's module names that match no module)."""
    found, unmatched, spelled = {}, [], {}
    for comp, mods in self.modules.items():
      model = components.get(comp)
      index = _name_index(comp, model) if model is not None else {}
      for key, mod in mods.items():
        name = index.get(key) or index.get(key.replace('.', '_'))
        if name is None:
          unmatched.append(f'{comp}.{key}')
          continue
        if (comp, name) in spelled:  # two spellings of one layer: neither may silently replace the other
          raise WeightsError(
            f'{self.path or "LoRA"}: {comp}.{spelled[comp, name]} and {comp}.{key} both adapt {comp}.{name}'
          )
        spelled[comp, name] = key
        found.setdefault(comp, {})[name] = mod
    return found, unmatched


def _name_index(comp: str, model: nnx.Module) -> dict[str, str]:
  """{a name a file may use: the model's module name}: dotted, kohya-underscored, without 'text_model.'
  (older diffusers files), and the UNet's original SD/SGM names."""
  index, paths = {}, module_paths(model)
  for name in paths:
    if not name:
      continue
    index[name] = index[name.replace('.', '_')] = name
    if name.startswith('text_model.'):
      short = name.removeprefix('text_model.')
      index.setdefault(short, name)
      index.setdefault(short.replace('.', '_'), name)
  if comp == 'unet' and hasattr(model, 'config'):
    weighted = [n for n, m in paths.items() if n and hasattr(m, 'kernel')]  # layers, not blocks
    for name, original in original_unet_names(model.config, weighted).items():
      index.setdefault(original.replace('.', '_'), name)
  return index


def original_unet_names(config: dict, names) -> dict[str, str]:
  """{diffusers UNet module name: its original SD/SGM name} ('down_blocks.1.attentions.0.proj_in' ->
  'input_blocks.4.1.proj_in' in SDXL), for the weight layers among `names` that have one: single files' table
  (`key_map`), a module named as its weight is."""
  out = {}
  for name in names:
    try:
      [(original, _)] = key_map('unet', config, [name + '.weight']).values()
    except WeightsError:  # no original name (or a UNet without an original layout)
      continue
    out[name] = original.removesuffix('.weight')
  return out


def ldm_names(layers_per_block: int, levels: int, up_block_types=None) -> dict[str, str]:
  """Original SD (LDM) UNet block names -> diffusers ones, underscored ('input_blocks_1_1' ->
  'down_blocks_0_attentions_0'), and the resnets' inner layers: `original_unet_names` for a UNet of this shape
  (up levels as SD 1.x/2.x's unless given: the first without attention)."""
  n, up_block_types = layers_per_block, up_block_types or ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * (levels - 1)
  blocks = ['mid_block.resnets.0', 'mid_block.attentions.0', 'mid_block.resnets.1']
  for i in range(levels):
    blocks += [f'down_blocks.{i}.{part}.{j}' for part in ('resnets', 'attentions') for j in range(n)]
    blocks += [f'up_blocks.{i}.{part}.{j}' for part in ('resnets', 'attentions') for j in range(n + 1)]
  resnet_layers = ('conv1', 'conv2', 'time_emb_proj', 'conv_shortcut')
  layers = [f'{b}.{layer}' for b in blocks if '.resnets.' in b for layer in resnet_layers]
  samplers = [f'{kind}_blocks.{i}.{kind}samplers.0.conv' for i in range(levels - 1) for kind in ('down', 'up')]
  names = ['conv_in', 'conv_out', 'time_embedding.linear_1', 'time_embedding.linear_2', *blocks, *layers, *samplers]
  config = dict(layers_per_block=n, up_block_types=up_block_types)
  return {o.replace('.', '_'): d.replace('.', '_') for d, o in original_unet_names(config, names).items()}


# --- writing --------------------------------------------------------------------------------------------------


def _peft_config(layers: dict) -> dict:
  """peft's LoraConfig fields for these layers: the most common rank and alpha, others as patterns. alpha is
  written as scale * rank, which peft scales back to the layer's scale (rsLoRA included)."""
  # Names without CLIP's 'text_model.': peft's suffix rule then matches transformers 4 models (which have it)
  # and transformers 5 ones (flattened) alike.
  layers = {n.removeprefix('text_model.'): m for n, m in layers.items()}
  ranks = {n: int(m.lora_a.shape[-1]) for n, m in layers.items()}
  alphas = {n: float(m.lora_scale) * ranks[n] for n, m in layers.items()}
  r = max(set(ranks.values()), key=list(ranks.values()).count)
  alpha = max(set(alphas.values()), key=list(alphas.values()).count)
  return {
    'r': r,
    'lora_alpha': alpha,
    'target_modules': sorted(layers),
    'rank_pattern': {n: v for n, v in ranks.items() if v != r},
    'alpha_pattern': {n: v for n, v in alphas.items() if v != alpha},
    'use_rslora': False,
    'use_dora': False,
    'lora_dropout': 0.0,
    'bias': 'none',
    'init_lora_weights': True,
  }


def _kohya_prefix(comp: str, components) -> str:
  """kohya's key prefix of a component: SDXL's two text encoders are lora_te1_ and lora_te2_ (SD 1.x/2.x's one:
  lora_te_)."""
  return 'lora_te1_' if comp == 'text_encoder' and 'text_encoder_2' in components else _KOHYA_PREFIX[comp]


def _kohya_names(comp: str, components, names) -> dict[str, str]:
  """{module name: kohya's name for it, after the prefix}: the dotted name with '_' for '.', except in SDXL's UNet
  (a text_time one, or two text encoders), which kohya's sd-scripts train on the original SGM UNet
  (sdxl_original_unet): A1111 and ComfyUI apply only those names."""
  unet = components.get('unet')
  sdxl = 'text_encoder_2' in components or getattr(unet, 'config', {}).get('addition_embed_type') == 'text_time'
  if comp != 'unet' or not sdxl:
    return {n: n.replace('.', '_') for n in names}
  original = original_unet_names(unet.config, names)
  if missing := sorted(set(names) - set(original)):
    raise ValueError(f'kohya SDXL LoRA files: no original UNet name for adapted module(s) {", ".join(missing[:10])}')
  return {n: o.replace('.', '_') for n, o in original.items()}


def lora_tensors(
  components: Mapping[str, nnx.Module], *, format: str = 'diffusers'
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The LoRA layers of `components` ('unet', 'text_encoder', ...; others are ignored) as a LoRA file's tensors
  (torch layout, float32) and safetensors metadata, in diffusers' `save_lora_weights` layout or kohya's."""
  if format not in FORMATS:
    raise ValueError(f'LoRA format {format!r}: use one of {", ".join(FORMATS)}')
  tensors, config = {}, {}
  for comp in COMPONENTS:
    layers = lora_layers(components[comp]) if comp in components else {}
    kohya = _kohya_names(comp, components, layers) if format == 'kohya' and layers else {}
    for name, layer in layers.items():
      down, up = layer.torch_factors()
      if format == 'diffusers':
        tensors[f'{comp}.{name}.lora_A.weight'], tensors[f'{comp}.{name}.lora_B.weight'] = down, up
      else:
        key = _kohya_prefix(comp, components) + kohya[name]
        tensors[f'{key}.lora_down.weight'], tensors[f'{key}.lora_up.weight'] = down, up
        tensors[f'{key}.alpha'] = np.asarray(layer.lora_scale * down.shape[0], np.float32)
    if layers:
      config.update({f'{comp}.{k}': v for k, v in _peft_config(layers).items()})
  if not tensors:
    raise ValueError(f'no LoRA layers in {", ".join(components) or "no components"}: nothing to write')
  metadata = {METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)} if format == 'diffusers' else {}
  return tensors, metadata


def save_lora(path: str, components: Mapping[str, nnx.Module], *, format: str = 'diffusers') -> str:
  """Write the components' LoRA layers to one .safetensors file (atomically, float32); returns the path."""
  tensors, metadata = lora_tensors(components, format=format)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_safetensors(path, tensors, metadata)
  return path


# --- reading --------------------------------------------------------------------------------------------------


def read_safetensors_metadata(path: str) -> dict[str, str]:
  with open(path, 'rb') as f:
    n = int.from_bytes(f.read(8), 'little')
    return json.loads(f.read(n)).get('__metadata__') or {}


def _split_key(key: str) -> tuple[str, str, str] | None:
  """(component, module name, factor) of a file key, None for a key that is no LoRA factor."""
  for prefix, comp in _KOHYA_READ.items():
    if key.startswith(prefix):
      key = f'{comp}.{key[len(prefix) :]}'
      break
  m = _OLD_TEXT_ATTENTION.search(key)
  if m:
    key = f'{key[: m.start()]}.self_attn.{_OLD_TEXT_PROJ[m.group(1)]}.lora.{m.group(2)}.weight'
  m = _PROCESSOR.search(key)
  if m:
    name, factor = key[: m.start()] + '.' + (m.group(1) + '.0' if m.group(1) == 'to_out' else m.group(1)), m.group(2)
  else:
    found = [(key[: -len(suffix)], factor) for suffix, factor in _FACTOR_SUFFIXES if key.endswith(suffix)]
    if not found:
      return None
    name, factor = found[0]
  comp, _, rest = name.partition('.')
  if comp not in COMPONENTS:  # unprefixed (older files)
    comp, rest = ('text_encoder' if name.startswith('text_model') else 'unet'), name
  if comp.startswith('text_encoder'):  # one spelling per module, with or without CLIP's text_model.
    rest = rest.removeprefix('text_model.').removeprefix('text_model_')
  return comp, rest, factor


def _peft_alphas(metadata: dict[str, str]) -> dict[str, dict]:
  """{component: peft LoraConfig fields} from diffusers' metadata."""
  raw = metadata.get(METADATA_KEY)
  if not raw:
    return {}
  out = {}
  for key, value in json.loads(raw).items():
    comp, _, field = key.rpartition('.')
    out.setdefault(comp or 'unet', {})[field] = value
  return out


def _config_alpha(config: dict, name: str) -> float | None:
  """peft's alpha for a module: an alpha_pattern key that is a suffix of the name, else lora_alpha."""
  for pattern, alpha in (config.get('alpha_pattern') or {}).items():
    if re.match(rf'(.*\.)?({pattern})$', name):
      return float(alpha)
  return None if config.get('lora_alpha') is None else float(config['lora_alpha'])


def load_lora(path: str) -> LoRAWeights:
  """Read a LoRA .safetensors file in diffusers/peft or kohya/A1111 layout. Pickle files are refused (they can
  run code when loaded): convert them to safetensors first."""
  if path.endswith(PICKLE_SUFFIXES):
    raise WeightsError(
      f'{path}: a pickle LoRA file, which can run code when loaded; jaxdream reads LoRA files only as .safetensors. '
      'Convert it with torch: `safetensors.torch.save_file(torch.load(p, weights_only=True), p_without_suffix + '
      '".safetensors")`'
    )
  if not os.path.isfile(path):
    raise WeightsError(f'{path}: no such LoRA file')
  tensors = read_safetensors(path)
  configs = _peft_alphas(read_safetensors_metadata(path))
  parts: dict[tuple[str, str], dict] = {}
  keys: dict[tuple[str, str, str], str] = {}
  unknown = []
  for key, value in tensors.items():
    split = _split_key(key)
    if split is None:
      unknown.append(key)
      continue
    comp, name, factor = split
    if split in keys:  # e.g. lora_te_ and lora_te1_, or with and without text_model.: one layer named twice
      raise WeightsError(f'{path}: {keys[split]} and {key} are the same factor of {comp}.{name}')
    keys[split] = key
    parts.setdefault((comp, name), {})[factor] = value
  if unknown:
    raise WeightsError(
      f'{path}: {len(unknown)} tensor(s) that are no LoRA factors (LoHa, LoKr, DoRA and full-weight diffs are not '
      f'supported): {", ".join(sorted(unknown)[:10])}'
    )
  modules: dict[str, dict[str, LoRAModule]] = {}
  for (comp, name), p in sorted(parts.items()):
    if 'down' not in p or 'up' not in p:
      raise WeightsError(f'{path}: {comp}.{name} has {" and ".join(sorted(p))} but needs both down and up factors')
    down, up = np.asarray(p['down'], np.float32), np.asarray(p['up'], np.float32)
    if up.ndim != down.ndim or up.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
      raise WeightsError(f'{path}: {comp}.{name}: up {up.shape} and down {down.shape} do not chain')
    if down.shape[0] == 0:
      raise WeightsError(f'{path}: {comp}.{name} has rank 0 (empty factors)')
    if up.ndim == 4 and up.shape[2:] != (1, 1):  # LoCon: the kernel is the down factor's; up is 1x1
      raise WeightsError(f'{path}: {comp}.{name}: the up factor {up.shape} of a conv LoRA must be 1x1')
    config = configs.get(comp, {})
    if 'alpha' in p and np.size(p['alpha']) != 1:
      raise WeightsError(f'{path}: {comp}.{name}: alpha has shape {np.shape(p["alpha"])}, not one number')
    alpha = float(np.asarray(p['alpha']).reshape(())) if 'alpha' in p else _config_alpha(config, name)
    finite_alpha = alpha is None or np.isfinite(alpha)  # None: the rank's
    if not (np.isfinite(down).all() and np.isfinite(up).all() and finite_alpha):  # a damaged or diverged file
      raise WeightsError(f'{path}: {comp}.{name} has non-finite (NaN or infinite) factors or alpha')
    modules.setdefault(comp, {})[name] = LoRAModule(down, up, alpha, bool(config.get('use_rslora')))
  if not modules:
    raise WeightsError(f'{path}: no LoRA tensors')
  kohya = any(k.startswith(tuple(_KOHYA_READ)) for k in tensors)
  return LoRAWeights(modules, 'kohya' if kohya else 'diffusers', path)
