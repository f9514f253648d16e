"""CIFAR-10 plain-20: the ResNet-20 layers without shortcuts (paper Fig. 6, left)."""
from configs import default


def get_config():
  config = default.get_config()
  config.name = 'cifar10_plain20'
  config.model.depth = 20
  config.model.residual = False
  return config
