"""The package's own modules import one another without circles and never up a layer.

Every .py file under vtp_jax/ is parsed with `ast` (nothing is imported); each `import vtp_jax.x`
and `from vtp_jax.x import y` anywhere in the file, function-local ones included, is an edge to
`vtp_jax.x.y` when that is a module and to `vtp_jax.x` otherwise. A circle, however deferred, means
two files that cannot be read or changed apart; an import up the layers below means a lower piece
that knows about a higher one (the tokenizer's batch contract about the generator, say).
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'vtp_jax'

# The package's layers, lowest first: a module imports from its own layer or below. A module
# belongs to the longest prefix listed (so `vtp_jax.driver`, the driver, sits above the
# trainings it runs, and `vtp_jax.eval.__main__`, a command line, above the generator it loads).
# This table is the one statement of the order; the README's map describes it.
LAYERS = (
    ('foundation', ('vtp_jax.host_malloc', 'vtp_jax.compiler_options', 'vtp_jax.sharding',
                    'vtp_jax.pixels', 'vtp_jax.paths', 'vtp_jax.kernels')),
    ('models and losses', ('vtp_jax.models', 'vtp_jax.losses')),
    ('batch and data', ('vtp_jax.batch', 'vtp_jax.data')),
    ('checkpoints', ('vtp_jax.checkpoints',)),
    ('released-model API', ('vtp_jax.inference',)),
    ('tokenizer training', ('vtp_jax.train',)),
    ('evaluation and tools', ('vtp_jax.eval', 'vtp_jax.tools')),
    ('generation', ('vtp_jax.generation',)),
    ('tasks', ('vtp_jax.tasks',)),
    ('programs', ('vtp_jax.driver', 'vtp_jax.bench', 'vtp_jax.study', 'vtp_jax.eval.__main__')),
)


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


def layer_of(module: str, layers=LAYERS) -> int:
  """Index in `layers` of the longest listed prefix of `module`."""
  best, best_len = None, -1
  for index, (_, prefixes) in enumerate(layers):
    for prefix in prefixes:
      if (module == prefix or module.startswith(prefix + '.')) and len(prefix) > best_len:
        best, best_len = index, len(prefix)
  if best is None:
    raise AssertionError(f'{module} is in no layer of tests/test_imports.py LAYERS: add it there.')
  return best


def upward_imports(graph: dict, layers=LAYERS) -> list:
  """['a (layer) -> b (layer)', ...] for every import of a higher layer."""
  names = [name for name, _ in layers]
  out = []
  for module, targets in sorted(graph.items()):
    if module == 'vtp_jax':
      continue  # the package root imports nothing of its own
    for target in sorted(targets):
      low, high = layer_of(module, layers), layer_of(target, layers)
      if high > low:
        out.append(f'{module} ({names[low]}) -> {target} ({names[high]})')
  return out


def test_layer_check_reports_an_import_up_the_layers():
  layers = (('low', ('pkg.a',)), ('high', ('pkg.b',)), ('top', ('pkg.a.cli',)))
  graph = {'pkg.a.x': {'pkg.b.y'}, 'pkg.b.y': {'pkg.a.x'}, 'pkg.a.cli': {'pkg.b.y'}}
  assert upward_imports(graph, layers) == ['pkg.a.x (low) -> pkg.b.y (high)']


def test_no_module_imports_a_layer_above_its_own():
  upward = upward_imports(import_graph())
  assert not upward, 'imports up the layers:\n' + '\n'.join(upward)
