"""Released ResNet weights as this codebase's variables: torchvision's, the paper's Caffe models and
pytorch_resnet_cifar10's CIFAR ResNets.

The conversions are pure, NumPy in and out. Each returns the `config.model` fields the weights need (the
sources differ in where a bottleneck strides and in the stem's pool alignment) and the variables
{'params', 'batch_stats'} of `models.create` with those fields. PREPROCESSING says what input each
source's network expects; `preprocess` is its NumPy reference.

`write_workdir` makes an ordinary workdir of them (config.json with the model and preprocessing fields,
the mean image, a step-0 checkpoint in training's TrainState layout), so every tool takes a converted
model like a trained one; `load(workdir)` gives (model, variables) back.
"""

import json
import os
import re

import jax
import numpy as np
from flax import traverse_util
from google.protobuf import message

from resnet_jax import caffe_proto, checkpointing, defaults, models, optim, train
from resnet_jax import workdir as workdir_lib
from resnet_jax.registry import PREPROCESSING
from resnet_jax.workdir import Workdir

DEPTHS = tuple(sorted(models.IMAGENET_STAGES))
CAFFE_DEPTHS = (50, 101, 152)  # the released models
BN_EPSILON = 1e-5  # torchvision's and Caffe's BatchNorm default, as models.BatchNorm


class ConversionError(ValueError):
  """Weights that do not fit the network asked for; the message names the problem and the fix."""


def preprocess(images, spec, mean_image=None):
  """float32 NHWC network input from uint8 RGB images [N, H, W, 3] as `spec` (PREPROCESSING)."""
  x = np.asarray(images, np.float32)
  if spec['channel_order'] == 'bgr':
    x = x[..., ::-1]
  if spec['mean_image']:
    if mean_image is None or np.shape(mean_image) != x.shape[1:]:
      got = None if mean_image is None else np.shape(mean_image)
      raise ValueError(
        f'These weights need a mean image of shape {x.shape[1:]}, got {got}: pass '
        "mean_image_from_binaryproto() of the images' crop size."
      )
    x = x - np.asarray(mean_image, np.float32)
  x = x * np.float32(spec['scale'])
  mean = np.asarray(spec['mean'], np.float32)
  std = np.asarray(spec['std'], np.float32)
  return ((x - mean) / std).astype(np.float32)


def load_state_dict(path):
  """{name: array} of a torch.save'd state_dict (.pth, or a checkpoint dict holding one under
  'state_dict'); torch is needed only here, and installed by the `torch` extra."""
  import pickle

  try:
    import torch
  except ImportError:
    raise ConversionError(
      f'Reading {path}, a PyTorch file, needs torch, which is not installed: install the torch '
      "extra (pip install -e '.[torch]' in a checkout)."
    ) from None
  try:
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
  except EOFError as e:
    raise ConversionError(
      f'{path} ends early ({type(e).__name__}), a truncated download: fetch the file again.'
    ) from e
  except RuntimeError as e:
    if 'EOF' in str(e):
      raise ConversionError(
        f'{path} ends early (unexpected EOF), a truncated download: fetch the file again.'
      ) from e
    raise ConversionError(
      f'{path} is not a PyTorch file ({type(e).__name__}): pass a .pth written '
      'by torch.save(model.state_dict()).'
    ) from e
  except (pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError) as e:
    raise ConversionError(
      f'{path} is not a PyTorch file ({type(e).__name__}): pass a .pth written '
      'by torch.save(model.state_dict()).'
    ) from e
  if not isinstance(state_dict, dict):
    raise ConversionError(
      f'{path} holds a {type(state_dict).__name__}, not a state_dict: pass a '
      '.pth written by torch.save(model.state_dict()).'
    )

  def numpy(tree):
    if isinstance(tree, dict):
      return {k: numpy(v) for k, v in tree.items()}
    return tree.numpy() if isinstance(tree, torch.Tensor) else tree

  return numpy(state_dict)


