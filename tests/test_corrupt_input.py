"""A file that does not decode in a streamed ImageNet folder ends every tool at once (exit 2) with one
sentence naming it, and an exception in any worker of the input reaches the caller: nothing waits on it.

The commands run as subprocesses; the harness's timeout, not a wall-clock assertion, catches a hang.
"""

import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from conftest import REPO
from helpers import random_variables
from PIL import Image

from resnet_jax import checkpointing, data, defaults, parallel, pretrained

tf = pytest.importorskip('tensorflow')

WNIDS = ('n01440764', 'n01443537')  # tench, goldfish: ILSVRC labels 0 and 1
TIMEOUT = 240  # seconds: a hang fails the test instead of stalling the suite
BROKEN = 'broken.JPEG'


def _folder(root, broken_in):
  """root/{train,val}/<wnid>/ with four small JPEGs per class, and BROKEN (garbage bytes) in the splits
  `broken_in`."""
  rng = np.random.default_rng(0)
  for split in ('train', 'val'):
    for wnid in WNIDS:
      folder = root / split / wnid
      folder.mkdir(parents=True)
      for i in range(4):
        pixels = rng.integers(0, 256, (40 + 4 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'{i}.JPEG', quality=90)
    if split in broken_in:
      (root / split / WNIDS[1] / BROKEN).write_bytes(b'\x13\x37 not an image ' * 40)
  return root


def _overrides(folder, mean_file):
  """The smallest ImageNet run: ResNet-18 at a 32-pixel crop, a fixed (zero) mean image, batches of 8."""
  return {
    'data.source': 'image_folder',
    'data.image_folder': str(folder),
    'data.train_split': 'train',
    'data.eval_split': 'val',
    'data.image_size': 32,
    'data.scale_min': 36,
    'data.scale_max': 48,
    'data.eval_resize': 36,
    'data.mean_image_file': str(mean_file),
    'data.threads': 1,
    'train.batch_size': 8,
    'train.eval_batch_size': 8,
    'train.num_steps': 3,
    'train.log_every_steps': 1,
    'train.eval_every_steps': 3,
    'train.checkpoint_every_steps': 3,
    'train.recompute_bn_stats': False,
  }


def _config(overrides):
  config = defaults.load_file(str(REPO / 'configs' / 'imagenet_resnet18.py'))
  for key, value in overrides.items():
    section, field = key.split('.', 1)
    config[section][field] = value
  return config


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('corrupt')
  mean_file = root / 'mean.npy'
  np.save(mean_file, np.zeros((32, 32, 3), np.float32))
  return {
    'val': _folder(root / 'bad_val', ('val',)),
    'train': _folder(root / 'bad_train', ('train',)),
    'mean': mean_file,
  }


@pytest.fixture(scope='module')
def workdir(folders, tmp_path_factory):
  """A step-0 checkpoint of random weights whose config reads the folder with a broken training image."""
  config = _config(_overrides(folders['train'], folders['mean']))
  model = pretrained.models.create(config.model)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  )
  state = pretrained.train_state(config, random_variables(shapes))
  out = tmp_path_factory.mktemp('workdir')
  mngr = checkpointing.manager(str(out), 1)
  checkpointing.save(mngr, state, 0)
  mngr.wait_until_finished()
  mngr.close()
  (out / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return out


def _run(module, *args):
  tool = 'resnet_jax.main' if module == 'main' else f'resnet_jax.tools.{module}'
  command = [sys.executable, '-m', tool, *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)


def _assert_names_broken(result, split):
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot decode image ') and last.endswith(
    '; replace or delete the file.'
  ), last
  assert f'{split}/{WNIDS[1]}/{BROKEN}' in last and '(Unknown image file format.' in last, last


# ------------------------------------------------------------------------------------------ in process


def test_eval_batches_name_the_broken_file(folders):
  config = _config(_overrides(folders['val'], folders['mean']))
  ds = data.load(config.data, 0)
  for mode in ('1crop', '10crop'):
    with pytest.raises(data.DataError, match=rf'cannot decode image .*val/{WNIDS[1]}/{BROKEN} '):
      list(ds.eval_batches(8, mode=mode))


