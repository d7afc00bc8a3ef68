"""A1111's LoRA prompt tags: `<lora:name:0.8>` in a prompt names a file in a LoRA folder, at a weight."""

from __future__ import annotations

import math
import os
import re

# A1111's prompt syntax: <lora:name> or <lora:name:0.8>
_TAG = re.compile(r'<lora:([^:>]+)(?::([^:>]*))?>')


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
  """(the prompt without its <lora:name:scale> tags, ((name, scale), ...) of the tags), no file looked up."""
  found = []
  for m in _TAG.finditer(prompt):
    name, scale = m.group(1).strip(), m.group(2)
    value = 1.0 if scale is None or not scale.strip() else lora_scale_value(scale, f'prompt tag {m.group(0)}')
    found.append((name, value))
  text = re.sub(r'\s{2,}', ' ', _TAG.sub('', prompt)).strip()
  return text, tuple(found)


def prompt_loras(prompt: str, folder: str | None) -> tuple[str, tuple[tuple[str, float], ...]]:
  """(the prompt without its <lora:name:scale> tags, ((path, scale), ...) of the tags)."""
  text, tags = parse_tags(prompt)
  return text, tuple((lora_in_dir(folder, name), value) for name, value in tags)
