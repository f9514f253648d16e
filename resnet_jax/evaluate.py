"""The paper's ImageNet test protocols on a workdir's latest checkpoint: 1-crop, 10-crop and multi-scale.

  python -m resnet_jax.evaluate --config=configs/imagenet_resnet50.py --workdir=DIR --mode=10crop

'1crop': shorter side 256, the centre 224 crop. '10crop': the four corners and the centre and their flips,
softmax scores averaged (the paper's comparisons, Tables 2-4). 'multiscale': the fully-convolutional form
(Table 4's best results): the whole image at shorter sides data.eval_scales = {224, 256, 384, 480, 640} and
its flip, scores averaged over scales and flips. Whole images vary in shape, so each is resized to the
nearest of a few aspect ratios (imagenet_input.ASPECTS, at most ~7% stretch) and images of one shape are
batched together: one compilation per (scale, shape). Top-1 and top-5 errors count every evaluation image
exactly once (the last batch is padded and masked). Writes DIR/eval_<mode>.json.
"""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from resnet_jax import input_pipeline, parallel

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
  return np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x)


def _scores(fn, variables, batches, mesh, prefetch):
  """The scores of the real (mask 1) images, in order."""
  out = []
  for batch in parallel.prefetch(batches, mesh, prefetch):
    out.append(_host(fn(variables, batch['image']))[_host(batch['mask']) > 0])
  return np.concatenate(out)


def errors(scores, labels) -> dict:
  top5 = np.argsort(-scores, axis=1)[:, :5]
  return {'top1_error': float(np.mean(top5[:, 0] != labels)),
          'top5_error': float(np.mean(~np.any(top5 == labels[:, None], axis=1))), 'count': int(len(labels))}


def _per_batch(images, views, pixels, device_count):
  """Images per global batch so that a batch holds about `images` views of 224x224: a multiple of devices."""
  n = int(images * 224 * 224 / (views * pixels))
  return max(device_count, n // device_count * device_count)


def evaluate_scores(mode, model, variables, ds, config, mesh):
  """[M, classes] averaged softmax scores of every eval image and their labels, for `mode`."""
  from resnet_jax import imagenet_input  # pylint: disable=g-import-not-at-top
  pi, pc, dc, size = jax.process_index(), jax.process_count(), mesh.size, config.data.image_size
  images, prefetch = config.train.eval_batch_size, config.data.prefetch
  if isinstance(ds, input_pipeline.Dataset):  # CIFAR (or synthetic): the single original view
    batches = input_pipeline.eval_batches(ds, images, pi, pc)
    return _scores(scores_fn(model, mesh, False), variables, batches, mesh, prefetch), ds.eval_labels
  labels = ds.eval_labels()
  if mode == '1crop':
    batches = ds.eval_batches(images, pi, pc, '1crop')
  if mode == '10crop':
    batches = ds.eval_batches(_per_batch(images, 10, size * size, dc), pi, pc, '10crop')
  if mode != 'multiscale':
    return _scores(scores_fn(model, mesh, False), variables, batches, mesh, prefetch), labels
  sizes = ds.eval_image_sizes()
  channel_mean = ds.mean_image.mean(axis=(0, 1))
  fn, total = scores_fn(model, mesh, True), np.zeros((len(labels), ds.num_classes), np.float64)
  for scale in config.data.eval_scales:
    shapes = [imagenet_input.bucket_shape(h, w, scale) for h, w in sizes]
    for h, w in sorted(set(shapes)):
      index = [i for i, s in enumerate(shapes) if s == (h, w)]
      view = lambda tf, d, h=h, w=w: imagenet_input.scale_view(tf, d, h, w, channel_mean)  # noqa: E731
      batches = ds.view_batches(view, (h, w, 3), _per_batch(images, 2, h * w, dc), pi, pc, index)
      total[index] += _scores(fn, variables, batches, mesh, prefetch)
  return total / len(config.data.eval_scales), labels


def evaluate_checkpoint(config, workdir, mode, mesh=None) -> dict:
  """Evaluates the latest checkpoint of `workdir` and writes workdir/eval_<mode>.json."""
  from resnet_jax import train  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh() if mesh is None else mesh
  ds, model, _, manager, state = train._setup(config, workdir, mesh)  # pylint: disable=protected-access
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise FileNotFoundError(f'{workdir} holds no checkpoint; train first (python -m resnet_jax.main) or pass '
                            'the workdir of a trained run.')
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  scores, labels = evaluate_scores(mode, model, variables, ds, config, mesh)
  result = {'mode': mode, **errors(scores, labels), 'step': int(step), 'split': ds.eval_split,
            'config': config.name}
  if mode == 'multiscale':
    result['scales'] = list(config.data.eval_scales)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{mode}.json'), 'w') as f:
      json.dump(result, f, indent=2)
  return result


def _main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from resnet_jax import main as cli, validate  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}: options are --config, --workdir, --mode and --config.<field>=.')
  config, workdir, mode = flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.mode
  try:
    validate.check(config)
  except validate.ConfigError as e:
    cli.fail(str(e))
  if mode != '1crop' and not input_pipeline.streamed(config.data):
    cli.fail(f'--mode={mode} needs ImageNet images (data.name=imagenet2012 with data.source tfds or '
             'image_folder); CIFAR and synthetic data have one view: use --mode=1crop.')
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    cli.fail(f'{workdir} holds no checkpoints/; pass the --workdir of a trained run.')
  cli.initialize_distributed()
  from resnet_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    input_pipeline.check(config.data)
    print(json.dumps(evaluate_checkpoint(config, workdir, mode)))
  except (input_pipeline.DataError, FileNotFoundError, checkpointing.CheckpointMismatch) as e:
    cli.fail(str(e))
  sys.stdout.flush()


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  from resnet_jax import main as _cli  # pylint: disable=g-import-not-at-top  # defines --config and --workdir
  flags.DEFINE_enum('mode', '1crop', MODES, 'The test protocol: 1crop, 10crop or multiscale.')
  app.run(_main, flags_parser=_cli.parse_flags)
