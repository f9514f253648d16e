"""Released ResNet weights (the paper's Caffe models, torchvision's, pytorch_resnet_cifar10's) into a
workdir every tool reads.

  python -m resnet_jax.tools.convert --format=caffe --weights=ResNet-50-model.caffemodel \
      --mean=ResNet_mean.binaryproto --depth=50 --workdir=runs/caffe_resnet50
  python -m resnet_jax.tools.convert --format=torchvision --weights=resnet50-0676ba61.pth --depth=50 \
      --workdir=runs/torchvision_resnet50
  python -m resnet_jax.tools.convert --format=pytorch_resnet_cifar10 --weights=resnet20-12fca82f.th \
      --workdir=runs/cifar10_resnet20
  python -m resnet_jax.tools.convert --pretrained=cifar10_resnet20 --workdir=runs/cifar10_resnet20

The workdir's config is get_imagenet_config() (CIFAR: configs/cifar10_<depth>.py; or --config, with
--config.data.* saying where the images are) with the weights' model fields and their framework's
preprocessing. --pretrained names a registry entry (resnet_jax/registry.py), downloaded into
$RESNET_JAX_WEIGHTS_DIR (default ~/.cache/resnet_jax/weights) and verified first. Wrong inputs end in
one sentence and leave the workdir as it was.
"""

import sys

from resnet_jax import registry
from resnet_jax.tools import cli

FORMATS = (
  'caffe',
  'torchvision',
  'pytorch_resnet_cifar10',
)  # pretrained.FORMATS, without importing JAX


def main(argv):
  cli.no_arguments(
    argv, '--pretrained or --format and --weights, --mean, --depth, --workdir and --config'
  )
  from absl import flags

  FLAGS = flags.FLAGS
  source, weights, depth = FLAGS.format, FLAGS.weights, FLAGS.depth
  if FLAGS.pretrained:
    if source or weights:
      cli.fail('--pretrained names the weights: leave out --format and --weights.')
    try:
      entry = registry.lookup(FLAGS.pretrained)
      weights = registry.fetch(FLAGS.pretrained)
    except registry.DownloadError as e:
      cli.fail(str(e))
    if depth is not None and depth != entry.depth:
      cli.fail(
        f'{FLAGS.pretrained} is a ResNet-{entry.depth}: pass --depth={entry.depth} or leave it out.'
      )
    source, depth = entry.format, entry.depth
  elif not source or not weights:
    cli.fail('no weights given: pass --pretrained=NAME, or --format and --weights=FILE.')

  from resnet_jax import pretrained

  try:
    config, written = pretrained.write_workdir(
      FLAGS.workdir, source, weights, depth, FLAGS.mean, FLAGS.config
    )
  except pretrained.ConversionError as e:
    cli.fail(str(e))
  state = 'wrote' if written else 'already holds'
  print(f'{FLAGS.workdir} {state} {config.name} (step 0).', file=sys.stderr)


if __name__ == '__main__':
  from absl import flags

  cli.define_config_flag(required=False)
  cli.define_workdir_flag('The workdir to write (config.json, mean_image.npy, checkpoints/0).')
  flags.DEFINE_string(
    'pretrained',
    None,
    f'A released network to download and convert: {", ".join(registry.MODELS)}.',
  )
  flags.DEFINE_enum('format', None, FORMATS, 'Where the weights come from.')
  flags.DEFINE_string(
    'weights',
    None,
    '.caffemodel (Caffe), .pth state_dict (torchvision) or .th (pytorch_resnet_cifar10).',
  )
  flags.DEFINE_string('mean', None, "Caffe only: the released mean image's .binaryproto.")
  flags.DEFINE_integer(
    'depth',
    None,
    'The ResNet depth of the weights: 18, 34, 50, 101 or 152 (ImageNet); pytorch_resnet_cifar10 '
    'reads it from the file and only checks it.',
  )
  cli.run(main)
