"""Trains and evaluates one experiment: python -m resnet_jax.main --config=configs/cifar10_110.py --workdir=DIR.

Any config field can be overridden on the command line (--config.train.num_steps=200). Problems with the
config or the data are reported in one sentence before anything is compiled.
"""

import errno
import os
import sys

from absl import flags, logging

from resnet_jax import validate
from resnet_jax.tools import cli
from resnet_jax.workdir import Workdir

FLAGS = flags.FLAGS
cli.define_config_flag(required=True)
cli.define_workdir_flag('Directory for checkpoints, metrics and results; resumed if it has any.')
cli.define_distributed_flags()
flags.DEFINE_bool(
  'fresh_start',
  False,
  'Train from step 0 in a workdir whose checkpoints were all found damaged and moved to '
  'checkpoints/corrupt/ (they stay there); without it such a run stops and says so.',
)


def _writable(path):
  """The workdir, or the nearest folder above it that exists, is writable: checked before it is created,
  so a run that fails its checks leaves nothing behind."""
  path = os.path.abspath(os.path.expanduser(path))
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)


def main(argv):
  cli.no_arguments(argv, '--config, --workdir and --config.<field>=<value>')
  config = FLAGS.config
  try:
    validate.check(config)
  except validate.ConfigError as e:
    cli.fail(str(e))
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    cli.fail(f'the workdir {FLAGS.workdir} is a file: choose a directory path for --workdir.')
  if not _writable(FLAGS.workdir):
    cli.fail(
      f'the workdir {FLAGS.workdir} cannot be created or written: choose a writable path for --workdir.'
    )
  cli.initialize_distributed()
  import jax  # after the cheap checks and jax.distributed

  from resnet_jax import checkpointing, data, models, train, workdir_lock

  try:
    validate.check(config, jax.device_count(), jax.process_count())
    models.create(config.model)
    data.check(config.data)
  except (validate.ConfigError, data.DataError, ValueError) as e:
    cli.fail(str(e))
  logging.info('JAX devices: %s', jax.devices())
  try:
    results = train.train_and_evaluate(config, FLAGS.workdir, fresh_start=FLAGS.fresh_start)
  except (
    data.DataError,
    checkpointing.CheckpointMismatch,
    checkpointing.CheckpointUnreadable,
    checkpointing.CheckpointWriteError,
    checkpointing.NoUsableCheckpoint,
    train.Diverged,
    validate.ConfigError,
    workdir_lock.WorkdirLocked,
  ) as e:
    cli.fail(str(e))  # an unreadable image is found when the data is read; the others in training
  except OSError as e:  # the workdir's other files (lock, metrics, config.json) on a full disk
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    cli.fail(
      f'cannot write {e.filename or FLAGS.workdir} ({e.strerror}): free some space and rerun the '
      'same command to continue from the last checkpoint.'
    )
  except train.Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)
  if jax.process_index() == 0:
    print(report(results, FLAGS.workdir))


def report(results, workdir) -> str:
  """Where a finished run's outputs are, and its final number."""
  split = next(k[: -len('_error')] for k in results if k.endswith('_error'))
  run = Workdir(workdir)
  exact_bn = (
    ''  # the pass's time is apart from training's; an earlier version's results.json lacks it
  )
  if results.get('exact_bn_images') and 'exact_bn_time_s' in results:
    images = results['exact_bn_images']
    exact_bn = (
      f', then {results["exact_bn_time_s"]:.0f} s of exact BN statistics over {images:,} images'
    )
  return (
    f'{results["config"]}: step {results["steps"]}, {split} error '
    f'{100 * results[f"{split}_error"]:.2f}% ({results["bn_statistics"].replace("_", " ")} BN '
    f'statistics; {100 * results[f"{split}_error_exact_bn"]:.2f}% with exact ones), '
    f'{results["wall_time_s"] / 60:.1f} min of training in {len(results["segments"])} segment(s)'
    f'{exact_bn}.\n'
    f'  results:     {run.results}\n'
    f'  checkpoints: {run.checkpoints}\n'
    f'  TensorBoard: tensorboard --logdir {run.tensorboard}'
  )


if __name__ == '__main__':
  cli.run(main)
