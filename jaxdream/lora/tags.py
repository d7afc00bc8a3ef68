"""A1111's LoRA prompt tags: `<lora:name:0.8>` in a prompt names a file in a LoRA folder, at a weight."""

from __future__ import annotations

import math
import os
import re

# A1111's extra-network tags, <kind:args>: the webui takes every one out of the prompt text. <lora:name>,
# <lora:name:0.8>, <lora:name:te:unet> and <lora:name:te=0.8:unet=0.8> (lyco: the same, an old name).
_TAG = re.compile(r'<(\w+):([^>]+)>')
_LORA_KINDS = ('lora', 'lyco')


def lora_in_dir(folder: str | None, name: str) -> str:
  """The file of a prompt tag's name: DIR/name.safetensors, or DIR/name/pytorch_lora_weights.safetensors (as the
  trainer writes DIR/loras/<name>/)."""
  if not folder:
    raise ValueError(f'prompt tag <lora:{name}>: give --lora-dir, the folder to find {name}.safetensors in')
  for path in (
    os.path.join(folder, f'{name}.safetensors'),
    os.path.join(folder, name, 'pytorch_lora_weights.safetensors'),
  ):
    if os.path.isfile(path):
      return path
  raise ValueError(
    f'prompt tag <lora:{name}>: no {name}.safetensors or {name}/pytorch_lora_weights.safetensors in {folder}'
  )


def lora_name(path: str) -> str:
  """The name a prompt tag gives a file: its stem, or its folder's name for DIR/<name>/pytorch_lora_weights."""
  stem = os.path.basename(path).removesuffix('.safetensors')
  return os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == 'pytorch_lora_weights' else stem


def with_tags(prompt: str, loras) -> str:
  """The prompt with a <lora:name:scale> tag per (path, scale), as A1111 records the LoRAs an image used."""
  return ' '.join([prompt, *(f'<lora:{lora_name(p)}:{s:g}>' for p, s in loras)]).strip()


def lora_scale_value(text: str, what: str) -> float:
  """A LoRA scale from text: a finite number (NaN or infinity would turn every image black)."""
  try:
    value = float(text)
  except ValueError:
    raise ValueError(f'{what}: the scale must be a number') from None
  if not math.isfinite(value):
    raise ValueError(f'{what}: the scale must be a finite number, got {text}')
  return value


def parse_tags(prompt: str) -> tuple[str, tuple[tuple[str, float], ...]]:
  """(the prompt without its <lora:...> tags, ((name, scale), ...) of the tags), no file looked up. Other extra
  networks (<hypernet:...>) and A1111's separate text-encoder and UNet weights are errors: the webui would change
  the image by them, so they are never silently read as prompt text or dropped."""
  found = []
  for m in _TAG.finditer(prompt):
    kind, args = m.group(1), m.group(2).split(':')
    if kind not in _LORA_KINDS:
      raise ValueError(f'prompt tag {m.group(0)}: {kind} networks are not supported (only <lora:name:weight>)')
    name, positional, named = args[0].strip(), [], {}
    for arg in args[1:]:
      key, eq, value = arg.partition('=')
      if eq:
        named[key.strip()] = value
      else:
        positional.append(arg)
    if set(named) - {'te', 'unet'} or len(positional) > 2:
      raise ValueError(
        f'prompt tag {m.group(0)}: give <lora:name:weight> (dynamic rank and block weights are not supported)'
      )
    te = named.get('te', positional[0] if positional else '')
    unet = named.get('unet', positional[1] if len(positional) > 1 else te)
    scale = lambda text: 1.0 if not text.strip() else lora_scale_value(text, f'prompt tag {m.group(0)}')
    if scale(te) != scale(unet):
      raise ValueError(
        f'prompt tag {m.group(0)}: separate text-encoder and UNet weights are not supported; give one weight'
      )
    found.append((name, scale(te)))
  text = re.sub(r'\s{2,}', ' ', _TAG.sub('', prompt)).strip()
  return text, tuple(found)


def prompt_loras(prompt: str, folder: str | None) -> tuple[str, tuple[tuple[str, float], ...]]:
  """(the prompt without its <lora:name:scale> tags, ((path, scale), ...) of the tags)."""
  text, tags = parse_tags(prompt)
  return text, tuple((lora_in_dir(folder, name), value) for name, value in tags)
