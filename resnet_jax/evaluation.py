"""The paper's ImageNet test protocols on a workdir's latest checkpoint: 1-crop, 10-crop and multi-scale.

'1crop': shorter side 256, the centre 224 crop. '10crop': the four corners and the centre and their flips,
softmax scores averaged (the paper's comparisons, Tables 2-4). 'multiscale': the fully-convolutional form
(Table 4's best results): the whole image at shorter sides data.eval_scales = {224, 256, 384, 480, 640} and
its flip, scores averaged over scales and flips. Whole images vary in shape, so each is resized to the
nearest of a few aspect ratios (imagenet_input.ASPECTS, at most ~7 percent stretch) and images of one shape are
batched together: one compilation per (scale, shape). Top-1 and top-5 errors count every evaluation image
exactly once (the last batch is padded and masked). It reads the newest complete checkpoint and changes
nothing in the workdir but writing DIR/eval_<mode>.json. The command is resnet_jax.tools.evaluate.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from resnet_jax import checkpointing, models, parallel
from resnet_jax import data as data_lib
from resnet_jax.data import imagenet
from resnet_jax.workdir import Workdir

MODES = ('1crop', '10crop', 'multiscale')


def scores_fn(model, mesh, flips):
  """Softmax scores averaged over each image's views ([b, V, H, W, 3] or [b, H, W, 3]) and, with `flips`,
  their horizontal flips: [b, classes]."""

  def fn(variables, images):
    b = images.shape[0]
    x = images.reshape((-1,) + images.shape[-3:])
    if flips:
      x = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape((-1,) + x.shape[1:])
    probs = jax.nn.softmax(model.apply(variables, x, train=False).astype(jnp.float32))
    return probs.reshape(b, -1, probs.shape[-1]).mean(axis=1)

  return parallel.map_step(fn, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS))


def _host(x):
  return np.asarray(
    multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x
  )


CHUNK_ROWS = 16_384  # scores held on the devices between copies to the host (64 MB at 1000 classes)


def scores_in_chunks(fn, variables, batches, mesh, prefetch, chunk_rows=CHUNK_ROWS):
  """The scores of the real (mask 1) images, in order.

  Scores and masks stay on the devices and are copied (and, over several processes, gathered) once per
  `chunk_rows` rows: one transfer instead of one per batch.
  """
  out, scores, masks = [], [], []

  def flush():
    if scores:
      kept = _host(jnp.concatenate(scores))[_host(jnp.concatenate(masks)) > 0]
      out.append(kept)
      scores.clear()
      masks.clear()

  for batch in parallel.prefetch(batches, mesh, prefetch):
    scores.append(fn(variables, batch['image']))
    masks.append(batch['mask'])
    if sum(len(s) for s in scores) >= chunk_rows:
      flush()
  flush()
  return np.concatenate(out)


def errors(scores, labels) -> dict:
  top5 = np.argsort(-scores, axis=1)[:, :5]
  return {
    'top1_error': float(np.mean(top5[:, 0] != labels)),
    'top5_error': float(np.mean(~np.any(top5 == labels[:, None], axis=1))),
    'count': int(len(labels)),
  }


def _per_batch(images, views, pixels, device_count):
  """Images per global batch so that a batch holds about `images` views of 224x224: a multiple of devices."""
  n = int(images * 224 * 224 / (views * pixels))
  return max(device_count, n // device_count * device_count)


def evaluate_scores(mode, model, variables, ds, config, mesh):
  """[M, classes] averaged softmax scores of every eval image and their labels, for `mode`."""
  process_index, process_count = jax.process_index(), jax.process_count()
  images, prefetch, size = (
    config.train.eval_batch_size,
    config.data.prefetch,
    config.data.image_size,
  )
  if mode == 'multiscale':
    return _multiscale_scores(model, variables, ds, config, mesh), ds.eval_labels
  if mode == '10crop':
    images = _per_batch(images, 10, size * size, mesh.size)
  batches = ds.eval_batches(images, process_index, process_count, mode)
  return scores_in_chunks(
    scores_fn(model, mesh, False), variables, batches, mesh, prefetch
  ), ds.eval_labels


def _multiscale_scores(model, variables, ds, config, mesh):
  process_index, process_count = jax.process_index(), jax.process_count()
  sizes = ds.eval_image_sizes()
  channel_mean = ds.mean_image.mean(axis=(0, 1))
  fn, total = (
    scores_fn(model, mesh, True),
    np.zeros((len(ds.eval_labels), ds.num_classes), np.float64),
  )
  for scale in config.data.eval_scales:
    shapes = [imagenet.bucket_shape(h, w, scale) for h, w in sizes]
    for h, w in sorted(set(shapes)):
      index = [i for i, s in enumerate(shapes) if s == (h, w)]
      view = lambda tf, d, h=h, w=w: imagenet.scale_view(tf, d, h, w, config.data, channel_mean)  # noqa: E731
      per_batch = _per_batch(config.train.eval_batch_size, 2, h * w, mesh.size)
      batches = ds.view_batches(view, (h, w, 3), per_batch, process_index, process_count, index)
      total[index] += scores_in_chunks(fn, variables, batches, mesh, config.data.prefetch)
  return total / len(config.data.eval_scales)


def evaluate_workdir(workdir, mode, config=None, mesh=None) -> dict:
  """Evaluates the newest readable checkpoint of `workdir` and writes workdir/eval_<mode>.json."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  run = checkpointing.open_workdir(workdir, config)
  config = run.config
  ds = data_lib.load(config.data, config.seed)
  if mode not in ds.eval_modes:
    raise ValueError(
      f'--mode={mode} needs ImageNet images (data.name=imagenet2012 with data.source tfds or '
      'image_folder); CIFAR and synthetic data have one view: use --mode=1crop.'
    )
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  variables = jax.device_put(run.variables, parallel.replicated(mesh))
  scores, labels = evaluate_scores(mode, model, variables, ds, config, mesh)
  result = {
    'mode': mode,
    **errors(scores, labels),
    'step': run.step,
    'split': ds.eval_split,
    'config': config.name,
  }
  if mode == 'multiscale':
    result['scales'] = list(config.data.eval_scales)
  if jax.process_index() == 0:
    with open(Workdir(run.workdir).evaluation(mode), 'w') as f:
      json.dump(result, f, indent=2)
  return result
