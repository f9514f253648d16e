"""CIFAR-10 ResNet-44, option A (paper section 4.2, Table 6)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_44'
  config.model.depth = 44
  return config
