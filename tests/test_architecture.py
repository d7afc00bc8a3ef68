"""The package layout is the architecture: lower layers never import upper ones, and there are no cycles."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'jaxdream')
# Lowest first; a package imports only from its own level or below.
LEVELS = {
  'nn': 0,
  'io': 0,
  'schedulers': 0,
  'distributed': 0,
  'runtime': 0,
  'models': 1,
  'lora': 1,
  'diffusion': 2,
  'vlm': 2,
  'training': 3,
  'serve': 3,
  'evaluation': 3,
  'cli': 4,
}


def _modules() -> dict[str, str]:
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        out['jaxdream.' + os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.').removesuffix('.__init__')] = path
  return out


def _imports() -> dict[str, set[str]]:
  """{module: the jaxdream modules it imports}, every import in the file (also those inside functions).
  `from jaxdream.pkg import mod` depends on jaxdream.pkg.mod, not on the package's __init__."""
  modules = _modules()
  graph = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if not f.endswith('.py'):
        continue
      path = os.path.join(folder, f)
      mod = 'jaxdream.' + os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
      mod = mod.removesuffix('.__init__')
      deps = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('jaxdream'):
          for a in node.names:
            sub = f'{node.module}.{a.name}'
            deps.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
          deps.update(a.name for a in node.names if a.name.startswith('jaxdream'))
      graph[mod] = deps
  return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def _package(mod: str) -> str | None:
  parts = mod.split('.')
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LEVELS) else None


def test_every_package_has_a_level():
  packages = {
    d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d)) and d not in ('assets', '__pycache__')
  }
  assert packages == set(LEVELS), 'add new packages to LEVELS (and to the README layout table)'


def test_no_upward_imports():
  upward = []
  for mod, deps in _imports().items():
    pkg = _package(mod)
    if pkg is None:  # jaxdream/__init__.py and the old-path alias modules sit on top
      continue
    for d in deps:
      dpkg = _package(d)
      if dpkg is None or LEVELS[dpkg] > LEVELS[pkg]:
        upward.append(f'{mod} -> {d}')
  assert not upward, 'imports from a higher layer:\n' + '\n'.join(sorted(upward))


@pytest.mark.parametrize('level', ['package', 'module'])
def test_import_graph_has_no_cycles(level):
  graph = _imports()
  if level == 'package':
    pg = {}
    for m, deps in graph.items():
      if _package(m):
        pg.setdefault(_package(m), set()).update(
          _package(d) for d in deps if _package(d) and _package(d) != _package(m)
        )
    graph = pg
  state, stack = {}, []

  def visit(n):
    state[n] = 'open'
    stack.append(n)
    for d in graph.get(n, ()):
      if state.get(d) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(d) :] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[n] = 'done'

  for n in sorted(graph):
    if n not in state:
      visit(n)


def test_evaluation_never_imports_training():
  """Both sit on level 3: training may score its validation images with jaxdream.evaluation, not the reverse."""
  upward = [
    f'{m} -> {d}'
    for m, deps in _imports().items()
    for d in deps
    if (_package(m), _package(d)) == ('evaluation', 'training')
  ]
  assert not upward, '\n'.join(upward)