def _layout(depth):
  """(module path, kind, source shapes) of every layer of the option-B ImageNet ResNet, in order.

  Shapes are the sources' (conv OIHW, fc (out, in)); None is a dimension the weights decide.
  """
  stages, bottleneck = models.IMAGENET_STAGES[depth]
  layers = [(('stem_conv',), 'conv', (64, 3, 7, 7)), (('stem_bn',), 'bn', 64)]
  in_features = 64
  for i, blocks in enumerate(stages):
    width = 64 * 2**i
    out_features = 4 * width if bottleneck else width
    for j in range(1, blocks + 1):
      block = models.block_name(i + 1, j)
      if bottleneck:
        convs = ((width, in_features, 1, 1), (width, width, 3, 3), (out_features, width, 1, 1))
      else:
        convs = ((width, in_features, 3, 3), (width, width, 3, 3))
      for k, shape in enumerate(convs, 1):
        layers += [((block, f'conv{k}'), 'conv', shape), ((block, f'bn{k}'), 'bn', shape[0])]
      if in_features != out_features or (j == 1 and i > 0):
        layers += [
          ((block, 'shortcut', 'proj_conv'), 'conv', (out_features, in_features, 1, 1)),
          ((block, 'shortcut', 'proj_bn'), 'bn', out_features),
        ]
      in_features = out_features
  layers.append((('fc',), 'fc', (None, in_features)))
  return layers


def _depth_of(stage_sizes, bottleneck):
  for depth, layout in models.IMAGENET_STAGES.items():
    if layout == (tuple(stage_sizes), bottleneck):
      return depth
  return None


def _fix(depth, inferred):
  if inferred is not None and inferred != depth:
    return f'pass --depth={inferred}'
  return f'pass weights of a ResNet-{depth}'


def _fits(shape, want):
  return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want))


def _check(name, array, want, depth, inferred):
  if not _fits(array.shape, want):
    want_text = str(want).replace('None', 'any')
    raise ConversionError(
      f"The weights' {name} has shape {array.shape} where ResNet-{depth} "
      f'needs {want_text}: {_fix(depth, inferred)}.'
    )
  return array


def _assemble(depth, inferred, fetch, layout=None):
  """{'params', 'batch_stats'} from fetch(path, kind) -> [(source name, array)] in the order
  conv: (weight OIHW,), bn: (scale, bias, mean, var), fc: (weight (out, in), bias), over `layout`
  (default: the ImageNet ResNet's)."""
  params, batch_stats = {}, {}
  num_classes = None
  for path, kind, shape in layout or _layout(depth):
    named = fetch(path, kind)
    if kind == 'conv':
      wants = [shape]
    elif kind == 'bn':
      wants = [(shape,)] * 4
    else:
      wants = [shape, (None,)]
    arrays = [
      _check(name, np.asarray(a, np.float32), want, depth, inferred)
      for (name, a), want in zip(named, wants)
    ]
    if kind == 'conv':
      leaves = {'params': {'kernel': arrays[0].transpose(2, 3, 1, 0)}}
    elif kind == 'bn':
      scale, bias, mean, var = arrays
      leaves = {'params': {'scale': scale, 'bias': bias}, 'batch_stats': {'mean': mean, 'var': var}}
    else:
      weight, bias = arrays
      if bias.shape != weight.shape[:1]:
        _check(named[1][0], bias, weight.shape[:1], depth, inferred)
      num_classes = weight.shape[0]
      leaves = {'params': {'kernel': weight.T, 'bias': bias}}
    for collection, values in leaves.items():
      node = params if collection == 'params' else batch_stats
      for key in path:
        node = node.setdefault(key, {})
      node.update({k: np.ascontiguousarray(v, np.float32) for k, v in values.items()})
  return {'params': params, 'batch_stats': batch_stats}, num_classes


def _check_depth(depth, allowed, source):
  if depth not in allowed:
    depths = ', '.join(map(str, allowed))
    raise ConversionError(f'{source} ResNets have depth {depths}, got {depth!r}: pass one of them.')


def _check_unused(names, used, depth, inferred):
  unused = [name for name in names if name not in used]
  if unused:
    raise ConversionError(
      f'The weights have a layer {unused[0]} that ResNet-{depth} does not '
      f'have: {_fix(depth, inferred)}.'
    )


