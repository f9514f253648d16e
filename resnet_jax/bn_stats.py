"""Exact BN population statistics after training, as for the paper's released models.

"The provided mean and variance are strictly computed using average (not moving average) on a sufficiently
large training batch after the training procedure." The network runs in train mode (each layer normalised
with its batch's statistics, as in training) over K training images with the training transform, without
updating weights; every BN layer's mean is the average of its batch means and its variance the average of
its batch mean squares minus the mean squared: the exact moments over all K images.

  python -m resnet_jax.bn_stats --workdir=DIR [--num_images=10000]   # on the latest checkpoint
"""
import json
import os

import flax
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from resnet_jax import input_pipeline, parallel


def recompute(model, params, batch_stats, batches, mesh):
  """New batch_stats from exact moments over `batches` (global arrays on `mesh`); `model` has bn_axis_name."""
  def moments(variables, images):
    _, state = model.apply(variables, images, train=True, mutable=['batch_stats', 'bn_moments'])
    return state['bn_moments']

  fn = parallel.map_step(moments, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P())
  total, count = None, 0
  for batch in batches:
    m = fn({'params': params, 'batch_stats': batch_stats}, batch['image'])
    total = m if total is None else jax.tree.map(lambda a, b: a + b, total, m)
    count += 1
  flat = flax.traverse_util.flatten_dict(jax.device_get(total))
  new = {}
  for path, ((mean_sum, sq_sum),) in flat.items():  # path = (..module path.., 'moments')
    mean, sq = mean_sum / count, sq_sum / count
    new[path[:-1] + ('mean',)] = mean.astype(np.float32)
    new[path[:-1] + ('var',)] = np.maximum(sq - np.square(mean), 0).astype(np.float32)
  old = flax.traverse_util.flatten_dict(jax.device_get(batch_stats))
  assert set(new) == set(old), 'every BN layer must report its moments'
  return jax.device_put(flax.traverse_util.unflatten_dict(new), parallel.replicated(mesh))


def training_batches(ds, config, num_images):
  """num_images // batch training images with the training transform, drawn apart from the training order."""
  batch = config.train.batch_size
  if num_images < batch:
    raise ValueError(f'bn_stats_images={num_images} is smaller than one global batch ({batch}).')
  gen = input_pipeline.train_batches(ds, 0, batch, config.seed + 1, jax.process_index(), jax.process_count())
  return [next(gen) for _ in range(num_images // batch)]


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from resnet_jax import checkpointing, train  # pylint: disable=g-import-not-at-top
  workdir = flags.FLAGS.workdir
  config = checkpointing.load_config(workdir)
  before, after, state, ds, mesh = train.recalibrate_checkpoint(config, workdir, flags.FLAGS.num_images)
  out = os.path.join(os.path.abspath(workdir), 'bn_recomputed', str(int(state.step)))
  with ocp.StandardCheckpointer() as checkpointer:  # leaving waits for the asynchronous write
    checkpointer.save(out, state, force=True)
  report = {'step': int(state.step), 'num_images': flags.FLAGS.num_images, 'split': ds.eval_split,
            'moving_average': before, 'recomputed': after, 'checkpoint': out}
  with open(os.path.join(workdir, 'bn_stats.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string('workdir', None, 'A training workdir (config.json + checkpoints).')
  flags.DEFINE_integer('num_images', 10_000, 'Training images to average the statistics over.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
