"""Single-file checkpoints in the original CompVis/Stability layout (what A1111, SD.Next and ComfyUI keep): SD 1.x,
SD 2.x, their inpainting models, SDXL base and refiner, as one state dict whose prefixes name the parts
(`model.diffusion_model.` the UNet, `first_stage_model.` the VAE, `cond_stage_model.` / `conditioner.embedders.N.`
the text encoders).

The model type is inferred from the keys as diffusers' single-file loader does (`infer_diffusers_model_type`). The
names map through one table, `key_map`: for every diffusers/transformers parameter of a component, the original key
it lives in and how its layout differs. Loading reads it one way (`from_single_file`), saving the other
(`to_single_file`), so the two directions cannot disagree.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from jaxdream.io.weights import WeightsError
from jaxdream.models import presets

UNET, VAE = 'model.diffusion_model.', 'first_stage_model.'
EMA = 'model_ema.'  # LDM's EMA copy of the UNet: model_ema.<UNet key without 'model.' and without dots>


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a model family's components live in a single file: component -> (key prefix, key map kind)."""

  parts: dict
  pipeline_class: str = 'StableDiffusionPipeline'


LAYOUTS = {
  'sd1': Layout(
    {'unet': (UNET, 'unet'), 'vae': (VAE, 'vae'), 'text_encoder': ('cond_stage_model.transformer.', 'clip')}
  ),
  'sd2': Layout(
    {'unet': (UNET, 'unet'), 'vae': (VAE, 'vae'), 'text_encoder': ('cond_stage_model.model.', 'open_clip')}
  ),
  'sdxl': Layout(
    {
      'unet': (UNET, 'unet'),
      'vae': (VAE, 'vae'),
      'text_encoder': ('conditioner.embedders.0.transformer.', 'clip'),
      'text_encoder_2': ('conditioner.embedders.1.model.', 'open_clip'),
    },
    'StableDiffusionXLPipeline',
  ),
  'sdxl_refiner': Layout(
    {'unet': (UNET, 'unet'), 'vae': (VAE, 'vae'), 'text_encoder_2': ('conditioner.embedders.0.model.', 'open_clip')},
    'StableDiffusionXLImg2ImgPipeline',
  ),
}
# diffusers' model type names -> the layout of their files.
MODEL_TYPES = {
  'v1': 'sd1',
  'inpainting': 'sd1',
  'v2': 'sd2',
  'inpainting_v2': 'sd2',
  'xl_base': 'sdxl',
  'xl_inpaint': 'sdxl',
  'xl_refiner': 'sdxl_refiner',
}
# What each model type is, in words (jaxdream inspect).
DESCRIPTIONS = {
  'v1': 'SD 1.x',
  'inpainting': 'SD 1.x inpainting',
  'v2': 'SD 2.x',
  'inpainting_v2': 'SD 2.x inpainting',
  'xl_base': 'SDXL base',
  'xl_inpaint': 'SDXL inpainting',
  'xl_refiner': 'SDXL refiner',
}
# Published configs per model type (models/presets.py), for files that come without a config folder.
_SD15 = dict(unet=presets.SD15_UNET, vae=presets.SD_VAE, text_encoder=presets.SD15_TEXT_ENCODER)
_SD21 = dict(unet=presets.SD21_UNET, vae=presets.SD_VAE, text_encoder=presets.SD21_TEXT_ENCODER)
_SDXL = dict(
  unet=presets.SDXL_UNET,
  vae=presets.SDXL_VAE,
  text_encoder=presets.SDXL_TEXT_ENCODER,
  text_encoder_2=presets.SDXL_TEXT_ENCODER_2,
)
PRESETS = {
  'v1': _SD15,
  'inpainting': dict(_SD15, unet=dict(presets.SD15_UNET, in_channels=9)),
  'v2': _SD21,
  'inpainting_v2': dict(_SD21, unet=dict(presets.SD21_UNET, in_channels=9, sample_size=64)),
  'xl_base': _SDXL,
  'xl_inpaint': dict(_SDXL, unet=dict(presets.SDXL_UNET, in_channels=9)),
  'xl_refiner': dict(unet=presets.SDXL_REFINER_UNET, vae=presets.SDXL_VAE, text_encoder_2=presets.SDXL_TEXT_ENCODER_2),
}
# Keys that hold no parameter of the diffusers models: CLIP's position ids buffer, OpenCLIP's logit scale and
# attention mask. SD 2.x's OpenCLIP keeps its last layer and text projection, which SD 2.x never uses (it reads the
# penultimate layer): the diffusers text encoder has one layer less and no projection.
_IGNORED = (r'.*\.position_ids', r'logit_scale', r'attn_mask')
_SD2_UNUSED = r'text_projection|transformer\.resblocks\.{n}\..*'


