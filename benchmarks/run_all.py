"""Every benchmark, each side --repeats times, into one results file and the README's table.

  python benchmarks/run_all.py                         # the README's benchmarks (hours on 2 CPU cores)
  python benchmarks/run_all.py --quick --repeats 1     # the tiny presets only (minutes): checks the harness
  python benchmarks/run_all.py --only sample eval_scoring --update-readme

Each benchmark script runs in its own process with --json (benchmarks/_report.py): its raw per-repeat values
per side come back as data, not as printed text. Written: benchmarks/results/<date>-<host>.json (per row: the
exact command, median, min and max per side, the ratio of medians, versions, device kind, thread counts, the
1-minute load average before and after the run, the CPU cores other processes used during it, and `loaded`)
and the markdown table beside it (.md). A rerun on the same day and host replaces the benchmarks it ran and keeps the others.
--quick writes <date>-<host>-quick.* instead.

--update-readme replaces the README's table between `<!-- benchmarks:begin -->` and `<!-- benchmarks:end -->`
with this table and its heading (machine, date, versions), so the numbers there are regenerated, never hand-edited. It refuses loaded rows (a loaded
machine slows torch's OpenMP threads far more than XLA, which flatters jaxdream) unless --allow-loaded, quick
results, and a table missing any README benchmark.

Loaded: other processes used more than --max-others cores on average while the benchmark ran (Linux: the
machine's busy CPU time from /proc/stat less the benchmark's own, from its rusage). The load average is kept
in the results but does not decide: it counts the benchmark's own threads (2 on a 2-core machine make it ~2)
and, for a minute after, the previous benchmark's. Where /proc/stat is missing, a load average above
--max-load before or after the run flags the row.

Ratio: the peer's median / jaxdream's median, so above 1 jaxdream is faster (or, for memory, smaller).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import resource
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import _report

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
README = os.path.join(ROOT, 'README.md')
RESULTS = os.path.join(HERE, 'results')
BEGIN, END = '<!-- benchmarks:begin -->', '<!-- benchmarks:end -->'
MAX_LOAD = 1.5
MAX_OTHERS = 0.25  # cores other processes may use during a run before it counts as loaded
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A script and its command lines (arguments after the script), full and quick; `repeats` is the flag that
  sets how often each side runs (None: one run measures it, e.g. a compiler's memory analysis)."""

  name: str
  script: str
  full: tuple[tuple[str, ...], ...]
  quick: tuple[tuple[str, ...], ...]
  repeats: str | None = '--repeats'

  def commands(self, quick: bool, repeats: int) -> list[list[str]]:
    flag = [self.repeats, str(repeats)] if self.repeats else []
    script = os.path.join('benchmarks', self.script)
    return [['python', script, *args, *flag] for args in (self.quick if quick else self.full)]


