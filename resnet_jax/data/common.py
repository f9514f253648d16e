"""What every data source shares: the order of examples, each process's share, the cache, the error type.

A batch is a function of (seed, step): epoch e's order is a permutation drawn from (seed, e), step s takes
the s-th slice of it, and each process takes a contiguous share of that slice. A resumed run therefore
reads exactly what it would have read, and no iterator state is ever saved.
"""

import functools
import os
from typing import Iterator

import numpy as np

IMAGE_EXTENSIONS = (
  '.jpg',
  '.jpeg',
  '.png',
  '.bmp',
  '.ppm',
  '.pgm',
  '.gif',
  '.tif',
  '.tiff',
  '.webp',
)
DEFAULT_CACHE_DIR = '~/.cache/resnet_jax'


class DataError(ValueError):
  """User-facing data problem; the message is one sentence naming the problem and the fix."""


def cache_dir(data_config) -> str:
  return os.path.expanduser(data_config.cache_dir or DEFAULT_CACHE_DIR)


def write_atomically(path: str, save) -> None:
  """`save(tmp_path)` then a rename, so a reader never sees half a file and concurrent writers do not clash."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{os.getpid()}{ext}'
  save(tmp)
  os.replace(tmp, path)


def steps_per_epoch(num_train: int, batch_size: int) -> int:
  """Full global batches per epoch; the remainder is dropped (a different one each epoch)."""
  if batch_size <= 0 or num_train // batch_size == 0:
    raise DataError(
      f'the global batch size {batch_size} does not fit the {num_train} training images; '
      'set train.batch_size between 1 and the number of training images.'
    )
  return num_train // batch_size


@functools.lru_cache(maxsize=4)
def _cached_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  perm.flags.writeable = False  # shared between calls
  return perm


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of epoch `epoch`; cached because every step of the epoch needs it."""
  return _cached_permutation(int(seed), int(epoch), int(n))


def process_share(batch_size: int, process_index: int, process_count: int, field: str) -> slice:
  """This process's contiguous part of a global batch; `field` names the config setting to fix."""
  if batch_size <= 0 or batch_size % process_count:
    raise DataError(
      f'the global batch size {batch_size} is not a positive multiple of the {process_count} '
      f'processes; set {field} to one.'
    )
  if not 0 <= process_index < process_count:
    raise DataError(
      f'process_index={process_index} is outside [0, {process_count}); pass the JAX process index.'
    )
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def step_indices(num_train: int, step: int, batch_size: int, seed: int, share: slice) -> np.ndarray:
  """The training examples of this process's share of global step `step`."""
  epoch, i = divmod(int(step), steps_per_epoch(num_train, batch_size))
  order = epoch_permutation(seed, epoch, num_train)
  return order[i * batch_size : (i + 1) * batch_size][share]


def eval_indices(num_eval: int, batch_size: int, share: slice) -> Iterator[np.ndarray]:
  """The eval set in order, this process's share of each global batch; -1 pads the last one."""
  if batch_size <= 0:
    raise DataError(
      f'the eval batch size {batch_size} must be positive; set train.eval_batch_size.'
    )
  padded = np.full(-(-num_eval // batch_size) * batch_size, -1)
  padded[:num_eval] = np.arange(num_eval)
  yield from padded.reshape(-1, batch_size)[:, share]


def seeded_subset(n: int, limit: int, seed: int, salt: int) -> np.ndarray:
  """A fixed random subset of `limit` of n examples, in order: spread over the classes of a sorted list."""
  return np.sort(np.random.default_rng([seed, salt]).permutation(n)[:limit])
