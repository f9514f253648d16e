"""CIFAR-10 ResNet-44, option A (paper section 4.2, Table 6)."""
from configs import default


def get_config():
  config = default.get_config()
  config.name = 'cifar10_44'
  config.model.depth = 44
  return config
