"""The package's own modules import one another without circles.

Every .py file under vtp_jax/ is parsed with `ast` (nothing is imported); each `import vtp_jax.x`
and `from vtp_jax.x import y` anywhere in the file, function-local ones included, is an edge to
`vtp_jax.x.y` when that is a module and to `vtp_jax.x` otherwise. A circle, however deferred, means
two files that cannot be read or changed apart.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'vtp_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict:
  files = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  graph = {name: set() for name in files}
  for name, path in files.items():
    is_package = path.name == '__init__.py'
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:  # relative import: resolve against this module's package
          package = name.split('.') if is_package else name.split('.')[:-1]
          package = package[:len(package) - node.level + 1]
          base = '.'.join(package + ([base] if base else []))
        targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in files else base
                   for alias in node.names]
      for target in targets:
        while target and target not in files:  # `import vtp_jax.a.b` names module a.b, or a
          target = target.rpartition('.')[0]
        if target.startswith('vtp_jax') and target != name:
          graph[name].add(target)
  return graph


def find_cycle(graph: dict) -> list | None:
  """One import circle as [a, b, ..., a], or None."""
  state = {}  # name -> 'open' while on the DFS path, 'done' after

  def visit(node, path):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt, path + [nxt])
        if found:
          return found
    state[node] = 'done'
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def test_the_graph_sees_function_local_imports():
  graph = import_graph()
  assert 'vtp_jax.models.vtp' in graph['vtp_jax.train.state']
  # metrics.py imports decode.py inside a function only.
  assert 'vtp_jax.data.decode' in graph['vtp_jax.train.metrics']


def test_cycle_finder_reports_a_circle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_circles():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)
