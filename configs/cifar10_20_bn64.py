"""CIFAR-10 ResNet-20 with the paper's BN groups: statistics over 64 images, as on each of its 2 GPUs.

The default normalises over the global batch of 128 (sync BN); the paper's Caffe BN saw each GPU's 64.
"""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_20_bn64'
  config.model.bn_group_size = 64
  return config
