"""CIFAR-10 ResNet-1202, option A (paper section 4.2, Table 6), with ResNet-110's lr warm-up.

Section 4.2 trains ResNet-1202 "as described above", and the only start described for the deep nets is
ResNet-110's: lr 0.01 until the training error is below 80%, then 0.1. A net ten times deeper is no easier
to start at 0.1, so this config warms up the same way. tests/test_fidelity.py checks that the warm-up keeps
the first steps finite and bounded (on one CPU batch of 8: the loss stayed within 3x of its start at 0.01,
and reached 38x at 0.1); that the loss then falls at the paper's batch of 128 is left to a GPU run.
Why it rises first, even at 0.01: at initialisation 600 residual additions make the pooled features
large (the first loss is ~15-20, not ln 10), so one SGD step moves the logits by about lr * |features|^2
and overshoots; on one device, batch 8, one fixed batch, it went 15.4, 37.6, 66.1, 79.0, 65.9 over the
first five steps (~29 s a step on 2 CPU cores). Each stage's 199 identical blocks run as one nn.scan
with recomputed activations, which changes nothing but compile time and memory.
"""

from resnet_jax import defaults


def get_config():
  config = defaults.get_config()
  config.name = 'cifar10_1202'
  config.model.depth = 1202
  config.model.scan_blocks = True
  config.model.remat = True
  config.optimizer.warmup_learning_rate = 0.01
  return config
