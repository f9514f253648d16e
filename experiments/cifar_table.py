"""The paper's Table 6 (CIFAR-10 ResNets) from finished runs, beside the paper's numbers.

  python experiments/cifar_table.py [--runs_dir runs] [--out experiments/results/table6.md]
  python experiments/cifar_table.py --launch --seeds 5 [--depths 20 56]   # trains what is missing first

A run is any workdir under --runs_dir whose results.json names config cifar10_<depth>. It counts once it
has all of the config's iterations (64,000) with the recipe of configs/cifar10_<depth>.py (model, optimizer,
batch size, real data, the full test set); shorter runs are listed as partial and runs of another recipe
as not counted. Per depth the table gives best (mean ± std) of the test error over the counted seeds, as
the paper does for ResNet-110.

--launch trains each missing (depth, seed), seeds 0..S-1, one after another (seed by seed, shallow
first), with `python -m resnet_jax.main --config=configs/cifar10_<depth>.py
--workdir=<runs_dir>/cifar10_<depth>_seed<s> --config.seed=<s>`, rewriting the table after each run.
A workdir that is already there is resumed. On CPU this takes days (ResNet-1202 much longer); the point is
that one command does it, anywhere.
"""

import argparse
import datetime
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from resnet_jax import defaults

DEPTHS = (20, 32, 44, 56, 110, 1202)
PAPER = {
  20: '8.75',
  32: '7.51',
  44: '7.17',
  56: '6.97',
  110: '6.43 (6.61 ± 0.16)',
  1202: '7.93',
}  # Table 6
RECIPE = (
  'model',
  'optimizer',
  'train.batch_size',
  'train.num_steps',
  'data.name',
  'data.image_size',
  'data.val_split',
  'data.train_limit',
  'data.eval_limit',
)  # what changes the result


def reference(depth):
  """configs/cifar10_<depth>.py's config as plain JSON values (tuples as lists, like config.json)."""
  config = defaults.load_file(ROOT / 'configs' / f'cifar10_{depth}.py')
  return json.loads(config.to_json_best_effort())


def _read_json(path):
  return json.loads(path.read_text()) if path.exists() else None


def _differences(config, ref):
  """The recipe fields where a run's config.json differs from the reference (fields it lacks are skipped)."""
  diffs = []
  for key in RECIPE:
    section, _, field = key.partition('.')
    fields = [field] if field else sorted(ref[section])
    diffs += [
      f'{section}.{f}'
      for f in fields
      if f in config.get(section, {}) and config[section][f] != ref[section][f]
    ]
  if config.get('data', {}).get('source') == 'synthetic':
    diffs.append('data.source=synthetic')
  return diffs


def _last_logged_step(workdir):
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return 0
  steps = [json.loads(line)['step'] for line in path.read_text().splitlines() if line.strip()]
  return max(steps, default=0)


def classify(workdir):
  """(status, run) with status 'finished' | 'partial' | 'other', or None for a workdir that is no Table 6 run."""
  results, config = _read_json(workdir / 'results.json'), _read_json(workdir / 'config.json')
  name = (results or {}).get('config') or (config or {}).get('name') or ''
  match = re.fullmatch(r'cifar10_(\d+)', name)
  if not match or int(match[1]) not in DEPTHS:
    return None
  depth = int(match[1])
  ref = reference(depth)
  run = {
    'workdir': workdir,
    'name': name,
    'depth': depth,
    'seed': (config or {}).get('seed'),
    'results': results,
    'num_steps': ref['train']['num_steps'],
  }
  run['steps'] = results['steps'] if results else _last_logged_step(workdir)
  if results is None:
    return 'partial', {**run, 'why': 'no results.json: running or interrupted'}
  if run['steps'] < run['num_steps']:
    return 'partial', {**run, 'why': 'ended early: rerun its command to resume it'}
  diffs = ['no config.json'] if config is None else _differences(config, ref)
  if 'test_error' not in results:
    diffs.append('no test_error (evaluated on a validation split)')
  if diffs:
    return 'other', {**run, 'why': 'differs from the recipe: ' + ', '.join(diffs)}
  return 'finished', run


def scan(runs_dir):
  """{'finished': {depth: [run]}, 'partial': [run], 'other': [run]} over the workdirs directly in runs_dir."""
  found = {'finished': {d: [] for d in DEPTHS}, 'partial': [], 'other': []}
  runs_dir = pathlib.Path(runs_dir)
  for workdir in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []:
    status, run = classify(workdir) or (None, None)
    if status == 'finished':
      found['finished'][run['depth']].append(run)
    elif status:
      found[status].append(run)
  return found