# torchvision.models.resnet and pytorch_resnet_cifar10: layer{i}.{j} is our stage{i}_block{j + 1};
# torchvision's downsample is the projection.
_PYTORCH_BLOCK = re.compile(r'layer(\d)\.(\d+)\.conv1\.weight')
_TORCH_PARTS = {'proj_conv': 'downsample.0', 'proj_bn': 'downsample.1'}


def _torch_name(path):
  if path[0] in ('stem_conv', 'stem_bn'):
    return 'conv1' if path[0] == 'stem_conv' else 'bn1'
  if path[0] == 'fc':
    return 'fc'
  stage, block = models.parse_block(path[0])
  parts = [_TORCH_PARTS.get(part, part) for part in path[1:] if part != 'shortcut']
  return '.'.join([f'layer{stage}', str(int(block) - 1), *parts])


def from_torchvision(state_dict, depth):
  """(config.model overrides, variables) of a torchvision ResNet's state_dict {name: array|tensor}.

  torchvision strides a bottleneck's 3x3 ("v1.5") and projects shortcuts where shapes change (B).
  """
  _check_depth(depth, DEPTHS, 'torchvision')
  if not hasattr(state_dict, 'items'):
    raise ConversionError(
      f'A {type(state_dict).__name__} is not a state_dict: pass '
      'model.state_dict() or load_state_dict(path).'
    )
  arrays = {}
  for key, value in state_dict.items():
    if isinstance(key, str) and key.endswith('num_batches_tracked'):
      continue
    if hasattr(value, 'detach'):  # a torch tensor
      value = value.detach().cpu().numpy()
    arrays[key.removeprefix('module.') if isinstance(key, str) else key] = value
  if 'conv1.weight' not in arrays:
    nested = [k for k in ('state_dict', 'model') if hasattr(state_dict.get(k), 'items')]
    where = f"checkpoint['{nested[0]}']" if nested else 'the state_dict of a torchvision ResNet'
    raise ConversionError(f'The state_dict has no conv1.weight: pass {where}.')
  blocks = {}
  for key in arrays:
    m = _PYTORCH_BLOCK.fullmatch(key)
    if m:
      blocks[int(m[1])] = blocks.get(int(m[1]), 0) + 1
  inferred = _depth_of([blocks.get(i, 0) for i in range(1, 5)], 'layer1.0.conv3.weight' in arrays)
  used = set()

  def get(name):
    if name not in arrays:
      raise ConversionError(
        f'The weights have no layer {name} that ResNet-{depth} needs: {_fix(depth, inferred)}.'
      )
    used.add(name)
    return name, arrays[name]

  def fetch(path, kind):
    name = _torch_name(path)
    if kind == 'conv':
      return [get(f'{name}.weight')]
    if kind == 'bn':
      return [get(f'{name}.{p}') for p in ('weight', 'bias', 'running_mean', 'running_var')]
    return [get(f'{name}.weight'), get(f'{name}.bias')]

  variables, num_classes = _assemble(depth, inferred, fetch)
  _check_unused(arrays, used, depth, inferred)
  overrides = {
    'family': 'imagenet',
    'depth': depth,
    'residual': True,
    'shortcut': 'B',
    'stride_on_3x3': True,
    'num_classes': num_classes,
    'stem_pool': 'symmetric',
  }
  return overrides, variables


# The released Caffe models: res{stage}{block}_branch1 (projection), _branch2a/b/c (the bottleneck's
# convs), each followed by bn... (BatchNorm: mean, variance, scale factor), scale... (gamma, beta).
_CAFFE_BLOCK = re.compile(r'res(\d)([a-z]\d*)_branch2a')


def _caffe_block(depth, stage, block):
  """ResNet-50 letters its blocks (res3a..res3d); 101 and 152 go a, b1, b2, ... where a stage has
  more than three."""
  blocks = models.IMAGENET_STAGES[depth][0][stage - 1]
  if block == 1:
    return f'{stage + 1}a'
  if depth > 50 and blocks > 3:
    return f'{stage + 1}b{block - 1}'
  return f'{stage + 1}{chr(ord("a") + block - 1)}'


