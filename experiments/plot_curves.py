"""Training curves in the style of the paper's Figs. 1 and 6: error (%) against iterations, one colour per
run, training error dashed and thin, test error solid and bold.

  python experiments/plot_curves.py --workdirs runs/cifar10_plain20 runs/cifar10_plain56 --out fig1.png

Reads only each workdir's metrics.jsonl, so it also plots runs that are still training.
"""

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from resnet_jax.workdir import Workdir  # noqa: E402

EVAL_SPLITS = ('test', 'val')  # a run evaluates on one of them (val with data.val_split > 0)


def _rows(workdir):
  with open(Workdir(workdir).metrics) as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(rows, splits):
  """(steps, errors in %) sorted by step; a step logged twice (a resumed run re-logs it) keeps its last row."""
  by_step = {row['step']: 100 * row['error'] for row in rows if row['split'] in splits}
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def run_name(workdir):
  """The config's name from config.json, else the workdir's basename."""
  path = pathlib.Path(Workdir(workdir).config_json)
  if path.exists():
    return json.loads(path.read_text()).get('name') or path.parent.name
  return pathlib.Path(workdir).name


def read_curves(workdir):
  """{'train': (steps, errors), 'test': (steps, errors), 'eval_split', 'name'}: errors in %, as plotted;
  'test' holds the evaluation curve, on the test set or, with data.val_split, held-out training images."""
  rows = _rows(workdir)
  splits = {r['split'] for r in rows}
  return {
    'train': _series(rows, ('train',)),
    'test': _series(rows, EVAL_SPLITS),
    'eval_split': 'val' if 'val' in splits else 'test',
    'name': run_name(workdir),
  }


def plot(curves, labels, out, ymax=None):
  fig, ax = plt.subplots(figsize=(6, 4.5))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (c, label) in enumerate(zip(curves, labels)):
    colour = colours[i % len(colours)]
    ax.plot(*c['train'], '--', color=colour, linewidth=0.8)
    ax.plot(*c['test'], '-', color=colour, linewidth=2.2, label=label)
  ax.set_xlabel('iterations')
  ax.set_ylabel('error (%)')
  ax.set_ylim(0, ymax)
  held_out = {c.get('eval_split', 'test') for c in curves} == {'val'}
  evaluation = 'held-out (val) error' if held_out else 'test error'
  ax.set_title(f'dashed: training error, bold: {evaluation}', fontsize=9)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=150)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--workdirs', nargs='+', required=True, help='training workdirs (metrics.jsonl)'
  )
  parser.add_argument('--out', required=True, help='the figure, e.g. fig6.png')
  parser.add_argument(
    '--labels', nargs='+', help='legend entries, one per workdir (default: config names)'
  )
  parser.add_argument(
    '--ymax', type=float, help='top of the error axis in %% (the paper: 20 for Fig. 6)'
  )
  args = parser.parse_args(argv)
  if args.labels and len(args.labels) != len(args.workdirs):
    parser.error(f'--labels has {len(args.labels)} entries for {len(args.workdirs)} workdirs')
  curves = [read_curves(w) for w in args.workdirs]
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  plot(curves, args.labels or [c['name'] for c in curves], args.out, args.ymax)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
