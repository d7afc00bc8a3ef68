"""The command line: the demo runs end to end; bad model folders give a message, not a traceback."""

import subprocess
import sys

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
