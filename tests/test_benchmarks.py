"""benchmarks/run_all.py aggregates what the benchmark scripts report: medians, ranges and ratios, the loaded
flag, the results files, the markdown table and the README's table between its markers. A fake benchmark
script stands in for the real ones (which take minutes to hours): it writes a known --json report."""

import json
import os
import shutil
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import run_all  # noqa: E402

# Two rows, as a script's --json: 2 images per call, timed 3 times per side; and one side in GiB.
REPORT = {
  'script': 'fake.py',
  'argv': [],
  'rows': [
    {
      'name': 'fake txt2img',
      'unit': 's',
      'per_call': 2,
      'item': 'image',
      'sides': [
        {'name': 'jaxdream', 'label': 'jaxdream', 'values': [3.0, 1.0, 2.0]},
        {'name': 'torch', 'label': 'diffusers', 'values': [6.0, 4.0, 5.0]},
      ],
      'notes': {},
    },
    {
      'name': 'fake memory',
      'unit': 'GiB',
      'per_call': 1,
      'item': 'call',
      'sides': [{'name': 'jaxdream', 'values': [1.5]}],
    },
  ],
  'environment': {
    'versions': {'jax': '9.9', 'torch': '8.8'},
    'device': {'platform': 'cpu', 'kind': 'cpu', 'count': 1},
    'threads': {'jaxdream_cores': 2, 'torch': 2},
    'cores': 2,
  },
}


@pytest.fixture
def fake_script(tmp_path):
  """A benchmark script that writes REPORT to its --json path (or fails, given --fail)."""
  path = tmp_path / 'fake_bench.py'
  path.write_text(
    textwrap.dedent(f"""
    import json, sys
    if '--fail' in sys.argv:
      sys.exit(3)
    with open(sys.argv[sys.argv.index('--json') + 1], 'w') as f:
      json.dump({REPORT!r}, f)
    """)
  )
  return str(path)


@pytest.fixture
def loads(monkeypatch):
  """os.getloadavg as run_all sees it: the given 1-minute averages, in turn (before, after, before, ...); the
  machine's busy CPU time unknown (as off Linux), so these decide `loaded`."""
  values = []
  monkeypatch.setattr(run_all.os, 'getloadavg', lambda: (values.pop(0), 0.0, 0.0))
  monkeypatch.setattr(run_all, 'cpu_busy_seconds', lambda: None)
  return values


def test_rows_aggregate_repeats_ratio_load_and_environment(fake_script, loads):
  loads += [0.4, 2.0, 0.3, 1.2, 0.1, 0.2]
  rows = run_all.run_command('sample', ['python', fake_script, '--steps', '4'])
  assert len(rows) == 2
  r = rows[0]
  assert r['command'] == f'python {fake_script} --steps 4' and r['benchmark'] == 'sample'
  ours, peer = r['sides']
  assert (ours['median'], ours['min'], ours['max']) == (2.0, 1.0, 3.0)
  assert (peer['median'], peer['min'], peer['max'], peer['label']) == (5.0, 4.0, 6.0, 'diffusers')
  assert r['ratio'] == 2.5  # the peer's median / jaxdream's: jaxdream 2.5x faster
  assert (r['load_before'], r['load_after'], r['loaded']) == (0.4, 2.0, True)  # 2.0 after the run > 1.5
  assert r['versions'] == {'jax': '9.9', 'torch': '8.8'} and r['device']['kind'] == 'cpu'
  assert r['threads'] == {'jaxdream_cores': 2, 'torch': 2}
  assert rows[1]['ratio'] is None and rows[1]['sides'][0]['median'] == 1.5  # one side: no ratio

  quiet = run_all.run_command('sample', ['python', fake_script])
  assert [q['loaded'] for q in quiet] == [False, False]  # 0.3 -> 1.2: both at most 1.5
  failed = run_all.run_command('sample', ['python', fake_script, '--fail'])
  assert failed == [
    {
      'benchmark': 'sample',
      'command': f'python {fake_script} --fail',
      'load_before': 0.1,
      'load_after': 0.2,
      'others_cores': None,
      'name': 'sample',
      'error': 'exit status 3',
      'loaded': False,
    }
  ]

  # The table: per item (2 images per call) as s/image since an image takes a second or more, the range over
  # the repeats, the peer's label; a loaded row's ratio is not bold, a quiet one's is.
  table = run_all.markdown_table(rows + quiet[:1] + failed).splitlines()
  assert table[:2] == ['| work | command | jaxdream | peer | ratio |', '| --- | --- | --- | --- | --- |']
  cmd = f'`python {fake_script} --steps 4`'
  assert table[2] == (
    f'| fake txt2img (loaded: load 0.4 -> 2.0) | {cmd} | 1 s/image (0.5-1.5) | 2.5 s/image (2-3) (diffusers) | 2.50x |'
  )
  assert table[3] == f'| fake memory (loaded: load 0.4 -> 2.0) | {cmd} | 1.5 GiB | - | - |'
  assert table[4].endswith('| 1 s/image (0.5-1.5) | 2.5 s/image (2-3) (diffusers) | **2.50x** |')
  assert table[5] == f'| sample (load 0.1 -> 0.2) | `python {fake_script} --fail` | failed: exit status 3 | | |'
  # Under a second per item the table shows items/s (and the range the other way round).
  fast = run_all.summarize(
    dict(REPORT['rows'][0], per_call=20), benchmark='sample', command='c', load=(0.1, 0.1), env={}
  )
  assert '| 10 images/s (6.67-20) | 4 images/s (3.33-5) (diffusers) | **2.50x** |' in run_all.markdown_table([fast])


