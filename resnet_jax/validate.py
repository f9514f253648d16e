"""Config checks that run before any data is read or anything compiled: one sentence per problem.

The valid choices are those of the modules that implement them (optim, data); models.create checks the
model section.
"""

from resnet_jax import data as data_lib
from resnet_jax import optim


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def _require(ok, message):
  if not ok:
    raise ConfigError(message)


def _check_preprocessing(data):
  _require(
    data.input_scale > 0,
    f'data.input_scale must be positive (1/255: pixels in [0, 1]), got {data.input_scale}.',
  )
  for field in ('channel_mean', 'channel_std'):
    _require(
      len(data[field]) in (0, 3),
      f'data.{field} must be () or one value per RGB channel, got {tuple(data[field])}.',
    )
  _require(
    all(s > 0 for s in data.channel_std),
    f'data.channel_std must be positive, got {tuple(data.channel_std)}.',
  )


def check(config, device_count=None, process_count=1):
  """Raises ConfigError for the first invalid field (device counts checked when given; models.create checks
  the model section)."""
  _check_optimizer(config.optimizer)
  _check_train(config.train)
  _check_data(config.data)
  _check_finetuning(config)
  _check_devices(config, device_count, process_count)


def _check_finetuning(config):
  num_classes = config.model.num_classes
  _require(
    isinstance(num_classes, int) and num_classes >= 0,
    f"model.num_classes must be a positive count (0: the data's number of classes), got {num_classes!r}.",
  )
  _require(
    isinstance(config.get('init_from', ''), str),
    f'init_from must be the path of a workdir, got {config.get("init_from")!r}.',
  )
  _require(
    not (config.model.get('freeze_bn', False) and config.train.recompute_bn_stats),
    'model.freeze_bn keeps the loaded BN statistics, which train.recompute_bn_stats would replace: '
    'set --config.train.recompute_bn_stats=False.',
  )


def _check_optimizer(opt):
  _require(
    opt.learning_rate > 0, f'optimizer.learning_rate must be positive, got {opt.learning_rate}.'
  )
  _require(0 <= opt.momentum < 1, f'optimizer.momentum must be in [0, 1), got {opt.momentum}.')
  _require(opt.weight_decay >= 0, f'optimizer.weight_decay must be >= 0, got {opt.weight_decay}.')
  _require(
    opt.weight_decay_on in optim.WEIGHT_DECAY_ON,
    f'optimizer.weight_decay_on must be one of {optim.WEIGHT_DECAY_ON}, got {opt.weight_decay_on!r}.',
  )
  _require(
    opt.momentum_style in optim.MOMENTUM_STYLES,
    f'optimizer.momentum_style must be one of {optim.MOMENTUM_STYLES}, got {opt.momentum_style!r}.',
  )
  _require(
    list(opt.boundaries) == sorted(opt.boundaries),
    f'optimizer.boundaries must be increasing steps, got {tuple(opt.boundaries)}.',
  )
  _require(
    opt.boundaries_at in optim.BOUNDARIES_AT,
    f'optimizer.boundaries_at must be one of {optim.BOUNDARIES_AT}, got {opt.boundaries_at!r}.',
  )
  _require(
    opt.boundaries_at == 'steps'
    or (
      list(opt.boundary_fractions) == sorted(opt.boundary_fractions)
      and all(0 < f < 1 for f in opt.boundary_fractions)
    ),
    f'optimizer.boundary_fractions must be increasing fractions in (0, 1), got '
    f'{tuple(opt.boundary_fractions)}.',
  )
  _require(
    opt.schedule in optim.SCHEDULES,
    f'optimizer.schedule must be one of {optim.SCHEDULES}, got {opt.schedule!r}.',
  )
  _require(
    isinstance(opt.get('plateau_patience', 1), int) and opt.get('plateau_patience', 1) > 0,
    f'optimizer.plateau_patience must be a positive number of evaluations, got {opt.get("plateau_patience")!r}.',
  )
  _require(
    opt.get('plateau_threshold', 0) >= 0,
    f'optimizer.plateau_threshold must be >= 0, got {opt.get("plateau_threshold")}.',
  )
  _require(
    opt.warmup_learning_rate >= 0,
    f'optimizer.warmup_learning_rate must be >= 0 (0 = no warm-up), got {opt.warmup_learning_rate}.',
  )


