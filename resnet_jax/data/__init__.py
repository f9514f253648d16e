"""The data sources behind one interface: `load(config.data, seed)` returns a `Dataset`.

- in_memory: CIFAR-10 (tfds), an image folder or archive, synthetic data; uint8 arrays in host memory.
- imagenet: ImageNet's JPEGs streamed through tf.data (tfds array_record or a folder of WordNet ids).
- on_device: an in-memory training set kept on the accelerators, batches made inside the step.
- common: what they share (example order, process shares, the cache, DataError).
"""

from typing import Iterator, Protocol

import numpy as np

from resnet_jax.data import imagenet, in_memory
from resnet_jax.data.common import DataError

__all__ = ['DataError', 'Dataset', 'check', 'load', 'streamed', 'SOURCES', 'DATASETS']

SOURCES = ('tfds', 'image_folder', 'synthetic')
DATASETS = tuple(in_memory.SPECS)


class Dataset(Protocol):
  """What the loop, evaluation and the tools need from a dataset, whatever its source."""

  num_classes: int
  eval_split: str  # the name results are reported under: 'test', 'val', 'validation'
  eval_modes: tuple[str, ...]  # the test views it can make: '1crop' always
  mean_image: np.ndarray  # float32, 0..255 units

  @property
  def num_train(self) -> int: ...

  @property
  def eval_labels(self) -> np.ndarray: ...

  def train_batches(
    self,
    start_step: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Iterator[dict]:
    """{'image', 'label'}: this process's share of the global batch of each step from start_step on."""

  def eval_batches(
    self, batch_size: int, process_index: int = 0, process_count: int = 1, mode: str = '1crop'
  ) -> Iterator[dict]:
    """{'image', 'label', 'mask'}: the eval set in order, the last global batch padded (mask 0)."""


def streamed(data_config) -> bool:
  """ImageNet's JPEGs are streamed; everything else is held in memory."""
  return data_config.name == 'imagenet2012' and data_config.source != 'synthetic'


def check(data_config) -> None:
  """Fast (seconds) checks that the data can be read, before anything heavy; raises DataError."""
  if streamed(data_config):
    imagenet.check(data_config)
  else:
    in_memory.check(data_config)


def load(data_config, seed: int) -> Dataset:
  if streamed(data_config):
    return imagenet.ImageNet(data_config, seed)
  return in_memory.load(data_config, seed)
