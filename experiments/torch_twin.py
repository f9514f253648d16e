"""A PyTorch twin of resnet_jax.models: the same networks, so experiments/benchmark.py compares frameworks,
not architectures.

Same as ours: v1 bottleneck (stride on the first 1x1 unless stride_on_3x3), shortcut options A/B/C with
option A as ours (subsample x[::s, ::s], zero-pad the new channels at the end), symmetric padding (3x3: 1,
7x7/2 stem: 3, max pool 3x3/2 pad 1 with -inf), BN eps 1e-5 and running averages 0.9 old + 0.1 new, He
normal init of convs, flax's default (truncated LeCun normal) init of the dense layer. Modules carry our
variable names (stem_conv, stage2_block1.shortcut.proj_conv, ...), so `load_flax_params` is a renaming.

Differences that do not change the cost of a step: torch's BN updates its running variance with the
unbiased batch variance (ours: the biased one), and the twin has no ghost BN (model.bn_group_size).
tests/test_benchmark.py proves the twin equal: equal parameter counts, and equal logits with our weights.

  from experiments import torch_twin
  net = torch_twin.build(config.model)          # NCHW input
  torch_twin.load_flax_params(net, variables)   # {'params': ..., 'batch_stats': ...} of models.create(...)
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resnet_jax import models


def _conv(cin, cout, k, stride=1, padding=0, init_mode='fan_in'):
  conv = nn.Conv2d(cin, cout, k, stride, padding, bias=False)
  nn.init.kaiming_normal_(
    conv.weight, mode=init_mode, nonlinearity='relu'
  )  # N(0, 2/fan): flax's He init
  return conv


def _bn(features, zero_scale=False):
  bn = nn.BatchNorm2d(
    features, eps=1e-5, momentum=0.1
  )  # torch's momentum is the new batch's weight
  if zero_scale:
    nn.init.zeros_(bn.weight)
  return bn


class Shortcut(nn.Module):
  """Option A: subsample and zero-pad channels (no parameters); B: 1x1 projection where the shape changes;
  C: projection always."""

  def __init__(self, cin, cout, stride, option, init_mode):
    super().__init__()
    self.stride, self.extra = stride, cout - cin
    self.project = option == 'C' or (option == 'B' and (stride != 1 or cin != cout))
    if self.project:
      self.proj_conv = _conv(cin, cout, 1, stride, 0, init_mode)
      self.proj_bn = _bn(cout)

  def forward(self, x):
    if self.project:
      return self.proj_bn(self.proj_conv(x))
    if self.stride != 1:
      x = x[:, :, :: self.stride, :: self.stride]
    if self.extra > 0:
      x = F.pad(x, (0, 0, 0, 0, 0, self.extra))  # NCHW: new channels after the old ones, as ours
    return x


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(
    self, cin, width, stride, residual, option, init_mode, zero_init_last_bn, stride_on_3x3
  ):
    super().__init__()
    del stride_on_3x3  # the basic block strides its first 3x3 anyway
    self.conv1, self.bn1 = _conv(cin, width, 3, stride, 1, init_mode), _bn(width)
    self.conv2, self.bn2 = _conv(width, width, 3, 1, 1, init_mode), _bn(width, zero_init_last_bn)
    self.shortcut = Shortcut(cin, width, stride, option, init_mode) if residual else None

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.shortcut is not None:
      y = y + self.shortcut(x)
    return F.relu(y)


class BottleneckBlock(nn.Module):
  expansion = 4

  def __init__(
    self, cin, width, stride, residual, option, init_mode, zero_init_last_bn, stride_on_3x3
  ):
    super().__init__()
    s1, s3 = (
      (1, stride) if stride_on_3x3 else (stride, 1)
    )  # v1 (the paper): stride on the first 1x1
    self.conv1, self.bn1 = _conv(cin, width, 1, s1, 0, init_mode), _bn(width)
    self.conv2, self.bn2 = _conv(width, width, 3, s3, 1, init_mode), _bn(width)
    self.conv3, self.bn3 = (
      _conv(width, 4 * width, 1, 1, 0, init_mode),
      _bn(4 * width, zero_init_last_bn),
    )
    self.shortcut = Shortcut(cin, 4 * width, stride, option, init_mode) if residual else None

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.shortcut is not None:
      y = y + self.shortcut(x)
    return F.relu(y)


class ResNet(nn.Module):
  """Stem, stages (the first block of every stage but the first strides 2), global mean pool, fc."""

  def __init__(
    self,
    stage_sizes,
    widths,
    block,
    stem,
    num_classes,
    residual=True,
    shortcut='B',
    stride_on_3x3=False,
    init_mode='fan_in',
    zero_init_last_bn=False,
  ):
    super().__init__()
    self.imagenet_stem = stem == 'imagenet'
    cin = 64 if self.imagenet_stem else widths[0]
    k, stride = (7, 2) if self.imagenet_stem else (3, 1)
    self.stem_conv = _conv(3, cin, k, stride, k // 2, init_mode)
    self.stem_bn = _bn(cin)
    self.block_names = []
    for i, (blocks, width) in enumerate(zip(stage_sizes, widths)):
      for j in range(blocks):
        name = f'stage{i + 1}_block{j + 1}'
        self.add_module(
          name,
          block(
            cin,
            width,
            2 if i > 0 and j == 0 else 1,
            residual,
            shortcut,
            init_mode,
            zero_init_last_bn,
            stride_on_3x3,
          ),
        )
        self.block_names.append(name)
        cin = width * block.expansion
    self.fc = nn.Linear(cin, num_classes)
    # flax's Dense default: LeCun normal truncated at 2 std (std corrected for the truncation), zero bias.
    std = math.sqrt(1.0 / cin) / 0.87962566103423978
    nn.init.trunc_normal_(self.fc.weight, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(self.fc.bias)

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    if self.imagenet_stem:
      x = F.max_pool2d(x, 3, 2, 1)  # pads with -inf, as flax's max_pool
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.fc(x.mean(dim=(2, 3)))


def build(model_config) -> ResNet:
  """The twin of `models.create(model_config)` (a config's `model` section); float32, NCHW input."""
  if model_config.get('bn_group_size'):
    raise ValueError('the torch twin has no ghost BN: set model.bn_group_size=0.')
  ours = models.create(
    model_config
  )  # validates the config; the twin takes its stages, widths and block
  block = BottleneckBlock if ours.block is models.BottleneckBlock else BasicBlock
  return ResNet(
    ours.stage_sizes,
    ours.widths,
    block,
    ours.stem,
    ours.num_classes,
    residual=ours.residual,
    shortcut=ours.shortcut,
    stride_on_3x3=ours.stride_on_3x3,
    init_mode=ours.init_mode,
    zero_init_last_bn=ours.zero_init_last_bn,
  )


def num_params(net) -> int:
  """Trainable parameters (BN scale and bias included, running statistics not), as complexity.count."""
  return sum(p.numel() for p in net.parameters() if p.requires_grad)


_NAMES = {
  'kernel': 'weight',
  'scale': 'weight',
  'bias': 'bias',
  'mean': 'running_mean',
  'var': 'running_var',
}


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, 'items'):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def load_flax_params(net, variables):
  """Copies our {'params', 'batch_stats'} into the twin: conv HWIO -> OIHW, dense (in, out) -> (out, in).

  Strict: every variable of ours must land on a tensor of the twin and every tensor must be set.
  """
  state = {}
  for collection in ('params', 'batch_stats'):
    for path, value in _flatten(
      models.unstack_blocks(variables[collection])
    ):  # scan_blocks: per block
      value = np.array(value, np.float32)  # a writable copy
      if path[-1] == 'kernel':
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      state['.'.join(path[:-1] + (_NAMES[path[-1]],))] = torch.from_numpy(
        np.ascontiguousarray(value)
      )
  own = net.state_dict()
  state.update({k: v for k, v in own.items() if k.endswith('num_batches_tracked')})
  missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
  if missing or unexpected:
    raise ValueError(
      f'the twin does not match the variables: missing {missing[:5]}, unexpected {unexpected[:5]}'
    )
  for k, v in state.items():
    if tuple(v.shape) != tuple(own[k].shape):
      raise ValueError(f'{k}: ours {tuple(v.shape)} vs the twin {tuple(own[k].shape)}')
  net.load_state_dict({k: v.to(own[k].device) for k, v in state.items()}, strict=True)
  return net
