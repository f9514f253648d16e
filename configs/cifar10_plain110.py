"""CIFAR-10 plain-110: the ResNet-110 layers without shortcuts (paper Fig. 6, left)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_plain110'
  config.model.depth = 110
  config.model.residual = False
  return config