def _caffe_names(depth, path):
  """(conv or fc layer, BatchNorm layer, Scale layer) names of a module path."""
  if path[0] in ('stem_conv', 'stem_bn'):
    return 'conv1', 'bn_conv1', 'scale_conv1'
  if path[0] == 'fc':
    return 'fc1000', None, None
  stage, block = models.parse_block(path[0])
  suffix = 'branch1' if path[1] == 'shortcut' else f'branch2{"abc"[int(path[1][-1]) - 1]}'
  name = f'{_caffe_block(depth, stage, block)}_{suffix}'
  return f'res{name}', f'bn{name}', f'scale{name}'


def _read_bytes(source):
  if isinstance(source, (bytes, bytearray, memoryview)):
    return bytes(source), 'The data'
  with open(os.fspath(source), 'rb') as f:
    return f.read(), os.fspath(source)


def from_caffe(net_param, depth):
  """(config.model overrides, variables) of a released Caffe ResNet (.caffemodel path or bytes).

  Caffe strides a bottleneck's first 1x1 (the paper), projects when shapes change (option B), pools
  its stem without padding (stem_pool='caffe') and reads BGR: conv1's input channels are reversed
  here, so the network takes RGB minus the mean image.
  """
  _check_depth(depth, CAFFE_DEPTHS, 'Released Caffe')
  data, what = _read_bytes(net_param)
  try:
    layers = caffe_proto.layer_blobs(caffe_proto.read_net(data))
  except (message.DecodeError, ValueError):
    layers = {}
  if not layers:
    text = data[:4096].isascii() and b'\0' not in data[:4096]
    problem = 'but a text file (a .prototxt?)' if text else '(no NetParameter with weights)'
    raise ConversionError(
      f'{what} is not a .caffemodel {problem}: pass the binary weights file '
      '(.caffemodel) of a released ResNet.'
    )
  blocks = {}
  for name in layers:
    m = _CAFFE_BLOCK.fullmatch(name)
    if m:
      blocks[int(m[1])] = blocks.get(int(m[1]), 0) + 1
  inferred = _depth_of([blocks.get(i, 0) for i in range(2, 6)], True)
  used = set()

  def get(name, count):
    if name not in layers:
      raise ConversionError(
        f'The weights have no layer {name} that ResNet-{depth} needs: {_fix(depth, inferred)}.'
      )
    if len(layers[name]) not in count:
      raise ConversionError(
        f"The weights' layer {name} has {len(layers[name])} blobs where a "
        f'ResNet-{depth} has {" or ".join(map(str, count))}: pass the released '
        "model's .caffemodel."
      )
    used.add(name)
    return layers[name]

  def fetch(path, kind):
    conv, bn, scale = _caffe_names(depth, path)
    if kind == 'conv':
      weight = get(conv, (1,))[0]
      if path == ('stem_conv',) and weight.ndim == 4:
        weight = weight[:, ::-1]  # BGR -> RGB
      return [(conv, weight)]
    if kind == 'fc':
      weight, bias = get(conv, (2,))
      if weight.ndim == 4:  # the legacy 4-D shape (1, 1, out, in)
        weight = weight.reshape(weight.shape[-2:])
      return [(conv, weight), (conv, bias)]
    mean, var, factor = get(bn, (3,))
    gamma_beta = get(scale, (1, 2))
    # Caffe's BatchNorm stores running sums and their weight: the statistics are the ratio (0 if 0).
    factor = float(np.asarray(factor).ravel()[0]) if np.size(factor) else 0.0
    inverse = 0.0 if factor == 0 else 1.0 / factor
    beta = gamma_beta[1] if len(gamma_beta) > 1 else np.zeros_like(gamma_beta[0])
    return [
      (scale, gamma_beta[0].ravel()),
      (scale, beta.ravel()),
      (bn, mean.ravel() * inverse),
      (bn, var.ravel() * inverse),
    ]

  variables, num_classes = _assemble(depth, inferred, fetch)
  _check_unused(layers, used, depth, inferred)
  overrides = {
    'family': 'imagenet',
    'depth': depth,
    'residual': True,
    'shortcut': 'B',
    'stride_on_3x3': False,
    'num_classes': num_classes,
    'stem_pool': 'caffe',
  }
  return overrides, variables


