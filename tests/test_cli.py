"""The main job end to end: bad input refused fast, exact resume, a real-data run, and learning."""
import json
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from conftest import REPO
from resnet_jax import train


def run_cli(workdir, *overrides, config='configs/cifar10_20.py', check=True, timeout=600):
  cmd = [sys.executable, '-m', 'resnet_jax.main', f'--config={config}', f'--workdir={workdir}', *overrides]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  if check and result.returncode:
    raise AssertionError(f'{" ".join(cmd)} failed:\n{result.stderr[-3000:]}')
  return result


def small_run(**overrides):
  """ResNet-8 on a fixed subset: a few steps through the whole loop in seconds."""
  config = default.get_config()
  config.model.depth = 8
  config.data.update(source='synthetic', train_limit=256, eval_limit=100)
  config.train.update(batch_size=32, eval_batch_size=64, num_steps=6, log_every_steps=2, eval_every_steps=3,
                      checkpoint_every_steps=3)
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


def as_flags(config):
  return [f'--config.{s}.{k}={v}' for s in ('model', 'data', 'train') for k, v in config[s].items()
          if v != default.get_config()[s][k] and not isinstance(v, (tuple, list))]


def final_params(workdir):
  steps = sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / 'checkpoints' / str(steps[-1]) / 'default')
  return steps[-1], state


@pytest.mark.parametrize('flags,message', [
    (['--config.optimizer.learning_rate=-0.1'], 'optimizer.learning_rate must be positive, got -0.1'),
    (['--config.train.batch_size=100'], 'train.batch_size=100 is not divisible by the 8 devices'),
    (['--config.data.source=ftp'], "data.source must be one of ('tfds', 'image_folder', 'synthetic'), got 'ftp'"),
    (['--config.model.depth=21'], 'CIFAR ResNet depth must be 6n+2, got 21'),
    (['--config.model.shortcut=D'], "Unknown shortcut option 'D'"),
    (['--config.train.num_steps=0'], 'train.num_steps must be a positive integer, got 0'),
    (['--config.data.source=image_folder', '--config.data.image_folder=/nonexistent/cifar'], '/nonexistent/cifar'),
])
def test_bad_input_is_refused_in_one_sentence(tmp_path, flags, message):
  start = time.time()
  result = run_cli(tmp_path / 'w', *flags, check=False, timeout=120)
  assert result.returncode != 0 and time.time() - start < 60
  assert message in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()  # refused before anything was written


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
  config = small_run()
  train.train_and_evaluate(config, str(tmp_path / 'straight'))
  half = small_run(train__num_steps=3)
  train.train_and_evaluate(half, str(tmp_path / 'resumed'))
  run_cli(tmp_path / 'resumed', *as_flags(config))  # a new process picks up at step 3
  step_a, a = final_params(tmp_path / 'straight')
  step_b, b = final_params(tmp_path / 'resumed')
  assert step_a == step_b == 6
  leaves_a, leaves_b = [np.asarray(x) for x in jax.tree.leaves(a)], [np.asarray(x) for x in jax.tree.leaves(b)]
  assert len(leaves_a) == len(leaves_b) > 0
  assert all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
  started = [json.loads(l) for l in (tmp_path / 'resumed' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in started if r['split'] == 'train'] == [2, 3, 4, 6]  # 3 = the first run's end


def test_cli_run_on_real_cifar_writes_everything(tmp_path, cifar_folder, cifar_cache_dir):
  workdir = tmp_path / 'run'
  config = small_run(data__source='image_folder', data__image_folder=str(cifar_folder),
                     data__cache_dir=str(cifar_cache_dir), train__num_steps=4,
                     train__checkpoint_every_steps=2, train__eval_every_steps=2)
  run_cli(workdir, *as_flags(config))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['2', '4']
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['split']) for r in rows] == [(2, 'train'), (2, 'test'), (4, 'train'), (4, 'test')]
  assert all(0 <= r['error'] <= 1 and np.isfinite(r['loss']) for r in rows)
  assert json.loads((workdir / 'config.json').read_text())['data']['image_folder'] == str(cifar_folder)
  results = json.loads((workdir / 'results.json').read_text())
  assert results['steps'] == 4 and results['test_error'] == rows[-1]['error']  # the final evaluation
  assert results['config'] == 'cifar10_20' and results['versions']['jax'] and results['device_kind']


def test_learns_real_cifar(tmp_path, cifar_folder, cifar_cache_dir):
  """2,000 real training images: at most 200 steps bring the training loss well under ln 10 = 2.30."""
  config = small_run(data__source='image_folder', data__image_folder=str(cifar_folder),
                     data__cache_dir=str(cifar_cache_dir), data__train_limit=2000,
                     train__batch_size=128, train__num_steps=200, train__log_every_steps=1,
                     train__eval_every_steps=200, train__checkpoint_every_steps=200)
  train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in rows if r['split'] == 'train']
  assert len(losses) == 200
  assert np.mean(losses[-20:]) <= 1.7, np.mean(losses[-20:])

