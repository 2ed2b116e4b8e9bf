"""The package's layers (README, "Architecture"): every import runs down or sideways within
a layer, never up, and no module imports itself back through others."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'saber_jax'

# The README's layer table: module (or package) prefix -> layer, most specific first.
LAYERS = {
    'saber_jax.main': 7, 'saber_jax.pipeline': 7, 'saber_jax.cli': 7, 'saber_jax.configs': 7,
    'saber_jax.train': 6, 'saber_jax.generate': 6,
    'saber_jax.weights': 5, 'saber_jax.decode': 5,
    'saber_jax.data': 4, 'saber_jax.convert': 4,
    'saber_jax.models': 3, 'saber_jax.losses': 3, 'saber_jax.judge': 3,
    'saber_jax.lm_head': 2, 'saber_jax.sharding': 2, 'saber_jax.fingerprint': 2,
    'saber_jax.batch': 1, 'saber_jax.files': 1, 'saber_jax.errors': 1, 'saber_jax.metrics': 1,
    'saber_jax.platforms': 1,
}


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer(module: str) -> int | None:
  for prefix in sorted(LAYERS, key=len, reverse=True):
    if module == prefix or module.startswith(prefix + '.'):
      return LAYERS[prefix]
  return None


def imported_modules(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The package modules `path` imports (`from saber_jax.x import y` counts y when y is a
  module, else x)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith('saber_jax')}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
        and node.module.startswith('saber_jax'):
      for alias in node.names:
        child = f'{node.module}.{alias.name}'
        found.add(child if child in modules else node.module)
  return found & modules


def import_graph() -> dict[str, set[str]]:
  paths = {module_name(p): p for p in PACKAGE.rglob('*.py')}
  return {m: imported_modules(p, set(paths)) - {m} for m, p in paths.items()}


def test_every_module_has_a_layer():
  assert [m for m in import_graph() if m != 'saber_jax' and layer(m) is None] == []


def test_no_import_runs_up_a_layer():
  upward = [f'{m} (layer {layer(m)}) imports {d} (layer {layer(d)})'
            for m, deps in import_graph().items() if m != 'saber_jax'
            for d in deps if d != 'saber_jax' and layer(d) > layer(m)]
  assert upward == []


def test_no_import_cycle():
  graph = import_graph()
  state, cycles = {}, []

  def visit(module, stack):
    state[module] = 'open'
    for dep in graph[module]:
      if state.get(dep) == 'open':
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[module] = 'done'

  for module in graph:
    if module not in state:
      visit(module, [module])
  assert cycles == []
