"""Two layers: the library never imports the command-line tools or a flag parser, and no module imports
itself back. Read from the source with `ast` (every import, also those inside functions), nothing is run."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / 'resnet_jax'
TOOLS = (
  'resnet_jax.tools',
  'resnet_jax.main',
)  # the command-line layer: the tools and the training job
FLAG_MODULES = ('absl.flags', 'absl.app', 'ml_collections.config_flags')


def module_name(path):
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob('*.py'))}


def is_tool(name):
  return any(name == t or name.startswith(f'{t}.') for t in TOOLS)


def imports(name):
  """Every module `name` imports: `from a import b` counts as a.b when that is a module, else as a."""
  found = set()
  package = name if MODULES[name].name == '__init__.py' else name.rpartition('.')[0]
  for node in ast.walk(ast.parse(MODULES[name].read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative
        anchor = package.split('.')[: len(package.split('.')) - node.level + 1]
        base = '.'.join(anchor + ([base] if base else []))
      for alias in node.names:
        full = f'{base}.{alias.name}'
        found.add(full if full in MODULES or full in FLAG_MODULES else base)
  return found


def dependencies(name):
  """The project modules importing `name` runs: each imported module and the packages above it, whose
  __init__ runs first, except the importer's own packages (already being imported)."""
  found = set()
  for module in imports(name):
    parts = module.split('.')
    for end in range(1, len(parts) + 1):
      parent = '.'.join(parts[:end])
      if parent in MODULES and parent != name and not name.startswith(f'{parent}.'):
        found.add(parent)
  return found


GRAPH = {name: dependencies(name) for name in MODULES}


def test_the_graph_sees_the_layers():
  """The parser is not blind: the tools exist and are found importing the library."""
  assert {'resnet_jax.tools.cli', 'resnet_jax.tools.evaluate', 'resnet_jax.main'} <= set(MODULES)
  assert 'resnet_jax.evaluation' in GRAPH['resnet_jax.tools.evaluate']
  assert 'resnet_jax.exact_bn' in GRAPH['resnet_jax.train']
  assert 'absl.flags' in imports('resnet_jax.tools.cli')
  # Importing a data source runs the data package's __init__, which imports every source.
  assert 'resnet_jax.data' in GRAPH['resnet_jax.evaluation']
  assert 'resnet_jax.data' not in GRAPH['resnet_jax.data.imagenet']


@pytest.mark.parametrize('name', sorted(n for n in MODULES if not is_tool(n)))
def test_the_library_imports_no_tool_and_no_flags(name):
  found = imports(name)
  assert not [m for m in found if is_tool(m)], f'{name} imports the command-line layer'
  flagged = [
    m for m in found if m in FLAG_MODULES or m.startswith(tuple(f'{f}.' for f in FLAG_MODULES))
  ]
  assert not flagged, f'{name} imports {flagged}: flags are parsed by the tools only'


def test_no_import_cycles():
  state, stack = {}, []

  def visit(name):
    state[name] = 'open'
    stack.append(name)
    for other in sorted(GRAPH[name]):
      if state.get(other) == 'open':
        cycle = stack[stack.index(other) :] + [other]
        raise AssertionError(f'import cycle: {" -> ".join(cycle)}')
      if other not in state:
        visit(other)
    stack.pop()
    state[name] = 'done'

  for name in sorted(GRAPH):
    if name not in state:
      visit(name)
