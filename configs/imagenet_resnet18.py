"""ImageNet ResNet-18 with option A shortcuts (Table 2, Fig. 4 right)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_imagenet_config()
  config.name = 'imagenet_resnet18'
  config.model.depth = 18
  config.model.shortcut = 'A'
  return config