_T = ('--threads', '2')
BENCHMARKS = (
  Benchmark(
    'unet_forward',
    'unet_forward.py',
    full=(
      ('--preset', 'sd15', '--batch', '2', '--size', '64', *_T),
      ('--preset', 'sdxl', '--batch', '1', '--size', '64', *_T),  # 512 px; each side in its own process
    ),
    quick=(
      ('--preset', 'tiny', '--batch', '2', '--size', '32', *_T),
      ('--preset', 'sdxl-tiny', '--batch', '2', '--size', '32', *_T),
    ),
  ),
  Benchmark(
    'train_step',
    'train_step.py',
    full=(
      ('--preset', 'tiny', *_T, '--steps', '10'),
      ('--preset', 'sd15', '--resolution', '256', *_T, '--steps', '2'),  # each side alone: 15-16 GB
    ),
    quick=(('--preset', 'tiny', *_T, '--steps', '3'),),
    repeats='--rounds',  # each round runs each side in a fresh process
  ),
  Benchmark(
    'sample',
    'sample.py',
    full=(
      ('--preset', 'sd15', '--steps', '2', '--batch', '1', *_T),
      ('--preset', 'tiny', '--steps', '10', '--batch', '2', *_T),
      ('--preset', 'sdxl', '--height', '512', '--width', '512', '--steps', '2', '--batch', '1', *_T),
    ),
    quick=(
      ('--preset', 'tiny', '--steps', '4', '--batch', '2', *_T),
      ('--preset', 'sdxl-tiny', '--steps', '4', '--batch', '2', *_T),
    ),
  ),
  Benchmark(
    'eval_scoring',
    'eval_scoring.py',
    full=(('--models', 'dino', 'clip', '--batch', '32', *_T),),
    quick=(('--models', 'dino', '--batch', '4', *_T),),
  ),
  Benchmark(
    'kernels',  # the single ops the model rows come down to
    'kernels.py',
    full=(_T,),
    quick=(('--kernels', 'conv320', 'gemv_f32', *_T),),
  ),
  Benchmark(
    'kosmos2_generate',
    'kosmos2_generate.py',
    full=(('--config', 'tiny', 'full', '--batch', '1', '--new-tokens', '16', *_T),),
    quick=(('--config', 'tiny', '--batch', '1', '--new-tokens', '4', *_T),),
  ),
  Benchmark(
    'vlm_generate',
    'vlm_generate.py',
    full=(
      ('--model', 'qwen2_5_vl', '--config', 'tiny', '3b', '--batch', '1', '4', '--new-tokens', '8', *_T),
      ('--model', 'qwen2_5_vl', '--config', '3b', '--batch', '1', '4', '--new-tokens', '8', '--dtype', 'bfloat16', *_T),
      (
        '--model',
        'qwen2_5_vl',
        '--config',
        '3b',
        '--batch',
        '1',
        '--new-tokens',
        '8',
        '--dtype',
        'bfloat16',
        '--int8',
        *_T,
      ),
    ),
    quick=(('--model', 'qwen2_5_vl', '--config', 'tiny', '--batch', '1', '--new-tokens', '4', '--repeats', '1', *_T),),
  ),
  Benchmark(
    'multi_subject',
    'multi_subject.py',
    full=(('--subjects', '8', '--steps', '20'),),
    quick=(('--subjects', '2', '--steps', '2'),),
  ),
  Benchmark(
    'memory',
    'memory.py',
    full=(('--models', 'sd15', '--meshes', '8,1,1', '1,8,1'),),
    quick=(('--models', 'tiny', '--meshes', '8,1,1'),),
    repeats=None,  # XLA's memory analysis of the compiled step: the same every run
  ),
)
NAMES = tuple(b.name for b in BENCHMARKS)


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--quick', action='store_true', help='the tiny presets only (minutes on 2 CPU cores)')
  p.add_argument('--repeats', type=int, default=3, help='times each side runs (default 3)')
  p.add_argument('--only', nargs='+', choices=NAMES, metavar='NAME', help=f'these benchmarks only: {", ".join(NAMES)}')
  p.add_argument('--update-readme', action='store_true', help="replace the README's table between the markers")
  p.add_argument('--allow-loaded', action='store_true', help='let --update-readme write rows measured under load')
  p.add_argument(
    '--max-load', type=float, default=MAX_LOAD, help=f'load average flagged as loaded (default {MAX_LOAD})'
  )
  p.add_argument(
    '--max-others',
    type=float,
    default=MAX_OTHERS,
    help=f'CPU cores other processes may use on average during a run before it is flagged (default {MAX_OTHERS})',
  )
  p.add_argument('--out', default=RESULTS, help='results folder (default benchmarks/results)')
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f'--repeats must be at least 1, got {args.repeats}')
  if args.update_readme and args.quick:
    p.error("--update-readme shows the full benchmarks; --quick's tiny presets are for checking the harness")
  return args


# ----------------------------------------------------------------------------- aggregation


def side_stats(side: dict) -> dict:
  v = side['values']
  return {
    'name': side['name'],
    'label': side.get('label', side['name']),
    'values': v,
    'median': statistics.median(v),
    'min': min(v),
    'max': max(v),
  }


