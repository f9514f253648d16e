"""ImageNet ResNet-34 with option C: projections on every shortcut (Tables 3 and 4)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_imagenet_config()
  config.name = 'imagenet_resnet34c'
  config.model.depth = 34
  config.model.shortcut = 'C'
  return config