def infer_model_type(tensors) -> str:
  """diffusers' model type of a single file ('v1', 'v2', 'inpainting', 'inpainting_v2', 'xl_base', 'xl_inpaint',
  'xl_refiner') from its key names and shapes (`tensors`: key -> array or anything with a shape). As diffusers'
  loader, with the text encoders' prefixes standing in for its probes of deep layers, which small models lack."""
  if f'{UNET}input_blocks.0.0.weight' not in tensors:
    if _has_prefix(tensors, UNET):  # SD3, Flux, PixArt...: the same prefix, another architecture
      found = sorted({k[len(UNET) :].split('.')[0] for k in tensors if k.startswith(UNET)})[:8]
      raise WeightsError(
        f'not a Stable Diffusion UNet checkpoint: its {UNET}* holds {", ".join(found)}, not a UNet '
        '(input_blocks, middle_block, output_blocks); SD3, Flux and other transformer models are not supported'
      )
    found = sorted({'.'.join(k.split('.')[:2]) + '.' for k in tensors})[:8]
    raise WeightsError(
      f'not a Stable Diffusion single-file checkpoint: expected the original (CompVis/Stability) layout, '
      f'{UNET}* (UNet), {VAE}* (VAE) and cond_stage_model.* (SD 1.x/2.x) or conditioner.embedders.* (SDXL) text '
      f'encoders; the file has {", ".join(found) or "no tensors"}'
    )
  if 'edm_mean' in tensors or 'edm_std' in tensors:  # diffusers' probe for Playground v2.5
    raise WeightsError(
      'a Playground v2.5 checkpoint (edm_mean/edm_std): its EDM scheduler and latent statistics are not supported'
    )
  inpaint = tuple(tensors[f'{UNET}input_blocks.0.0.weight'].shape)[1] == 9
  if _has_prefix(tensors, LAYOUTS['sdxl'].parts['text_encoder_2'][0]):
    return 'xl_inpaint' if inpaint else 'xl_base'
  if _has_prefix(tensors, LAYOUTS['sdxl_refiner'].parts['text_encoder_2'][0]):
    return 'xl_refiner'
  # diffusers: SD 2.x when the second input level's cross-attention reads 1024 features (OpenCLIP ViT-H)
  to_k = tensors.get(f'{UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight')
  v2 = _has_prefix(tensors, LAYOUTS['sd2'].parts['text_encoder'][0]) or (
    to_k is not None and tuple(to_k.shape)[-1] == 1024
  )
  if inpaint:
    return 'inpainting_v2' if v2 else 'inpainting'
  return 'v2' if v2 else 'v1'


def default_prediction_type(model_type: str, tensors=None) -> str:
  """As diffusers' single-file loader: SD 2.x (768 px, not its inpainting model) predicts v, except SD 2.0 base
  (trained 875,000 steps: the file's `global_step`, when it has one)."""
  step = (tensors or {}).get('global_step')
  if model_type == 'v2' and (step is None or int(np.asarray(step).reshape(-1)[0]) != 875000):
    return 'v_prediction'
  return 'epsilon'


def _has_prefix(tensors, prefix: str) -> bool:
  return any(k.startswith(prefix) for k in tensors)


