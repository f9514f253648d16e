"""The paper's networks: basic and bottleneck blocks, shortcuts A/B/C, CIFAR and ImageNet ResNets.

All conv padding is explicit and symmetric (as in Caffe and PyTorch): Flax's 'SAME' pads (0, 1) for a stride-2
conv on an even input, which would sample odd pixels in the conv branch while the shortcut (option A's
x[:, ::2, ::2] or a 1x1/2 projection) samples even ones.
"""

import functools
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import loop_conv

PAD3 = ((1, 1), (1, 1))  # 3x3 convs: 1 pixel each side
PAD7 = ((3, 3), (3, 3))  # ImageNet stem
IMAGENET_STAGES = {  # depth -> (blocks per stage, bottleneck), Table 1
  18: ((2, 2, 2, 2), False),
  34: ((3, 4, 6, 3), False),
  50: ((3, 4, 6, 3), True),
  101: ((3, 4, 23, 3), True),
  152: ((3, 8, 36, 3), True),
}


class BatchNorm(nn.Module):
  """BatchNorm with flax's variables (scale, bias; mean, var) and two additions the paper needs.

  - `group_size=k`: statistics over groups of k examples within each device's share ("ghost" BN), the
    paper's per-GPU BN (64 images on each of 2 GPUs for CIFAR, 32 on each of 8 for ImageNet), whatever
    the number of devices; None normalises over the whole batch, synchronised over `axis_name`.
  - In train mode it sows the batch moments (mean, mean of squares) over the whole batch into the
    'bn_moments' collection, so exact_bn.py can recompute exact population statistics after training.
  """

  use_running_average: bool
  axis_name: Optional[str] = None
  group_size: Optional[int] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      moments = (xf.mean(axes), jnp.square(xf).mean(axes))
      if self.axis_name is not None and not self.is_initializing():
        moments = jax.lax.pmean(moments, self.axis_name)
      self.sow('bn_moments', 'moments', moments)
      if self.group_size:
        if x.shape[0] % self.group_size:
          raise ValueError(
            f'model.bn_group_size={self.group_size} does not divide the {x.shape[0]} examples '
            'each device gets: use a divisor of the per-device batch.'
          )
        groups = xf.reshape(-1, self.group_size, *x.shape[1:])
        group_axes = tuple(range(1, groups.ndim - 1))
        mean = groups.mean(group_axes, keepdims=True)
        var = jnp.maximum(jnp.square(groups).mean(group_axes, keepdims=True) - jnp.square(mean), 0)
        batch_mean, batch_var = (
          mean.mean(axis=0).reshape(features),
          var.mean(axis=0).reshape(features),
        )
        if (
          self.axis_name is not None and not self.is_initializing()
        ):  # average the groups of every device
          batch_mean, batch_var = jax.lax.pmean((batch_mean, batch_var), self.axis_name)
        xf = groups
      else:
        mean = batch_mean = moments[0]
        var = batch_var = jnp.maximum(moments[1] - jnp.square(moments[0]), 0)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * batch_mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * batch_var
    # One multiply-add per element with per-channel factors: its backward is one reduction pass
    # (sums of g and g*x) and one elementwise pass, fewer than (x - mean) * ... gives XLA:CPU.
    factor = jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
    shift = bias.astype(jnp.float32) - mean * factor
    return (xf * factor + shift).reshape(x.shape).astype(self.dtype)


class Shortcut(nn.Module):
  """The identity path of a block: option A, B or C (paper section 3.3)."""

  features: int
  strides: int
  option: str
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    changes = self.strides != 1 or x.shape[-1] != self.features
    if self.option == 'C' or (self.option == 'B' and changes):
      x = self.conv(
        self.features, (1, 1), (self.strides, self.strides), padding='VALID', name='proj_conv'
      )(x)
      return self.norm(name='proj_bn')(x)
    # Option A (and B/C's identity): subsample, then zero-pad the new channels; no parameters.
    if self.strides != 1:
      x = x[:, :: self.strides, :: self.strides, :]
    extra = self.features - x.shape[-1]
    if extra > 0:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x


