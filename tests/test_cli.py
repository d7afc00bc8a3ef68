"""The command line: the demo runs end to end; bad model folders give a message, not a traceback."""

import subprocess
import sys

import pytest

from jaxdream.cli import main


def test_demo_creates_loads_and_runs_the_tiny_model(tmp_path, capsys):
  assert not main(['demo', '--out', str(tmp_path)])
  out = capsys.readouterr().out
  assert 'decoded image (1, 64, 64, 3)' in out
  assert (tmp_path / 'demo_decoded.png').exists()
  assert (tmp_path / 'tiny-sd' / 'model_index.json').exists()


def test_inspect_on_a_wrong_folder_prints_an_error_and_exits_2(tmp_path):
  proc = subprocess.run(
    [sys.executable, '-m', 'jaxdream.cli', 'inspect', '--model', str(tmp_path)], capture_output=True, text=True
  )
  assert proc.returncode == 2
  assert 'model_index.json' in proc.stderr and 'Traceback' not in proc.stderr


def test_outputs_that_would_overwrite_an_input_or_sit_under_a_file_are_refused_before_any_work(tmp_path, capsys):
  import os

  from jaxdream.cli.args import check_model_output
  from jaxdream.cli.train import main as train_main

  def error(argv):
    assert main(argv) == 2
    return capsys.readouterr().err

  scores = tmp_path / 'a.json'
  scores.write_text('{}')
  assert 'would overwrite the input' in error(['eval', 'compare', str(scores), str(scores), '--out', str(scores)])
  bench = tmp_path / 'bench'
  bench.mkdir()
  (bench / 'prompts_and_classes.txt').write_text('subject_name,class\n')
  prompts = str(bench / 'prompts_and_classes.txt')
  assert 'would overwrite the input' in error(['subjects', '--dreambench', str(bench), '--out', prompts])
  afile = tmp_path / 'afile.txt'
  afile.write_text('x')
  assert f'{afile} is a file, not a folder' in error(
    ['subjects', '--dreambench', str(bench), '--out', str(afile / 'c.json')]
  )
  assert f'{afile} is a file, not a folder' in error(['demo', '--out', str(afile / 'x')])
  out = tmp_path / 'out'
  out.mkdir()
  (out / '00000.png').write_bytes(b'')
  argv = ['sample', '--model', 'builtin:tiny-base', '--prompt', 'a', '--out', str(out)]
  assert 'this run writes a file of that name' in error([*argv, '--init-image', str(out / '00000.png')])
  assert f'--embedding {tmp_path}/nope.safetensors: no such file' in error(
    [*argv, '--embedding', str(tmp_path / 'nope.safetensors')]
  )
  bench_argv = [
    'eval',
    'dreambench',
    '--dataset',
    str(bench),
    '--images',
    str(out),
    '--clip',
    str(out),
    '--dino',
    str(out),
  ]
  assert '--num-prompts must be at least 1, got 0' in error(
    [*bench_argv, '--out', str(tmp_path / 'e'), '--num-prompts', '0']
  )
  other = tmp_path / 'other'
  (other / 'vae').mkdir(parents=True)
  (other / 'vae' / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='is not a model folder'):  # lora merge / convert: component folders replaced
    check_model_output('--out', str(other))
  # train: a stray word (a typo in an override) was dropped and the whole run trained
  config = os.path.join(os.path.dirname(__file__), '..', 'configs', 'quickstart.py')
  assert train_main(['--config', config, '--workdir', str(tmp_path / 'w'), 'extra_pos']) == 2
  assert "unexpected arguments ['extra_pos']" in capsys.readouterr().err
