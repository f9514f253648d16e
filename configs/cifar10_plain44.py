"""CIFAR-10 plain-44: the ResNet-44 layers without shortcuts (paper Fig. 6, left)."""
from configs import default


def get_config():
  config = default.get_config()
  config.name = 'cifar10_plain44'
  config.model.depth = 44
  config.model.residual = False
  return config