def summarize(
  row: dict,
  *,
  benchmark: str,
  command: str,
  load: tuple[float, float],
  env: dict,
  others: float | None = None,
  max_load=MAX_LOAD,
  max_others=MAX_OTHERS,
):
  """One results row from a script's --json row: median, min and max per side, the ratio of medians (peer /
  jaxdream: above 1 jaxdream is faster or smaller), and where and under which load it was measured (`others`:
  the cores other processes used during the run, None where unknown)."""
  sides = [side_stats(s) for s in row['sides']]
  ratio = sides[1]['median'] / sides[0]['median'] if len(sides) == 2 and sides[0]['median'] > 0 else None
  return {
    'benchmark': benchmark,
    'name': row['name'],
    'command': command,
    'unit': row['unit'],
    'per_call': row.get('per_call', 1),
    'item': row.get('item', 'call'),
    'sides': sides,
    'ratio': ratio,
    'load_before': load[0],
    'load_after': load[1],
    'others_cores': others,
    'loaded': is_loaded(load, others, max_load, max_others),
    'versions': env.get('versions'),
    'device': env.get('device'),
    'threads': env.get('threads'),
    'cores': env.get('cores'),
    'notes': row.get('notes', {}),
  }


def is_loaded(load: tuple[float, float], others: float | None, max_load=MAX_LOAD, max_others=MAX_OTHERS) -> bool:
  """Whether other work shared the machine: measured directly where it can be (`others`, cores), else the
  load average before or after the run."""
  return others > max_others if others is not None else max(load) > max_load


def memory_rows(lines: list[dict]) -> list[dict]:
  """memory.py's --json lines (its own format, kept: the README's memory commands append to such files) as
  one-sided rows in GiB per device."""
  rows = []
  for r in lines:
    if 'error' in r:
      continue
    mesh = ','.join(map(str, r['mesh']))
    name = f'training step memory per device, {r["model"]} {r["resolution"]} px, mesh {mesh}, '
    name += f'{r["batch_per_device"]} example(s)/device (XLA:CPU memory analysis)'
    rows.append(_report.row(name, [_report.side('jaxdream', [r['total'] / GIB])], unit='GiB'))
  return rows


# ----------------------------------------------------------------------------- the table


def _style(row: dict) -> str:
  """How a row's numbers read best, from jaxdream's median: GiB; seconds per item when an item takes a second
  or more; else items per second. One style per row, so both sides read alike."""
  if row['unit'] == 'GiB':
    return 'GiB'
  return 'time' if row['sides'][0]['median'] / row['per_call'] >= 1 else 'rate'


def _number(row: dict, style: str, value: float) -> float:
  if style == 'GiB':
    return value
  per_item = value / row['per_call']
  return per_item if style == 'time' else 1 / per_item


def _unit(row: dict, style: str) -> str:
  item = row['item']
  if style == 'GiB':
    return 'GiB'
  if style == 'time':
    return 's' if item == 'call' else f's/{item}'
  return f'{item}s/s'


def _cell(row: dict, side: dict, show_label: bool) -> str:
  """A side's median, its range over the repeats, and its label (when it is not plain 'jaxdream')."""
  style = _style(row)
  text = f'{_number(row, style, side["median"]):.3g} {_unit(row, style)}'
  if len(side['values']) > 1:
    lo, hi = sorted(_number(row, style, side[k]) for k in ('min', 'max'))
    text += f' ({lo:.3g}-{hi:.3g})'
  return text + (f' ({" ".join(side["label"].split())})' if show_label else '')