def test_training_batches_through_the_prefetch_thread_name_the_broken_file(folders):
  config = _config(_overrides(folders['train'], folders['mean']))
  ds = data.load(config.data, 0)
  batches = parallel.prefetch(ds.train_batches(0, 8, 0), parallel.make_mesh(jax.devices()[:1]), 2)
  with pytest.raises(data.DataError, match=rf'cannot decode image .*train/{WNIDS[1]}/{BROKEN} '):
    for _ in range(4):  # 9 images, 8 a step: the broken one is in step 0 or 1
      next(batches)


def test_mean_image_names_the_broken_training_file(folders, tmp_path):
  config = _config(_overrides(folders['train'], folders['mean']))
  config.data.update(mean_image_file='', mean_images=100, cache_dir=str(tmp_path))
  with pytest.raises(data.DataError, match=rf'cannot decode image .*train/{WNIDS[1]}/{BROKEN} '):
    data.load(config.data, 0)


def test_a_map_function_that_raises_ends_the_stream(folders):
  """Any error inside tf.data's parallel map (here a Python exception of a numpy_function) is raised by
  the stream as a DataError naming the first example that fails."""
  config = _config(_overrides(folders['val'], folders['mean']))
  ds = data.load(config.data, 0)

  def fail(x):
    raise RuntimeError('worker failed')

  def view(tf, d):
    return tf.numpy_function(fail, [tf.zeros([32, 32, 3])], tf.float32, stateful=False)

  with pytest.raises(data.DataError, match=rf'cannot decode image .*val/{WNIDS[0]}/0.JPEG'):
    list(ds.view_batches(view, (32, 32, 3), 8))


def test_prefetch_forwards_a_worker_exception():
  """The prefetch thread's exception reaches the consumer after the batches before it, and the thread
  ends."""
  mesh = parallel.make_mesh(jax.devices()[:1])

  def batches():
    yield {'image': np.zeros((2, 3), np.float32)}
    raise OSError('disk gone')

  got = parallel.prefetch(batches(), mesh, 2)
  assert next(got)['image'].shape == (2, 3)
  with pytest.raises(OSError, match='disk gone'):
    next(got)


def test_prefetch_close_does_not_wait_forever_on_a_blocked_source():
  """A consumer that fails while the source is stuck (a reader that never returns) still gets out: the
  close waits a bounded time for the thread, not for ever (a hang here is caught by the harness)."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  never = threading.Event()

  def batches():
    yield {'image': np.zeros((2, 3), np.float32)}
    never.wait()  # blocked for good, as a stuck reader

  got = parallel.prefetch(batches(), mesh, 2, join_timeout_s=0.5)
  assert next(got)['image'].shape == (2, 3)
  got.close()
  never.set()


# ------------------------------------------------------------------------------------------ the commands


def _flags(overrides):
  return [f'--config.{k}={v}' for k, v in overrides.items()]


@pytest.mark.slow
def test_evaluate_cli_exits_naming_the_broken_file(folders, workdir):
  """The reported command: 1-crop evaluation of a folder with a broken image in val/."""
  for mode in ('1crop', '10crop'):
    result = _run(
      'evaluate',
      f'--mode={mode}',
      '--config=configs/imagenet_resnet18.py',
      f'--workdir={workdir}',
      *_flags(_overrides(folders['val'], folders['mean'])),
    )
    _assert_names_broken(result, 'val')


@pytest.mark.slow
def test_bn_stats_cli_exits_naming_the_broken_file(workdir):
  """bn_stats evaluates val/ (clean), then reads train/, where the broken image is."""
  result = _run('bn_stats', f'--workdir={workdir}', '--num_images=16')
  _assert_names_broken(result, 'train')


@pytest.mark.slow
def test_training_cli_exits_naming_the_broken_file(folders, tmp_path):
  result = _run(
    'main',
    '--config=configs/imagenet_resnet18.py',
    f'--workdir={tmp_path / "run"}',
    *_flags(_overrides(folders['train'], folders['mean'])),
  )
  _assert_names_broken(result, 'train')


def test_predict_cli_names_the_broken_file(folders, workdir):
  broken = folders['val'] / 'val' / WNIDS[1] / BROKEN
  result = _run('predict', f'--workdir={workdir}', str(broken))
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(f'error: {broken} is not an image file')
