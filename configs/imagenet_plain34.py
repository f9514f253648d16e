"""ImageNet plain-34: ResNet-34's layers without shortcuts (Tables 2 and 3, Fig. 4 left)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_imagenet_config()
  config.name = 'imagenet_plain34'
  config.model.depth = 34
  config.model.shortcut = 'A'
  config.model.residual = False
  return config