def test_other_processes_cpu_decides_loaded_not_the_benchmarks_own_load(fake_script, loads, monkeypatch):
  """A 2-thread benchmark on 2 cores makes the load average ~2 by itself: where the machine's busy CPU time is
  known, a row is loaded when other processes used more than --max-others cores during it."""
  assert run_all.others_cores((100.0, 112.0), (5.0, 15.0), wall=10.0) == pytest.approx(0.2)  # 12 busy, 10 ours
  assert run_all.others_cores((100.0, 110.0), (5.0, 15.5), wall=10.0) == 0.0  # clock granularity: never < 0
  assert run_all.others_cores((None, 110.0), (5.0, 15.0), wall=10.0) is None
  assert run_all.is_loaded((2.0, 2.1), 0.05) is False and run_all.is_loaded((0.1, 0.2), 0.6) is True
  assert run_all.is_loaded((0.1, 1.6), None) is True  # unknown: the load average decides

  busy = iter([1000.0, 1000.0 + 1e6])  # others burned a million core-seconds while the script ran
  monkeypatch.setattr(run_all, 'cpu_busy_seconds', lambda: next(busy))
  loads += [2.0, 2.0]
  (r, _) = run_all.run_command('sample', ['python', fake_script])
  assert r['loaded'] is True and r['others_cores'] > 1
  assert '(loaded: other processes ' in run_all.markdown_table([r])

  monkeypatch.setattr(run_all, 'cpu_busy_seconds', lambda: 1000.0)  # nothing else ran
  loads += [2.0, 2.0]
  (r, _) = run_all.run_command('sample', ['python', fake_script], max_others=0.25)
  assert r['loaded'] is False and r['others_cores'] == 0.0
  assert '| fake txt2img (other processes 0.00 cores, load 2.0 -> 2.0) |' in run_all.markdown_table([r])


def test_machine_busy_time_is_read_and_covers_this_process(monkeypatch):
  if not os.path.exists('/proc/stat'):
    pytest.skip('no /proc/stat')
  b0, own0 = run_all.cpu_busy_seconds(), run_all._own_cpu_seconds()
  x = 0
  while run_all._own_cpu_seconds() - own0 < 0.3:  # burn 0.3 CPU seconds here
    x += 1
  b1 = run_all.cpu_busy_seconds()
  assert b1 - b0 >= 0.25  # the machine's busy time includes what this process just used


def test_memory_script_json_lines_become_one_sided_gib_rows(tmp_path):
  """memory.py keeps its own --json (JSON lines appended per compiled row, as the README's commands use it)."""
  row = dict(model='sd15', resolution=512, mesh=[8, 1, 1], devices=8, batch_per_device=1, total=3 * 2**30)
  path = tmp_path / 'memory.jsonl'
  path.write_text(json.dumps(row) + '\n' + json.dumps(dict(row, mesh=[1, 8, 1], error='out of memory')) + '\n')
  report = run_all.read_report(str(path))
  (r,) = report['rows']
  assert r['unit'] == 'GiB' and r['sides'][0]['values'] == [3.0] and 'sd15 512 px, mesh 8,1,1' in r['name']
  assert report['environment']['device']['count'] == 8


