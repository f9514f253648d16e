"""The degradation problem in miniature: plain-20/56 and ResNet-20/56 on a compressed schedule, then the
paper's Figs. 1, 6 (left, middle) and 7 from those runs.

  python experiments/degradation.py --image_folder ../shared/data/cifar10-jpg.tar.gz

Each net is one ordinary run of `resnet_jax.main` (the paper's recipe: batch 128, lr 0.1, momentum 0.9,
weight decay 1e-4, pad-crop-flip) shortened to --epochs, with the lr divided by 10 at half and three
quarters of the run (after epochs 2 and 3 of 4), in its own workdir under --runs_dir. Rerunning the same
command resumes an interrupted net and skips finished ones; the figures and the table are drawn from
whatever has finished.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'experiments'))

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from resnet_jax.workdir import Workdir  # noqa: E402

NETS = {  # label -> config file, in the order they are trained (shortest first)
  'plain-20': 'configs/cifar10_plain20.py',
  'ResNet-20': 'configs/cifar10_20.py',
  'plain-56': 'configs/cifar10_plain56.py',
  'ResNet-56': 'configs/cifar10_56.py',
}
TRAIN_IMAGES = 50_000
BATCH = 128


def workdir(runs_dir, label):
  return pathlib.Path(runs_dir) / label.lower().replace('-', '')


def train_command(config_file, workdir_path, image_folder, epochs, seed, evals_per_epoch):
  steps_per_epoch = TRAIN_IMAGES // BATCH  # the loader drops the remainder each epoch
  eval_every = steps_per_epoch // evals_per_epoch
  return [
    sys.executable,
    '-m',
    'resnet_jax.main',
    f'--config={config_file}',
    f'--workdir={workdir_path}',
    f'--config.seed={seed}',
    '--config.data.source=image_folder',
    f'--config.data.image_folder={image_folder}',
    f'--config.train.batch_size={BATCH}',
    f'--config.train.num_steps={epochs * steps_per_epoch}',
    '--config.optimizer.boundaries_at=fractions',
    '--config.optimizer.boundary_fractions=(0.5,0.75)',
    f'--config.train.eval_every_steps={eval_every}',
    f'--config.train.checkpoint_every_steps={eval_every}',
    f'--config.train.log_every_steps={max(1, eval_every // 5)}',
  ]


def train_all(args):
  for label in args.nets:
    config_file = NETS[label]
    path = workdir(args.runs_dir, label)
    if pathlib.Path(Workdir(path).results).exists():
      print(f'{label}: finished earlier ({path})', flush=True)
      continue
    cmd = train_command(
      config_file, path, args.image_folder, args.epochs, args.seed, args.evals_per_epoch
    )
    print(f'{label}: {" ".join(cmd[1:])}', flush=True)
    start = time.time()
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    if code:
      sys.exit(f'{label} stopped with exit code {code}; rerun the same command to resume it.')
    print(f'{label}: done in {(time.time() - start) / 60:.1f} min', flush=True)


def finished(runs_dir):
  """{label: workdir} of the nets whose results.json exists, in NETS order."""
  found = {label: workdir(runs_dir, label) for label in NETS}
  return {
    label: path for label, path in found.items() if pathlib.Path(Workdir(path).results).exists()
  }


def _save(fig, out_stem):
  for ext in ('png', 'svg'):
    fig.savefig(f'{out_stem}.{ext}', dpi=150)
  plt.close(fig)


def draw_fig1(curves, out_stem):
  """Fig. 1: training error (left) and test error (right) of plain-20 and plain-56."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for label in ('plain-20', 'plain-56'):
    if label in curves:
      left.plot(*curves[label]['train'], label=label)
      right.plot(*curves[label]['test'], label=label, linewidth=2)
  for ax, title in ((left, 'training error'), (right, 'test error')):
    ax.set_title(title)
    ax.set_xlabel('iterations')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a net that has not finished leaves its panel empty
      ax.legend()
  left.set_ylabel('error (%)')
  left.set_ylim(0, None)
  fig.tight_layout()
  _save(fig, out_stem)


