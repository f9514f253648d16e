"""ResNet-1202's first steps on the CPU at a warm-up lr against 0.1: the evidence for configs/cifar10_1202.py.

Each run is the config's own recipe (scanned, recomputed blocks; the warm-up held at its lr) for --steps
steps at batch 8 on one device, on synthetic images: either the same 8 images every step (--limits=8) or
batches drawn from 256 (--limits=256). It reports the first loss, the peak, and the last ten steps' lowest
and median, and writes experiments/results/resnet1202_start.md.

  python experiments/resnet1202_start.py --steps=40 --lrs=0.01,0.1 --seeds=0,1,2
"""

import argparse
import json
import pathlib
import sys
import tempfile

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from resnet_jax import defaults, parallel, train  # noqa: E402
from resnet_jax.workdir import Workdir  # noqa: E402

RESULTS = REPO / 'experiments' / 'results' / 'resnet1202_start.md'


def run(steps, lr, seed, limit, workdir):
  """The training losses of one run of the config's recipe with the warm-up held at `lr`."""
  config = defaults.load_file(REPO / 'configs' / 'cifar10_1202.py')
  config.seed = seed
  config.optimizer.warmup_learning_rate = lr
  config.optimizer.warmup_error = 0.0  # hold the warm-up: a batch of 8 can fall below 80% by chance
  config.data.update(source='synthetic', train_limit=limit, eval_limit=8)
  config.train.update(
    batch_size=8,
    eval_batch_size=8,
    num_steps=steps,
    log_every_steps=1,
    eval_every_steps=steps,
    checkpoint_every_steps=steps,
    bn_stats_images=8,
  )
  train.train_and_evaluate(config, workdir, mesh=parallel.make_mesh(jax.devices()[:1]))
  rows = [
    json.loads(line) for line in pathlib.Path(Workdir(workdir).metrics).read_text().splitlines()
  ]
  return [(r['loss'], r['error']) for r in rows if r['split'] == 'train']


def row(limit, lr, seed, history):
  losses = np.array([loss for loss, _ in history])
  errors = [error for _, error in history]
  last = losses[-10:]
  return (
    f'| {limit} | {lr:g} | {seed} | {losses[0]:.2f} | {losses.max():.3g} ({losses.max() / losses[0]:.3g}x) '
    f'| {last.min():.3g} ({last.min() / losses[0]:.2f}) | {np.median(last):.3g} '
    f'| {min(errors[-10:]):.3f}-{max(errors[-10:]):.3f} |'
  )


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--lrs', default='0.01,0.1', help='warm-up lrs, comma-separated')
  parser.add_argument(
    '--seeds', default='0,1,2', help='seeds for the first lr; the others get the first'
  )
  parser.add_argument('--limits', default='8,256', help='training images the batches come from')
  parser.add_argument('--out', default=str(RESULTS))
  args = parser.parse_args(argv)
  lrs = [float(v) for v in args.lrs.split(',')]
  seeds = [int(v) for v in args.seeds.split(',')]
  lines = [
    '# ResNet-1202: the first steps at the warm-up lr and at 0.1 (CPU)',
    '',
    f'`python experiments/resnet1202_start.py --steps={args.steps} --lrs={args.lrs} --seeds={args.seeds} '
    f'--limits={args.limits}`: configs/cifar10_1202.py (scanned, recomputed blocks), batch 8 on one CPU '
    'device, synthetic images, the warm-up held. "Last ten": steps '
    f'{args.steps - 9}-{args.steps}; their lowest loss is also given as a fraction of the first.',
    '',
    '| images | lr | seed | first loss | peak | last ten: lowest | last ten: median | last ten: error |',
    '|---:|---:|---:|---:|---:|---:|---:|---|',
  ]
  for limit in (int(v) for v in args.limits.split(',')):
    for lr in lrs:
      for seed in seeds if lr == lrs[0] else seeds[:1]:
        with tempfile.TemporaryDirectory() as workdir:
          lines.append(row(limit, lr, seed, run(args.steps, lr, seed, limit, workdir)))
        print(lines[-1], flush=True)
  lines.append('')
  pathlib.Path(args.out).write_text('\n'.join(lines))
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
