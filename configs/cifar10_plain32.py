"""CIFAR-10 plain-32: the ResNet-32 layers without shortcuts (paper Fig. 6, left)."""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_plain32'
  config.model.depth = 32
  config.model.residual = False
  return config