def markdown_table(rows: list[dict]) -> str:
  """The README's table: work (and the load it was measured under), command, each side's median (range over
  repeats), the ratio; quiet rows' ratios in bold."""
  lines = ['| work | command | jaxdream | peer | ratio |', '| --- | --- | --- | --- | --- |']
  for r in rows:
    load = f'load {r["load_before"]:.1f} -> {r["load_after"]:.1f}'
    if r.get('others_cores') is not None:
      load = f'other processes {r["others_cores"]:.2f} cores, {load}'
    work = f'{r["name"]} ({"loaded: " if r["loaded"] else ""}{load})'
    if 'error' in r:
      lines.append(f'| {work} | `{r["command"]}` | failed: {r["error"]} | | |')
      continue
    ours = _cell(r, r['sides'][0], r['sides'][0]['label'] != 'jaxdream')
    peer = _cell(r, r['sides'][1], True) if len(r['sides']) > 1 else '-'
    ratio = '-' if r['ratio'] is None else f'{r["ratio"]:.2f}x'
    if r['ratio'] is not None and not r['loaded']:
      ratio = f'**{ratio}**'
    lines.append(f'| {work} | `{r["command"]}` | {ours} | {peer} | {ratio} |')
  return '\n'.join(lines) + '\n'


def results_markdown(results: dict) -> str:
  env = results['environment']
  v = ', '.join(f'{k} {x}' for k, x in env['versions'].items() if x)
  head = (
    f'Benchmarks on {env["host"]} ({env["cpu"]}, {env["cpu_count"]} cores), {results["date"]}, '
    f'{"quick presets, " if results["quick"] else ""}{results["repeats"]} repeat(s) per side; {v}. '
    f'Ratio: the peer\'s median / jaxdream\'s (above 1: jaxdream faster or smaller); "loaded": other processes '
    f'used more than {results.get("max_others", MAX_OTHERS)} CPU cores on average during the run (where that '
    f'cannot be measured: the 1-minute load average was above {results["max_load"]} before or after it).\n\n'
  )
  return head + markdown_table(results['rows'])


def replace_table(text: str, table: str, where: str = 'README.md') -> str:
  """`text` with what lies between the benchmark markers replaced by `table`."""
  if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
    raise ValueError(f'{where}: expected one {BEGIN} followed by one {END} around the benchmark table')
  head, rest = text.split(BEGIN)
  _, tail = rest.split(END)
  return f'{head}{BEGIN}\n\n{table.rstrip()}\n\n{END}{tail}'


def update_readme(path: str, results: dict, allow_loaded: bool = False) -> None:
  """Write the results' table into the README between the markers: only full results of every benchmark the
  README shows, none of them loaded (unless allow_loaded)."""
  if results['quick']:
    raise ValueError('quick results (tiny presets) do not go into the README')
  have = {r['benchmark'] for r in results['rows']}
  missing = [n for n in NAMES if n not in have]
  if missing:
    raise ValueError(f'no results for {", ".join(missing)}: the README table needs every benchmark')
  failed = [r['name'] for r in results['rows'] if 'error' in r]
  loaded = [r['name'] for r in results['rows'] if r.get('loaded') and 'error' not in r]
  if failed:
    raise ValueError(f'failed rows: {"; ".join(failed)}')
  if loaded and not allow_loaded:
    raise ValueError(f'loaded rows (rerun them on a quiet machine, or --allow-loaded): {"; ".join(loaded)}')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  text = replace_table(text, results_markdown(results), path)  # with where, when and on what it ran
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


# ----------------------------------------------------------------------------- running


def read_report(path: str) -> dict:
  """A script's --json file: _report's format, or memory.py's JSON lines (see memory_rows)."""
  with open(path) as f:
    text = f.read()
  try:
    report = json.loads(text)
  except json.JSONDecodeError:  # several lines
    report = None
  if isinstance(report, dict) and 'rows' in report:
    return report
  lines = [json.loads(line) for line in text.splitlines() if line.strip()]
  device = {'platform': 'cpu', 'kind': 'simulated CPU devices', 'count': max([r['devices'] for r in lines] or [0])}
  return {'rows': memory_rows(lines), 'environment': dict(_report.environment(), device=device)}


def cpu_busy_seconds() -> float | None:
  """CPU seconds the whole machine has been busy since boot (user, nice, system, irq, softirq in /proc/stat),
  or None where there is no /proc/stat."""
  try:
    with open('/proc/stat') as f:
      fields = f.readline().split()
  except OSError:
    return None
  if not fields or fields[0] != 'cpu':
    return None
  user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
  return (user + nice + system + irq + softirq) / os.sysconf('SC_CLK_TCK')


