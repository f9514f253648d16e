"""The paper's Table 6 (CIFAR-10 ResNets) from finished runs, beside the paper's numbers.

  python experiments/cifar_table.py [--runs_dir runs] [--out experiments/results/table6.md]
  python experiments/cifar_table.py --launch --seeds 5 [--depths 20 56]   # trains what is missing first
  python experiments/cifar_table.py --launch --protocol=paper   # 45k/5k validation runs first

A run is any workdir under --runs_dir whose results.json names config cifar10_<depth>. It counts once it
has all of the config's iterations (64,000) with the recipe of configs/cifar10_<depth>.py (model, optimizer,
batch size, real data, the full test set); shorter runs are listed as partial and runs of another recipe
as not counted. Per depth the table gives best (mean ± std) of the test error over the counted seeds, as
the paper does for ResNet-110, twice: with the moving-average BN statistics training leaves (the
checkpointed model's) and with exact statistics recomputed over training images after training: their
difference says how much the number depends on the BN statistics. Runs whose results.json has
`test_error` alone count, with "—" for the statistics they lack.

The paper chose the CIFAR schedule on a 45k/5k train/val split, then trained on all 50k for Table 6. A
run of the recipe with `data.val_split=5000` is such a validation run: it is reported in its own section
(error on the 5,000 held-out images) and never in Table 6; it chooses nothing, the schedule is the config's.

--launch trains each missing (depth, seed), seeds 0..S-1, one after another (seed by seed, shallow
first), with `python -m resnet_jax.main --config=configs/cifar10_<depth>.py
--workdir=<runs_dir>/cifar10_<depth>_seed<s> --config.seed=<s>`, rewriting the table after each run.
With --protocol=paper it first trains the missing validation runs the same way, in
`<runs_dir>/cifar10_<depth>_val5k_seed<s>` with `--config.data.val_split=5000`, then the 50k runs.
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
from resnet_jax.workdir import Workdir

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
VAL_SPLIT = 5_000  # the paper's 45k/5k split of the 50k training images


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
  path = pathlib.Path(Workdir(workdir).metrics)
  if not path.exists():
    return 0
  steps = [json.loads(line)['step'] for line in path.read_text().splitlines() if line.strip()]
  return max(steps, default=0)


def classify(workdir):
  """(status, run) with status 'finished' | 'partial' | 'other', or None for a workdir that is no Table 6 run."""
  run = Workdir(workdir)
  results, config = _read_json(pathlib.Path(run.results)), _read_json(pathlib.Path(run.config_json))
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
  val_split = (config or {}).get('data', {}).get('val_split', 0)
  run['split'] = 'val' if val_split else 'test'
  run['protocol'] = f'45k/5k validation run (data.val_split={val_split})' if val_split else '50k'
  train_config = (config or {}).get('train', {})
  run['bn_statistics'] = (results or {}).get('bn_statistics') or (
    'exact' if train_config.get('recompute_bn_stats') else 'moving_average'
  )
  if results is None:
    return 'partial', {**run, 'why': 'no results.json: running or interrupted'}
  if run['steps'] < run['num_steps']:
    return 'partial', {**run, 'why': 'ended early: rerun its command to resume it'}
  diffs = ['no config.json'] if config is None else _differences(config, ref)
  status = 'finished'
  if val_split == VAL_SPLIT and diffs == ['data.val_split']:
    status, diffs = 'val', []
  if f'{run["split"]}_error' not in results:
    diffs.append(f'no {run["split"]}_error in results.json')
  if diffs:
    return 'other', {**run, 'why': 'differs from the recipe: ' + ', '.join(diffs)}
  return status, run


def scan(runs_dir):
  """{'finished': {depth: [run]}, 'val': {depth: [run]}, 'partial': [run], 'other': [run]} over the
  workdirs directly in runs_dir."""
  found = {'finished': {d: [] for d in DEPTHS}, 'val': {d: [] for d in DEPTHS}}
  found.update(partial=[], other=[])
  runs_dir = pathlib.Path(runs_dir)
  for workdir in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []:
    status, run = classify(workdir) or (None, None)
    if status in ('finished', 'val'):
      found[status][run['depth']].append(run)
    elif status:
      found[status].append(run)
  return found


def bn_errors(run):
  """(moving-average BN, exact BN) error in % on the run's split; None for one its results.json lacks.

  Results written before both were recorded have `{split}_error` alone, computed with the statistics
  that `bn_statistics` (or, older still, config.json's train.recompute_bn_stats) names.
  """
  results, split = run['results'], run['split']
  moving = results.get(f'{split}_error_moving_average_bn')
  exact = results.get(f'{split}_error_exact_bn')
  if moving is None and exact is None:
    if run['bn_statistics'] == 'exact':
      exact = results[f'{split}_error']
    else:
      moving = results[f'{split}_error']
  return tuple(None if e is None else 100 * e for e in (moving, exact))


def summary(errors):
  """'best (mean ± std)' in %, std over seeds with ddof=1; a single seed gives its error alone."""
  errors = np.asarray(errors)
  if len(errors) == 1:
    return f'{errors[0]:.2f} (1 seed)'
  return f'{errors.min():.2f} ({errors.mean():.2f} ± {errors.std(ddof=1):.2f})'


def summary_cell(errors):
  """summary() over the seeds that have the error; '—' when none has it."""
  known = [e for e in errors if e is not None]
  if not known:
    return '—'
  text = summary(known)
  if len(known) < len(errors):
    text += f'; — for {len(errors) - len(known)} of {len(errors)} seeds'
  return text


def _percent(error):
  return '—' if error is None else f'{error:.2f}%'


def _duration(seconds):
  return f'{seconds / 60:.0f} min' if seconds < 3600 else f'{seconds / 3600:.1f} h'


def describe(run):
  r = run['results']
  moving, exact = bn_errors(run)
  text = (
    f'seed {run["seed"]}: {_percent(moving)} / {_percent(exact)}, {r.get("device_kind")} × '
    f'{r.get("device_count")}, {r["steps"]:,} steps, {_duration(r.get("wall_time_s", 0))}'
  )
  if r.get('start_step'):
    text += f' (last session only: resumed at step {r["start_step"]:,})'
  return text


def _by_seed(runs):
  return sorted(runs, key=lambda r: (r['seed'] is None, r['seed'] or 0))


def _row(runs):
  """The cells of one depth: both errors' best (mean ± std), the seed count, each run."""
  errors = [bn_errors(r) for r in runs]
  moving = summary_cell([e[0] for e in errors])
  exact = summary_cell([e[1] for e in errors])
  return f'{moving} | {exact} | {len(runs)} | {"; ".join(map(describe, runs))} |'


RUNS_HEADER = (
  'seeds | runs: seed, error with moving-average / exact BN statistics, hardware, steps, '
  'wall time |'
)


def table(found, runs_dir):
  lines = [
    '# CIFAR-10 ResNets against the paper (Table 6)',
    '',
    f'Written by `python experiments/cifar_table.py` on {datetime.date.today()} from `{runs_dir}`. Test '
    'error (%) of the final model (the last evaluation, on the 10,000 test images) of each run that '
    'finished the recipe of `configs/cifar10_<depth>.py` (64,000 iterations, all 50,000 training images); '
    'best (mean ± std) over seeds, std with ddof=1. The paper gives best (mean ± std) of 5 runs for '
    'ResNet-110 and one number for the others. Each run is evaluated twice: with the moving-average BN '
    'statistics training leaves (the checkpointed model) and with exact statistics recomputed over '
    '`train.bn_stats_images` training images after training; "—" where a run\'s results.json predates '
    'the second.',
    '',
    '| network | paper error (%) | ours, moving-average BN: best (mean ± std) | ours, exact BN: best '
    f'(mean ± std) | {RUNS_HEADER}',
    '|---|---:|---:|---:|---:|---|',
  ]
  for depth, runs in found['finished'].items():
    cells = _row(_by_seed(runs)) if runs else 'not reproduced yet | | 0 | |'
    lines.append(f'| ResNet-{depth} | {PAPER[depth]} | {cells}')
  lines += [
    '',
    '## 45k/5k validation runs (not in Table 6)',
    '',
    f'The paper chose the schedule on 45,000 training images, evaluated on the other {VAL_SPLIT:,}, then '
    'trained on all 50,000 for Table 6. These are the runs of the same recipe with '
    f'`data.val_split={VAL_SPLIT}` (`--protocol=paper`): their error is on the held-out training images, '
    "not the test set, and they choose nothing here (the schedule is the config's).",
    '',
  ]
  val_runs = {depth: _by_seed(runs) for depth, runs in found['val'].items() if runs}
  if val_runs:
    lines += [
      '| network | val error, moving-average BN: best (mean ± std) | val error, exact BN: best (mean ± '
      f'std) | {RUNS_HEADER}',
      '|---|---:|---:|---:|---|',
    ]
    lines += [f'| ResNet-{depth} | {_row(runs)}' for depth, runs in val_runs.items()]
  else:
    lines.append('none')
  for status, title in (
    ('partial', 'Partial runs (not counted)'),
    ('other', 'Other runs (not counted)'),
  ):
    lines += ['', f'## {title}', '']
    lines += [
      f'- `{r["workdir"]}`: {r["name"]} seed {r["seed"]} ({r["protocol"]}), {r["steps"]:,} of '
      f'{r["num_steps"]:,} steps; {r["why"]}'
      for r in found[status]
    ] or ['none']
  return '\n'.join(lines) + '\n'


def write_table(runs_dir, out):
  found = scan(runs_dir)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(table(found, runs_dir))
  return found


def missing(found, depths, seeds, status='finished'):
  """(depth, seed) pairs without a counted run of `status` ('finished' or 'val'), seed by seed and
  shallow first."""
  have = {(r['depth'], r['seed']) for runs in found[status].values() for r in runs}
  return [(d, s) for s in range(seeds) for d in sorted(depths) if (d, s) not in have]


def launch_command(depth, seed, runs_dir, val_split=0):
  """The training command of one run; val_split > 0: a validation run, in a workdir of its own."""
  name = (
    f'cifar10_{depth}_val{val_split // 1000}k_seed{seed}'
    if val_split
    else f'cifar10_{depth}_seed{seed}'
  )
  cmd = [
    sys.executable,
    '-m',
    'resnet_jax.main',
    f'--config=configs/cifar10_{depth}.py',
    f'--workdir={runs_dir / name}',
    f'--config.seed={seed}',
  ]
  return cmd + [f'--config.data.val_split={val_split}'] if val_split else cmd


def launch(runs_dir, out, depths, seeds, protocol='50k'):
  """Trains the missing runs one after another; protocol 'paper': the 45k/5k validation runs first."""
  found = scan(runs_dir)
  jobs = (
    [(d, s, VAL_SPLIT) for d, s in missing(found, depths, seeds, 'val')]
    if protocol == 'paper'
    else []
  )
  jobs += [(d, s, 0) for d, s in missing(found, depths, seeds)]
  for depth, seed, val_split in jobs:
    cmd = launch_command(depth, seed, runs_dir, val_split)
    print('running', ' '.join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    write_table(runs_dir, out)
    if code:
      what = f'ResNet-{depth} seed {seed}' + (' (45k/5k validation run)' if val_split else '')
      sys.exit(f'{what} failed (exit code {code}); rerun the same command to resume it.')


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
  parser.add_argument(
    '--protocol',
    choices=('50k', 'paper'),
    default='50k',
    help='with --launch: 50k trains the Table 6 runs; paper first trains 45k/5k validation runs',
  )
  args = parser.parse_args(argv)
  runs_dir = args.runs_dir.resolve()
  if args.launch:
    launch(runs_dir, args.out, args.depths, args.seeds, args.protocol)
  write_table(runs_dir, args.out)
  print(args.out.read_text())


if __name__ == '__main__':
  main()
