"""A run's files through workdir.Workdir: the mean image training saves there, so that evaluation needs
only the workdir and the images it evaluates on, and tools' --config.<field> overrides of a workdir's
config."""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from helpers import small_run
from PIL import Image

from resnet_jax import data, defaults, evaluation, parallel, train
from resnet_jax.workdir import Workdir


def test_every_file_is_named_under_the_workdir(tmp_path):
  run = Workdir(tmp_path / 'run')
  names = {
    run.config_json: 'config.json',
    run.checkpoints: 'checkpoints',
    run.corrupt: 'checkpoints/corrupt',
    run.metrics: 'metrics.jsonl',
    run.tensorboard: 'tensorboard',
    run.segments: 'segments.json',
    run.results: 'results.json',
    run.lock: 'lock.json',
    run.mean_image: 'mean_image.npy',
    run.evaluation('10crop'): 'eval_10crop.json',
    run.bn_stats: 'bn_stats.json',
    run.bn_recomputed(12): 'bn_recomputed/12',
  }
  for path, name in names.items():
    assert path == str(tmp_path / 'run' / name)
  assert not (tmp_path / 'run').exists()  # naming creates nothing


def test_the_saved_mean_image_replaces_the_computed_one(tmp_path):
  config = small_run()
  run = Workdir(tmp_path)
  assert run.with_saved_statistics(config) is config  # an older run: computed as before
  np.save(run.mean_image, np.zeros((32, 32, 3), np.float32))
  assert run.with_saved_statistics(config).data.mean_image_file == run.mean_image
  assert config.data.mean_image_file == ''  # the caller's config is left as it was
  converted = small_run(data__channel_mean=(0.5, 0.5, 0.5))  # fixed preprocessing wins
  assert run.with_saved_statistics(converted) is converted


def test_imagenet_runs_saved_before_the_antialias_switch_keep_antialiasing(tmp_path):
  """An ImageNet config.json written before data.antialias existed was resized with antialiasing, so it
  reads True; today's runs read what they saved; CIFAR configs, which never resize, have no such field."""
  saved = json.loads(defaults.get_imagenet_config().to_json())
  assert saved['data'].pop('antialias') is False  # the default: the Caffe-era bilinear
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  assert Workdir(tmp_path).config().data.antialias is True
  for value in (False, True):
    saved['data']['antialias'] = value
    assert defaults.from_saved(saved).data.antialias is value
  assert 'antialias' not in defaults.from_saved(json.loads(defaults.get_config().to_json())).data


def _image_folder(root, per_class):
  """root/{train,val}/{a,b}/*.png of random 40x48 pixels: an ImageNet-layout folder of two classes."""
  rng = np.random.default_rng(0)
  for split, count in per_class.items():
    for name in ('a', 'b'):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / name / f'{i}.png')


def _config(folder, cache):
  config = small_run(
    train__batch_size=8,
    train__eval_batch_size=8,
    train__num_steps=2,
    train__log_every_steps=1,
    train__eval_every_steps=2,
    train__checkpoint_every_steps=2,
    train__bn_stats_images=8,
  )
  config.data = defaults.get_imagenet_config().data
  config.data.update(
    source='image_folder',
    image_folder=str(folder),
    train_split='train',
    eval_split='val',
    cache_dir=str(cache),
    image_size=32,
    scale_min=36,
    scale_max=48,
    eval_resize=36,
    mean_images=16,
    threads=1,
  )
  return config


@pytest.mark.slow
def test_evaluation_needs_only_the_workdir_and_the_evaluation_images(tmp_path):
  folder, run = tmp_path / 'images', Workdir(tmp_path / 'run')
  _image_folder(folder, {'train': 8, 'val': 4})
  mesh = parallel.make_mesh(jax.devices()[:1])
  results = train.train_and_evaluate(_config(folder, tmp_path / 'cache'), run.path, mesh=mesh)
  # What training saved is the mean image it computed and cached from the training images.
  (cached,) = (tmp_path / 'cache').glob('imagenet-mean-*.npy')
  np.testing.assert_array_equal(np.load(run.mean_image), np.load(cached))
  assert json.loads(open(run.config_json).read())['data']['mean_image_file'] == ''
  full = evaluation.evaluate_workdir(run.path, '1crop', mesh=mesh)
  assert full['count'] == 8 and full['top1_error'] == pytest.approx(results['val_error'])

  # No training images and an empty cache: the same numbers, and nothing computed or cached.
  shutil.move(folder / 'train', tmp_path / 'train-elsewhere')
  config = run.config()
  config.data.cache_dir = str(tmp_path / 'empty')
  alone = evaluation.evaluate_workdir(run.path, '1crop', config, mesh=mesh)
  assert alone == full and not (tmp_path / 'empty').exists()

  # An older run without the file: the mean image is computed from the training images and cached
  # outside the workdir, which gains nothing but its evaluation.
  (tmp_path / 'run' / 'mean_image.npy').unlink()
  with pytest.raises(data.DataError, match='train'):
    data.load(run.config().data, 0)  # it needs the training images
  shutil.move(tmp_path / 'train-elsewhere', folder / 'train')
  config = run.config()
  config.data.cache_dir = str(tmp_path / 'empty')
  older = evaluation.evaluate_workdir(run.path, '1crop', config, mesh=mesh)
  assert older == full and len(list((tmp_path / 'empty').glob('imagenet-mean-*.npy'))) == 1
  assert not (tmp_path / 'run' / 'mean_image.npy').exists()


@pytest.mark.slow
def test_overrides_apply_to_the_workdirs_config(tmp_path):
  """--config.data.* without --config: the tool reads the workdir's config.json and overrides it; here
  the evaluation images moved to another folder and the cache is empty."""
  folder, run = tmp_path / 'images', Workdir(tmp_path / 'run')
  _image_folder(folder, {'train': 8, 'val': 4})
  mesh = parallel.make_mesh(jax.devices()[:1])
  train.train_and_evaluate(_config(folder, tmp_path / 'cache'), run.path, mesh=mesh)
  expected = evaluation.evaluate_workdir(run.path, '1crop', mesh=mesh)
  moved = tmp_path / 'moved'
  shutil.copytree(folder / 'val', moved / 'val')
  shutil.rmtree(folder)
  command = [
    sys.executable,
    '-m',
    'resnet_jax.tools.evaluate',
    f'--workdir={run.path}',
    f'--config.data.image_folder={moved}',
    f'--config.data.cache_dir={tmp_path / "empty"}',
  ]
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1]) == expected
  assert json.loads(open(run.config_json).read())['data']['image_folder'] == str(
    folder
  )  # unchanged

  mistyped = subprocess.run(
    [*command[:4], '--config.data.image_foldr=x'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert mistyped.returncode == 2
  assert 'did you mean --config.data.image_folder?' in mistyped.stderr, mistyped.stderr
