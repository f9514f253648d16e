"""What a new user meets first: relative workdirs, limited eval sets, class counts, short schedules."""

import json
import os
import subprocess
import sys
import time
import types

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


def folder_run(tmp_path, **overrides):
  """small_run on the image folder tmp_path/data, every image of it, its cache under tmp_path."""
  return small_run(
    data__source='image_folder',
    data__image_folder=str(tmp_path / 'data'),
    data__cache_dir=str(tmp_path / 'cache'),
    data__train_limit=0,
    data__eval_limit=0,
    **overrides,
  )


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
  config = folder_run(
    tmp_path,
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


def test_the_first_decode_of_a_folder_reports_its_progress_and_the_cache(tmp_path, caplog):
  write_image_folder(tmp_path / 'data', classes=('a', 'b'), per_class=(6, 2))  # 16 images
  config = defaults.get_config().data
  config.update(
    source='image_folder', image_folder=str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache')
  )
  caplog.set_level('INFO')
  data.load(config, seed=0)
  first = caplog.messages
  (cache,) = (tmp_path / 'cache').iterdir()
  assert any(m.startswith(f'Decoding 16 images of {tmp_path / "data"}') for m in first)
  quarters = [m.split(': ')[-1] for m in first if '% (' in m]
  assert quarters == [
    f'{p}% ({n} of 16 images)' for p, n in ((25, 4), (50, 8), (75, 12), (100, 16))
  ]
  assert any(m.startswith('Decoded 16 images') and str(cache) in m for m in first)
  caplog.clear()
  data.load(config, seed=0)  # from the cache: no decoding, and where it came from
  assert not any('Decoding' in m for m in caplog.messages)
  assert any(str(cache) in m for m in caplog.messages)


@pytest.mark.slow
def test_the_exact_bn_pass_reports_the_images_it_read_its_progress_and_its_own_time(
  tmp_path, caplog, monkeypatch
):
  """A folder smaller than train.bn_stats_images: the pass reads the training set once, in whole
  batches, and says so; its time is apart from the training time."""
  write_image_folder(
    tmp_path / 'data', classes=('a', 'b', 'c'), per_class=(10, 2)
  )  # 30 training images
  config = folder_run(
    tmp_path,
    model__num_classes=3,
    train__batch_size=8,
    train__eval_batch_size=8,
    train__bn_stats_images=10_000,
  )
  # A clock that the pass moves on by an hour: training time that held the pass would hold that hour.
  hour = [0.0]
  clock = types.SimpleNamespace(
    time=lambda: time.time() + hour[0], perf_counter=lambda: time.perf_counter() + hour[0]
  )
  recompute = exact_bn.recompute

  def slow_recompute(*args):
    stats = recompute(*args)
    hour[0] += 3600
    return stats

  monkeypatch.setattr(train, 'time', clock)
  monkeypatch.setattr(exact_bn, 'time', clock)  # the pass times itself
  monkeypatch.setattr(exact_bn, 'recompute', slow_recompute)
  caplog.set_level('INFO')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  batches = 30 // 8
  assert results['exact_bn_images'] == batches * 8  # not bn_stats_images, nor more than the set
  progress = [m for m in caplog.messages if m.startswith('Exact BN statistics: ')]
  assert f'over {batches * 8} training images' in progress[0]
  assert progress[-1] == f'Exact BN statistics: 100% ({batches} of {batches} batches)'
  assert results['exact_bn_time_s'] >= 3600 > results['wall_time_s']
  saved = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert saved['exact_bn_time_s'] == results['exact_bn_time_s']
  assert saved['wall_time_s'] == pytest.approx(sum(s['wall_time_s'] for s in saved['segments']))


@pytest.mark.slow
def test_reading_tools_print_no_orbax_metadata_warning_and_no_line_twice(tmp_path):
  write_image_folder(tmp_path / 'data', classes=('a', 'b'), per_class=(8, 2))
  config = folder_run(
    tmp_path,
    train__batch_size=8,
    train__eval_batch_size=8,
    train__bn_stats_images=8,
  )
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  image = tmp_path / 'data' / 'test' / 'a' / '0000.png'
  # JAX probes every platform, as for a user (the tests otherwise pin the CPU)
  probing = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  for tool, *args in (
    ('evaluate',),
    ('predict', str(image)),
    ('bn_stats', '--num_images=8'),
    ('summary',),
  ):
    result = subprocess.run(
      [sys.executable, '-m', f'resnet_jax.tools.{tool}', f'--workdir={tmp_path / "run"}', *args],
      cwd=REPO,
      env=probing,
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert '_CHECKPOINT_METADATA' not in result.stderr, (tool, result.stderr)
    assert "backend 'tpu'" not in result.stderr, (tool, result.stderr)
    # absl's prefix (time, thread) makes each line unique: compare the messages after it
    messages = [line.split('] ', 1)[-1] for line in result.stderr.splitlines() if line.strip()]
    assert len(messages) == len(set(messages)), (tool, result.stderr)
  # A checkpoint written without the step's metadata file (older orbax versions) still reads.
  (tmp_path / 'run' / 'checkpoints' / '6' / '_CHECKPOINT_METADATA').unlink()
  assert checkpointing.open_workdir(tmp_path / 'run').step == 6
