"""The paper's test protocols (1-crop, 10-crop, multi-scale) on a workdir's newest checkpoint.

  python -m resnet_jax.tools.evaluate --workdir=DIR --mode=10crop [--config.data.image_folder=PATH]

The config is the workdir's (any field overridden with --config.<field>=<value>) unless --config is given.
It changes nothing in the workdir but writing DIR/eval_<mode>.json; see resnet_jax/evaluation.py.
"""

import json
import sys

from absl import flags

from resnet_jax.tools import cli

MODES = (
  '1crop',
  '10crop',
  'multiscale',
)  # evaluation.MODES, without importing JAX before the flags


def main(argv):
  cli.no_arguments(argv, '--workdir, --mode, --config and --config.<field>=<value>')
  from resnet_jax import data as data_lib
  from resnet_jax import validate

  workdir, mode = flags.FLAGS.workdir, flags.FLAGS.mode
  config = cli.config_or_workdir(workdir)
  try:
    validate.check(config)
  except validate.ConfigError as e:
    cli.fail(str(e))
  if mode != '1crop' and not data_lib.streamed(config.data):
    cli.fail(
      f'--mode={mode} needs ImageNet images (data.name=imagenet2012 with data.source tfds or '
      'image_folder); CIFAR and synthetic data have one view: use --mode=1crop.'
    )
  cli.initialize_distributed()
  from resnet_jax import evaluation

  try:
    data_lib.check(config.data)
    print(json.dumps(evaluation.evaluate_workdir(workdir, mode, config)))
  except (data_lib.DataError, FileNotFoundError) as e:
    cli.fail(str(e))
  sys.stdout.flush()


if __name__ == '__main__':
  cli.define_config_flag(required=False, from_workdir=True)
  cli.define_workdir_flag('The workdir of a training run (its config.json and checkpoints).')
  cli.define_distributed_flags()
  flags.DEFINE_enum('mode', '1crop', MODES, 'The test protocol: 1crop, 10crop or multiscale.')
  cli.run(main)
