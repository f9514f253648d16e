"""Parameters and forward multiply-adds of a config's network, layer by layer, without compiling it.

`walk` records every conv, dense and pooling layer and every block in network order by intercepting
module calls under jax.eval_shape. MACs come from each kernel's and output's shapes: XLA's cost
analysis skips the taps of a conv that fall on padding: 7 percent fewer MACs for ResNet-18, 3.4 for
ResNet-50 (test_models cross-checks the two counts).

The command resnet_jax.tools.summary prints them, for a config file or a workdir.
"""

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import models


@dataclasses.dataclass(frozen=True)
class Layer:
  """One conv, dense or pooling layer; a conv's params include those of the BN that follows it."""

  path: str  # module path: 'stage2_block1/conv1'; per block under scan_blocks
  kind: str  # 'conv' | 'dense' | 'max_pool' | 'avg_pool'
  kernel: tuple  # window (height, width); () for dense and global pooling
  stride: int
  features: int  # output channels
  shape: tuple  # output of one image: (height, width, channels) or (features,)
  params: int
  macs: int
  block: Optional[str] = None  # the enclosing block's path, 'stage2_block1'
  branch: str = 'main'  # 'shortcut' for a projection (options B and C)

  @property
  def label(self):
    """The paper's name for it (Fig. 3): '3x3 conv, 128, /2', 'pool, /2', 'avg pool', 'fc 1000'."""
    stride = f', /{self.stride}' if self.stride != 1 else ''
    if self.kind == 'conv':
      return f'{self.kernel[0]}x{self.kernel[1]} conv, {self.features}{stride}'
    if self.kind == 'max_pool':
      return f'pool{stride}'
    if self.kind == 'avg_pool':
      return 'avg pool'
    return f'fc {self.features}'


@dataclasses.dataclass(frozen=True)
class Block:
  """A residual (or plain) block: what its shortcut does."""

  path: str
  stage: int  # 1-based: Table 1's conv{stage + 1}_x
  input_shape: tuple
  shape: tuple
  residual: bool  # has a shortcut (False: the paper's plain counterpart)
  increase: bool  # the block changes the dimensions (its shortcut subsamples and widens)
  projection: bool  # the shortcut is a 1x1 conv (option B where dimensions increase, C everywhere)


@dataclasses.dataclass(frozen=True)
class Network:
  """A network's layers and blocks in the order the input meets them."""

  name: str
  input_shape: tuple
  layers: tuple
  blocks: tuple

  @property
  def params(self):
    return sum(layer.params for layer in self.layers)

  @property
  def macs(self):
    return sum(layer.macs for layer in self.layers)


def input_shape(config):
  size = config.data.image_size
  return (1, size, size, 3)


_KINDS = (
  (nn.Conv, 'conv'),
  (nn.Dense, 'dense'),
  (models.MaxPool, 'max_pool'),
  (models.GlobalAvgPool, 'avg_pool'),
)
_NORMS = (models.BatchNorm, nn.BatchNorm)
_RECORDED = tuple(cls for cls, _ in _KINDS) + _NORMS + (models.Block,)


# The classifier a config with model.num_classes=0 (as many outputs as the data has classes) is shown with.
PLACEHOLDER_CLASSES = {'cifar10': 10, 'imagenet2012': 1000}


def _trace(config):
  """The variables' shapes and the recorded module calls, once per module path, in call order."""
  model_config = config.model
  if not model_config.num_classes:  # 0: the data's classes, known only once it is read
    model_config = model_config.copy_and_resolve_references()
    model_config.num_classes = PLACEHOLDER_CLASSES[config.data.name]
  model = models.create(model_config)
  image = jax.ShapeDtypeStruct(input_shape(config), jnp.float32)
  calls = {}  # nn.scan traces its body more than once: the first call of a path counts

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, _RECORDED):
      return next_fun(*args, **kwargs)
    # Entered before its children, so that a block comes before its layers.
    call = calls.setdefault(module.path, {'module': module, 'input': args[0].shape[1:]})
    out = next_fun(*args, **kwargs)
    call['output'] = out.shape[1:]
    if not isinstance(module, models.Block):  # a block's variables are its layers'
      call['params'] = sum(x.size for x in jax.tree.leaves(module.variables.get('params', {})))
      kernel = module.variables.get('params', {}).get('kernel')
      # Each output element takes prod(kernel window) * in_features / groups multiply-adds.
      per_output = 0 if kernel is None else kernel.size // kernel.shape[-1]
      call['macs'] = per_output * out.size // out.shape[0]
    return out

  def init(x):
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), x, train=False)

  variables = jax.eval_shape(init, image)
  return variables, _unscan(calls)


