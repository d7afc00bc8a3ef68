"""Validation of model config.json files: a key we do not implement is an error that names it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
  """A model config that jaxdream cannot honour; the message names the key."""


def resolve_config(
  config: dict, defaults: dict[str, Any], *, model: str, supported: dict[str, tuple] | None = None, strict: bool = True
) -> dict[str, Any]:
  """Merge `config` over `defaults` after checking it.

  supported: key -> the values jaxdream implements for it (anything else is an error).
  strict: keys not in `defaults` are errors (diffusers configs); transformers configs carry many
    generic keys, so for those pass strict=False and only the listed keys are checked.
  Keys starting with '_' are metadata (`_class_name`, `_diffusers_version`, ...).
  """
  out = dict(defaults)
  for key, value in config.items():
    if key.startswith('_'):
      continue
    if key not in defaults:
      if strict:
        raise ConfigError(
          f'{model} config key {key!r} is not supported by jaxdream (known keys: {", ".join(sorted(defaults))})'
        )
      continue
    out[key] = value
  for key, allowed in (supported or {}).items():
    value = out[key]
    for v in value if isinstance(value, (list, tuple)) else [value]:  # per-block lists: each entry
      if v not in allowed:
        raise ConfigError(
          f'{model} config {key}={value!r} is not supported by jaxdream (supported: {", ".join(map(repr, allowed))})'
        )
  return out


def per_block(value, n: int, key: str, model: str) -> list:
  """An int-or-list config value expanded to one entry per block."""
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ConfigError(f'{model} config {key} has {len(value)} entries for {n} blocks')
    return list(value)
  return [value] * n


def square_size(value, key: str, model: str) -> int:
  """An image or patch size given as an int or a square [h, w] pair, as an int."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConfigError(f'{model} config {key}={value!r}: only square sizes are supported')
    value = value[0]
  return int(value)
