"""CIFAR-10 ResNet-110, option A (paper section 4.2, Table 6), with the paper's lr warm-up.

"We use 0.01 to warm up the training until the training error is below 80% (about 400
iterations), and then go back to 0.1."
"""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_110'
  config.model.depth = 110
  config.optimizer.warmup_learning_rate = 0.01
  return config
