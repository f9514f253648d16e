"""CIFAR-10 ResNet-56, option A (paper section 4.2, Table 6)."""
from configs import default


def get_config():
  config = default.get_config()
  config.name = 'cifar10_56'
  config.model.depth = 56
  return config
