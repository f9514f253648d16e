"""What a new user meets first: relative workdirs, limited eval sets, class counts, short schedules."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from helpers import as_flags, run_cli, small_run, write_image_folder

from resnet_jax import checkpointing, data, defaults, exact_bn, optim, train, validate


@pytest.mark.slow
def test_tools_accept_relative_and_home_workdirs(tmp_path, monkeypatch):
  train.train_and_evaluate(small_run(), str(tmp_path / 'run'))
  absolute = checkpointing.open_workdir(tmp_path / 'run')
  monkeypatch.chdir(tmp_path)
  relative = checkpointing.open_workdir('run')
  monkeypatch.setenv('HOME', str(tmp_path))
  home = checkpointing.open_workdir('~/run')
  assert absolute.step == relative.step == home.step == 6
  jax.tree.map(np.testing.assert_array_equal, absolute.variables, relative.variables)


def test_eval_limit_samples_every_class_of_a_sorted_folder(tmp_path):
  """The first N files of a sorted folder are one or two classes; a limit must spread over all."""
  classes = tuple(f'class{i}' for i in range(5))
  write_image_folder(tmp_path / 'data', classes=classes, per_class=(2, 20))
  config = defaults.get_config().data
  config.update(source='image_folder', image_folder=str(tmp_path / 'data'), cache_dir=str(tmp_path))
  config.eval_limit = 20  # of 100 test images, sorted by class: the first 20 are all class 0
  ds = data.load(config, seed=0)
  assert len(ds.eval_labels) == 20
  assert set(ds.eval_labels.tolist()) == set(range(5))
  np.testing.assert_array_equal(data.load(config, seed=0).eval_images, ds.eval_images)  # fixed


def test_more_classes_than_outputs_is_refused_naming_both(tmp_path):
  write_image_folder(tmp_path / 'data', classes=('a', 'b', 'c'), per_class=(2, 1))
  config = small_run(
    data__source='image_folder',
    data__image_folder=str(tmp_path / 'data'),
    data__cache_dir=str(tmp_path / 'cache'),
    data__train_limit=0,
    data__eval_limit=0,
    model__num_classes=2,
    train__batch_size=2,
  )
  with pytest.raises(data.DataError, match=r'has 3 classes but model.num_classes=2.*num_classes=3'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()  # found before the workdir was created


def test_boundaries_beyond_a_shortened_run_warn_and_fractions_place_them():
  config = defaults.get_config()
  config.train.num_steps = 2000
  (warning,) = validate.warnings(config)
  assert '(32000, 48000)' in warning and 'boundaries_at=fractions' in warning
  assert validate.warnings(defaults.get_config()) == []  # the paper's 64k run drops at 32k and 48k
  config.optimizer.boundaries_at = 'fractions'
  assert validate.warnings(config) == []
  resolved = optim.resolve_boundaries(config.optimizer, config.train.num_steps)
  assert tuple(resolved.boundaries) == (1000, 1500)
  lrs = [float(optim.learning_rate(resolved, np.int32(s), True)) for s in (999, 1000, 1499, 1500)]
  np.testing.assert_allclose(lrs, [0.1, 0.01, 0.01, 0.001], rtol=1e-6)


@pytest.mark.slow
def test_evaluate_prints_only_its_json(tmp_path):
  """Library log lines go to stderr, so the tool's output can be piped."""
  train.train_and_evaluate(small_run(), str(tmp_path))
  result = subprocess.run(
    [sys.executable, '-m', 'resnet_jax.tools.evaluate', f'--workdir={tmp_path}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=True,
  )
  (line,) = result.stdout.strip().splitlines()
  assert json.loads(line)['step'] == 6


@pytest.mark.slow
def test_results_report_both_bn_statistics_and_the_time_of_every_segment(tmp_path):
  train.train_and_evaluate(small_run(train__num_steps=3), str(tmp_path))
  results = train.train_and_evaluate(small_run(), str(tmp_path))  # resumed at step 3
  segments = results['segments']
  assert [(s['start_step'], s['end_step']) for s in segments] == [(0, 3), (3, 6)]
  assert results['wall_time_s'] == pytest.approx(sum(s['wall_time_s'] for s in segments))
  assert results['bn_statistics'] == 'moving_average'
  assert results['test_error'] == results['test_error_moving_average_bn']
  recomputed = exact_bn.recalibrate_workdir(str(tmp_path), num_images=64)  # the same 64 images
  assert results['test_error_exact_bn'] == pytest.approx(
    recomputed['recomputed']['error'], abs=1e-6
  )
  assert results['test_error'] == pytest.approx(recomputed['checkpoint']['error'], abs=1e-6)


@pytest.mark.slow
def test_the_end_of_a_run_says_where_everything_is_and_a_rerun_changes_nothing(tmp_path):
  config = small_run()
  first = run_cli(tmp_path, *as_flags(config))
  results = (tmp_path / 'results.json').read_bytes()
  error = json.loads(results)['test_error']
  assert f'test error {100 * error:.2f}%' in first.stdout
  assert str(tmp_path / 'results.json') in first.stdout and 'tensorboard --logdir' in first.stdout
  again = run_cli(tmp_path, *as_flags(config))
  assert 'already at step 6 of 6' in again.stderr
  assert (tmp_path / 'results.json').read_bytes() == results