_RESNET = {
  'norm1': 'in_layers.0',
  'conv1': 'in_layers.2',
  'norm2': 'out_layers.0',
  'conv2': 'out_layers.3',
  'time_emb_proj': 'emb_layers.1',
  'conv_shortcut': 'skip_connection',
}
_UNET_TOP = {
  'time_embedding.linear_1': 'time_embed.0',
  'time_embedding.linear_2': 'time_embed.2',
  'add_embedding.linear_1': 'label_emb.0.0',
  'add_embedding.linear_2': 'label_emb.0.2',
  'conv_in': 'input_blocks.0.0',
  'conv_norm_out': 'out.0',
  'conv_out': 'out.2',
}
_VAE_TOP = {'conv_norm_out': 'norm_out'}
_VAE_ATTENTION = {'group_norm': 'norm', 'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}
_OPEN_CLIP = {
  'embeddings.token_embedding.weight': 'token_embedding.weight',
  'embeddings.position_embedding.weight': 'positional_embedding',
  'final_layer_norm': 'ln_final',
}
_OPEN_CLIP_LAYER = {
  'self_attn.out_proj': 'attn.out_proj',
  'layer_norm1': 'ln_1',
  'layer_norm2': 'ln_2',
  'mlp.fc1': 'mlp.c_fc',
  'mlp.fc2': 'mlp.c_proj',
}


def _rename(key: str, table: dict) -> str | None:
  """`key` with its leading name replaced as `table` says (None when no entry fits)."""
  for old, new in table.items():
    if key == old or key.startswith(old + '.'):
      return new + key[len(old) :]
  return None


def _unet_key(key: str, config: dict) -> str:
  per_level = config.get('layers_per_block', 2)
  if not isinstance(per_level, int):
    raise WeightsError(f'single files: a UNet with layers_per_block={per_level!r} has no original layout')
  top = _rename(key, _UNET_TOP)
  if top:
    return top
  m = re.fullmatch(r'(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)', key)
  if m:
    kind, level, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if kind == 'down_blocks':
      block = 1 + level * (per_level + 1) + j
      if part == 'downsamplers':  # the level's last input block: a downsampling conv named `op`
        return f'input_blocks.{level * (per_level + 1) + per_level + 1}.0.op.{rest.removeprefix("conv.")}'
      return f'input_blocks.{block}.{0 if part == "resnets" else 1}.{_resnet(rest) if part == "resnets" else rest}'
    block = level * (per_level + 1) + j
    if part == 'upsamplers':  # after the level's last ResNet and its transformer, if the level has one
      last = level * (per_level + 1) + per_level
      return f'output_blocks.{last}.{2 if "CrossAttn" in config["up_block_types"][level] else 1}.{rest}'
    return f'output_blocks.{block}.{0 if part == "resnets" else 1}.{_resnet(rest) if part == "resnets" else rest}'
  m = re.fullmatch(r'mid_block\.(resnets|attentions)\.(\d+)\.(.+)', key)
  if m:
    if m[1] == 'resnets':
      return f'middle_block.{2 * int(m[2])}.{_resnet(m[3])}'
    return f'middle_block.1.{m[3]}'
  raise WeightsError(f'single files: no original name for UNet parameter {key}')


def _resnet(rest: str) -> str:
  return _rename(rest, _RESNET) or rest


def _vae_key(key: str, config: dict) -> tuple[str, str]:
  levels = len(config.get('up_block_types') or config['block_out_channels'])
  half, rest = key.split('.', 1) if key.startswith(('encoder.', 'decoder.')) else ('', key)
  if not half:  # quant_conv, post_quant_conv
    return key, 'same'
  top = _rename(rest, _VAE_TOP)
  if top:
    return f'{half}.{top}', 'same'
  m = re.fullmatch(r'(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)', rest)
  if m:
    # the original decoder counts its levels from the lowest resolution up, as the encoder does
    level = int(m[2]) if m[1] == 'down_blocks' else levels - 1 - int(m[2])
    name = 'down' if m[1] == 'down_blocks' else 'up'
    if m[3] == 'resnets':
      return f'{half}.{name}.{level}.block.{m[4]}.{m[5].replace("conv_shortcut", "nin_shortcut")}', 'same'
    return f'{half}.{name}.{level}.{"downsample" if name == "down" else "upsample"}.{m[5]}', 'same'
  m = re.fullmatch(r'mid_block\.resnets\.(\d+)\.(.+)', rest)
  if m:
    return f'{half}.mid.block_{int(m[1]) + 1}.{m[2].replace("conv_shortcut", "nin_shortcut")}', 'same'
  m = re.fullmatch(r'mid_block\.attentions\.0\.(.+)', rest)
  if m:
    name = _rename(m[1], _VAE_ATTENTION)
    # the original attention projections are 1x1 convolutions
    return f'{half}.mid.attn_1.{name}', 'conv1x1' if name.endswith('.weight') and 'norm' not in name else 'same'
  if rest.startswith(('conv_in.', 'conv_out.')):
    return key, 'same'
  raise WeightsError(f'single files: no original name for VAE parameter {key}')


def _open_clip_key(key: str) -> tuple[str, str]:
  if key == 'text_projection.weight':
    return 'text_projection', 'T'  # OpenCLIP multiplies x @ P; a torch Linear holds P transposed
  rest = key.removeprefix('text_model.')
  top = _rename(rest, _OPEN_CLIP)
  if top:
    return top, 'same'
  m = re.fullmatch(r'encoder\.layers\.(\d+)\.(.+)', rest)
  if m:
    qkv = re.fullmatch(r'self_attn\.([qkv])_proj\.(weight|bias)', m[2])
    if qkv:  # fused: one in_proj holds q, k and v stacked
      return f'transformer.resblocks.{m[1]}.attn.in_proj_{qkv[2]}', qkv[1]
    name = _rename(m[2], _OPEN_CLIP_LAYER)
    if name:
      return f'transformer.resblocks.{m[1]}.{name}', 'same'
  raise WeightsError(f'single files: no original name for OpenCLIP text encoder parameter {key}')


def key_map(kind: str, config: dict, keys) -> dict[str, tuple[str, str]]:
  """The one table both directions use: diffusers/transformers parameter name -> (original name within the
  component's prefix, how the layout differs: 'same', 'conv1x1' (a 1x1 conv there, a linear here), 'T'
  (transposed), or 'q'/'k'/'v' (one third of a fused in_proj))."""
  if kind == 'unet':
    return {k: (_unet_key(k, config), 'same') for k in keys}
  if kind == 'vae':
    return {k: _vae_key(k, config) for k in keys}
  if kind == 'clip':
    return {k: (k, 'same') for k in keys}
  if kind == 'open_clip':
    return {k: _open_clip_key(k) for k in keys}
  raise ValueError(f'unknown single-file component kind {kind!r}')


_QKV = ('q', 'k', 'v')
_NAMES = {'unet': 'UNet', 'vae': 'VAE', 'clip': 'CLIP text encoder', 'open_clip': 'OpenCLIP text encoder'}


def from_single_file(
  tensors: dict, prefix: str, kind: str, config: dict, keys, *, extract_ema: bool = False, source: str = 'file'
) -> dict[str, np.ndarray]:
  """One component's diffusers-named state dict (`keys`: the names its model expects) out of a single file's
  `tensors`. Missing blocks are an error that names them; so are tensors under the prefix that the model has no
  place for (a config that does not fit the file), except the few that hold no parameters."""
  table = key_map(kind, config, keys)
  stored = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
  if not stored:
    raise WeightsError(f'{source}: missing block {prefix}* (the {_NAMES[kind]}): the file has none of its tensors')
  if extract_ema:
    if kind != 'unet':
      raise ValueError("extract_ema: EMA weights are the UNet's")
    stored = _ema(tensors, stored, source)
  out, missing = {}, set()
  for key, (name, op) in table.items():
    if name not in stored:
      missing.add(name)
      continue
    value = np.asarray(stored[name])
    if op == 'conv1x1' and value.ndim == 4:
      value = value[:, :, 0, 0]
    elif op == 'T':
      value = value.T
    elif op in _QKV:
      if value.ndim < 1 or value.shape[0] % 3:
        raise WeightsError(f'{source}: {name} has shape {value.shape}: not the q, k, v projections stacked')
      value = np.split(value, 3, axis=0)[_QKV.index(op)]
    out[key] = value
  if missing:
    raise WeightsError(f'{source}: missing block(s) {", ".join(_blocks(prefix, missing))} ({len(missing)} tensor(s))')
  ignored = _ignored(kind, config, projection='text_projection.weight' in table)
  used = {name for name, _ in table.values()}
  unexpected = sorted(k for k in stored if k not in used and not any(re.fullmatch(p, k) for p in ignored))
  if unexpected:
    raise WeightsError(
      f'{source}: {len(unexpected)} tensor(s) under {prefix} that the model has no place for (does its config '
      f'fit the file?): {", ".join(prefix + k for k in unexpected[:8])}'
    )
  return out


def _ignored(kind: str, config: dict, projection: bool) -> tuple[str, ...]:
  """Patterns of the tensors under a component's prefix that hold none of its parameters: buffers, and for an
  OpenCLIP encoder without a text projection (SD 2.x) the layer after the penultimate one it stops at."""
  if kind == 'open_clip' and not projection:
    return (*_IGNORED, _SD2_UNUSED.format(n=config['num_hidden_layers']))
  return _IGNORED


def stored_components(tensors, model_type: str, configs: dict) -> dict[str, dict]:
  """{component: {key: tensor}}: each component's parameters as the file stores them (fused OpenCLIP projections
  whole), without the tensors it does not load; by key names and shapes alone, so nothing is read from a
  memory-mapped file. `configs`: the components' (resolved) configs."""
  out = {}
  for name, (prefix, kind) in layout_of(model_type).parts.items():
    ignored = _ignored(kind, configs[name], projection=name == 'text_encoder_2')  # SDXL's second encoder has one
    out[name] = {
      k: v
      for k, v in tensors.items()
      if k.startswith(prefix) and not any(re.fullmatch(p, k[len(prefix) :]) for p in ignored)
    }
  return out


def check_ema(tensors, source: str = 'file'):
  """That the file has EMA weights (extract_ema asks for them): before any model is built."""
  if not _has_prefix(tensors, EMA):
    raise WeightsError(f'{source}: extract_ema asks for EMA weights, but the file has no {EMA}* tensors')


def _ema(tensors: dict, stored: dict, source: str) -> dict:
  """The UNet's EMA weights, under the names of its regular ones."""
  check_ema(tensors, source)
  ema = {k: v for k, v in tensors.items() if k.startswith(EMA)}
  flat = {name: EMA + ''.join(('diffusion_model.' + name).split('.')) for name in stored}
  lost = sorted(name for name, key in flat.items() if key not in ema)
  if lost:
    raise WeightsError(f'{source}: no EMA copy of {", ".join(UNET + n for n in lost[:8])}')
  return {name: ema[key] for name, key in flat.items()}


def _blocks(prefix: str, names) -> list[str]:
  """The blocks that the missing names belong to: each name up to its first index (`model.diffusion_model.
  input_blocks.4`, `first_stage_model.decoder.up.1`), or without its last part when it has none."""
  out = set()
  for name in names:
    m = re.match(r'(.*?\.\d+)(\.|$)', name)
    out.add(prefix + (m[1] if m else name.rsplit('.', 1)[0]))
  return sorted(out)


def to_single_file(state: dict[str, np.ndarray], prefix: str, kind: str, config: dict) -> dict[str, np.ndarray]:
  """One component's diffusers-named state dict as the original layout's tensors, under `prefix`."""
  out, fused = {}, {}
  for key, (name, op) in key_map(kind, config, state).items():
    value = state[key]
    if op == 'conv1x1':
      value = value[:, :, None, None]
    elif op == 'T':
      value = value.T
    elif op in _QKV:
      fused.setdefault(name, {})[op] = value
      continue
    out[prefix + name] = value
  for name, parts in fused.items():
    if len(parts) != 3:
      raise WeightsError(f'single files: {prefix}{name} needs q, k and v; the model has {", ".join(sorted(parts))}')
    out[prefix + name] = np.concatenate([parts[p] for p in _QKV])
  return out


def layout_of(model_type: str) -> Layout:
  return LAYOUTS[MODEL_TYPES[model_type]]
