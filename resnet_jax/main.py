"""Trains and evaluates one experiment: python -m resnet_jax.main --config=configs/cifar10_110.py --workdir=DIR.

Any config field can be overridden on the command line (--config.train.num_steps=200). Problems with the
config or the data are reported in one sentence before anything is compiled.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax import validate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results; resumed if it has any.')
flags.DEFINE_bool('distributed', False, 'Join a multi-process job: jax.distributed.initialize() detects TPU pods, '
                  'SLURM and Open MPI, or uses the three flags below.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a job JAX cannot detect.')
flags.DEFINE_integer('num_processes', None, 'Number of processes in the job (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process\'s index in [0, num_processes) (with --coordinator_address).')
flags.mark_flags_as_required(['config', 'workdir'])


def fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _quiet_orbax():
  """orbax logs every save step by step at INFO; keep its warnings and errors only."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or 'orbax' not in r.pathname)


def parse_flags(argv):
  """absl flag parsing, with config-file and override mistakes reported in one line instead of a traceback."""
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path and not os.path.isfile(path):
    fail(f'the config file {path} does not exist: pass one of the files in configs/, e.g. '
         '--config=configs/cifar10_20.py.')
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f'{e}.')
  except Exception as e:  # pylint: disable=broad-except  # config_flags raises many kinds
    unknown = _unknown_override(path, argv)
    if unknown:
      fail(f'{unknown} is not a field of the config {path}: see the fields in configs/default.py.')
    fail(f'cannot load the config {path}: {type(e).__name__}: {str(e).splitlines()[0]}')


def _unknown_override(path, argv):
  """The first --config.a.b=... whose field does not exist in the config file, if any."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    spec = importlib.util.spec_from_file_location('config_module', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv:
    if arg.startswith('--config.'):
      name = arg[len('--'):].split('=', 1)[0]
      node = config
      for part in name.split('.')[1:]:
        if not hasattr(node, 'keys') or part not in node:
          return f'--{name}'
        node = node[part]
  return None


def initialize_distributed():
  """jax.distributed.initialize before any other JAX call, when the job has more than one process."""
  explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if not FLAGS.distributed and all(v is None for v in explicit):
    return
  if any(v is None for v in explicit) and any(v is not None for v in explicit):
    fail('--coordinator_address, --num_processes and --process_id go together: pass all three, or only '
         '--distributed on a TPU pod, under SLURM or Open MPI.')
  import jax  # pylint: disable=g-import-not-at-top
  try:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except (RuntimeError, ValueError) as e:
    fail(f'cannot join the multi-process job ({str(e).splitlines()[0]}); check the coordinator address and '
         'that every process was started with the same --num_processes.')


def main(argv):
  _quiet_orbax()
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}: options are --config, --workdir and --config.<field>=<value>.')
  config = FLAGS.config
  try:
    validate.check(config)
  except validate.ConfigError as e:
    fail(str(e))
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    fail(f'the workdir {FLAGS.workdir} is a file: choose a directory path for --workdir.')
  try:
    os.makedirs(FLAGS.workdir, exist_ok=True)
  except OSError as e:
    fail(f'cannot create the workdir {FLAGS.workdir} ({e.strerror}): choose a writable path for --workdir.')
  initialize_distributed()
  import jax  # pylint: disable=g-import-not-at-top  # after the cheap checks
  from resnet_jax import checkpointing, input_pipeline, models, train  # pylint: disable=g-import-not-at-top
  try:
    validate.check(config, jax.device_count(), jax.process_count())
    models.create(config.model)
    input_pipeline.check(config.data)
  except (validate.ConfigError, input_pipeline.DataError, ValueError) as e:
    fail(str(e))
  logging.info('JAX devices: %s', jax.devices())
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except (input_pipeline.DataError, checkpointing.CheckpointMismatch, train.Diverged, validate.ConfigError) as e:
    fail(str(e))  # an unreadable image is found when the data is read; the others when training starts
  except train.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
