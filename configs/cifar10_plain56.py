"""CIFAR-10 plain-56: the ResNet-56 layers without shortcuts (paper Fig. 6, left)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_plain56'
  config.model.depth = 56
  config.model.residual = False
  return config