def test_main_writes_the_results_files_and_merges_a_rerun(fake_script, loads, tmp_path, monkeypatch):
  bench = lambda name: run_all.Benchmark(name, fake_script, full=(('--full',),), quick=(('--quick',),))
  monkeypatch.setattr(run_all, 'BENCHMARKS', (bench('unet_forward'), bench('sample')))
  out = tmp_path / 'results'
  loads += [0.2, 0.3] * 4
  assert run_all.main(['--out', str(out), '--repeats', '4']) == 0
  (path,) = out.glob('*.json')
  assert path.name == os.path.basename(run_all.results_path(str(out), False))
  results = json.loads(path.read_text())
  assert results['repeats'] == 4 and results['quick'] is False
  assert [(r['benchmark'], r['name']) for r in results['rows']] == [
    ('unet_forward', 'fake txt2img'),
    ('unet_forward', 'fake memory'),
    ('sample', 'fake txt2img'),
    ('sample', 'fake memory'),
  ]
  assert results['rows'][0]['command'] == f'python {fake_script} --full --repeats 4'
  assert {'python', 'jax', 'jaxlib', 'flax', 'torch', 'diffusers', 'transformers'} <= set(
    results['environment']['versions']
  )
  md = path.with_suffix('.md').read_text()
  assert run_all.markdown_table(results['rows']) in md and '4 repeat(s) per side' in md
  # A rerun of one benchmark replaces its rows and keeps the others'; --quick goes to its own file.
  assert run_all.main(['--out', str(out), '--repeats', '1', '--only', 'sample']) == 0
  rerun = json.loads(path.read_text())
  assert [r['command'].split()[-1] for r in rerun['rows']] == ['4', '4', '1', '1']
  assert run_all.main(['--out', str(out), '--quick', '--only', 'sample']) == 0
  assert sorted(p.name for p in out.glob('*.json')) == sorted([path.name, path.name.replace('.json', '-quick.json')])


def test_readme_table_is_replaced_between_the_markers_only(fake_script, loads, tmp_path):
  readme = tmp_path / 'README.md'
  shutil.copy(os.path.join(REPO, 'README.md'), readme)
  before = readme.read_text()
  loads += [0.2, 0.3] * len(run_all.NAMES)
  rows = [r for name in run_all.NAMES for r in run_all.run_command(name, ['python', fake_script])]
  env = dict(REPORT['environment'], host='box', cpu='Some CPU', cpu_count=2)
  results = {'quick': False, 'rows': rows, 'environment': env, 'date': '2026-01-02', 'repeats': 3, 'max_load': 1.5}
  run_all.update_readme(str(readme), results)
  after = readme.read_text()
  head, rest = before.split(run_all.BEGIN)
  tail = rest.split(run_all.END)[1]
  table = run_all.markdown_table(rows)
  assert after == f'{head}{run_all.BEGIN}\n\n{run_all.results_markdown(results)}\n{run_all.END}{tail}'
  assert 'Benchmarks on box (Some CPU, 2 cores), 2026-01-02, 3 repeat(s) per side; jax 9.9, torch 8.8.' in after
  assert table in after
  assert '| fake txt2img (load 0.2 -> 0.3) |' in after and '7.58 s' not in after  # the old UNet row is gone

  loaded = [dict(rows[0], loaded=True)] + rows[1:]
  for bad, match in (
    (dict(results, rows=loaded), 'loaded rows .*fake txt2img'),
    (dict(results, quick=True), 'quick results'),
    (dict(results, rows=[r for r in rows if r['benchmark'] != 'memory']), 'no results for memory'),
  ):
    with pytest.raises(ValueError, match=match):
      run_all.update_readme(str(readme), bad)
  run_all.update_readme(str(readme), dict(results, rows=loaded), allow_loaded=True)
  assert '| fake txt2img (loaded: load 0.2 -> 0.3) |' in readme.read_text()
  with pytest.raises(ValueError, match='expected one <!-- benchmarks:begin --> followed by one'):
    run_all.replace_table(before.replace(run_all.END, ''), table)
  with pytest.raises(SystemExit):
    run_all._parse(['--quick', '--update-readme'])