def _own_cpu_seconds() -> float:
  """CPU seconds of this process and its finished children (a benchmark's own side processes included)."""
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def others_cores(busy: tuple[float | None, float | None], own: tuple[float, float], wall: float) -> float | None:
  """The CPU cores other processes used on average over `wall` seconds: the machine's busy time less ours."""
  if busy[0] is None or busy[1] is None or wall <= 0:
    return None
  return max(0.0, ((busy[1] - busy[0]) - (own[1] - own[0])) / wall)


def run_command(benchmark: str, command: list[str], *, max_load: float = MAX_LOAD, max_others=MAX_OTHERS) -> list[dict]:
  """Run one benchmark command with --json in a fresh process (its output passes through); its rows
  summarised, or one error row."""
  shown = ' '.join(shlex.quote(a) for a in command)
  script = os.path.join(ROOT, command[1])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
  with tempfile.TemporaryDirectory(prefix='jaxdream-bench-') as tmp:
    out = os.path.join(tmp, 'report.json')
    print(f'\n$ {shown}', flush=True)
    before = os.getloadavg()[0]
    busy0, own0, t0 = cpu_busy_seconds(), _own_cpu_seconds(), time.monotonic()
    proc = subprocess.run([sys.executable, script, *command[2:], '--json', out], cwd=ROOT, env=env)
    others = others_cores((busy0, cpu_busy_seconds()), (own0, _own_cpu_seconds()), time.monotonic() - t0)
    after = os.getloadavg()[0]
    base = dict(benchmark=benchmark, command=shown, load_before=before, load_after=after, others_cores=others)
    if proc.returncode or not os.path.exists(out):
      loaded = is_loaded((before, after), others, max_load, max_others)
      return [dict(base, name=benchmark, error=f'exit status {proc.returncode}', loaded=loaded)]
    report = read_report(out)
  env = report['environment'] or _report.environment()
  return [
    summarize(
      r,
      benchmark=benchmark,
      command=shown,
      load=(before, after),
      env=env,
      others=others,
      max_load=max_load,
      max_others=max_others,
    )
    for r in report['rows']
  ]


def results_path(folder: str, quick: bool, date: str | None = None, host: str | None = None) -> str:
  date = date or datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d')
  return os.path.join(folder, f'{date}-{host or socket.gethostname()}{"-quick" if quick else ""}.json')


def merge(earlier: dict | None, results: dict) -> dict:
  """The new results, with the earlier file's rows of benchmarks not run this time kept (in benchmark order)."""
  if not earlier:
    return results
  ran = {r['benchmark'] for r in results['rows']}
  rows = [r for r in earlier['rows'] if r['benchmark'] not in ran] + results['rows']
  return dict(results, rows=sorted(rows, key=lambda r: NAMES.index(r['benchmark'])))


def main(argv=None) -> int:
  args = _parse(argv)
  chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
  rows = []
  for b in chosen:
    for command in b.commands(args.quick, args.repeats):
      rows += run_command(b.name, command, max_load=args.max_load, max_others=args.max_others)
  results = {
    'date': datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d'),
    'created': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'quick': args.quick,
    'repeats': args.repeats,
    'max_load': args.max_load,
    'max_others': args.max_others,
    'environment': _report.environment(),
    'rows': rows,
  }
  path = results_path(args.out, args.quick)
  earlier = None
  if os.path.exists(path):
    with open(path) as f:
      earlier = json.load(f)
  results = merge(earlier, results)
  os.makedirs(args.out, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=1)
  table = results_markdown(results)
  with open(path[: -len('.json')] + '.md', 'w') as f:
    f.write(table)
  print('\n' + table + f'\nwrote {path} and its .md')
  if args.update_readme:
    update_readme(README, results, args.allow_loaded)
    print(f'updated the table in {README}')
  failed = [r['command'] for r in rows if 'error' in r]
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
