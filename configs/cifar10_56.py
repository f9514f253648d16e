"""CIFAR-10 ResNet-56, option A (paper section 4.2, Table 6)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_56'
  config.model.depth = 56
  return config
