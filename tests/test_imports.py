"""bcjax's modules import each other without cycles, and the input entry without TensorFlow.

Every ``import`` / ``from ... import`` in every module of the package counts,
the ones inside functions too: a lazy import that closes a loop is still a
loop, one that makes the order modules may be changed in a puzzle. Read from
the source text (``ast``), so nothing is imported to check it.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'bcjax'


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(ROOT).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def _imports(name: str, path: pathlib.Path, known) -> set[str]:
  """The bcjax modules ``name`` imports anywhere in its text."""
  package = name if path.name == '__init__.py' else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      for a in node.names:  # `from bcjax import data` imports the module bcjax.data.
        found.add(f'{base}.{a.name}' if f'{base}.{a.name}' in known else base)
  return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
  known = _modules()
  return {name: _imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_the_walk_sees_lazy_imports():
  edges = graph()
  assert 'bcjax.data' in edges['bcjax.train'] and 'bcjax.steps' in edges['bcjax.parallel']
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_import_cycle():
  assert cycles(graph()) == []


def test_evaluate_and_ensemble_do_not_import_each_other():
  edges = graph()
  assert 'bcjax.ensemble' not in edges['bcjax.evaluate']
  assert 'bcjax.evaluate' not in edges['bcjax.ensemble']


def test_the_input_entry_never_imports_tensorflow_at_module_level():
  """bcjax.data and its facts import no TensorFlow (tests/test_packed.py runs it)."""
  for name in ('bcjax.data', 'bcjax.data.spec'):
    path = _modules()[name]
    tree = ast.parse(path.read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module for n in top
                                                       if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n and ('tensorflow' in n or n.endswith(
        ('pipeline', 'sources', 'tf_cpu', 'images')))}, (name, names)
