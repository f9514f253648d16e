"""Parameters and multiply-accumulates of a config's network, layer by layer (resnet_jax/complexity.py),
and the paper's Fig. 3 drawing of it (resnet_jax/diagram.py).

  python -m resnet_jax.tools.summary --config=configs/imagenet_resnet50.py [--json] [--diagram=fig.svg]
  python -m resnet_jax.tools.summary --workdir=DIR   # a run's or a converted model's config.json
"""

import json
import sys

from absl import flags

from resnet_jax.tools import cli


def main(argv):
  cli.no_arguments(
    argv, '--config or --workdir, --json, --diagram, --collapse and --config.<field>=<value>'
  )
  if flags.FLAGS.workdir:
    config = cli.config_or_workdir(flags.FLAGS.workdir)
  elif flags.FLAGS.config is not None:
    config = flags.FLAGS.config
  else:
    cli.fail('pass --config=configs/<experiment>.py or the --workdir of a run or converted model.')
  from resnet_jax import complexity, diagram

  network = complexity.walk(config)
  if flags.FLAGS.diagram:
    diagram.write(network, flags.FLAGS.diagram, collapse=flags.FLAGS.collapse)
    print(f'wrote {flags.FLAGS.diagram}', file=sys.stderr)
  if flags.FLAGS.json:
    print(json.dumps(complexity.as_json(network)))
    return
  print(complexity.table(network))
  shape = complexity.input_shape(config)
  print(
    f'{network.name}: {network.params:,} trainable parameters, {network.macs / 1e9:.3f} G '
    f'multiply-accumulates per {shape[1]}x{shape[2]} image'
  )


if __name__ == '__main__':
  cli.define_config_flag(required=False, from_workdir=True)
  flags.DEFINE_string('workdir', None, "A run's or converted model's workdir: its config.json.")
  flags.DEFINE_bool('json', False, 'Print {"model", "params", "macs", "layers"} as JSON.')
  flags.DEFINE_string('diagram', None, "Also draw the network as the paper's Fig. 3 into this SVG.")
  flags.DEFINE_bool('collapse', None, 'Draw runs of identical blocks once; default: when deep.')
  cli.run(main)