def mean_image_from_binaryproto(blob_proto):
  """The released models' mean image (a BlobProto 1x3xHxW, BGR, 0..255) as float32 [H, W, 3] RGB."""
  data, what = _read_bytes(blob_proto)
  fix = 'pass the mean .binaryproto released with the models (ResNet_mean.binaryproto)'
  try:
    blob = caffe_proto.BlobProto.FromString(data)
    array = caffe_proto.blob_to_array(blob)
  except (message.DecodeError, ValueError) as e:
    raise ConversionError(f'{what} is not a BlobProto ({type(e).__name__}): {fix}.') from e
  if array.ndim == 4 and array.shape[0] == 1:
    array = array[0]
  if array.ndim != 3 or array.shape[0] != 3 or array.size == 0:
    raise ConversionError(f'{what} holds a blob of shape {array.shape}, not a colour image: {fix}.')
  return np.ascontiguousarray(array.transpose(1, 2, 0)[..., ::-1], np.float32)


# pytorch_resnet_cifar10 (akamaster): conv1/bn1, layer{1,2,3}.{i}.conv{1,2}/bn{1,2}, linear; saved from
# DataParallel, so keys may carry 'module.'. Its option-A shortcut pads planes//4 zero channels on both
# sides of the subsampled input where ours pads at the end (Shortcut): the same function up to a
# permutation of each stage's residual channels, which the conversion carries through.
CIFAR_WIDTHS = (16, 32, 64)


def cifar_stream_orders():
  """Per stage, their channel of each of our residual channels: ours[..., i] is theirs[order[i]].

  Stage s + 1 holds their stage s stream at channels C/2 .. 3C/2 (C = stage s's width) between two C/2
  zero pads; ours holds it at 0 .. C, zeros after.
  """
  orders = [np.arange(CIFAR_WIDTHS[0])]
  for before, width in zip(CIFAR_WIDTHS, CIFAR_WIDTHS[1:]):
    pad = (width - before) // 2
    zeros = np.concatenate([np.arange(pad), np.arange(pad + before, width)])
    orders.append(np.concatenate([pad + orders[-1], zeros]))
  return orders


def _cifar_layout(depth):
  """As _layout, for the CIFAR ResNet with option-A shortcuts (no shortcut parameters)."""
  blocks = (depth - 2) // 6
  layers = [(('stem_conv',), 'conv', (16, 3, 3, 3)), (('stem_bn',), 'bn', 16)]
  in_features = CIFAR_WIDTHS[0]
  for i, width in enumerate(CIFAR_WIDTHS):
    for j in range(1, blocks + 1):
      block = models.block_name(i + 1, j)
      layers += [
        ((block, 'conv1'), 'conv', (width, in_features, 3, 3)),
        ((block, 'bn1'), 'bn', width),
        ((block, 'conv2'), 'conv', (width, width, 3, 3)),
        ((block, 'bn2'), 'bn', width),
      ]
      in_features = width
  layers.append((('fc',), 'fc', (None, in_features)))
  return layers


def _cifar_orders(path, orders):
  """(order of the input channels, order of the output channels) of a layer; None keeps them."""
  if path[0] in ('stem_conv', 'stem_bn'):
    return None, orders[0]
  if path[0] == 'fc':
    return orders[-1], None
  stage, block = models.parse_block(path[0])
  if path[1] in ('conv1', 'bn1'):
    reads = orders[stage - 2] if block == 1 and stage > 1 else orders[stage - 1]
    return (reads if path[1] == 'conv1' else None), None
  return None, orders[stage - 1]


def _cifar_name(path):
  if path[0] in ('stem_conv', 'stem_bn'):
    return 'conv1' if path[0] == 'stem_conv' else 'bn1'
  if path[0] == 'fc':
    return 'linear'
  stage, block = models.parse_block(path[0])
  return f'layer{stage}.{int(block) - 1}.{path[1]}'


