"""ImageNet ResNet-34 with option B: projections where dimensions increase (Tables 3 and 4)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_imagenet_config()
  config.name = 'imagenet_resnet34b'
  config.model.depth = 34
  config.model.shortcut = 'B'
  return config
