"""Images/s of the ImageNet preprocessing on real JPEGs, ours against the flax ImageNet example's, at 1 and
2 tf.data threads: training crops and 1-crop evaluation (and our 10-crop).

  python experiments/pipeline_benchmark.py [--tar=../shared/data/imagenet-sample-100.tar.gz] [--images=2000]

Ours: the paper's scale augmentation (a random window of the JPEG decoded, resized to 224), flip, PCA
lighting, mean image; 1-crop resizes the image to shorter side 256 and takes the centre 224. The resizes
are bilinear, by default (data.antialias=False) not antialiased; the "antialiased" rows set it True (1-crop
then decodes only the window its centre crop is resampled from).
flax examples/imagenet/input_pipeline.py, re-implemented here on the same files: the inception crop
(sample_distorted_bounding_box, decode_and_crop_jpeg, bicubic resize to 224), flip, mean/std; evaluation
the centre (224 / (224 + 32)) of the shorter side decoded with decode_and_crop_jpeg, bicubic to 224. Both
read files through tf.data's parallel map with the same threading options. The 100-image sample is
repeated to `--images`; each pipeline is timed `--repeats` times, alternating, and its best rate kept (other
work on the machine only slows a run). Appends its table, with the date and the machine, to
experiments/results/pipeline_benchmark.md.
"""

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnet_jax import (
  data,
  defaults,
)
from resnet_jax.data import imagenet

FLAX_CROP_PADDING = 32
FLAX_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
FLAX_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _flax_resize(tf, image, size):
  return tf.image.resize(image, [size, size], method='bicubic')


def _flax_centre(tf, data, size):
  """The centre square of side size / (size + 32) of the shorter side, decoded alone, bicubic to size."""
  shape = tf.image.extract_jpeg_shape(data)
  side = tf.cast(
    size / (size + FLAX_CROP_PADDING) * tf.cast(tf.reduce_min(shape[:2]), tf.float32), tf.int32
  )
  y, x = (shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2
  return _flax_resize(
    tf, tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, side, side]), channels=3), size
  )


def _flax_train(tf, data, size):
  """The inception crop: a box of 8-100% of the area, aspect 3/4-4/3, at most 10 tries, else the centre."""
  shape = tf.image.extract_jpeg_shape(data)
  begin, box, _ = tf.image.sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], box[0], box[1]])
  whole = tf.reduce_all(tf.equal(box[:2], shape[:2]))  # no box found: flax takes the centre crop
  image = tf.cond(
    whole,
    lambda: _flax_centre(tf, data, size),
    lambda: _flax_resize(tf, tf.image.decode_and_crop_jpeg(data, window, channels=3), size),
  )
  return tf.image.random_flip_left_right(tf.reshape(image, [size, size, 3]))


def flax_batches(paths, train, batch, threads, size=224):
  """The flax example's pipeline over files: read, preprocess in a parallel map, batch, prefetch."""
  import tensorflow as tf

  ds = tf.data.Dataset.from_tensor_slices(paths)
  if train:
    ds = ds.repeat().shuffle(16 * batch, seed=0)

  def example(path):
    data = tf.io.read_file(path)
    image = _flax_train(tf, data, size) if train else _flax_centre(tf, data, size)
    return {'image': (image - FLAX_MEAN) / FLAX_STD, 'label': tf.constant(0)}

  ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE).batch(batch, drop_remainder=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _repeat(split, n):
  index = np.arange(n) % split.size
  return dataclasses.replace(
    split, size=n, paths=[split.paths[i] for i in index], labels=split.labels[index]
  )


def ours(ds, antialias, make):
  """`make` with ds.cfg.antialias set (the views read it when the pipeline is made)."""

  def made():
    ds.cfg.antialias = antialias
    return make()

  return made


def _rate(batches, n):
  """Images/s over all batches after the first (which includes tf.data's start-up)."""
  next(batches)
  start, count = time.perf_counter(), 0
  for b in batches:
    count += len(b['label'])
    if count >= n:
      break
  return count / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--tar', default=str(ROOT.parent / 'shared' / 'data' / 'imagenet-sample-100.tar.gz')
  )
  parser.add_argument('--images', type=int, default=2000)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as tmp:
    with tarfile.open(args.tar) as f:
      f.extractall(tmp, filter='data')
    config = defaults.get_imagenet_config()
    config.data.update(
      source='image_folder',
      image_folder=os.path.join(tmp, 'imagenet-sample'),
      train_split='val',
      eval_split='val',
      cache_dir=tmp,
    )
    ds = data.load(config.data, 0)
    ds.train, ds.eval = _repeat(ds.train, args.images), _repeat(ds.eval, args.images)
    paths = np.array(ds.eval.paths)
    rows = []
    for threads in (1, 2):
      ds.cfg.threads = threads
      crop = (config.data.image_size,) * 2 + (3,)
      cases = {
        'train crops': {
          'ours (scale aug. + lighting)': ours(
            ds, False, lambda: ds.train_batches(0, args.batch, 0)
          ),
          'ours, antialiased': ours(ds, True, lambda: ds.train_batches(0, args.batch, 0)),
          'flax example (inception crop)': lambda: flax_batches(paths, True, args.batch, threads),  # noqa: B023
        },
        'eval 1-crop': {
          'ours': ours(ds, False, lambda: ds.eval_batches(args.batch, mode='1crop')),
          'ours, antialiased': ours(ds, True, lambda: ds.eval_batches(args.batch, mode='1crop')),
          'flax example': lambda: flax_batches(paths, False, args.batch, threads),  # noqa: B023
        },
        'eval 10-crop': {
          'ours': ours(
            ds,
            False,
            lambda: ds.view_batches(
              lambda tf, d: imagenet.ten_crop_view(tf, d, ds.cfg, ds.mean_image),
              (10, *crop),  # noqa: B023
              args.batch // 4,
            ),
          ),
        },
      }
      for case, pipelines in cases.items():
        best = {name: 0.0 for name in pipelines}
        for _ in range(args.repeats):
          for name, make in pipelines.items():
            best[name] = max(best[name], _rate(iter(make()), args.images // 2))
        for name, rate in best.items():
          flax = [r for n, r in best.items() if n.startswith('flax')]
          ratio = rate / flax[0] if flax and not name.startswith('flax') else None
          rows.append((case, name, threads, rate, ratio))
          print(f'{case:14s} {name:32s} {threads} thread(s) {rate:8.1f} images/s', flush=True)
  header = (
    f'\n## {datetime.date.today()} — {platform.node()}: {cores} CPU cores ({platform.processor() or "cpu"}), '
    f'load average {os.getloadavg()[0]:.1f}\n\n`python experiments/pipeline_benchmark.py --images='
    f'{args.images} --repeats={args.repeats}` (the 100-image sample repeated; 224 crops; best of '
    f'{args.repeats}; images of 10-crop count once)\n\n'
    '| preprocessing | pipeline | tf.data threads | images/s | ours / flax |\n|---|---|---:|---:|---:|\n'
  )
  out = ROOT / 'experiments' / 'results' / 'pipeline_benchmark.md'
  if not out.exists():
    out.write_text(
      '# ImageNet preprocessing throughput\n\nWritten by experiments/pipeline_benchmark.py.\n'
    )
  with open(out, 'a') as f:
    f.write(
      header
      + ''.join(
        f'| {c} | {n} | {t} | {r:.0f} | {"" if q is None else f"{q:.2f}x"} |\n'
        for c, n, t, r, q in rows
      )
    )
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
