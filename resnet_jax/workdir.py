"""A run's folder: the one place that names its files.

Training (or a conversion) writes config.json, checkpoints/, metrics.jsonl, tensorboard/, segments.json,
results.json, lock.json and the preprocessing statistics it computed from the training images
(mean_image.npy). The tools read those and write only their own outputs: eval_<mode>.json, bn_stats.json
and bn_recomputed/<step>/.
"""

import json
import os

from resnet_jax import defaults

MEAN_IMAGE_NAME = 'mean_image.npy'  # a converted config names it relative to the workdir


class Workdir:
  """The paths of one run's files; nothing is read or created until asked."""

  def __init__(self, path):
    self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))

  def __repr__(self):
    return f'Workdir({self.path!r})'

  def _file(self, name) -> str:
    return os.path.join(self.path, name)

  @property
  def config_json(self) -> str:
    return self._file('config.json')

  @property
  def checkpoints(self) -> str:
    return self._file('checkpoints')

  @property
  def corrupt(self) -> str:
    """Where damaged checkpoints are moved aside, never deleted."""
    return os.path.join(self.checkpoints, 'corrupt')

  @property
  def metrics(self) -> str:
    return self._file('metrics.jsonl')

  @property
  def tensorboard(self) -> str:
    return self._file('tensorboard')

  @property
  def segments(self) -> str:
    return self._file('segments.json')

  @property
  def results(self) -> str:
    return self._file('results.json')

  @property
  def lock(self) -> str:
    return self._file('lock.json')

  @property
  def mean_image(self) -> str:
    """The per-pixel mean of the training images the run was trained with (float32 .npy)."""
    return self._file(MEAN_IMAGE_NAME)

  def evaluation(self, mode) -> str:
    return self._file(f'eval_{mode}.json')

  @property
  def bn_stats(self) -> str:
    return self._file('bn_stats.json')

  def bn_recomputed(self, step) -> str:
    return os.path.join(self._file('bn_recomputed'), str(step))

  def has_config(self) -> bool:
    return os.path.isfile(self.config_json)

  def config(self):
    """The config the run was trained with, on today's defaults (see defaults.from_saved), with the
    preprocessing statistics training saved here (with_saved_statistics)."""
    with open(self.config_json) as f:
      config = defaults.from_saved(json.load(f))
    mean_image_file = config.data.mean_image_file
    if mean_image_file and not os.path.isabs(mean_image_file):
      config.data.mean_image_file = os.path.join(self.path, mean_image_file)
    return self.with_saved_statistics(config)

  def with_saved_statistics(self, config):
    """`config` reading the mean image training saved here instead of computing it again.

    Evaluation then needs no training images. A config that fixes its preprocessing (a converted model's)
    and an older run that saved no mean image are returned as they are: their mean image is computed from
    the training images and cached as before, never written into the run.
    """
    if defaults.fixed_preprocessing(config.data) or not os.path.isfile(self.mean_image):
      return config
    config = config.copy_and_resolve_references()
    config.data.mean_image_file = self.mean_image
    return config