def summary(errors):
  """'best (mean ± std)' in %, std over seeds with ddof=1; a single seed gives its error alone."""
  errors = np.asarray(errors)
  if len(errors) == 1:
    return f'{errors[0]:.2f} (1 seed)'
  return f'{errors.min():.2f} ({errors.mean():.2f} ± {errors.std(ddof=1):.2f})'


def _duration(seconds):
  return f'{seconds / 60:.0f} min' if seconds < 3600 else f'{seconds / 3600:.1f} h'


def describe(run):
  r = run['results']
  text = (
    f'seed {run["seed"]}: {100 * r["test_error"]:.2f}%, {r.get("device_kind")} × {r.get("device_count")}, '
    f'{r["steps"]:,} steps, {_duration(r.get("wall_time_s", 0))}'
  )
  if r.get('start_step'):
    text += f' (last session only: resumed at step {r["start_step"]:,})'
  return text


def table(found, runs_dir):
  lines = [
    '# CIFAR-10 ResNets against the paper (Table 6)',
    '',
    f'Written by `python experiments/cifar_table.py` on {datetime.date.today()} from `{runs_dir}`. Test '
    'error (%) of the final model (the last evaluation, on the 10,000 test images) of each run that '
    'finished the recipe of `configs/cifar10_<depth>.py` (64,000 iterations); best (mean ± std) over '
    'seeds, std with ddof=1. The paper gives best (mean ± std) of 5 runs for ResNet-110 and one number '
    'for the others.',
    '',
    '| network | paper error (%) | ours: best (mean ± std) | seeds | runs: seed, error, hardware, steps, '
    'wall time |',
    '|---|---:|---:|---:|---|',
  ]
  for depth, runs in found['finished'].items():
    runs = sorted(runs, key=lambda r: (r['seed'] is None, r['seed'] or 0))
    ours = (
      summary([100 * r['results']['test_error'] for r in runs]) if runs else 'not reproduced yet'
    )
    lines.append(
      f'| ResNet-{depth} | {PAPER[depth]} | {ours} | {len(runs)} | {"; ".join(map(describe, runs))} |'
    )
  for status, title in (
    ('partial', 'Partial runs (not counted)'),
    ('other', 'Other runs (not counted)'),
  ):
    lines += ['', f'## {title}', '']
    lines += [
      f'- `{r["workdir"]}`: {r["name"]} seed {r["seed"]}, {r["steps"]:,} of {r["num_steps"]:,} steps; '
      f'{r["why"]}'
      for r in found[status]
    ] or ['none']
  return '\n'.join(lines) + '\n'


def write_table(runs_dir, out):
  found = scan(runs_dir)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(table(found, runs_dir))
  return found


def missing(found, depths, seeds):
  """(depth, seed) pairs without a counted run, seed by seed and shallow first."""
  have = {(r['depth'], r['seed']) for runs in found['finished'].values() for r in runs}
  return [(d, s) for s in range(seeds) for d in sorted(depths) if (d, s) not in have]


def launch_command(depth, seed, runs_dir):
  return [
    sys.executable,
    '-m',
    'resnet_jax.main',
    f'--config=configs/cifar10_{depth}.py',
    f'--workdir={runs_dir / f"cifar10_{depth}_seed{seed}"}',
    f'--config.seed={seed}',
  ]


def launch(runs_dir, out, depths, seeds):
  for depth, seed in missing(scan(runs_dir), depths, seeds):
    cmd = launch_command(depth, seed, runs_dir)
    print('running', ' '.join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    write_table(runs_dir, out)
    if code:
      sys.exit(
        f'ResNet-{depth} seed {seed} failed (exit code {code}); rerun the same command to resume it.'
      )


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--runs_dir', type=pathlib.Path, default=ROOT / 'runs', help='where the workdirs are'
  )
  parser.add_argument(
    '--out',
    type=pathlib.Path,
    default=ROOT / 'experiments' / 'results' / 'table6.md',
    help='the Markdown table',
  )
  parser.add_argument(
    '--seeds', type=int, default=1, help='with --launch: seeds 0..S-1 of each depth'
  )
  parser.add_argument(
    '--depths',
    type=int,
    nargs='+',
    default=list(DEPTHS),
    choices=DEPTHS,
    help='with --launch: the depths to train',
  )
  parser.add_argument(
    '--launch', action='store_true', help='train the missing runs first (days on CPU)'
  )
  args = parser.parse_args(argv)
  runs_dir = args.runs_dir.resolve()
  if args.launch:
    launch(runs_dir, args.out, args.depths, args.seeds)
  write_table(runs_dir, args.out)
  print(args.out.read_text())


if __name__ == '__main__':
  main()
