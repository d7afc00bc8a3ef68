"""`jaxdream train`: parse the config flags and run the training loop."""

from __future__ import annotations

import os
import sys

from jaxdream.distributed import multihost
from jaxdream.training import config as config_lib
from jaxdream.training.data import DataError
from jaxdream.training.loop import TrainingError, train


def main(argv=None):
  """`jaxdream train --config FILE --workdir DIR [--config.key=value ...]`."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config', None, 'a configs/*.py file with get_config()', flag_values=fv, lock_config=True
  )
  flags.DEFINE_string('workdir', None, 'run folder: checkpoints, logs, samples, the exported model', flag_values=fv)
  argv = ['jaxdream train'] + list(sys.argv[2:] if argv is None else argv)
  try:
    fv(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    print(f'jaxdream train: error: {e}', file=sys.stderr)
    return 2
  if fv.config is None or fv.workdir is None:
    print('jaxdream train: error: --config and --workdir are required', file=sys.stderr)
    return 2
  multihost.initialize()
  try:
    summary = train(fv.config, fv.workdir)
  except (config_lib.RunConfigError, DataError, TrainingError, ValueError, OSError) as e:
    print(f'jaxdream train: error: {e}', file=sys.stderr)
    return 2
  if summary.get('preempted'):
    return 0
  out = summary.get('outputs', {})
  if out:
    multihost.log(
      f'\nDone: {summary["step"]} steps. Fine-tuned model (diffusers format): {out["model"]}\n'
      f'Samples: {os.path.dirname(out["loss_curve"])}/  (loss curve: {out["loss_curve"]})\n'
      f'Sample more with: jaxdream sample --model {out["model"]} --prompt "..." --out DIR'
    )
  return 0