def _cifar_arrays(state_dict):
  """{name: array} without 'module.' and BN's counters, from a bare state_dict or a checkpoint dict."""
  if not hasattr(state_dict, 'items'):
    raise ConversionError(
      f'A {type(state_dict).__name__} is not a state_dict: pass a file of '
      'pytorch_resnet_cifar10 (a dict with a state_dict) or its state_dict.'
    )
  if hasattr(state_dict.get('state_dict'), 'items'):
    state_dict = state_dict['state_dict']
  arrays = {}
  for key, value in state_dict.items():
    if not isinstance(key, str) or key.endswith('num_batches_tracked'):
      continue
    if hasattr(value, 'detach'):  # a torch tensor
      value = value.detach().cpu().numpy()
    arrays[key.removeprefix('module.')] = value
  return arrays


def _check_cifar_source(arrays):
  """One sentence for the files people mistake for these: ImageNet ResNets, option-B CIFAR ResNets."""
  if 'fc.weight' in arrays or any(k.startswith('layer4.') for k in arrays):
    raise ConversionError(
      'The weights are an ImageNet ResNet (fc, layer4), not a pytorch_resnet_cifar10 CIFAR ResNet: '
      'convert them with --format=torchvision.'
    )
  projection = next((k for k in arrays if '.shortcut.' in k or '.downsample.' in k), None)
  if projection:
    raise ConversionError(
      f"The weights have projection shortcuts ({projection}, option B) where pytorch_resnet_cifar10's "
      'released networks and this conversion use option A: pass one of its option-A files '
      '(resnet20-12fca82f.th, ...).'
    )
  if 'conv1.weight' not in arrays or 'linear.weight' not in arrays:
    missing = 'conv1.weight' if 'conv1.weight' not in arrays else 'linear.weight'
    raise ConversionError(
      f'The state_dict has no {missing}: pass a file of pytorch_resnet_cifar10 '
      "(torch.save({'state_dict': model.state_dict()}) of its resnet.py)."
    )


def from_pytorch_resnet_cifar10(state_dict, depth=None):
  """(config.model overrides, variables) of a pytorch_resnet_cifar10 ResNet (its checkpoint dict
  {'state_dict': ...} or a bare state_dict, keys with or without 'module.'); `depth` is read from the
  weights and only checked when given."""
  arrays = _cifar_arrays(state_dict)
  _check_cifar_source(arrays)
  blocks = [0, 0, 0]
  for key in arrays:
    m = _PYTORCH_BLOCK.fullmatch(key)
    if m and 1 <= int(m[1]) <= 3:
      blocks[int(m[1]) - 1] += 1
  if len(set(blocks)) != 1 or not blocks[0]:
    raise ConversionError(
      f'The weights have {blocks[0]}, {blocks[1]} and {blocks[2]} blocks in layer1..3 where a CIFAR '
      'ResNet has n in each: pass a file of pytorch_resnet_cifar10.'
    )
  inferred = 6 * blocks[0] + 2
  if depth is not None and depth != inferred:
    raise ConversionError(
      f'The weights are a ResNet-{inferred} where --depth={depth} was given: pass '
      f'--depth={inferred} or leave it out.'
    )
  depth = inferred
  orders = cifar_stream_orders()
  used = set()

  def get(name):
    if name not in arrays:
      raise ConversionError(
        f'The weights have no layer {name} that ResNet-{depth} needs: pass a file of '
        'pytorch_resnet_cifar10.'
      )
    used.add(name)
    return name, arrays[name]

  def fetch(path, kind):
    name = _cifar_name(path)
    reads, writes = _cifar_orders(path, orders)
    if kind == 'conv':
      key, weight = get(f'{name}.weight')
      weight = np.asarray(weight)
      if weight.ndim == 4 and writes is not None and weight.shape[0] == len(writes):
        weight = weight[writes]
      if weight.ndim == 4 and reads is not None and weight.shape[1] == len(reads):
        weight = weight[:, reads]
      return [(key, weight)]
    if kind == 'bn':
      named = [get(f'{name}.{p}') for p in ('weight', 'bias', 'running_mean', 'running_var')]
      if writes is None:
        return named
      return [(k, a[writes] if np.shape(a) == writes.shape else a) for k, a in named]
    (weight_key, weight), bias = get(f'{name}.weight'), get(f'{name}.bias')
    weight = np.asarray(weight)
    if weight.ndim == 2 and weight.shape[1] == len(reads):
      weight = weight[:, reads]
    return [(weight_key, weight), bias]

  variables, num_classes = _assemble(depth, depth, fetch, _cifar_layout(depth))
  _check_unused(arrays, used, depth, depth)
  overrides = {
    'family': 'cifar',
    'depth': depth,
    'residual': True,
    'shortcut': 'A',
    'num_classes': num_classes,
  }
  return overrides, variables


