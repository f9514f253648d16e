"""ImageNet plain-18: ResNet-18's layers without shortcuts (Table 2, Fig. 4 left)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_imagenet_config()
  config.name = 'imagenet_plain18'
  config.model.depth = 18
  config.model.shortcut = 'A'
  config.model.residual = False
  return config