def draw_fig6(curves, out_stem):
  """Fig. 6 left (plain) and middle (ResNet): training error dashed, test error bold."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  panels = ((axes[0], ('plain-20', 'plain-56')), (axes[1], ('ResNet-20', 'ResNet-56')))
  for ax, labels in panels:
    for colour, label in zip(('tab:orange', 'tab:red'), labels):
      if label in curves:
        ax.plot(*curves[label]['train'], '--', color=colour, linewidth=0.8)
        ax.plot(*curves[label]['test'], '-', color=colour, linewidth=2.2, label=label)
    ax.set_xlabel('iterations')
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a net that has not finished leaves its panel empty
      ax.legend()
  axes[0].set_ylabel('error (%)')
  axes[0].set_ylim(0, None)
  fig.suptitle('dashed: training error, bold: test error', fontsize=9)
  fig.tight_layout()
  _save(fig, out_stem)


def table(runs, curves):
  """Markdown rows: final training error (last logged window), test error, wall time, per net."""
  rows = [
    '| net | iterations | training error (last window) | test error | wall time |',
    '|---|---:|---:|---:|---:|',
  ]
  for label, path in runs.items():
    results = json.loads(pathlib.Path(Workdir(path).results).read_text())
    train_error = curves[label]['train'][1][-1]
    rows.append(
      f'| {label} | {results["steps"]:,} | {train_error:.2f}% | '
      f'{100 * results["test_error"]:.2f}% | {results["wall_time_s"] / 60:.1f} min |'
    )
  return '\n'.join(rows)


def draw_all(args):
  import layer_responses
  import plot_curves

  runs = finished(args.runs_dir)
  if not runs:
    sys.exit(f'no finished run under {args.runs_dir}; train first.')
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  curves = {label: plot_curves.read_curves(path) for label, path in runs.items()}
  draw_fig1(curves, out / 'fig1')
  draw_fig6(curves, out / 'fig6')
  stds = {
    label: layer_responses.layer_stds(str(path), args.num_images) for label, path in runs.items()
  }
  for ext in ('png', 'svg'):
    layer_responses.plot(stds, out / f'fig7.{ext}')
  (out / 'fig7.json').write_text(json.dumps({k: v.tolist() for k, v in stds.items()}, indent=1))
  (out / 'table.md').write_text(table(runs, curves) + '\n')
  print(table(runs, curves))
  print(f'wrote fig1, fig6, fig7 (.png, .svg), fig7.json and table.md in {out}')


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--image_folder', help='CIFAR-10 as a train/ and test/ tree or a .tar.gz of one (training)'
  )
  parser.add_argument('--runs_dir', default='runs/degradation', help='one workdir per net')
  parser.add_argument('--out', default='experiments/results/degradation', help='figures, table')
  parser.add_argument('--epochs', type=int, default=4)
  parser.add_argument('--evals_per_epoch', type=int, default=2, help='test-error points per epoch')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num_images', type=int, default=1000, help="Fig. 7's test images")
  parser.add_argument(
    '--nets',
    default=','.join(NETS),
    help='comma-separated subset to train (two commands with different subsets share the cores)',
  )
  parser.add_argument('--plot_only', action='store_true', help='draw from the finished runs only')
  args = parser.parse_args(argv)
  args.nets = [label.strip() for label in args.nets.split(',') if label.strip()]
  unknown = [label for label in args.nets if label not in NETS]
  if unknown:
    parser.error(f'--nets names {unknown}; choose from {list(NETS)}')
  if not args.plot_only:
    if not args.image_folder:
      parser.error('--image_folder is needed to train (or pass --plot_only)')
    train_all(args)
  draw_all(args)


if __name__ == '__main__':
  main()