# ------------------------------------------------------------------------------------------ workdirs

FORMATS = ('caffe', 'torchvision', 'pytorch_resnet_cifar10')


def _existing_file(path, what):
  if not os.path.isfile(os.path.expanduser(os.fspath(path))):
    raise ConversionError(f'{path} does not exist: pass the path of the {what}.')
  return os.path.expanduser(os.fspath(path))


def cifar_config(depth):
  """The checkout's configs/cifar10_<depth>.py when there is one (configs are not installed), else
  the defaults with that depth."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(root, 'configs', f'cifar10_{depth}.py')
  if os.path.isfile(path):
    return defaults.load_file(path)
  config = defaults.get_config()
  config.name = f'cifar10_{depth}'
  config.model.depth = depth
  return config


def convert(source, weights, depth, mean=None, config=None):
  """(config, variables, mean image or None) of released weights (a file path) of `source`.

  The config is `config` (default: defaults.get_imagenet_config(), or cifar_config(depth) for
  pytorch_resnet_cifar10, whose depth comes from the weights) with the converter's model fields, the
  name '<source>_resnet<depth>' and the source's preprocessing in data.*; a Caffe model's mean image
  (its .binaryproto, `mean`) is float32 [crop, crop, 3] RGB. Raises ConversionError.
  """
  if source not in FORMATS:
    raise ConversionError(f'Unknown weights format {source!r}: pass one of {", ".join(FORMATS)}.')
  weights = _existing_file(weights, 'weights file')
  if source != 'caffe' and mean is not None:
    raise ConversionError(f'{source} models take no mean image: leave out the mean file.')
  mean_image = None
  if source == 'pytorch_resnet_cifar10':
    overrides, variables = from_pytorch_resnet_cifar10(load_state_dict(weights), depth)
    depth = overrides['depth']
    config = (config or cifar_config(depth)).copy_and_resolve_references()
  elif source == 'torchvision':
    config = (config or defaults.get_imagenet_config()).copy_and_resolve_references()
    overrides, variables = from_torchvision(load_state_dict(weights), depth)
  else:
    config = (config or defaults.get_imagenet_config()).copy_and_resolve_references()
    if mean is None:
      raise ConversionError(
        'A Caffe model needs the mean image released with it: pass ResNet_mean.binaryproto.'
      )
    overrides, variables = from_caffe(weights, depth)
    mean_image = mean_image_from_binaryproto(_existing_file(mean, 'mean .binaryproto'))
    crop = int(config.data.image_size)
    if mean_image.shape != (crop, crop, 3):
      raise ConversionError(
        f'The mean image is {mean_image.shape[0]}x{mean_image.shape[1]} where the crop '
        f'data.image_size is {crop}: pass the mean image of {crop}x{crop} crops.'
      )
  spec = PREPROCESSING[source]
  config.name = f'{source}_resnet{depth}'
  config.model.update(overrides)
  config.data.input_scale = float(spec['scale'])
  config.data.channel_mean = tuple(spec['mean']) if any(spec['mean']) else ()
  config.data.channel_std = tuple(spec['std']) if any(v != 1 for v in spec['std']) else ()
  config.data.mean_image_file = workdir_lib.MEAN_IMAGE_NAME if spec['mean_image'] else ''
  if spec['antialias'] is not None:
    config.data.antialias = spec['antialias']
  variables = models.convert_layout(variables, bool(config.model.scan_blocks))
  return config, variables, mean_image


def train_state(config, variables):
  """Training's TrainState of `config` holding `variables` at step 0 (zero momentum)."""
  model = models.create(config.model)
  tx = optim.create(config.optimizer)
  key = jax.random.key(config.seed)
  x = jax.ShapeDtypeStruct((1, config.data.image_size, config.data.image_size, 3), np.float32)
  initial = jax.eval_shape(lambda x: model.init(key, x, train=False), x)
  fitted = {  # the network's own tree (raises if the converted one differs), in its dtypes
    k: jax.tree.map(lambda new, want: np.asarray(new, want.dtype), variables[k], initial[k])
    for k in ('params', 'batch_stats')
  }
  return train.create_train_state(config, model, tx, key, variables=fitted)


