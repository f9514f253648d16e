"""The main job end to end on the real CIFAR copy: every output written, and learning.

(Resuming, interruptions and bad input are tested in test_reliability.py.)
"""

import ast
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from helpers import as_flags, checkpoint_steps, run_cli, small_run

from resnet_jax import train

pytestmark = pytest.mark.slow  # CLI runs and training on the real CIFAR copy


def test_cli_run_on_real_cifar_writes_everything(tmp_path, cifar_folder, cifar_cache_dir):
  workdir = tmp_path / 'run'
  config = small_run(
    data__source='image_folder',
    data__image_folder=str(cifar_folder),
    data__cache_dir=str(cifar_cache_dir),
    train__num_steps=4,
    train__checkpoint_every_steps=2,
    train__eval_every_steps=2,
  )
  run_cli(workdir, *as_flags(config))
  assert checkpoint_steps(workdir) == [2, 4]
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['split']) for r in rows] == [
    (2, 'train'),
    (2, 'test'),
    (4, 'train'),
    (4, 'test'),
  ]
  assert all(0 <= r['error'] <= 1 and np.isfinite(r['loss']) for r in rows)
  assert json.loads((workdir / 'config.json').read_text())['data']['image_folder'] == str(
    cifar_folder
  )
  results = json.loads((workdir / 'results.json').read_text())
  assert (
    results['steps'] == 4 and results['test_error'] == rows[-1]['error']
  )  # the final evaluation
  assert results['config'] == 'cifar10_20' and results['versions']['jax'] and results['device_kind']


def test_learns_real_cifar(tmp_path, cifar_folder, cifar_cache_dir):
  """2,000 real training images: at most 200 steps bring the training loss well under ln 10 = 2.30."""
  config = small_run(
    data__source='image_folder',
    data__image_folder=str(cifar_folder),
    data__cache_dir=str(cifar_cache_dir),
    data__train_limit=2000,
    train__batch_size=128,
    train__num_steps=200,
    train__log_every_steps=1,
    train__eval_every_steps=200,
    train__checkpoint_every_steps=200,
  )
  train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in rows if r['split'] == 'train']
  assert len(losses) == 200
  assert np.mean(losses[-20:]) <= 1.7, np.mean(losses[-20:])


def test_trains_without_tensorflow(tmp_path):
  """A JAX-only machine may have no TensorFlow: the model, the step and the writers must do without it."""
  code = f"""
import sys
sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None  # any import of them fails
sys.path.insert(0, 'tests')
from helpers import small_run
from resnet_jax import train
train.train_and_evaluate(small_run(train__num_steps=2, train__eval_every_steps=2), {str(tmp_path)!r})
assert sys.modules['tensorflow'] is None
"""
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'TensorFlow is not importable' in result.stderr
  assert (tmp_path / 'metrics.jsonl').exists() and (tmp_path / 'results.json').exists()
  assert not (tmp_path / 'tensorboard').exists()


def test_help_prints_the_docstring_as_written():
  """absl %-formats a tool's docstring for --help: a literal % swallowed text and printed the
  program's path mid-sentence."""
  result = subprocess.run(
    [sys.executable, '-m', 'resnet_jax.tools.evaluate', '--help'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert 'It changes nothing in the workdir but writing DIR/eval_<mode>.json' in result.stdout, (
    result.stdout[:2000]
  )
  assert 'resnet_jax/tools/evaluate.py' not in result.stdout.split('flags:')[0]
  tools = [REPO / 'resnet_jax' / 'main.py', *sorted((REPO / 'resnet_jax' / 'tools').glob('*.py'))]
  for path in tools:  # and no other tool has one
    docstring = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ''
    assert '%' not in docstring, f'{path.name}: write "percent" instead of %'
