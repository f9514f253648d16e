"""Small runs shared by the end-to-end tests: a ResNet-8 config, its CLI flags, the CLI, checkpoints."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from conftest import REPO
from PIL import Image

from resnet_jax import defaults


def run_cli(workdir, *overrides, config='configs/cifar10_20.py', check=True, timeout=600):
  cmd = [
    sys.executable,
    '-m',
    'resnet_jax.main',
    f'--config={config}',
    f'--workdir={workdir}',
    *overrides,
  ]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  if check and result.returncode:
    raise AssertionError(f'{" ".join(cmd)} failed:\n{result.stderr[-3000:]}')
  return result


def model_config(family='cifar', depth=8, image_size=None, **model_overrides):
  """The paper's CIFAR or ImageNet config for a network of `depth`, with model fields overridden."""
  config = defaults.get_config() if family == 'cifar' else defaults.get_imagenet_config()
  config.model.depth = depth
  config.model.update(model_overrides)
  if image_size is not None:
    config.data.image_size = image_size
  return config


def cifar_params(depth, classes=10):
  """Trainable parameters of the CIFAR ResNet (option A) from Sec. 4.2's layer list: 3x3 convs without
  bias, each followed by BN's scale and bias; 16, 32 and 64 filters; a fc with bias."""
  n = (depth - 2) // 6
  params = 9 * 3 * 16 + 2 * 16  # the first conv and its BN
  channels = 16
  for width in (16, 32, 64):
    for _ in range(n):
      params += 9 * channels * width + 9 * width * width + 4 * width
      channels = width
  return params + 64 * classes + classes


def small_run(**overrides):
  """ResNet-8 on a fixed subset: a few steps through the whole loop in seconds."""
  config = defaults.get_config()
  config.model.depth = 8
  config.data.update(source='synthetic', train_limit=256, eval_limit=100)
  config.train.update(
    batch_size=32,
    eval_batch_size=64,
    num_steps=6,
    log_every_steps=2,
    eval_every_steps=3,
    checkpoint_every_steps=3,
    bn_stats_images=64,  # the exact-BN test error at the end: two batches
  )
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


def as_flags(config):
  return [
    f'--config.{s}.{k}={v}'
    for s in ('model', 'data', 'train')
    for k, v in config[s].items()
    if v != defaults.get_config()[s][k] and not isinstance(v, (tuple, list))
  ]


def final_params(workdir):
  steps = checkpoint_steps(workdir)
  state = ocp.StandardCheckpointer().restore(
    pathlib.Path(workdir) / 'checkpoints' / str(steps[-1]) / 'default'
  )
  return steps[-1], state


def checkpoint_steps(workdir):
  return sorted(
    int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir() if p.name.isdigit()
  )


def assert_same_checkpoints(workdir_a, workdir_b, without=()):
  """The final checkpoints of two runs hold bit-identical arrays (params, BN statistics, optimizer);
  `without`: top-level fields of the state left out of the comparison."""
  step_a, a = final_params(workdir_a)
  step_b, b = final_params(workdir_b)
  assert step_a == step_b and a.keys() == b.keys() and set(without) <= a.keys()
  a, b = ({k: v for k, v in s.items() if k not in without} for s in (a, b))
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def write_image_folder(
  root, classes=('zebra', 'apple', 'mango'), per_class=(3, 2), fmt='png', seed=0
):
  """Writes random 32x32 images to root/{train,test}/<class>/; returns {relative path: pixels}."""
  rng, pixels = np.random.default_rng(seed), {}
  for split, count in zip(('train', 'test'), per_class):
    for c in classes:
      os.makedirs(os.path.join(root, split, c))
      for i in range(count):
        x = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        rel = f'{split}/{c}/{i:04d}.{fmt}'
        Image.fromarray(x).save(os.path.join(root, rel))
        pixels[rel] = x
  return pixels


TIMING = ('time', 'steps_per_sec', 'images_per_sec', 'eta_min')


def last_rows(workdir):
  """metrics.jsonl as {(step, split): row without timing}: a step logged again after a resume counts
  with its last row. Every line must be a whole JSON object."""
  rows = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    rows[row['step'], row['split']] = {k: v for k, v in row.items() if k not in TIMING}
  return rows


def random_variables(shapes):
  """He-scaled kernels, perturbed BN scales and biases, drawn with NumPy: an init compiles for seconds.
  `shapes` is a variables tree of arrays or ShapeDtypeStructs (jax.eval_shape of an init); scanned
  blocks' kernels, with their leading block axis, get the fan-in of one block's kernel."""
  rng = np.random.default_rng(0)

  def draw(path, x):
    name = path[-1].key
    if name in ('mean', 'var'):
      return np.full(x.shape, float(name == 'var'), np.float32)
    fan_in = np.prod(x.shape[-4:-1]) if len(x.shape) >= 4 else x.shape[0]
    std = np.sqrt(2 / fan_in) if name == 'kernel' else 0.1
    return (float(name == 'scale') + std * rng.normal(size=x.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)
