"""Released ResNet weights (the paper's Caffe models, torchvision's) into a workdir every tool reads.

  python -m resnet_jax.convert --format=caffe --weights=ResNet-50-model.caffemodel \
      --mean=ResNet_mean.binaryproto --depth=50 --workdir=runs/caffe_resnet50
  python -m resnet_jax.convert --format=torchvision --weights=resnet50-0676ba61.pth --depth=50 \
      --workdir=runs/torchvision_resnet50

The workdir's config is get_imagenet_config() (or --config, with --config.data.* saying where the images
are) with the weights' model fields and their framework's preprocessing. Wrong inputs end in one sentence
and leave the workdir as it was.
"""

import sys

from resnet_jax import cli


def main(argv):
  cli.no_arguments(argv, '--format, --weights, --mean, --depth, --workdir and --config')
  from absl import flags

  from resnet_jax import pretrained

  FLAGS = flags.FLAGS
  try:
    config, written = pretrained.write_workdir(
      FLAGS.workdir, FLAGS.format, FLAGS.weights, FLAGS.depth, FLAGS.mean, FLAGS.config
    )
  except pretrained.ConversionError as e:
    cli.fail(str(e))
  state = 'wrote' if written else 'already holds'
  print(f'{FLAGS.workdir} {state} {config.name} (step 0).', file=sys.stderr)


if __name__ == '__main__':
  from absl import flags

  cli.define_config_flag(required=False)
  cli.define_workdir_flag('The workdir to write (config.json, mean_image.npy, checkpoints/0).')
  flags.DEFINE_enum('format', None, ('caffe', 'torchvision'), 'Where the weights come from.')
  flags.DEFINE_string('weights', None, '.caffemodel (Caffe) or .pth state_dict (torchvision).')
  flags.DEFINE_string('mean', None, "Caffe only: the released mean image's .binaryproto.")
  flags.DEFINE_integer('depth', None, 'The ResNet depth of the weights: 18, 34, 50, 101 or 152.')
  for name in ('format', 'weights', 'depth'):
    flags.mark_flag_as_required(name)
  cli.run(main)