class Block(nn.Module):
  """What every block is given; `residual=False` builds the paper's plain counterpart (no shortcut)."""

  features: int
  strides: int
  residual: bool
  shortcut: str
  conv: Any
  norm: Any
  act: Any = nn.relu
  zero_init_last_bn: bool = False
  stride_on_3x3: bool = False


class BasicBlock(Block):
  """Two 3x3 convs (CIFAR nets, ResNet-18/34); the stride is always on the first 3x3."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), padding=PAD3, name='conv1')(
      x
    )
    y = self.norm(name='bn1')(y)
    self.sow('intermediates', 'responses', y)
    y = self.act(y)
    y = self.conv(self.features, (3, 3), padding=PAD3, name='conv2')(y)
    y = self.norm(name='bn2', scale_init=_last_scale_init(self.zero_init_last_bn))(y)
    self.sow('intermediates', 'responses', y)
    if self.residual:
      y = y + Shortcut(
        self.features, self.strides, self.shortcut, self.conv, self.norm, name='shortcut'
      )(x)
    return self.act(y)


class BottleneckBlock(Block):
  """1x1 reduce, 3x3, 1x1 expand (x4): `features` is the 3x3's width and the block outputs 4x it.

  The paper (v1, the released models) strides the first 1x1; `stride_on_3x3` gives the later "v1.5".
  """

  @nn.compact
  def __call__(self, x):
    s1, s3 = (1, self.strides) if self.stride_on_3x3 else (self.strides, 1)
    y = self.conv(self.features, (1, 1), (s1, s1), padding='VALID', name='conv1')(x)
    y = self.act(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), (s3, s3), padding=PAD3, name='conv2')(y)
    y = self.norm(name='bn2')(y)
    self.sow('intermediates', 'responses', y)
    y = self.act(y)
    y = self.conv(4 * self.features, (1, 1), padding='VALID', name='conv3')(y)
    y = self.norm(name='bn3', scale_init=_last_scale_init(self.zero_init_last_bn))(y)
    if self.residual:
      y = y + Shortcut(
        4 * self.features, self.strides, self.shortcut, self.conv, self.norm, name='shortcut'
      )(x)
    return self.act(y)


class MaxPool(nn.Module):
  """nn.max_pool as a variable-free module, so that method interceptors (complexity.walk) see it."""

  window: int
  strides: int
  padding: Any

  def __call__(self, x):
    window = (self.window, self.window)
    return nn.max_pool(x, window, strides=(self.strides, self.strides), padding=self.padding)


class GlobalAvgPool(nn.Module):
  """The mean over the spatial axes, as a module for the same reason as MaxPool."""

  def __call__(self, x):
    return jnp.mean(x, axis=(1, 2))


def materialize(x):
  """`x` unchanged, but as a buffer XLA cannot fuse through: the operand of a conditional.

  XLA:CPU duplicates cheap elementwise producers into every consumer, so without this the backward
  pass recomputes a stage's whole chain of BN, ReLU and residual additions inside each of its
  layout transposes (optimization_barrier is expanded before fusion there and does not stop it).
  Both branches return x exactly (the second, never taken for a finite x, negates twice).
  """
  return jax.lax.cond(
    jnp.isfinite(x.reshape(-1)[0]), lambda v: v, lambda v: jnp.negative(jnp.negative(v)), x
  )


def materialized_relu(x):
  return materialize(nn.relu(x))


def _last_scale_init(zero):
  return nn.initializers.zeros if zero else nn.initializers.ones


class ResNet(nn.Module):
  """A stem, stages of blocks (the first block of every stage but the first strides 2), pool, dense.

  For memory and compile time at depth (ResNet-1202): `remat` recomputes each block's activations in the
  backward pass, with the same variables (XLA:CPU saves memory only under scan). `scan_blocks` runs a stage's
  blocks 2..n as one nn.scan, 'stage{i}_block2to{n}', whose variables and sown values have a leading block
  axis; stack_blocks/unstack_blocks convert. On XLA:CPU the scanned blocks need loop_conv's gradients
  (`explicit_conv_grads`) to run as fast as unrolled ones.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block: Any
  stem: str  # 'cifar': 3x3 conv 16 | 'imagenet': 7x7/2 conv 64 + 3x3/2 max pool
  num_classes: int
  residual: bool = True
  shortcut: str = 'B'
  stride_on_3x3: bool = False
  init_mode: str = 'fan_in'
  zero_init_last_bn: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None  # 'batch' inside the data-parallel step: sync BN
  bn_group_size: Optional[int] = None  # examples per BN group; None: the global batch
  remat: bool = False
  scan_blocks: bool = False
  stem_pool: str = 'symmetric'  # 'symmetric': pad 1 each side | 'caffe': windows from pixel 0, ceil
  freeze_bn: bool = False  # BN uses its running statistics in training too (they stay as loaded)
  # Every ReLU output as a buffer XLA cannot fuse through (see materialize).
  materialize: bool = False
  # Which convolutions state their own gradients (loop_conv): 'none', 'scanned' (the blocks inside
  # nn.scan) or 'all'. Same variables and numbers.
  explicit_conv_grads: str = 'none'

  def __call__(self, x, train: bool = True):
    """The class logits (float32)."""
    return self._forward(x, train, head=True)

  def features(self, x, train: bool = False):
    """The stage outputs for detection and other tasks, from the classifier's own forward pass.

    ImageNet nets: {'stem': conv1 (stride 2), 'conv2'..'conv5': the paper's conv2_x..conv5_x (strides
    4, 8, 16, 32)}; CIFAR nets: {'stem', 'conv2', 'conv3', 'conv4'} (strides 1, 2, 4). The classifier
    pools the last of them: logits = fc(mean(features[last])). Use
    `model.apply(variables, x, train=False, method=ResNet.features)`.
    """
    return self._forward(x, train, head=False)

  @nn.compact
  def _forward(self, x, train: bool, head: bool):
    he = nn.initializers.variance_scaling(2.0, self.init_mode, 'normal')
    conv = functools.partial(
      nn.Conv, use_bias=False, kernel_init=he, dtype=self.dtype, param_dtype=self.param_dtype
    )
    explicit_conv = functools.partial(conv, conv_general_dilated=loop_conv.conv_general_dilated)
    if self.explicit_conv_grads == 'all':
      conv = explicit_conv
    norm = functools.partial(
      BatchNorm,
      # freeze_bn: the loaded statistics in training too (the paper's detection fine-tuning)
      use_running_average=not train or self.freeze_bn,
      momentum=0.9,
      epsilon=1e-5,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      axis_name=self.bn_axis_name,
      group_size=self.bn_group_size,
    )
    act = materialized_relu if self.materialize else nn.relu
    x = x.astype(self.dtype)
    if self.stem == 'cifar':
      x = act(norm(name='stem_bn')(conv(self.widths[0], (3, 3), padding=PAD3, name='stem_conv')(x)))
      features = {'stem': x}
    else:
      x = act(norm(name='stem_bn')(conv(64, (7, 7), (2, 2), padding=PAD7, name='stem_conv')(x)))
      features = {'stem': x}
      x = MaxPool(3, 2, stem_pool_padding(x.shape, self.stem_pool), name='pool')(x)  # -inf padding
    block_cls = nn.remat(self.block) if self.remat else self.block
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      block = functools.partial(
        block_cls,
        width,
        residual=self.residual,
        shortcut=self.shortcut,
        conv=conv,
        norm=norm,
        act=act,
        zero_init_last_bn=self.zero_init_last_bn,
        stride_on_3x3=self.stride_on_3x3,
      )
      x = block(strides=2 if i > 0 else 1, name=block_name(i + 1, 1))(
        x
      )  # changes shape: never scanned
      if self.scan_blocks and blocks > 1:
        # One traced block whatever the depth: every collection (params, batch_stats, bn_moments,
        # intermediates) gets a leading axis over the blocks.
        scan = nn.scan(
          lambda module, x, _: (module(x), None),
          variable_axes={True: 0},
          split_rngs={'params': True},
          length=blocks - 1,
        )
        if self.explicit_conv_grads == 'scanned':
          block = functools.partial(block, conv=explicit_conv)
        x, _ = scan(block(strides=1, name=scanned_name(i + 1, blocks)), x, None)
      else:
        for j in range(2, blocks + 1):
          x = block(strides=1, name=block_name(i + 1, j))(x)
      features[f'conv{i + 2}'] = x  # the paper's conv{i+2}_x: stage i+1
    if not head:
      return features
    x = GlobalAvgPool(name='avg_pool')(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name='fc')(x)
    return x.astype(jnp.float32)


