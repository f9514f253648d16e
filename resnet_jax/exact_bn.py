"""Exact BN population statistics after training, as for the paper's released models.

"The provided mean and variance are strictly computed using average (not moving average) on a sufficiently
large training batch after the training procedure." The network runs in train mode (each layer normalised
with its batch's statistics, as in training) over K training images with the training transform, without
updating weights; every BN layer's mean is the average of its batch means and its variance the average of
its batch mean squares minus the mean squared: the exact moments over all K images.

Training's end-of-run pass calls `recompute`; `recalibrate_workdir` (the command resnet_jax.tools.bn_stats)
reads a run, never changes its checkpoints, and writes only its own outputs: bn_stats.json and the
recomputed state under bn_recomputed/<step>/.
"""

import dataclasses
import json
import time
from typing import Iterator

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import PartitionSpec as P

from resnet_jax import checkpointing, data, evaluation, models, parallel, writers
from resnet_jax.workdir import Workdir


def recompute(model, params, batch_stats, batches, mesh):
  """New batch_stats from exact moments over `batches` (global arrays on `mesh`, any iterable: read one at
  a time); `model` has bn_axis_name.

  The moments are summed on the devices as the batches arrive, and at most one batch's pass is left in
  flight, so memory stays that of a few batches however many there are.
  """

  def moments(variables, images):
    _, state = model.apply(variables, images, train=True, mutable=['batch_stats', 'bn_moments'])
    return state['bn_moments']

  fn = parallel.map_step(moments, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P())
  total, count = None, 0
  for batch in batches:
    previous = total
    m = fn({'params': params, 'batch_stats': batch_stats}, batch['image'])
    total = m if total is None else jax.tree.map(lambda a, b: a + b, total, m)
    count += 1
    # Asynchronous dispatch would otherwise queue every batch's pass, each holding its images.
    jax.block_until_ready(previous)
  if total is None:
    raise ValueError('the exact BN statistics need at least one batch; pass more images.')
  flat = flax.traverse_util.flatten_dict(jax.device_get(total))
  new = {}
  for path, ((mean_sum, sq_sum),) in flat.items():  # path = (..module path.., 'moments')
    mean, sq = mean_sum / count, sq_sum / count
    new[path[:-1] + ('mean',)] = mean.astype(np.float32)
    new[path[:-1] + ('var',)] = np.maximum(sq - np.square(mean), 0).astype(np.float32)
  old = flax.traverse_util.flatten_dict(jax.device_get(batch_stats))
  assert set(new) == set(old), 'every BN layer must report its moments'
  return jax.device_put(flax.traverse_util.unflatten_dict(new), parallel.replicated(mesh))


def images_to_read(num_images, batch, num_train) -> int:
  """The images a pass reads for `num_images` asked: at least one global batch and at most the training
  set, in whole global batches (a small set is not read over and over)."""
  return max(min(max(num_images, batch), num_train) // batch, 1) * batch


@dataclasses.dataclass(frozen=True)
class Pass:
  """What an exact-BN pass read and how long it took; zeros when there was none (model.freeze_bn)."""

  images: int = 0
  seconds: float = 0.0


def measured_pass(model, params, batch_stats, ds, config, mesh, num_images):
  """(`recompute` over images_to_read(num_images) training images, its Pass), with a start line and
  progress by quarters: the pass takes half a minute on CIFAR and minutes on ImageNet."""
  start = time.perf_counter()
  batch = config.train.batch_size
  images = images_to_read(num_images, batch, ds.num_train)
  logging.info(
    'Exact BN statistics: the network runs over %s training images (%s asked; %d batches of %d).',
    f'{images:,}',
    f'{num_images:,}',
    images // batch,
    batch,
  )
  progress = writers.Milestones('Exact BN statistics', images // batch, 'batches')
  batches = parallel.prefetch(training_batches(ds, config, images), mesh, config.data.prefetch)
  stats = recompute(model, params, batch_stats, progress.track(batches), mesh)
  done = Pass(progress.done * batch, time.perf_counter() - start)
  logging.info('Exact BN statistics over %s images took %.0f s.', f'{done.images:,}', done.seconds)
  return stats, done


def training_batches(ds, config, num_images) -> Iterator[dict]:
  """num_images // batch training images with the training transform, drawn apart from the training order,
  made one batch at a time as they are read (never all at once: 10,000 ImageNet crops are 6 GB)."""
  batch = config.train.batch_size
  if num_images < batch:
    raise ValueError(f'bn_stats_images={num_images} is smaller than one global batch ({batch}).')
  gen = ds.train_batches(0, batch, config.seed + 1, jax.process_index(), jax.process_count())
  return _first(gen, num_images // batch)


def _first(gen, n):
  """The first n items of `gen`, which is closed after them (a tf.data pipeline stops reading ahead)."""
  try:
    for _ in range(n):
      yield next(gen)
  finally:
    gen.close()


def _errors(scores, labels) -> dict:
  loss = float(np.mean(-np.log(np.maximum(scores[np.arange(len(labels)), labels], 1e-30))))
  errors = evaluation.errors(scores, labels)
  return {'error': errors['top1_error'], 'loss': loss, **errors}


def recalibrate_workdir(workdir, num_images, config=None, mesh=None) -> dict:
  """Exact BN statistics on the newest checkpoint of `workdir` (with `config`, else its own): the
  report, also written to bn_stats.json."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  run = checkpointing.open_workdir(workdir, config)
  config = run.config
  ds = data.load(config.data, config.seed)
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  variables = jax.device_put(run.variables, parallel.replicated(mesh))
  before = evaluation.evaluate_scores('1crop', model, variables, ds, config, mesh)
  stats, done = measured_pass(
    model, variables['params'], variables['batch_stats'], ds, config, mesh, num_images
  )
  after = evaluation.evaluate_scores(
    '1crop', model, {**variables, 'batch_stats': stats}, ds, config, mesh
  )
  out = Workdir(run.workdir).bn_recomputed(run.step)
  with ocp.StandardCheckpointer() as checkpointer:  # leaving waits for the asynchronous write
    checkpointer.save(out, {**run.state, 'batch_stats': stats}, force=True)
  held = 'recomputed_after_training' if config.train.recompute_bn_stats else 'moving_average'
  report = {
    'step': run.step,
    'num_images': done.images,  # what the pass read: num_images capped to whole batches of the set
    'num_images_asked': num_images,
    'split': ds.eval_split,
    'checkpoint': {'statistics': held, **_errors(*before)},
    'recomputed': _errors(*after),
    'recomputed_checkpoint': out,
  }
  if jax.process_index() == 0:
    with open(Workdir(run.workdir).bn_stats, 'w') as f:
      json.dump(report, f, indent=2)
  return report
