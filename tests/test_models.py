"""The networks against the paper's sizes and costs, and the properties its text states."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cifar_params, model_config, random_variables
from jax import ad_checkpoint

from resnet_jax import complexity, defaults, models


def param_shapes(config, size, batch=1):
  """Variables of the config's network from one traced forward pass (no compile), checking the logits' shape."""
  model = models.create(config.model)
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  logits, variables = jax.eval_shape(
    lambda x: model.init_with_output(jax.random.key(0), x, train=False), x
  )
  assert logits.shape == (batch, config.model.num_classes) and logits.dtype == jnp.float32
  return variables


def n_params(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


# Table 6's #params column, in millions.
TABLE6_PARAMS = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85, 110: 1.7, 1202: 19.4}


@pytest.mark.parametrize('depth', [20, 32, 44, 56, 110, pytest.param(1202, marks=pytest.mark.slow)])
def test_cifar_parameter_counts(depth):  # ResNet-1202's shapes too, traced, never compiled
  params = n_params(param_shapes(model_config('cifar', depth), 32, batch=2)['params'])
  assert params == cifar_params(depth)
  assert round(params / 1e6, 2 if params < 1e6 else 1) == TABLE6_PARAMS[depth]


# torchvision's resnet18 ... resnet152 have these parameter counts (option B shortcuts).
@pytest.mark.parametrize(
  'depth,expected',
  [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032), (101, 44_549_160), (152, 60_192_808)],
)
def test_imagenet_parameter_counts_option_b(depth, expected):
  assert (
    n_params(param_shapes(model_config('imagenet', depth, shortcut='B'), 224, batch=2)['params'])
    == expected
  )


def conv_macs(size, kernel, stride, pad, in_channels, out_channels, valid_only=False):
  """(multiply-adds, output size) of a square conv. `valid_only` leaves out the taps that fall on the
  padding, as XLA's cost analysis does; the paper's count (and ours) includes them."""
  out = (size + 2 * pad - kernel) // stride + 1
  taps = out * kernel  # along one axis, summed over the output positions
  if valid_only:
    taps = sum(0 <= o * stride - pad + i < size for o in range(out) for i in range(kernel))
  return taps * taps * in_channels * out_channels, out


def analytic_macs(depth, classes=1000, valid_only=False):
  """Multiply-adds of ImageNet ResNet v1 (option B) at 224 px, from Table 1's layer list: every conv
  (the bottleneck's stride on its first 1x1, as the paper) and the fc; no BN, ReLU or pooling."""
  stages = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
  stages[152] = [3, 8, 36, 3]
  conv = functools.partial(conv_macs, valid_only=valid_only)
  macs, size = conv(224, 7, 2, 3, 3, 64)  # conv1, 7x7/2
  size = (size + 2 - 3) // 2 + 1  # the 3x3/2 max pool: 56
  channels = 64
  for i, blocks in enumerate(stages[depth]):
    width = 64 * 2**i
    out_channels = 4 * width if depth >= 50 else width
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      if depth >= 50:
        m1, mid = conv(size, 1, stride, 0, channels, width)
        m2, _ = conv(mid, 3, 1, 1, width, width)
        m3, _ = conv(mid, 1, 1, 0, width, out_channels)
      else:
        m1, mid = conv(size, 3, stride, 1, channels, width)
        m2, _ = conv(mid, 3, 1, 1, width, width)
        m3 = 0
      macs += m1 + m2 + m3
      if channels != out_channels:  # option B's projection
        macs += conv(size, 1, stride, 0, channels, out_channels)[0]
      channels, size = out_channels, mid
  return macs + channels * classes


def cifar_macs(depth, valid_only=False):
  """Multiply-adds of the CIFAR ResNet (option A: shortcuts cost nothing) from Sec. 4.2: a 3x3 conv,
  then 2n 3x3 convs on each of the 32, 16 and 8 px maps with 16, 32 and 64 filters, and the fc."""
  conv = functools.partial(conv_macs, valid_only=valid_only)
  macs, size = conv(32, 3, 1, 1, 3, 16)
  channels = 16
  for i in range(3):
    for j in range((depth - 2) // 6):
      m1, size = conv(size, 3, 2 if i > 0 and j == 0 else 1, 1, channels, 16 * 2**i)
      m2, _ = conv(size, 3, 1, 1, 16 * 2**i, 16 * 2**i)
      macs += m1 + m2
      channels = 16 * 2**i
  return macs + channels * 10


# Table 1's FLOPs row (the paper's multiply-adds, x 10^9), given to two significant figures.
TABLE1_GFLOPS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}


@pytest.mark.parametrize('depth', sorted(TABLE1_GFLOPS))
def test_imagenet_macs_are_table1s(depth):
  _, _, macs = complexity.count(model_config('imagenet', depth, shortcut='B'))
  assert macs == analytic_macs(depth)
  assert (
    abs(macs / 1e9 - TABLE1_GFLOPS[depth]) / TABLE1_GFLOPS[depth] < 0.02
  )  # the paper's rounding


@pytest.mark.parametrize(
  'family,depth,size', [('cifar', 20, 32), ('imagenet', 18, 224), ('imagenet', 50, 224)]
)
def test_macs_against_xla_cost_analysis(family, depth, size):
  config = model_config(family, depth, shortcut='B' if family == 'imagenet' else 'A')
  count = cifar_macs if family == 'cifar' else analytic_macs
  assert complexity.count(config)[2] == count(depth)
  model = models.create(config.model)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  flops = forward.lower(variables, x).cost_analysis()['flops']  # the HLO as traced, not compiled
  # XLA counts a multiply-add as 2 flops and skips a conv's taps on the padding (7% of ResNet-18's
  # MACs, most on the 7x7 maps). On top, per conv output element: BN's 4 flops (subtract the mean,
  # times rsqrt(var + eps), times scale, plus bias), ReLU's 1 and the residual add's 1, against
  # 2 * 9 * C_in >= 288 flops of the conv itself (the stem's 54 aside): under 2% in all.
  ratio = flops / (2 * count(depth, valid_only=True))
  assert 1 <= ratio < 1.02, ratio


def test_v1_5_moves_the_stride_and_costs_more():
  # torchvision's resnet50 (stride on the 3x3) is the familiar 4.09 GMACs; v1 saves the 3x3 at full size.
  _, params_v15, macs_v15 = complexity.count(model_config('imagenet', 50, stride_on_3x3=True))
  _, params_v1, macs_v1 = complexity.count(model_config('imagenet', 50))
  assert params_v15 == params_v1
  assert abs(macs_v15 / 1e9 - 4.089) < 0.01 and macs_v1 < macs_v15


@pytest.mark.parametrize('family,depth,size', [('cifar', 20, 32), ('imagenet', 34, 224)])
def test_option_a_adds_no_parameters_and_matches_plain(family, depth, size):
  plain = param_shapes(model_config(family, depth, residual=False, shortcut='A'), size)
  option_a = param_shapes(model_config(family, depth, shortcut='A'), size)
  assert jax.tree.structure(plain) == jax.tree.structure(option_a)
  assert jax.tree.map(lambda x: x.shape, plain) == jax.tree.map(lambda x: x.shape, option_a)
  option_b = param_shapes(model_config(family, depth, shortcut='B'), size)
  assert n_params(option_b['params']) > n_params(option_a['params'])


def test_option_c_projects_every_block():
  params = param_shapes(model_config('imagenet', 34, shortcut='C'), 224)['params']
  blocks = [k for k in params if k.startswith('stage')]
  assert len(blocks) == 16 and all('proj_conv' in params[k]['shortcut'] for k in blocks)
  params_b = param_shapes(model_config('imagenet', 34, shortcut='B'), 224)['params']
  assert sum('shortcut' in params_b[k] for k in blocks) == 3  # only where dimensions increase


def _block_with_center_taps(block_cls, option, **kw):
  """A stride-2 block whose conv kernels are non-zero only at the centre tap, in eval mode."""
  conv = functools.partial(nn.Conv, use_bias=False)
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  block = block_cls(
    features=8, strides=2, residual=True, shortcut=option, conv=conv, norm=norm, **kw
  )
  x = jnp.zeros((1, 8, 8, 4))
  variables = block.init(jax.random.key(0), x)

  def center(path, p):
    if path[-1].key != 'kernel':
      return p
    h, w = p.shape[:2]
    return jnp.zeros_like(p).at[h // 2, w // 2].set(jnp.abs(p[h // 2, w // 2]) + 0.1)

  params = jax.tree_util.tree_map_with_path(center, variables['params'])
  return block, {'params': params, 'batch_stats': variables['batch_stats']}


@pytest.mark.parametrize(
  'block_cls,option,kw',
  [
    (models.BasicBlock, 'A', {}),
    (models.BasicBlock, 'B', {}),
    (models.BottleneckBlock, 'B', {}),
    (models.BottleneckBlock, 'B', {'stride_on_3x3': True}),
    (models.BottleneckBlock, 'A', {}),
  ],
)
def test_stride_two_branches_are_aligned(block_cls, option, kw):
  """An impulse at an even pixel reaches the same output pixel through the conv branch and the shortcut."""
  block, variables = _block_with_center_taps(block_cls, option, **kw)
  features = 8 * (4 if block_cls is models.BottleneckBlock else 1)
  for pos in [(2, 4), (6, 0)]:
    x = jnp.zeros((1, 8, 8, 4)).at[0, pos[0], pos[1], 1].set(1.0)
    _, state = block.apply(variables, x, mutable=['intermediates'])
    shortcut = models.Shortcut(features, 2, option, block.conv, block.norm).apply(
      {k: v['shortcut'] for k, v in variables.items() if 'shortcut' in v}, x
    )
    branch = state['intermediates']['responses'][-1]
    conv_pixels = {tuple(p[1:3]) for p in np.argwhere(np.abs(np.asarray(branch)) > 1e-6)}
    short_pixels = {tuple(p[1:3]) for p in np.argwhere(np.abs(np.asarray(shortcut)) > 1e-6)}
    assert conv_pixels == short_pixels == {(pos[0] // 2, pos[1] // 2)}


@pytest.mark.parametrize(
  'family,depth,size,classes', [('cifar', 8, 32, 10), ('imagenet', 18, 64, 1000)]
)
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_output_shapes_and_dtypes(family, depth, size, classes, dtype):
  model = models.create(model_config(family, depth, dtype=dtype).model)
  x = jnp.ones((2, size, size, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  for train in (True, False):
    logits, state = model.apply(variables, x, train=train, mutable=['batch_stats', 'intermediates'])
    assert logits.shape == (2, classes) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert all(r.dtype == jnp.dtype(dtype) for r in jax.tree.leaves(state['intermediates']))


@pytest.mark.parametrize('mode', ['fan_in', 'fan_out'])
def test_he_init_std(mode):
  params = models.create(model_config('cifar', 8, init_mode=mode).model).init(
    jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False
  )['params']
  kernel = np.asarray(params['stage3_block1']['conv2']['kernel'])  # 3x3x64x64: 36,864 samples
  fan = 9 * (kernel.shape[2] if mode == 'fan_in' else kernel.shape[3])
  assert abs(kernel.std() / np.sqrt(2 / fan) - 1) < 0.05
  stem = np.asarray(
    params['stage2_block1']['conv1']['kernel']
  )  # 3x3x16x32: fan-in and fan-out differ
  fan = 9 * (stem.shape[2] if mode == 'fan_in' else stem.shape[3])
  assert abs(stem.std() / np.sqrt(2 / fan) - 1) < 0.05


def test_zero_init_last_bn_scale():
  model = models.create(model_config('cifar', 8, zero_init_last_bn=True).model)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)['params']
  assert np.all(np.asarray(params['stage1_block1']['bn2']['scale']) == 0)
  assert np.all(np.asarray(params['stage1_block1']['bn1']['scale']) == 1)


@pytest.mark.parametrize(
  'family,depth,size,expected', [('cifar', 20, 32, 18), ('imagenet', 50, 64, 16)]
)
def test_sown_3x3_responses(family, depth, size, expected):
  model = models.create(model_config(family, depth).model)
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  _, state = jax.eval_shape(
    lambda v: model.apply(v, x, train=False, mutable=['intermediates']), variables
  )
  responses = [r for block in state['intermediates'].values() for r in block['responses']]
  assert len(responses) == expected
  if family == 'cifar':  # 2n layers on each of the 32/16/8 maps with 16/32/64 filters
    n = (depth - 2) // 6
    assert [r.shape for r in responses] == [
      (2, 32 // 2**i, 32 // 2**i, 16 * 2**i) for i in range(3) for _ in range(2 * n)
    ]


@pytest.mark.parametrize(
  'overrides,message',
  [
    (dict(family='cifar', depth=21), 'CIFAR ResNet depth must be 6n+2, got 21'),
    (dict(family='cifar', depth=2), 'CIFAR ResNet depth must be 6n+2, got 2'),
    (
      dict(family='imagenet', depth=42),
      'ImageNet ResNet depth must be one of [18, 34, 50, 101, 152], got 42',
    ),
    (dict(family='cifar', shortcut='D'), "Unknown shortcut option 'D'"),
    (dict(family='mnist'), "Unknown model family 'mnist'"),
    (dict(scan_blocks=None), 'model.scan_blocks must be True or False, got None'),
  ],
)
def test_invalid_requests_fail_with_one_sentence(overrides, message):
  config = defaults.get_config()
  config.model.update(overrides)
  with pytest.raises(ValueError) as err:
    models.create(config.model)
  assert message in str(err.value) and '\n' not in str(err.value)


@pytest.mark.slow
def test_summary_cli(tmp_path):
  import json
  import subprocess
  import sys

  from conftest import REPO

  run = lambda *a: (
    subprocess.run(
      [sys.executable, '-m', 'resnet_jax.tools.summary', '--config=configs/cifar10_20.py', *a],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True,
    ).stdout
  )
  report = json.loads(run('--json'))
  assert {k: report[k] for k in ('model', 'params', 'macs')} == {
    'model': 'cifar10_20',
    'params': cifar_params(20),
    'macs': cifar_macs(20),
  }
  assert (
    len(report['layers']) == 21 and report['layers'][-1]['path'] == 'fc'
  )  # 20 weighted + avg pool
  overview = run()
  assert 'stage3_block3/conv2' in overview and overview.strip().splitlines()[-1].startswith(
    f'cifar10_20: {cifar_params(20):,} trainable parameters'
  )


# Rematerialisation and scanned blocks.


def _train_step(config, params, batch_stats, batch=4):
  """Loss, gradients and everything a train-mode forward pass writes: logits, batch_stats, sown collections."""
  model = models.create(config.model)
  x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
  labels = jnp.arange(batch) % config.model.num_classes

  def loss_fn(params):
    logits, state = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      x,
      train=True,
      mutable=['batch_stats', 'bn_moments', 'intermediates'],
    )
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
    return loss, (logits, state)

  (loss, (logits, state)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  return jax.device_get({'loss': loss, 'grads': grads, 'logits': logits, **state})


@functools.lru_cache(maxsize=None)
def _unscanned_step(depth, **overrides):
  """The reference: an unscanned, unrematerialised net's variables and train step (once per session)."""
  config = model_config('cifar', depth, **overrides)
  variables = random_variables(param_shapes(config, 32))
  return variables, _train_step(config, variables['params'], variables['batch_stats'])


def _assert_trees_close(actual, expected, rtol, atol):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=rtol, atol=atol), actual, expected
  )


def test_remat_keeps_the_parameter_tree():  # checkpoints load across the switch
  def shapes(**overrides):
    variables = param_shapes(model_config('cifar', 20, **overrides), 32)
    return jax.tree.map(lambda x: (x.shape, x.dtype), variables)

  assert shapes(remat=True) == shapes()
  assert shapes(remat=True, scan_blocks=True) == shapes(scan_blocks=True)


def test_remat_saves_only_the_blocks_inputs(capsys):
  """What JAX keeps for the backward pass. XLA:CPU drops remat's barriers and keeps every activation anyway
  unless the blocks are scanned: a ResNet-110 step at batch 128 takes 2.0 GiB of temporaries, 0.4 scanned."""

  def saved_activations(**overrides):
    model = models.create(model_config('cifar', 20, **overrides).model)
    variables = random_variables(param_shapes(model_config('cifar', 20), 32))
    x = jnp.zeros((4, 32, 32, 3))
    loss = lambda p: model.apply(
      {'params': p, 'batch_stats': variables['batch_stats']}, x, train=True, mutable=['batch_stats']
    )[0].sum()
    ad_checkpoint.print_saved_residuals(loss, variables['params'])
    return sum(line.startswith('f32[4,') for line in capsys.readouterr().out.splitlines())

  assert saved_activations(remat=True) * 4 < saved_activations()


@pytest.mark.parametrize('depth', [20, pytest.param(56, marks=pytest.mark.slow)])
def test_remat_gives_the_same_loss_and_gradients(depth):
  variables, expected = _unscanned_step(depth)
  config = model_config('cifar', depth, remat=True)
  actual = _train_step(config, variables['params'], variables['batch_stats'])
  _assert_trees_close(
    actual, expected, rtol=1e-6, atol=1e-7
  )  # the same arithmetic: equal in practice


@pytest.mark.parametrize('overrides', [{}, dict(residual=False, bn_group_size=2, remat=True)])
def test_scanned_blocks_match_the_unscanned_net(overrides):
  """Same outputs and gradients from the unscanned net's variables moved into the scanned layout."""
  reference = {k: v for k, v in overrides.items() if k != 'remat'}
  variables, expected = _unscanned_step(20, **reference)
  params, batch_stats = (models.stack_blocks(variables[k]) for k in ('params', 'batch_stats'))
  config = model_config('cifar', 20, scan_blocks=True, **overrides)
  assert jax.tree.map(np.shape, params) == jax.tree.map(
    np.shape, param_shapes(config, 32)['params']
  )
  actual = _train_step(config, params, batch_stats)
  assert 'stage2_block2to3' in actual['grads'] and 'stage2_block2' not in actual['grads']
  # Every collection, sown ones included, comes back stacked over the scanned blocks.
  actual = {
    k: x if k in ('loss', 'logits') else models.unstack_blocks(x) for k, x in actual.items()
  }
  _assert_trees_close(
    actual, expected, rtol=1e-5, atol=1e-5
  )  # another program: other float32 rounding
  assert models.unstack_blocks(params).keys() == variables['params'].keys()


def test_resnet1202_scanned_train_step_is_resnet110s_program():
  """ResNet-1202 (200 blocks a stage) lowers to ResNet-110's program but for loop counts and axis sizes."""

  def lower(depth):
    model = models.create(model_config('cifar', depth, remat=True, scan_blocks=True).model)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def loss_fn(params, batch_stats, x):
      logits, state = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )
      return jax.nn.log_softmax(logits)[:, 0].mean(), state['batch_stats']

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    return step.lower(variables['params'], variables['batch_stats'], x)

  program = lambda lowered: re.sub(r'\d+', '#', lowered.as_text())
  # So the compile time does not grow with depth: the compiler sees the same program.
  assert program(lower(1202)) == program(lower(110))


@pytest.mark.parametrize('family,depth', [('cifar', 110), ('imagenet', 50)])
def test_summary_counts_do_not_change_with_scanned_blocks(family, depth):
  _, params, macs = complexity.count(model_config(family, depth))
  _, params_scan, macs_scan = complexity.count(model_config(family, depth, scan_blocks=True))
  assert (params_scan, macs_scan) == (params, macs)


def test_bn_stats_recompute_under_scanned_blocks():
  """bn_stats maps each stacked 'bn_moments' entry to the stacked batch_stats of the same blocks."""
  from resnet_jax import exact_bn, parallel

  def net(scan):
    return models.ResNet(
      stage_sizes=(1, 3),
      widths=(4, 8),
      block=models.BasicBlock,
      stem='cifar',
      num_classes=3,
      bn_axis_name=parallel.AXIS,
      scan_blocks=scan,
    )

  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(8, 8, 8, 3)).astype(np.float32) + i for i in range(2)]
  shapes = jax.eval_shape(lambda: net(False).init(jax.random.key(0), batches[0], train=False))
  variables = random_variables(shapes)
  mesh = parallel.make_mesh(jax.devices()[:4])
  placed = [parallel.to_global({'image': b}, mesh) for b in batches]
  expected = exact_bn.recompute(
    net(False), variables['params'], variables['batch_stats'], placed, mesh
  )
  stacked = [models.stack_blocks(variables[k]) for k in ('params', 'batch_stats')]
  actual = exact_bn.recompute(net(True), *stacked, placed, mesh)
  assert actual['stage2_block2to3']['bn1']['mean'].shape == (2, 8)
  actual, expected = jax.device_get((models.unstack_blocks(actual), expected))
  _assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6)
