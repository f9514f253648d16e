"""CIFAR-10 plain-20: the ResNet-20 layers without shortcuts (paper Fig. 6, left)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_plain20'
  config.model.depth = 20
  config.model.residual = False
  return config
