"""experiments/benchmark.py and its PyTorch twin: the twin is our network (equal parameter counts, equal
logits with our weights), and the JAX side times our real training step. Torch tests skip without torch."""

import functools
import math
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from helpers import cifar_params, model_config

from resnet_jax import complexity, models

sys.path.insert(0, str(REPO))  # experiments/ is no installed package
from experiments import benchmark

# ResNet-8's forward multiply-adds at 32x32, by hand: stem 27*16*32^2, stage 1 two 3x3 16->16 convs at 32^2,
# stage 2 (16->32, 32->32) at 16^2, stage 3 (32->64, 64->64) at 8^2, fc 64*10.
RESNET8_MACS = (
  27 * 16 * 1024 + 2 * 144 * 16 * 1024 + (144 + 288) * 32 * 256 + (288 + 576) * 64 * 64 + 640
)


@pytest.fixture(name='torch', scope='module')
def torch_fixture():
  return pytest.importorskip('torch')  # without PyTorch (CI) only the twin's tests skip


@pytest.fixture(name='twin', scope='module')
def twin_fixture(torch):
  from experiments import torch_twin

  return torch_twin


def random_variables(config, seed=0):
  """Our variables' shapes (without compiling an init) filled with values that exercise every mapping:
  He-scaled kernels, BN scales, biases and running statistics away from their initial 1 and 0."""
  shapes, _, _ = complexity.count(config)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return rng.normal(0, 0.1, shape).astype(np.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, {k: shapes[k] for k in ('params', 'batch_stats')})


@pytest.mark.parametrize(
  'family,depth', [('cifar', 20), ('cifar', 56), ('imagenet', 18), ('imagenet', 50)]
)
def test_twin_has_our_parameter_count_and_shapes(twin, family, depth):
  config = model_config(family, depth, image_size=32 if family == 'cifar' else 224)
  _, ours, _ = complexity.count(config)
  net = twin.build(config.model)
  assert twin.num_params(net) == ours
  twin.load_flax_params(
    net, random_variables(config)
  )  # strict: every name and shape has its counterpart


LOGIT_CASES = [
  ('cifar', 20, 32, False),
  ('cifar', 20, 32, True),
  ('imagenet', 18, 64, False),
  ('imagenet', 50, 64, False),
]


@pytest.mark.parametrize('family,depth,size,train', LOGIT_CASES)
def test_twin_logits_equal_ours(torch, twin, family, depth, size, train):
  """ResNet-20 (option A), ResNet-18/50 (option B, 7x7 stem, max pool); eval mode uses the running statistics,
  train mode the batch's."""
  config = model_config(family, depth, image_size=size)
  variables = random_variables(config)
  images = np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)
  model = models.create(config.model)
  apply = jax.jit(
    functools.partial(model.apply, train=train, mutable=['batch_stats'] if train else False)
  )
  ours = apply(variables, images)
  ours = np.asarray(ours[0] if train else ours)
  net = twin.load_flax_params(twin.build(config.model), variables).train(train)
  with torch.no_grad():
    theirs = net(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  assert ours.shape == theirs.shape == (2, config.model.num_classes)
  np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4 * np.abs(ours).max())


def test_twin_initialises_as_ours(twin):
  """He normal convs (std sqrt(2 / fan_in)) and flax's truncated LeCun normal dense layer."""
  net = twin.build(model_config('cifar', 20, image_size=32).model)
  conv = net.stage3_block3.conv2.weight.detach().numpy()
  np.testing.assert_allclose(conv.std(), np.sqrt(2 / (9 * 64)), rtol=0.05)
  fc = net.fc.weight.detach().numpy()
  # The standard normal cut at +-2 has variance 1 - 4 phi(2) / (Phi(2) - Phi(-2)); flax divides by its std.
  truncated_std = math.sqrt(1 - 4 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(math.sqrt(2)))
  assert np.abs(fc).max() <= 2 * np.sqrt(1 / 64) / truncated_std
  assert (net.stem_bn.weight.detach().numpy() == 1).all() and (
    net.fc.bias.detach().numpy() == 0
  ).all()


