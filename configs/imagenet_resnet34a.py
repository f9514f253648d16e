"""ImageNet ResNet-34 with option A: zero-padding identity shortcuts (Tables 2 and 3)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_imagenet_config()
  config.name = 'imagenet_resnet34a'
  config.model.depth = 34
  config.model.shortcut = 'A'
  return config
