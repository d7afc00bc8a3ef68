"""`jaxdream train`: parse the config flags and run the training loop."""

from __future__ import annotations

import difflib
import os
import re
import sys

from jaxdream.cli import quiet
from jaxdream.cli.args import check_output
from jaxdream.distributed import multihost
from jaxdream.training import config as config_lib
from jaxdream.training.data import DataError
from jaxdream.training.loop import TrainingError, train

USAGE = 'usage: jaxdream train --config FILE --workdir DIR [--config.KEY=VALUE ...]'
_CONFIG_FLAG = 'a configs/*.py file with get_config() (e.g. configs/quickstart.py)'
_WORKDIR_FLAG = 'run folder: checkpoints, logs, samples, the exported model'


def _error(msg: str) -> int:
  print(f'jaxdream train: error: {msg}', file=sys.stderr)
  return 2


def _list_indices(argv: list[str]) -> list[str]:
  """`--config.concepts.0.instance_dir=...` (as the README writes it) -> `--config.concepts[0].instance_dir=...`,
  the form ml_collections parses for an element of a list."""
  out = []
  for arg in argv:
    if arg.startswith('--config.'):
      name, eq, value = arg.partition('=')
      arg = re.sub(r'\.(\d+)(?=\.|$)', r'[\1]', name) + eq + value
    out.append(arg)
  return out


def _config_path(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
  return None


def _load_config_file(argv):
  """The --config file's config (None if there is none or it does not load)."""
  path = _config_path(argv)
  try:
    return config_lib.config_file(path.split(':', 1)[0]) if path else None
  except Exception:  # noqa: BLE001 - only for messages and help; the flag parser reports the real error
    return None


def _unknown_key(config, argv: list[str]) -> str | None:
  """A one-line message for the first override naming a key `config` lacks, with the nearest known key."""
  import ml_collections

  known = [k for k, _ in config_lib.config_keys(config)]
  for arg in argv:
    if not arg.startswith('--config.'):
      continue
    key = re.sub(r'\[(\d+)\]', r'.\1', arg[len('--config.') :].partition('=')[0])
    node, parts = config, key.split('.')
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
      elif isinstance(node, (list, tuple)) and part.isdigit():
        if int(part) >= len(node):
          where = '.'.join(parts[:i])
          return f"config key '{key}': {where} has {len(node)} element(s), numbered from 0"
        node = node[int(part)]
      else:
        pattern = re.sub(r'\.\d+(?=\.|$)', '.N', key)
        close = difflib.get_close_matches(pattern, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0].replace('.N.', '.0.')}'?" if close else '; see jaxdream train --help'
        return f"unknown config key '{key}'{hint}"
  return None


def _help(argv) -> str:
  config = _load_config_file(argv)
  source = _config_path(argv) if config is not None else 'base_config'
  config = config if config is not None else config_lib.base_config()
  keys = config_lib.config_keys(config)
  width = max(len(f'{k}={v!r}') for k, v in keys) + 2
  lines = [
    USAGE,
    '',
    'DreamBooth fine-tuning. Running the same command again on the same workdir resumes from its newest',
    'readable checkpoint. Ctrl-C (or SIGTERM) saves a checkpoint and stops with exit status 75 (run the same command '
    'to resume); a second Ctrl-C stops at once.',
    '',
    f'  --config FILE   {_CONFIG_FLAG}',
    f'  --workdir DIR   {_WORKDIR_FLAG}',
    '',
    f'config keys, --config.KEY=VALUE (values of {source}; N: a concept number, from 0):',
  ]
  lines += [f'  {f"{k}={v!r}":<{width}} {config_lib.KEY_DOCS.get(k, "")}' for k, v in keys]
  return '\n'.join(lines)


EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped by SIGTERM or Ctrl-C after saving; run again to resume


def main(argv=None):
  """`jaxdream train --config FILE --workdir DIR [--config.key=value ...]`."""
  quiet.silence_third_party()
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv[2:] if argv is None else argv)
  if '-h' in argv or '--help' in argv:
    print(_help(argv))
    return 0
  path = _config_path(argv)
  if path and not os.path.isfile(path.split(':', 1)[0]):
    return _error(f'config file {path} does not exist (see configs/ for examples)')
  argv = ['jaxdream train'] + _list_indices(argv)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config',
    None,
    _CONFIG_FLAG,
    flag_values=fv,
    lock_config=True,
    sys_argv=argv,  # the overrides are in argv
  )
  flags.DEFINE_string('workdir', None, _WORKDIR_FLAG, flag_values=fv)
  try:
    rest = fv(argv)[1:]
  except (flags.Error, AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
    config = _load_config_file(argv)
    msg = _unknown_key(config, argv[1:]) if config is not None else None
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # a KeyError's str() is its repr
    return _error(msg or ' '.join(str(text).split()))
  if rest:  # a stray word (a typo in an override) would be dropped and the whole run trained
    return _error(f'unexpected arguments {rest}: give --config, --workdir and --config.key=value overrides only')
  if fv.config is None or fv.workdir is None:
    return _error('--config and --workdir are required (see jaxdream train --help)')
  multihost.initialize()
  try:
    check_output('--workdir', fv.workdir, folder=True)
    summary = train(fv.config, fv.workdir)
  except (config_lib.RunConfigError, DataError, TrainingError, ValueError, OSError) as e:
    return _error(str(e))
  except KeyboardInterrupt:  # a second Ctrl-C, or one before the first step
    return _error('interrupted; run the same command to resume from the last saved checkpoint')
  if summary.get('preempted'):  # saved and stopped early: not done (a job scheduler's retry resumes it)
    return EXIT_STOPPED
  out = summary.get('outputs', {})
  if out:
    lines = [f'\nDone: {summary["step"]} steps.']
    if 'lora' in out:
      lines.append(f'LoRA adapter (diffusers/peft format): {out["lora"]}')
    if 'lora_kohya' in out:
      lines.append(f'LoRA adapter (kohya/A1111 format): {out["lora_kohya"]}')
    if 'model' in out:
      lines.append(f'Fine-tuned model (diffusers format): {out["model"]}')
    if 'vae' in out:  # task='vae'
      lines.append(f'Trained VAE (diffusers AutoencoderKL format): {out["vae"]}')
    if 'loras' in out:  # lora.per_subject: one adapter per subject
      lines.append(
        f'{len(out["loras"])} LoRA adapters (diffusers/peft format): {os.path.dirname(out["skipped"])}/NAME/'
      )
      if out.get('samples'):
        samples = os.path.join(os.path.dirname(os.path.dirname(out['skipped'])), 'samples')
        lines.append(f'Validation samples of each subject: {samples}/NAME/step_N.png')
      if summary['skipped']:
        lines.append(f'Skipped {len(summary["skipped"])} subject(s), listed in {out["skipped"]}')
    else:
      lines.append(f'Samples: {os.path.dirname(out["loss_curve"])}/  (loss curve: {out["loss_curve"]})')
    if 'model' in out:
      lines.append(f'Sample more with: jaxdream sample --model {out["model"]} --prompt "..." --out DIR')
    multihost.log('\n'.join(lines))
  return 0
