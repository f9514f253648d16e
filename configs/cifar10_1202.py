"""CIFAR-10 ResNet-1202, option A (paper section 4.2, Table 6)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_1202'
  config.model.depth = 1202
  return config
