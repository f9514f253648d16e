"""The shared base, runnable as it is: ResNet-20's CIFAR-10 recipe (every field in resnet_jax/defaults.py)."""

from resnet_jax.defaults import get_config  # noqa: F401
