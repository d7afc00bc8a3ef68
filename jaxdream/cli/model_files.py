"""The options with which a command loads a model that may be a single-file checkpoint (original CompVis/Stability
layout, .safetensors) instead of a diffusers folder: defined once for every command that takes one (`convert`,
`inspect`, `sample` and its `--refiner`, `eval dreambench`), read back as load_pipeline's keyword arguments."""

from __future__ import annotations

# argparse dest suffix -> (flag suffix, argparse keywords, help); the dest is load_pipeline's keyword.
_OPTIONS = {
  'config_dir': (
    'config-dir',
    dict(metavar='DIR'),
    'a diffusers folder (weights not needed) whose configs, tokenizers and scheduler the single file {what} loads '
    'with (default: those of the published model of the type its keys say)',
  ),
  'prediction_type': (
    'prediction-type',
    dict(choices=('epsilon', 'v_prediction')),
    "override the prediction type of {what} (a single file's default: the one its type says)",
  ),
  'extract_ema': (
    'extract-ema',
    dict(action='store_true'),
    "use the single file {what}'s EMA UNet weights (model_ema.*)",
  ),
}


def add_model_file_arguments(parser, *, prefix: str = '', what: str = '--model'):
  """--config-dir, --prediction-type and --extract-ema (with `prefix`: --refiner-config-dir, ...) on `parser`,
  for the model given as `what`."""
  for dest, (flag, kwargs, help_text) in _OPTIONS.items():
    parser.add_argument(
      f'--{prefix}{flag}', dest=f'{prefix.replace("-", "_")}{dest}', help=help_text.format(what=what), **kwargs
    )


def model_file_options(args, *, prefix: str = '') -> dict:
  """load_pipeline's (and read_model's) keyword arguments from what add_model_file_arguments parsed."""
  return {dest: getattr(args, f'{prefix.replace("-", "_")}{dest}') for dest in _OPTIONS}
