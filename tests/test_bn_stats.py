"""Exact post-training BN statistics against a NumPy computation of the same features."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import REPO
from helpers import random_variables, small_run

from resnet_jax import data, exact_bn, models, parallel, train


class TinyNet(nn.Module):
  """1x1 conv, BN, ReLU, 1x1 conv, BN: features a NumPy matmul reproduces exactly."""

  @nn.compact
  def __call__(self, x, train=True):
    bn = lambda name: models.BatchNorm(
      use_running_average=not train, axis_name=parallel.AXIS, name=name
    )
    x = nn.relu(bn('bn1')(nn.Conv(5, (1, 1), use_bias=False, name='conv1')(x)))
    return bn('bn2')(nn.Conv(4, (1, 1), use_bias=False, name='conv2')(x)).mean(axis=(1, 2))


def test_recomputed_statistics_equal_numpy():
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(8, 3, 3, 2)).astype(np.float32) + i for i in range(3)]
  model = TinyNet()
  variables = model.init(jax.random.key(0), batches[0], train=False)
  params = jax.tree.map(
    lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), variables['params']
  )
  mesh = parallel.make_mesh(jax.devices()[:4])
  placed = [parallel.to_global({'image': b}, mesh) for b in batches]
  stats = jax.device_get(exact_bn.recompute(model, params, variables['batch_stats'], placed, mesh))

  w1, w2 = (np.asarray(params[c]['kernel'])[0, 0] for c in ('conv1', 'conv2'))
  f1 = [b @ w1 for b in batches]  # [8, 3, 3, 5] per batch
  f2 = []
  for f in f1:  # train mode: each batch normalised with its own statistics
    mean, var = f.mean(axis=(0, 1, 2)), f.var(axis=(0, 1, 2))
    h = (f - mean) / np.sqrt(var + 1e-5) * np.asarray(params['bn1']['scale']) + np.asarray(
      params['bn1']['bias']
    )
    f2.append(np.maximum(h, 0) @ w2)
  for name, feats in (('bn1', f1), ('bn2', f2)):
    every = np.concatenate(feats).reshape(-1, feats[0].shape[-1])  # all 3 x 8 images' features
    np.testing.assert_allclose(stats[name]['mean'], every.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats[name]['var'], every.var(axis=0), rtol=1e-4, atol=1e-5)


class CountingDataset:
  """A dataset whose training batches are counted as they are made."""

  def __init__(self, ds):
    self.ds, self.made = ds, 0

  def train_batches(self, *args):
    for batch in self.ds.train_batches(*args):
      self.made += 1
      yield batch


def test_streamed_batches_give_the_statistics_of_the_whole_list():
  """The batches are made one at a time as the pass reads them, and the statistics are bit for bit those
  of the previous path, which made the whole list of batches first."""
  config = small_run(train__batch_size=16)
  ds = data.load(config.data, config.seed)
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  size = config.data.image_size
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32), train=False)
  )
  variables = random_variables(shapes)
  mesh = parallel.make_mesh(jax.devices()[:4])

  gen = ds.train_batches(0, 16, config.seed + 1)  # the previous training_batches: a list
  listed = [parallel.to_global(next(gen), mesh) for _ in range(5)]
  expected = exact_bn.recompute(model, variables['params'], variables['batch_stats'], listed, mesh)

  counting = CountingDataset(ds)
  batches = exact_bn.training_batches(counting, config, num_images=5 * 16 + 7)
  assert counting.made == 0  # nothing is made before the pass reads it
  first = next(batches)
  assert counting.made == 1
  rest = list(batches)
  assert counting.made == 5 and len(rest) == 4
  np.testing.assert_array_equal(first['image'], jax.device_get(listed[0])['image'])
  streamed = exact_bn.recompute(
    model,
    variables['params'],
    variables['batch_stats'],
    parallel.prefetch(exact_bn.training_batches(ds, config, 5 * 16), mesh),
    mesh,
  )
  for a, b in zip(
    jax.tree.leaves(jax.device_get(expected)), jax.tree.leaves(jax.device_get(streamed))
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_after_training_and_as_a_command(tmp_path):
  config = small_run(train__num_steps=4, train__recompute_bn_stats=True, train__bn_stats_images=64)
  results = train.train_and_evaluate(config, str(tmp_path))
  command = [
    sys.executable,
    '-m',
    'resnet_jax.tools.bn_stats',
    f'--workdir={tmp_path}',
    '--num_images=64',
  ]
  subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=300)
  report = json.loads((tmp_path / 'bn_stats.json').read_text())
  assert report['step'] == 4 and report['num_images'] == 64
  # The final checkpoint already holds statistics recomputed from the same images: recomputing again
  # from the same weights and images gives the same evaluation.
  assert abs(report['recomputed']['error'] - results['test_error']) < 1e-6
  assert report['checkpoint']['statistics'] == 'recomputed_after_training'
  assert abs(report['checkpoint']['error'] - results['test_error']) < 1e-6
  # Asked for more than the 256 training images: the report says what the pass really read.
  more = exact_bn.recalibrate_workdir(str(tmp_path), num_images=1000)
  assert (more['num_images'], more['num_images_asked']) == (256, 1000)


def test_a_pass_reads_whole_batches_of_at_most_the_training_set():
  assert exact_bn.images_to_read(64, batch=32, num_train=256) == 64
  assert exact_bn.images_to_read(70, batch=32, num_train=256) == 64
  assert exact_bn.images_to_read(10, batch=32, num_train=256) == 32  # at least one batch
  assert exact_bn.images_to_read(10_000, batch=32, num_train=250) == 224  # 7 whole batches of 250
