"""ImageNet ResNet-101, bottleneck blocks, option B, stride on the first 1x1 (Tables 3-5)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_imagenet_config()
  config.name = 'imagenet_resnet101'
  config.model.depth = 101
  config.model.shortcut = 'B'
  return config