def stem_pool_padding(shape, stem_pool):
  """The 3x3/2 max pool's padding (Flax pads max pools with -inf).

  Caffe's pool1 (the released models) has no padding and rounds the output size up, so its windows
  start one pixel later than ours: ceil((n - 3) / 2) + 1 outputs, the last window starting inside
  the input, padded at the end only.
  """
  if stem_pool == 'symmetric':
    return PAD3
  pads = []
  for n in shape[1:3]:
    out = -(-(n - 3) // 2) + 1
    if (out - 1) * 2 >= n:
      out -= 1
    pads.append((0, max(0, (out - 1) * 2 + 3 - n)))
  return tuple(pads)


_BLOCK = re.compile(r'stage(\d+)_block(\d+)')
_SCANNED = re.compile(r'stage(\d+)_block2to(\d+)')


def block_name(stage: int, block: int) -> str:
  """The module name of block `block` of stage `stage` (both from 1), as checkpoints hold it."""
  return f'stage{stage}_block{block}'


def scanned_name(stage: int, last: int) -> str:
  """The module name of a scanned stage's blocks 2..`last` (model.scan_blocks)."""
  return f'stage{stage}_block2to{last}'


def parse_block(name: str):
  """(stage, block) of a block's module name, else None."""
  m = _BLOCK.fullmatch(name)
  return (int(m[1]), int(m[2])) if m else None


def parse_scanned(name: str):
  """(stage, last block) of a scanned stage's module name, else None."""
  m = _SCANNED.fullmatch(name)
  return (int(m[1]), int(m[2])) if m else None


def stack_blocks(tree):
  """One collection (params, batch_stats, an optimizer's copy of them) of the unscanned net in the layout of
  `scan_blocks=True`, where each stage's blocks 2..n are one module with a leading axis. A scanned net's
  fresh init draws different (equally distributed) weights."""
  out, stages = {}, {}
  for name, sub in tree.items():
    parsed = parse_block(name)
    if parsed and parsed[1] > 1:
      stages.setdefault(parsed[0], {})[parsed[1]] = sub
    else:
      out[name] = sub
  for i, blocks in stages.items():
    ordered = [blocks[j] for j in sorted(blocks)]
    out[scanned_name(i, max(blocks))] = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
  return out


def unstack_blocks(tree):
  """The inverse of stack_blocks; it also splits sown collections (intermediates, bn_moments) per block."""
  out = {}
  for name, sub in tree.items():
    parsed = parse_scanned(name)
    if not parsed:
      out[name] = sub
      continue
    for j in range(2, parsed[1] + 1):
      out[block_name(parsed[0], j)] = jax.tree.map(lambda x, j=j: x[j - 2], sub)
  return out


def _holds_blocks(x):
  return isinstance(x, dict) and any(parse_block(k) or parse_scanned(k) for k in x)


def convert_layout(tree, scan_blocks: bool):
  """Any tree holding the network's modules (a TrainState, a checkpoint, an optimizer state) in the layout
  of `scan_blocks`: a checkpoint of either layout resumes or evaluates under the other."""
  convert = stack_blocks if scan_blocks else unstack_blocks
  return jax.tree.map(lambda x: convert(x) if _holds_blocks(x) else x, tree, is_leaf=_holds_blocks)


def create(model_config, bn_axis_name: Optional[str] = None) -> ResNet:
  """The network a config's `model` section names; raises ValueError with one sentence if it is invalid."""
  family, depth, shortcut = model_config.family, model_config.depth, model_config.shortcut
  if shortcut not in ('A', 'B', 'C'):
    raise ValueError(f"Unknown shortcut option {shortcut!r}: use 'A', 'B' or 'C'.")
  if model_config.init_mode not in ('fan_in', 'fan_out'):
    raise ValueError(f"Unknown init_mode {model_config.init_mode!r}: use 'fan_in' or 'fan_out'.")
  if family == 'cifar':
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {depth}.')
    stages, bottleneck, widths, stem = (((depth - 2) // 6,) * 3, False, (16, 32, 64), 'cifar')
  elif family == 'imagenet':
    if depth not in IMAGENET_STAGES:
      raise ValueError(
        f'ImageNet ResNet depth must be one of {sorted(IMAGENET_STAGES)}, got {depth}.'
      )
    (stages, bottleneck), widths, stem = IMAGENET_STAGES[depth], (64, 128, 256, 512), 'imagenet'
  else:
    raise ValueError(f"Unknown model family {family!r}: use 'cifar' or 'imagenet'.")
  remat, scan_blocks = model_config.get('remat', False), model_config.get('scan_blocks', False)
  freeze_bn = model_config.get('freeze_bn', False)
  for field, value in (('remat', remat), ('scan_blocks', scan_blocks), ('freeze_bn', freeze_bn)):
    if value not in (True, False):
      raise ValueError(f'model.{field} must be True or False, got {value!r}.')
  activations = model_config.get('activations', 'auto')
  if activations not in ('auto', 'fused', 'materialized'):
    raise ValueError(
      f"Unknown model.activations {activations!r}: use 'auto', 'fused' or 'materialized'."
    )
  conv_grads = model_config.get('conv_grads', 'auto')
  if conv_grads not in ('auto', 'xla', 'explicit', 'scanned'):
    raise ValueError(
      f"Unknown model.conv_grads {conv_grads!r}: use 'auto', 'xla', 'explicit' or 'scanned'."
    )
  auto = backend_defaults(jax.default_backend())
  activations = auto['activations'] if activations == 'auto' else activations
  conv_grads = auto['conv_grads'] if conv_grads == 'auto' else conv_grads
  stem_pool = model_config.get('stem_pool', 'symmetric')
  if stem_pool not in ('symmetric', 'caffe'):
    raise ValueError(f"Unknown model.stem_pool {stem_pool!r}: use 'symmetric' or 'caffe'.")
  return ResNet(
    stage_sizes=stages,
    widths=widths,
    block=BottleneckBlock if bottleneck else BasicBlock,
    stem=stem,
    num_classes=model_config.num_classes,
    residual=model_config.residual,
    shortcut=shortcut,
    stride_on_3x3=model_config.stride_on_3x3,
    init_mode=model_config.init_mode,
    zero_init_last_bn=model_config.zero_init_last_bn,
    dtype=jnp.dtype(model_config.dtype),
    param_dtype=jnp.dtype(model_config.param_dtype),
    bn_axis_name=bn_axis_name,
    bn_group_size=model_config.get('bn_group_size') or None,
    remat=bool(remat),
    scan_blocks=bool(scan_blocks),
    stem_pool=stem_pool,
    freeze_bn=bool(freeze_bn),
    materialize=activations == 'materialized',
    explicit_conv_grads={'xla': 'none', 'explicit': 'all'}.get(conv_grads, conv_grads),
  )


def backend_defaults(backend: str) -> dict:
  """What model.activations='auto' and model.conv_grads='auto' become on `backend`: the only
  backend-dependent defaults. Both choices compute the same function (tests/test_backend_defaults.py);
  they differ in speed only: XLA:CPU recomputes fused activation chains in the backward pass and runs
  its own convolution gradients slowly inside nn.scan's loop (experiments/results/cpu_profile.md)."""
  if backend == 'cpu':
    return {'activations': 'materialized', 'conv_grads': 'scanned'}
  return {'activations': 'fused', 'conv_grads': 'xla'}