def _same_arrays(a, b):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  return flat_a.keys() == flat_b.keys() and all(
    np.shape(flat_a[k]) == np.shape(flat_b[k]) and np.array_equal(flat_a[k], flat_b[k])
    for k in flat_a
  )


def _holds_this(workdir, config, variables, mean_image):
  """Whether `workdir` already holds exactly this conversion (False: nothing of it yet); raises
  ConversionError when it holds another network or other weights."""
  config_path = Workdir(workdir).config_json
  if os.path.exists(config_path):
    with open(config_path) as f:
      saved = json.load(f)
    # As tools read it (defaults.from_saved): a conversion written before a field existed is still this one.
    if json.loads(defaults.from_saved(saved).to_json_best_effort()) != json.loads(
      config.to_json_best_effort()
    ):
      raise ConversionError(
        f'{workdir} already holds another run ({saved.get("name", "unnamed")}) whose config.json '
        f'differs from {config.name}: choose a new --workdir.'
      )
  steps = checkpointing.complete_steps(Workdir(workdir).checkpoints)
  if not steps:
    return False
  try:
    run = checkpointing.open_workdir(workdir, config)
  except FileNotFoundError:
    run = None
  mean_path = Workdir(workdir).mean_image
  same = (
    run is not None
    and run.step == 0
    and _same_arrays(run.variables, variables)
    and (
      mean_image is None
      or (os.path.exists(mean_path) and np.array_equal(np.load(mean_path), mean_image))
    )
  )
  if not same:
    raise ConversionError(
      f'{workdir} already holds a checkpoint of another network or other weights (step '
      f'{steps[0]}): choose a new --workdir.'
    )
  return True


def write_workdir(workdir, source, weights, depth, mean=None, config=None):
  """(config, written): converts released weights into `workdir` (see `convert`), or finds them there.

  Everything is read and checked before anything is written: a ConversionError leaves the workdir as it
  was. Writes the mean image, the step-0 checkpoint, then config.json (a workdir with config.json is
  complete); `written` is False when the workdir already held exactly this conversion.
  """
  config, variables, mean_image = convert(source, weights, depth, mean, config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConversionError(f'{workdir} is a file: pass a folder as the workdir.')
  config_path = Workdir(workdir).config_json
  holds = _holds_this(workdir, config, variables, mean_image)
  if holds and os.path.exists(config_path):
    return config, False
  if not holds:
    state = train_state(config, variables)
    os.makedirs(workdir, exist_ok=True)
    if mean_image is not None:
      np.save(Workdir(workdir).mean_image, mean_image)
    mngr = checkpointing.manager(workdir, config.train.keep_checkpoints)
    checkpointing.save(mngr, state, 0)
    mngr.wait_until_finished()
    mngr.close()
  # Last, so that a workdir with config.json is complete; also completes an interrupted conversion.
  with open(config_path, 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return config, True


def load(workdir):
  """(model, variables {'params', 'batch_stats'}) of a workdir's newest checkpoint, converted or
  trained, for model.apply(variables, x, train=False)."""
  run = checkpointing.open_workdir(workdir)
  return models.create(run.config.model), run.variables
