"""The `jaxdream` command: one module per command group (main.py dispatches)."""

from jaxdream.cli.main import main  # noqa: F401
