"""CIFAR-10 plain-44: the ResNet-44 layers without shortcuts (paper Fig. 6, left)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_plain44'
  config.model.depth = 44
  config.model.residual = False
  return config
