"""Images/s of the ImageNet preprocessing per CPU core, on real JPEGs: training (decode the crop window,
resize, flip, lighting, mean) and evaluation (1-crop and 10-crop).

  python experiments/pipeline_benchmark.py [--tar=../shared/data/imagenet-sample-100.tar.gz] [--images=2000]

The 100-image sample is repeated to `--images`; tf.data is pinned to one thread for the per-core figure,
then given every core. Appends its table, with the date and the machine, to
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


def _repeat(split, n):
  index = np.arange(n) % split.size
  return dataclasses.replace(
    split, size=n, paths=[split.paths[i] for i in index], labels=split.labels[index]
  )


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
    rows = []
    for threads, label in ((1, '1 thread'), (0, f'all {cores} cores')):
      ds.cfg.threads = threads
      crop = (config.data.image_size,) * 2 + (3,)
      cases = {
        'train (scale aug. + lighting)': lambda: ds.train_batches(0, args.batch, 0),
        'eval 1-crop': lambda: ds.eval_batches(args.batch, mode='1crop'),
        'eval 10-crop': lambda: ds.view_batches(
          lambda tf, d: imagenet.ten_crop_view(tf, d, config.data, ds.mean_image),
          (10, *crop),  # noqa: B023
          args.batch // 4,
        ),
      }
      for name, make in cases.items():
        rate = _rate(iter(make()), args.images // 2)
        per_core = rate if threads == 1 else rate / cores
        rows.append((name, label, rate, per_core))
        print(f'{name:32s} {label:12s} {rate:8.1f} images/s  {per_core:7.1f} per core', flush=True)
  header = (
    f'\n## {datetime.date.today()} — {platform.node()}: {cores} CPU cores ({platform.processor() or "cpu"}), '
    f'load average {os.getloadavg()[0]:.1f}\n\n`python experiments/pipeline_benchmark.py --images='
    f'{args.images}` (the 100-image sample repeated; 224 crops; images of 10-crop count once)\n\n'
    '| preprocessing | tf.data threads | images/s | images/s per core |\n|---|---|---:|---:|\n'
  )
  out = ROOT / 'experiments' / 'results' / 'pipeline_benchmark.md'
  if not out.exists():
    out.write_text(
      '# ImageNet preprocessing throughput\n\nWritten by experiments/pipeline_benchmark.py.\n'
    )
  with open(out, 'a') as f:
    f.write(header + ''.join(f'| {n} | {line} | {r:.0f} | {p:.0f} |\n' for n, line, r, p in rows))
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
