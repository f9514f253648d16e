"""The top classes of images under a workdir's model, converted or trained (see resnet_jax/prediction.py).

  python -m resnet_jax.tools.predict --workdir=DIR IMAGE [IMAGE ...] [--top=5] [--json]

An image that cannot be read or decoded is named in one line on stderr and the others are still
classified; the exit code is then 2. The workdir is only read.
"""

import json
import os
import sys

from absl import flags

from resnet_jax.tools import cli


def main(argv):
  FLAGS = flags.FLAGS
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's C++ notices about each decode
  paths = argv[1:]
  if not paths:
    cli.fail('no images given: pass one or more image paths after the flags.')
  if FLAGS.top < 1:
    cli.fail(f'--top={FLAGS.top} must be a positive number of classes.')
  config = cli.config_or_workdir(FLAGS.workdir)
  from resnet_jax import checkpointing, prediction
  from resnet_jax import data as data_lib

  try:
    run = checkpointing.open_workdir(FLAGS.workdir, config)
  except FileNotFoundError as e:
    cli.fail(str(e))
  try:
    results, failed = prediction.classify(run, paths, FLAGS.top)
  except data_lib.DataError as e:
    cli.fail(str(e))
  for path, problem in failed:
    print(f'error: {path} {problem}', file=sys.stderr)
  print(json.dumps(results, indent=2) if FLAGS.json else prediction.as_text(results))
  sys.stdout.flush()
  if failed:
    sys.exit(2)


if __name__ == '__main__':
  cli.define_config_flag(required=False, from_workdir=True)
  cli.define_workdir_flag('A converted or trained workdir (config.json + checkpoints).')
  flags.DEFINE_integer('top', 5, 'Classes to print per image.')
  flags.DEFINE_bool(
    'json', False, 'Print a JSON list of {"image", "top": [{label, wnid, name, probability}]}.'
  )
  cli.run(main)
