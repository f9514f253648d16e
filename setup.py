"""resnet_jax: the networks, recipes and figures of He et al., "Deep Residual Learning" (CVPR 2016), in JAX.

One installed package, resnet_jax; the experiment configs in configs/ are loaded by path from a checkout.
"""

import setuptools

setuptools.setup(
  name='resnet_jax',
  version='0.1.0',
  description='Reproduce "Deep Residual Learning for Image Recognition" with JAX and Flax.',
  packages=['resnet_jax', 'resnet_jax.data', 'resnet_jax.tools'],
  python_requires='>=3.10',
  install_requires=[
    'absl-py',
    'clu>=0.0.12',
    'flax>=0.12.8',
    'jax>=0.10.2',
    'ml_collections>=1.1.0',
    'numpy',
    'optax>=0.2.8',
    'orbax-checkpoint>=0.12.8',
    'pillow',
    'protobuf',  # reading the released Caffe models
    # clu's TensorBoard writer imports tensorboard, which tensorflow-cpu 2.21 no longer pulls in.
    'tensorboard',
    'tensorflow-cpu>=2.21',  # tf.data for ImageNet, TensorBoard events
    'tensorflow-datasets>=4.9.10',
  ],
  extras_require={
    # Running experiments/colab.ipynb outside Colab (a Jupyter kernel and the plots).
    'notebook': ['ipykernel', 'matplotlib', 'nbclient', 'nbformat'],
    'test': [
      'ipykernel',
      'matplotlib',
      'nbclient',
      'nbformat',
      'pytest',
      'pytest-xdist',  # the README's test command runs the suite on every core
      'ruff',
      # The PyTorch twin and the conversion tests; pinned as the torch extra's pair.
      'torch==2.14.1',
      'torchvision==0.29.1',
    ],
    # Converting PyTorch files (torchvision, pytorch_resnet_cifar10) and experiments/benchmark.py's
    # PyTorch twin. Pinned as a pair: these two load their operators together (a torchvision beside
    # another torch build fails to import).
    'torch': ['torch==2.14.1', 'torchvision==0.29.1'],
  },
)
