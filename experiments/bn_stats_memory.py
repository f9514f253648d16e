"""Peak host memory of the exact-BN pass (exact_bn.recompute) against the number of ImageNet-size batches.

  python experiments/bn_stats_memory.py [--batches=10,100] [--batch=256] [--listed=10]

Each case runs in a fresh process: synthetic batches of `--batch` 224x224x3 float32 images (154 MB at 256)
go through the pass as training_batches makes them (streamed: made as they are read) or, for the counts
in `--listed`, all made first as the previous code did. The network is deliberately tiny (pooling, one 1x1
conv and BN): the memory in question is the host's batches, not the model's. Peak RSS is the process's
ru_maxrss; the baseline is the RSS before the pass. Appends a table to
experiments/results/bn_stats_memory.md.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / 'experiments' / 'results' / 'bn_stats_memory.md'
SIZE = 224


def _rss_mb():
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


class SyntheticImageNet:
  """Training batches of uniform noise at ImageNet's crop size, a function of the step."""

  def __init__(self, batch):
    self.batch = batch

  def train_batches(self, start_step, batch_size, seed, process_index=0, process_count=1):
    import numpy as np

    step = start_step
    while True:
      rng = np.random.default_rng([seed, step])
      yield {
        'image': rng.random((batch_size, SIZE, SIZE, 3), dtype=np.float32),
        'label': np.zeros(batch_size, np.int32),
      }
      step += 1


def case(num_batches, batch, listed):
  """One measurement in this process: {'baseline_mb', 'peak_mb', 'seconds'}."""
  import flax.linen as nn
  import jax
  import numpy as np

  from resnet_jax import defaults, exact_bn, models, parallel

  class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      x = nn.avg_pool(x, (8, 8), strides=(8, 8))
      x = nn.Conv(8, (1, 1), use_bias=False)(x)
      x = models.BatchNorm(use_running_average=not train, axis_name=parallel.AXIS)(x)
      return nn.relu(x).mean(axis=(1, 2))

  config = defaults.get_imagenet_config()
  config.train.batch_size = batch
  mesh = parallel.make_mesh(jax.devices()[:1])
  model = Tiny()
  variables = model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32), train=False)
  ds = SyntheticImageNet(batch)
  baseline = _rss_mb()
  start = time.perf_counter()
  batches = exact_bn.training_batches(ds, config, num_batches * batch)
  if listed:  # the previous path: every batch made before the pass
    batches = list(batches)
  stats = exact_bn.recompute(
    model,
    variables['params'],
    variables['batch_stats'],
    parallel.prefetch(batches, mesh, config.data.prefetch),
    mesh,
  )
  jax.block_until_ready(stats)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {'baseline_mb': baseline, 'peak_mb': peak, 'seconds': time.perf_counter() - start}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batches', default='10,100', help='numbers of batches, streamed')
  parser.add_argument('--listed', default='10', help='numbers of batches made first (old path)')
  parser.add_argument('--batch', type=int, default=256)
  parser.add_argument('--case', help=argparse.SUPPRESS)  # 'N:listed' inside the child process
  parser.add_argument('--out', default=str(OUT))
  args = parser.parse_args()
  if args.case:
    n, listed = args.case.split(':')
    print(json.dumps(case(int(n), args.batch, listed == 'listed')))
    return
  cases = [(int(n), 'streamed') for n in args.batches.split(',') if n]
  cases += [(int(n), 'listed') for n in args.listed.split(',') if n]
  rows = []
  batch_mb = args.batch * SIZE * SIZE * 3 * 4 / 2**20
  for n, how in cases:
    out = subprocess.run(
      [sys.executable, __file__, f'--case={n}:{how}', f'--batch={args.batch}'],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, 'JAX_PLATFORMS': os.environ.get('JAX_PLATFORMS', 'cpu')},
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rows.append((n, how, result))
    print(
      f'{n:4d} batches {how:9s} baseline {result["baseline_mb"]:7.0f} MB, peak '
      f'{result["peak_mb"]:7.0f} MB ({result["peak_mb"] - result["baseline_mb"]:+.0f}), '
      f'{result["seconds"]:.0f} s',
      flush=True,
    )
  command = 'python experiments/bn_stats_memory.py ' + ' '.join(sys.argv[1:])
  lines = [
    f'\n## {datetime.date.today()}, {platform.node()}: {os.cpu_count()} CPU cores, load average '
    f'{os.getloadavg()[0]:.1f}\n',
    f'`{command.strip()}`: batches of {args.batch} x {SIZE}x{SIZE}x3 float32 ({batch_mb:.0f} MB each)\n',
    '| batches | batches made | RSS before the pass (MB) | peak RSS (MB) | peak - before (MB) | seconds |',
    '|---:|---|---:|---:|---:|---:|',
  ]
  for n, how, r in rows:
    made = 'as read (streamed)' if how == 'streamed' else 'all first (previous path)'
    lines.append(
      f'| {n} | {made} | {r["baseline_mb"]:.0f} | {r["peak_mb"]:.0f} | '
      f'{r["peak_mb"] - r["baseline_mb"]:.0f} | {r["seconds"]:.0f} |'
    )
  path = pathlib.Path(args.out)
  if not path.exists():
    path.write_text(
      '# Host memory of the exact-BN pass\n\nWritten by experiments/bn_stats_memory.py.\n'
    )
  with open(path, 'a') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