def _check_train(train):
  for field in (
    'batch_size',
    'eval_batch_size',
    'num_steps',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
  ):
    value = train[field]
    _require(
      isinstance(value, int) and value > 0,
      f'train.{field} must be a positive integer, got {value!r}.',
    )
  timeout = train.get('lock_timeout_s', 600)
  _require(
    isinstance(timeout, (int, float)) and timeout > 0,
    f'train.lock_timeout_s must be a positive number of seconds, got {timeout!r}.',
  )
  k = train.get('steps_per_dispatch', 1)
  _require(
    isinstance(k, int) and k > 0, f'train.steps_per_dispatch must be a positive integer, got {k!r}.'
  )
  for field in ('num_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps'):
    _require(
      train[field] % k == 0,
      f'train.{field}={train[field]} is not a multiple of train.steps_per_dispatch={k}: '
      f'use a multiple of {k}, or a steps_per_dispatch that divides it.',
    )
  _require(
    train.on_nonfinite in ('stop', 'skip'),
    f"train.on_nonfinite must be 'stop' or 'skip', got {train.on_nonfinite!r}.",
  )


def _check_data(data):
  _require(
    data.source in data_lib.SOURCES,
    f'data.source must be one of {data_lib.SOURCES}, got {data.source!r}.',
  )
  _require(
    data.name in data_lib.DATASETS,
    f'data.name must be one of {data_lib.DATASETS}, got {data.name!r}.',
  )
  for field in ('val_split', 'train_limit', 'eval_limit'):
    _require(
      isinstance(data[field], int) and data[field] >= 0,
      f'data.{field}={data[field]!r} must be 0 (off) or a positive count.',
    )
  _require(
    isinstance(data.image_size, int) and data.image_size > 0,
    f'data.image_size={data.image_size!r} must be a positive number of pixels (CIFAR-10: 32).',
  )
  _require(
    data.source != 'image_folder' or data.image_folder,
    'data.source is image_folder but data.image_folder is empty: set --config.data.image_folder=PATH.',
  )
  _require(
    not data.get('on_device') or data.name == 'cifar10' or data.source == 'synthetic',
    'data.on_device keeps the whole training set on the accelerators, which only CIFAR-10 (or synthetic '
    'data) fits: set --config.data.on_device=False.',
  )
  if data.name == 'imagenet2012':
    _require(
      data.augment in ('paper', 'inception'),
      f"data.augment must be 'paper' or 'inception', got {data.augment!r}.",
    )
    _require(
      0 < data.image_size <= data.scale_min <= data.scale_max,
      f'data.scale_min and scale_max must satisfy image_size <= scale_min <= scale_max, got '
      f'{data.image_size}, {data.scale_min}, {data.scale_max}.',
    )
    _require(
      data.image_size <= data.eval_resize,
      f'data.eval_resize={data.eval_resize} is smaller than the crop data.image_size={data.image_size}.',
    )
    _require(data.mean_images > 0, f'data.mean_images must be positive, got {data.mean_images}.')
  _check_preprocessing(data)


def _check_devices(config, device_count, process_count):
  train = config.train
  group = config.model.get('bn_group_size') or 0
  _require(
    isinstance(group, int) and group >= 0,
    f'model.bn_group_size must be 0 (the global batch) or a positive group size, got {group!r}.',
  )
  if group and device_count:
    per_device = train.batch_size // device_count
    _require(
      per_device % group == 0,
      f'model.bn_group_size={group} does not divide the {per_device} examples each of the {device_count} '
      f'devices gets (train.batch_size={train.batch_size}): use a divisor of {per_device}.',
    )
  for field in ('batch_size', 'eval_batch_size'):
    if device_count:
      _require(
        train[field] % device_count == 0,
        f'train.{field}={train[field]} is not divisible by the {device_count} devices: use a multiple '
        f'of {device_count}.',
      )
    _require(
      train[field] % process_count == 0,
      f'train.{field}={train[field]} is not divisible by the {process_count} processes.',
    )


def warnings(config) -> list[str]:
  """Settings that run but probably not as meant; one sentence each, logged when training starts."""
  opt, num_steps = config.optimizer, config.train.num_steps
  found = []
  late = [b for b in opt.boundaries if b >= num_steps]
  if opt.schedule == 'steps' and opt.boundaries_at == 'steps' and late:
    found.append(
      f'optimizer.boundaries {tuple(late)} lie at or beyond train.num_steps={num_steps}, so the lr '
      f'never drops there; for a shortened run set --config.optimizer.boundaries_at=fractions (the lr '
      f'drops at {tuple(opt.boundary_fractions)} of the run).'
    )
  return found
