"""Parameters and forward multiply-accumulates of a config's network, without compiling it.

MACs are counted by intercepting every Conv and Dense call and reading its kernel and output shapes:
XLA's cost analysis skips the padded taps of a conv and comes out ~8% low against the paper's Table 1.

  python -m resnet_jax.summary --config=configs/imagenet_resnet50.py [--json]
"""

import json

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import models


def input_shape(config):
  size = config.data.image_size
  return (1, size, size, 3)


def count(config):
  """(variables shapes, trainable params, MACs for one image) of `config.model` at the config's image size."""
  model = models.create(config.model)
  image = jax.ShapeDtypeStruct(input_shape(config), jnp.float32)
  macs = {}  # by module path: nn.scan traces its body (more than once) for all the blocks it stacks

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == '__call__' and isinstance(module, (nn.Conv, nn.Dense)):
      kernel = module.variables['params']['kernel']
      # Each output element takes prod(kernel window) * in_features / groups multiply-adds.
      per_output = kernel.size // kernel.shape[-1]
      macs[module.path] = (per_output * out.size // out.shape[0], kernel.size)
    return out

  def init(x):
    with nn.intercept_methods(interceptor):
      return model.init(jax.random.key(0), x, train=False)

  variables = jax.eval_shape(init, image)
  params = sum(x.size for x in jax.tree.leaves(variables['params']))
  kernels = flax.traverse_util.flatten_dict(variables['params'])
  # A scanned kernel is stacked over its blocks: its size over the traced one's is the number of blocks.
  total = sum(m * (kernels[path + ('kernel',)].size // size) for path, (m, size) in macs.items())
  return variables, params, total


def main(argv):
  del argv
  from absl import flags

  config = flags.FLAGS.config
  variables, params, macs = count(config)
  name = config.get('name', 'model')
  if flags.FLAGS.json:
    print(json.dumps({'model': name, 'params': params, 'macs': macs}))
    return
  from clu import parameter_overview

  print(parameter_overview.get_parameter_overview(variables['params'], include_stats=False))
  print(
    f'{name}: {params:,} trainable parameters, {macs / 1e9:.3f} G multiply-accumulates per '
    f'{input_shape(config)[1]}x{input_shape(config)[2]} image'
  )


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_bool(
    'json', False, 'Print {"model", "params", "macs"} as JSON instead of the overview.'
  )
  flags.mark_flags_as_required(['config'])
  app.run(main)