def test_parse_grid():
  specs = benchmark.parse_grid(
    'cifar20:128:float32, imagenet50:32:bfloat16,imagenet18:8:float32:64'
  )
  assert [(s.family, s.depth, s.batch, s.dtype, s.image_size) for s in specs] == [
    ('cifar', 20, 128, 'float32', 32),
    ('imagenet', 50, 32, 'bfloat16', 224),
    ('imagenet', 18, 8, 'float32', 64),
  ]
  for bad in ('resnet20:128:float32', 'cifar20:128', 'cifar20:x:float32', 'cifar20:128:float16'):
    with pytest.raises(ValueError):
      benchmark.parse_grid(bad)
  with pytest.raises(ValueError, match='6n\\+2'):
    benchmark.make_config(benchmark.parse_grid('cifar21:8:float32')[0])


def test_parse_model_overrides():
  assert benchmark.parse_model_overrides('scan_blocks=True, conv_grads=xla,bn_group_size=32') == {
    'scan_blocks': True,
    'conv_grads': 'xla',
    'bn_group_size': 32,
  }
  assert benchmark.parse_model_overrides('') == {}
  for bad in ('scan_blocks', 'no_such_field=1'):
    with pytest.raises(ValueError, match='--model'):
      benchmark.parse_model_overrides(bad)


def test_peaks_come_from_the_table():
  assert benchmark.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989e12
  assert benchmark.peak_flops('NVIDIA H100 PCIe', 'float32') == 378e12
  assert benchmark.peak_flops('NVIDIA A100-SXM4-40GB', 'bfloat16') == 312e12
  assert benchmark.peak_flops('TPU v5 lite', 'bfloat16') == 197e12
  assert benchmark.peak_flops('CPU: Intel(R) Xeon(R)', 'float32') is None
  assert benchmark.peak_flops('CPU: Intel(R) Xeon(R)', 'float32', override_tflops=2.0) == 2e12


@pytest.mark.slow
def test_jax_side_times_our_training_step_and_writes_the_table(tmp_path):
  """ResNet-8, batch 16, 2 timed steps: our step is timed, FLOPs come from the MACs, the file is written."""
  out = tmp_path / 'benchmarks.md'
  rows = benchmark.main(
    [
      '--grid=cifar8:16:float32',
      '--frameworks=jax',
      '--steps=2',
      '--warmup=1',
      '--repeats=1',
      '--peak_tflops=1',
      f'--out={out}',
    ]
  )
  (row,) = rows
  assert (
    row['framework'] == 'JAX (ours)'
    and row['mode'] == 'jit, 1 device'
    and row['params'] == cifar_params(8)
  )
  assert row['timed'] == '1 x 2'
  assert row['images_per_s'] == pytest.approx(16 * 1000 / row['ms_per_step'])  # batch 16
  _, _, macs = complexity.count(model_config('cifar', 8, image_size=32))
  assert row['train_flops_per_image'] == 6 * RESNET8_MACS == 6 * macs
  assert row['mfu'] == pytest.approx(6 * RESNET8_MACS * row['images_per_s'] / 1e12)
  text = out.read_text()
  assert text.startswith(benchmark.HEADER.splitlines()[0]) and text.count('\n## ') == 1
  assert (
    f'| JAX (ours) | jit, 1 device | ResNet-8 (32x32) | 16 | float32 | {cifar_params(8):,} |'
    in text
  )
  assert (
    '--grid=cifar8:16:float32' in text
    and 'jax ' + jax.__version__ in text
    and 'while timing' in text
  )


def test_write_replaces_the_same_devices_section(tmp_path):
  out = tmp_path / 'benchmarks.md'
  benchmark.write(out, 'CPU: X', '## CPU: X\n\nfirst\n')
  benchmark.write(out, 'GPU Y', '## GPU Y\n\nsecond\n')
  benchmark.write(out, 'CPU: X', '## CPU: X\n\nthird\n')
  text = out.read_text()
  assert text.startswith(benchmark.HEADER.rstrip('\n'))
  assert text.count('## CPU: X') == 1 and 'first' not in text
  assert (
    text.index('## CPU: X') < text.index('third') < text.index('## GPU Y') < text.index('second')
  )
