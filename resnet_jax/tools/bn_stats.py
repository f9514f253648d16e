"""Exact BN population statistics on a workdir's newest checkpoint, as for the paper's released models.

  python -m resnet_jax.tools.bn_stats --workdir=DIR [--num_images=10000]

The config is the workdir's (any field overridden with --config.<field>=<value>) unless --config is given.
The command reads the run, never changes its checkpoints, and writes only its own outputs: bn_stats.json
and the recomputed state under bn_recomputed/<step>/ (see resnet_jax/exact_bn.py).
"""

import json

from absl import flags

from resnet_jax.tools import cli


def main(argv):
  cli.no_arguments(argv, '--workdir, --num_images, --config and --config.<field>=<value>')
  config = cli.config_or_workdir(flags.FLAGS.workdir)
  from resnet_jax import exact_bn

  try:
    report = exact_bn.recalibrate_workdir(flags.FLAGS.workdir, flags.FLAGS.num_images, config)
  except (FileNotFoundError, ValueError) as e:  # DataError is a ValueError
    cli.fail(str(e))
  print(json.dumps(report))


if __name__ == '__main__':
  cli.define_config_flag(required=False, from_workdir=True)
  cli.define_workdir_flag('A training workdir (config.json + checkpoints).')
  flags.DEFINE_integer('num_images', 10_000, 'Training images to average the statistics over.')
  cli.run(main)
