"""argparse types that refuse out-of-range numbers when the command line is parsed, before anything loads."""

from __future__ import annotations

import argparse
import os


def int_between(low: int, high: int | None = None):
  """An int type accepting low <= value (<= high)."""

  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < low or (high is not None and value > high):
      raise argparse.ArgumentTypeError(f'{value} is not in [{low}, {"..." if high is None else high}]')
    return value

  parse.__name__ = 'int'  # argparse names the type in its messages
  return parse


def positive_float(text: str) -> float:
  """A finite float above 0."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
  if not 0 < value < float('inf'):
    raise argparse.ArgumentTypeError(f'{text} is not a positive finite number')
  return value


def check_output(flag: str, path: str | None, *, folder: bool, inputs=()):
  """Refuse an output path that cannot be written as asked (a folder where a file goes, or the reverse; a path
  under a file), or that is one of the command's `inputs` (a file or folder it reads: writing would destroy it),
  before the command loads anything or computes what it would write there."""
  if not path:
    return
  if os.path.exists(path) and os.path.isdir(path) != folder:
    raise ValueError(f'{flag} {path}: exists and is {"not " * folder}a folder')
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise ValueError(f'{flag} {path}: {parent} is a file, not a folder')
  check_not_input(flag, path, inputs)


def check_model_output(flag: str, path: str) -> None:
  """A model folder to write: new, empty, or a model folder already (its component folders are replaced whole, so
  another folder's files under them would be lost)."""
  if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, 'model_index.json')):
    raise ValueError(
      f'{flag} {path}: exists, is not empty and is not a model folder (its subfolders would be replaced)'
    )


def check_not_input(flag: str, path: str, inputs) -> None:
  """Refuse an output that is one of the inputs."""
  out = os.path.realpath(path)
  for given in inputs:
    if given and not str(given).startswith('builtin:') and os.path.realpath(given) == out:
      raise ValueError(f'{flag} {path}: would overwrite the input {given}')
