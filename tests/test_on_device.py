"""The on-device CIFAR batches against the host path (in_memory.train_batch), on 8 fake devices."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from jax.sharding import PartitionSpec as P

from resnet_jax import parallel
from resnet_jax.data import in_memory, on_device

SEED = 3


def dataset(n, labels=None, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32) if labels is None else labels
  mean = images.mean(axis=0, dtype=np.float64).astype(np.float32)  # as load(): not whole numbers
  return in_memory.Dataset(images, labels, images[:8], labels[:8], mean, 10, 'test')


def device_batches(ds, xs, mesh):
  """on_device.batch on each device for every step of `xs` (numpy [batch, k]) -> numpy [k, batch, ...]."""

  def per_device(data, xs):
    steps = jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), xs)  # [k, b]: one step's share a row
    return jax.lax.map(lambda x: on_device.batch(data, x), steps)

  fn = parallel.map_step(
    per_device, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(None, parallel.AXIS)
  )
  return jax.device_get(fn(on_device.put(ds, mesh), parallel.to_global(xs, mesh)))


def test_equals_the_host_path_across_an_epoch_boundary():
  ds, batch_size, first, k = (
    dataset(100),
    16,
    4,
    6,
  )  # 6 steps an epoch: steps 4..9 cross into epoch 1
  out = device_batches(
    ds, on_device.step_arrays(100, first, k, batch_size, SEED), parallel.make_mesh()
  )
  assert out['image'].dtype == np.float32 and out['label'].dtype == np.int32
  for j in range(k):
    host = in_memory.train_batch(ds, first + j, batch_size, SEED)
    np.testing.assert_array_equal(out['image'][j], host['image'])  # bit-identical, not only close
    np.testing.assert_array_equal(out['label'][j], host['label'])
  assert (
    out['image'] == 0
  ).mean() > 0.05  # the zero padding does show, so the crops were exercised


@pytest.mark.parametrize('input_scale', [1 / 255, 1.0])
def test_a_converted_models_input_equals_the_host_path(input_scale):
  """ToTensor + Normalize's fields (and a scale of 1) on the device as on the host."""
  import dataclasses

  ds = dataclasses.replace(
    dataset(64),
    mean_image=np.zeros((32, 32, 3), np.float32),
    input_scale=input_scale,
    channel_mean=(0.485, 0.456, 0.406),
    channel_std=(0.229, 0.224, 0.225),
  )
  out = device_batches(ds, on_device.step_arrays(64, 0, 2, 16, SEED), parallel.make_mesh())
  for j in range(2):
    host = in_memory.train_batch(ds, j, 16, SEED)
    np.testing.assert_allclose(out['image'][j], host['image'], rtol=1e-6, atol=1e-6)


def test_process_shares_equal_the_host_path():
  """Two processes' step_arrays, side by side, are one process's; each part equals its process's batch."""
  ds, batch_size, first, k = dataset(100), 16, 5, 3
  parts = [on_device.step_arrays(100, first, k, batch_size, SEED, p, 2) for p in range(2)]
  joined = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
  whole = on_device.step_arrays(100, first, k, batch_size, SEED)
  for key in whole:
    np.testing.assert_array_equal(joined[key], whole[key])
  out = device_batches(ds, joined, parallel.make_mesh())  # process p's share on devices 4p..4p+3
  for j in range(k):
    for p in range(2):
      host = in_memory.train_batch(ds, first + j, batch_size, SEED, p, 2)
      np.testing.assert_array_equal(out['image'][j, p * 8 : (p + 1) * 8], host['image'])
      np.testing.assert_array_equal(out['label'][j, p * 8 : (p + 1) * 8], host['label'])


def test_every_image_exactly_once_per_epoch():
  ds = dataset(96, labels=np.arange(96, dtype=np.int32))  # the label names the image
  out = device_batches(ds, on_device.step_arrays(96, 0, 12, 16, SEED), parallel.make_mesh())
  epochs = out['label'].reshape(2, 96)
  for labels in epochs:
    np.testing.assert_array_equal(np.sort(labels), np.arange(96))
  assert not np.array_equal(epochs[0], epochs[1])  # each epoch has its own order


@pytest.mark.slow
def test_no_tensorflow():
  code = """
import sys
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from resnet_jax import parallel
from resnet_jax.data import in_memory, on_device
images = np.zeros((8, 32, 32, 3), np.uint8)
ds = in_memory.Dataset(images, np.arange(8, dtype=np.int32), images, np.arange(8, dtype=np.int32),
                            images[0].astype(np.float32), 10, 'test')
mesh = parallel.make_mesh()
fn = parallel.map_step(lambda d, x: on_device.batch(d, jax.tree.map(lambda a: a[:, 0], x)), mesh,
                       in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS))
out = fn(on_device.put(ds, mesh), parallel.to_global(on_device.step_arrays(8, 0, 1, 8, 0), mesh))
assert out['image'].shape == (8, 32, 32, 3)
assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
"""
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr[-2000:]
