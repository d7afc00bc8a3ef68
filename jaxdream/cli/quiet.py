"""Keep other libraries' start-up chatter off the terminal of a jaxdream command."""

from __future__ import annotations

import os


def silence_third_party():
  """Set before transformers is imported: it warns on every import that PyTorch is missing (jaxdream uses
  only its tokenizers, never torch) and narrates at INFO. A user's own settings win."""
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
