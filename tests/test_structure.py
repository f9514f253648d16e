"""The package's shape: no private cross-imports, read-only tools, layouts that convert (the layers and
import cycles: test_layers.py)."""

import ast
import hashlib
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from helpers import checkpoint_steps, small_run

from resnet_jax import checkpointing, evaluation, models, train

PACKAGE = REPO / 'resnet_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules():
  return {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _imports(path: pathlib.Path, modules) -> list[tuple[str, str]]:
  """(imported module, imported name) for every import of a project module, at any depth of the file."""
  found = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found += [(alias.name, '') for alias in node.names if alias.name.startswith('resnet_jax')]
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('resnet_jax'):
      for alias in node.names:
        submodule = f'{node.module}.{alias.name}'
        found.append((submodule, '') if submodule in modules else (node.module, alias.name))
  return found


def test_no_private_cross_imports():
  modules = _modules()
  private = [
    f'{name} imports {module}.{imported}'
    for name, path in modules.items()
    for module, imported in _imports(path, modules)
    if imported.startswith('_')
  ]
  assert not private


def _snapshot(workdir: pathlib.Path) -> dict:
  return {
    str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(workdir.rglob('*'))
    if p.is_file()
  }


@pytest.mark.slow
def test_evaluating_a_damaged_run_changes_nothing(tmp_path):
  """A read-only tool names a damaged newest checkpoint and uses the previous one; the workdir stays."""
  train.train_and_evaluate(small_run(), str(tmp_path))
  assert checkpoint_steps(tmp_path) == [3, 6]
  data_files = [
    p for p in (tmp_path / 'checkpoints' / '6' / 'default').rglob('*') if p.parent.name == 'd'
  ]
  assert data_files
  for p in data_files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
  before = _snapshot(tmp_path)
  result = evaluation.evaluate_workdir(str(tmp_path), '1crop')
  assert result['step'] == 3
  after = _snapshot(tmp_path)
  assert after.pop('eval_1crop.json')  # the tool's own output, and nothing else
  assert after == before


@pytest.mark.slow
def test_a_checkpoint_resumes_across_scan_blocks(tmp_path):
  """Half a run unscanned, the rest with scan_blocks: the same weights as the whole run unscanned."""
  common = dict(
    model__depth=14, optimizer__learning_rate=0.01
  )  # two blocks a stage: one is scanned
  straight = train.train_and_evaluate(small_run(**common), str(tmp_path / 'straight'))
  train.train_and_evaluate(small_run(**common, train__num_steps=3), str(tmp_path / 'switched'))
  switched = train.train_and_evaluate(
    small_run(**common, model__scan_blocks=True), str(tmp_path / 'switched')
  )
  assert switched['start_step'] == 3 and switched['steps'] == straight['steps'] == 6
  with ocp.StandardCheckpointer() as checkpointer:
    path = tmp_path / 'switched' / 'checkpoints' / '6' / 'default'
    assert 'stage1_block2to2' in checkpointer.metadata(path).item_metadata.tree['params']  # stacked
  saved = checkpointing.open_workdir(tmp_path / 'switched', small_run(**common))  # read unstacked
  expected = checkpointing.open_workdir(tmp_path / 'straight').variables
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), saved.variables, expected
  )


def test_convert_layout_round_trips():
  tree = {'params': {'stage1_block1': {'w': np.zeros(2)}, 'stage1_block2': {'w': np.ones(2)}}}
  stacked = models.convert_layout(tree, scan_blocks=True)
  assert set(stacked['params']) == {'stage1_block1', 'stage1_block2to2'}
  back = models.convert_layout(stacked, scan_blocks=False)
  jax.tree.map(np.testing.assert_array_equal, back, tree)


def _extras():
  setup = ast.parse((REPO / 'setup.py').read_text())
  call = next(
    n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, 'attr', '') == 'setup'
  )
  keywords = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  return keywords['install_requires'], keywords['extras_require']


def test_torch_is_an_extra_pinned_as_a_pair():
  """pip install -e '.[torch]' converts PyTorch files; the base install has no torch."""
  requires, extras = _extras()
  assert not any(r.startswith(('torch', 'torchvision')) for r in requires)
  pair = ['torch==2.14.1', 'torchvision==0.29.1']
  assert extras['torch'] == pair and set(pair) <= set(extras['test']) and 'bench' not in extras


def test_importing_the_tools_imports_no_torch():
  """The base install has no torch: every command imports without it."""
  code = (
    'import sys; sys.modules["torch"] = None; sys.modules["torchvision"] = None\n'
    'from resnet_jax import main, pretrained, registry, train\n'
    'from resnet_jax import complexity, data, diagram, evaluation, exact_bn, finetune, prediction\n'
    'from resnet_jax.tools import bn_stats, cli, convert, evaluate, predict, summary\n'
  )
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-2000:]
