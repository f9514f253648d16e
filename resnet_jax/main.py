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
flags.mark_flags_as_required(['config', 'workdir'])


def fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _quiet_orbax():
  """orbax logs every save step by step at INFO; keep its warnings and errors only."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or 'orbax' not in r.pathname)


def main(argv):
  _quiet_orbax()
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}: options are --config, --workdir and --config.<field>=<value>.')
  config = FLAGS.config
  try:
    validate.check(config)
  except validate.ConfigError as e:
    fail(str(e))
  import jax  # pylint: disable=g-import-not-at-top  # after the cheap checks
  from resnet_jax import input_pipeline, models, train  # pylint: disable=g-import-not-at-top
  try:
    validate.check(config, jax.device_count(), jax.process_count())
    models.create(config.model)
    input_pipeline.check(config.data)
  except (validate.ConfigError, input_pipeline.DataError, ValueError) as e:
    fail(str(e))
  try:
    os.makedirs(FLAGS.workdir, exist_ok=True)
  except OSError as e:
    fail(f'cannot create the workdir {FLAGS.workdir} ({e.strerror}): choose a writable path for --workdir.')
  logging.info('JAX devices: %s', jax.devices())
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except input_pipeline.DataError as e:  # e.g. an unreadable image, found when the data is read
    fail(str(e))


if __name__ == '__main__':
  app.run(main)
