"""CIFAR-10 ResNet-1202, option A (paper section 4.2, Table 6)."""
from configs import default


def get_config():
  config = default.get_config()
  config.name = 'cifar10_1202'
  config.model.depth = 1202
  return config