def _unscan(calls):
  """(path, call) pairs; a scanned stage's traced body is repeated for each block it stands for."""
  out = []
  done = set()  # scanned modules already repeated
  for path, call in calls.items():
    scanned = models.parse_scanned(path[0]) if path else None
    if not scanned:
      out.append((path, call))
    elif path[0] not in done:
      done.add(path[0])
      body = [(p, c) for p, c in calls.items() if p[0] == path[0]]
      for j in range(2, scanned[1] + 1):
        out += [((models.block_name(scanned[0], j),) + p[1:], c) for p, c in body]
  return out


def _stride(strides):
  if strides is None:
    return 1
  return strides if isinstance(strides, int) else strides[0]


def _layer(path, call):
  module = call['module']
  kind = next(name for cls, name in _KINDS if isinstance(module, cls))
  if kind == 'conv':
    kernel, stride = tuple(module.kernel_size), _stride(module.strides)
  elif kind == 'max_pool':
    kernel, stride = (module.window, module.window), module.strides
  else:
    kernel, stride = (), 1
  in_block = len(path) > 1 and models.parse_block(path[0])
  return Layer(
    path='/'.join(path),
    kind=kind,
    kernel=kernel,
    stride=stride,
    features=call['output'][-1],
    shape=tuple(call['output']),
    params=call['params'],
    macs=call['macs'],
    block=path[0] if in_block else None,
    branch='shortcut' if 'shortcut' in path else 'main',
  )


def _network(name, shape, calls):
  layers = []
  block_calls = []
  for path, call in calls:
    module = call['module']
    if isinstance(module, models.Block):
      block_calls.append((path, call))
    elif isinstance(module, _NORMS):  # BN belongs to the conv before it
      layers[-1] = dataclasses.replace(layers[-1], params=layers[-1].params + call['params'])
    else:
      layers.append(_layer(path, call))
  projected = {layer.block for layer in layers if layer.branch == 'shortcut'}
  blocks = []
  for path, call in block_calls:
    block_path = '/'.join(path)
    blocks.append(
      Block(
        path=block_path,
        stage=models.parse_block(path[0])[0],
        input_shape=tuple(call['input']),
        shape=tuple(call['output']),
        residual=call['module'].residual,
        increase=tuple(call['input']) != tuple(call['output']),
        projection=block_path in projected,
      )
    )
  return Network(name=name, input_shape=shape, layers=tuple(layers), blocks=tuple(blocks))


def walk(config):
  """`config.model`'s layers and blocks in network order, for one image of the config's size."""
  _, calls = _trace(config)
  return _network(config.get('name', 'model'), input_shape(config)[1:], calls)


def count(config):
  """(variables' shapes, trainable params, MACs for one image) of `config.model`."""
  variables, calls = _trace(config)
  params = sum(x.size for x in jax.tree.leaves(variables['params']))
  return variables, params, sum(call.get('macs', 0) for _, call in calls)


def table(network):
  """The layers as text: path, what it is, output shape, params and MACs, then the totals."""
  rows = [('layer', 'type', 'output', 'params', 'MACs')]
  for layer in network.layers:
    rows.append(
      (
        layer.path,
        layer.label,
        'x'.join(map(str, layer.shape)),
        f'{layer.params:,}',
        f'{layer.macs:,}',
      )
    )
  rows.append(('total', '', '', f'{network.params:,}', f'{network.macs:,}'))
  widths = [max(len(row[i]) for row in rows) for i in range(5)]
  lines = []
  for row in rows:
    left = [cell.ljust(width) for cell, width in zip(row[:3], widths)]
    right = [cell.rjust(width) for cell, width in zip(row[3:], widths[3:])]
    lines.append('  '.join(left + right))
  return '\n'.join(lines)


def as_json(network):
  """The network as JSON-ready data: totals, then every layer and block."""
  return {
    'model': network.name,
    'params': network.params,
    'macs': network.macs,
    'layers': [dataclasses.asdict(layer) for layer in network.layers],
    'blocks': [dataclasses.asdict(block) for block in network.blocks],
  }
