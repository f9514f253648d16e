"""CIFAR-10 plain-110: the ResNet-110 layers without shortcuts (paper Fig. 6, left)."""
from configs import default


def get_config():
  config = default.get_config()
  config.name = 'cifar10_plain110'
  config.model.depth = 110
  config.model.residual = False
  return config
