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


def check_output(flag: str, path: str | None, *, folder: bool):
  """Refuse an output path that cannot be written as asked (a folder where a file goes, or the reverse), before
  the command loads anything or computes what it would write there."""
  if path and os.path.exists(path) and os.path.isdir(path) != folder:
    raise ValueError(f'{flag} {path}: exists and is {"not " * folder}a folder')
