"""Starting a run from another run's weights (`config.init_from`): fine-tuning on new classes.

The source may be any workdir, trained or converted (pretrained.write_workdir). Its params and BN statistics
become the new run's step 0; the classifier is kept when it has this config's `model.num_classes` outputs,
else the network's own fresh initialisation takes its place (as in the paper's transfer experiments, where
only the output layer is new). The optimizer and the step start from zero.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from resnet_jax import checkpointing, models
from resnet_jax.validate import ConfigError
from resnet_jax.workdir import Workdir

HEAD = 'fc'  # the classifier's module: the only one that may differ from the source


def _shapes(variables) -> dict:
  flat = traverse_util.flatten_dict(variables, sep='/')
  return {k: tuple(np.shape(v)) for k, v in flat.items()}


def _describe(shape):
  return 'absent' if shape is None else str(shape)


_ARCHITECTURE = ('family', 'depth', 'residual', 'shortcut', 'stride_on_3x3')


def _model_flags(init_from, model_config) -> str:
  """' (--config.model.depth=18 ...)': the source's architecture fields where this config differs."""
  if model_config is None:
    return ''
  try:
    theirs = Workdir(init_from).config().model
  except (OSError, ValueError):
    return ''
  flags = [
    f'--config.model.{k}={theirs[k]}' for k in _ARCHITECTURE if theirs.get(k) != model_config.get(k)
  ]
  return f' ({" ".join(flags)})' if flags else ''


def check_fits(source, wanted, init_from, model_config=None) -> bool:
  """Whether the source's classifier is kept; raises ConfigError naming the first layer (other than the
  classifier) whose name or shape differs. Both are {'params', 'batch_stats'} trees (or their shapes)."""
  theirs, ours = _shapes(source), _shapes(wanted)
  body = lambda shapes: {k: v for k, v in shapes.items() if k.split('/')[1] != HEAD}  # noqa: E731
  differ = sorted(
    k for k in body(theirs).keys() | body(ours).keys() if theirs.get(k) != ours.get(k)
  )
  if differ:
    name = differ[0]
    raise ConfigError(
      f'init_from={init_from} holds another network than this config (first difference at {name}: '
      f'{_describe(theirs.get(name))} there, {_describe(ours.get(name))} here), so set the model '
      f'fields as in its config.json{_model_flags(init_from, model_config)}.'
    )
  head = lambda shapes: {k: v for k, v in shapes.items() if k.split('/')[1] == HEAD}  # noqa: E731
  return head(theirs) == head(ours)


def source_variables(config, workdir):
  """init_from's {'params', 'batch_stats'} (host arrays, in this config's scan_blocks layout), or None
  without init_from or when `workdir` already holds a checkpoint (a resumed run continues from its own)."""
  init_from = config.get('init_from', '')
  if not init_from or checkpointing.complete_steps(Workdir(workdir).checkpoints):
    return None
  path = Workdir(init_from).path
  if not Workdir(init_from).has_config():
    raise ConfigError(
      f'init_from={path} holds no config.json, so pass the workdir of a trained or converted run.'
    )
  try:
    run = checkpointing.open_workdir(path)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  return models.convert_layout(run.variables, bool(config.model.get('scan_blocks', False)))


def initial_variables(config, model, source):
  """The step-0 {'params', 'batch_stats'}: `source`'s, in the model's dtypes, with the model's own
  initialisation (from config.seed, as a fresh run) for a classifier of another size."""
  size = config.data.image_size
  x = jnp.zeros((1, size, size, 3), jnp.float32)
  own = model.init(jax.random.key(config.seed), x, train=False)
  keep_head = check_fits(source, own, config.init_from, config.model)
  own = {k: traverse_util.flatten_dict(own[k]) for k in ('params', 'batch_stats')}
  merged = {}
  for collection, flat in own.items():
    theirs = traverse_util.flatten_dict(source[collection])
    merged[collection] = traverse_util.unflatten_dict(
      {
        k: v if (k[0] == HEAD and not keep_head) else jnp.asarray(theirs[k], v.dtype)
        for k, v in flat.items()
      }
    )
  return merged
