"""The analysis scripts in experiments/ on two tiny real runs (a ResNet-8 and its plain twin) and fake run dirs."""

import json
import pathlib
import sys

import helpers
import jax
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from resnet_jax import data, defaults, models, train
from resnet_jax.data import in_memory

sys.path.insert(0, str(REPO))  # experiments/ is no installed package
from experiments import cifar_table, layer_responses, plot_curves, table1

# Two eval batches of 48: the second one is two-thirds padding, which must not count.
NUM_IMAGES = 64


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{'resnet8': workdir, 'plain8': workdir}: 6 steps each, logged every step, evaluated every 3."""
  out = {}
  for name, residual in (('resnet8', True), ('plain8', False)):
    config = helpers.small_run(train__log_every_steps=1, model__residual=residual)
    config.name = name
    out[name] = tmp_path_factory.mktemp(name)
    train.train_and_evaluate(config, str(out[name]))
  return out


def assert_drawn(png):
  """A decodable figure with lines and text on it, not an empty canvas."""
  image = np.asarray(Image.open(png).convert('RGB'))
  assert image.shape[0] > 200 and image.shape[1] > 200
  assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20


def file_rows(workdir, splits):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [(r['step'], 100 * r['error']) for r in rows if r['split'] in splits]


@pytest.mark.slow
def test_plot_curves_plots_the_logged_errors(runs, tmp_path):
  out = tmp_path / 'fig6.png'
  plot_curves.main(['--workdirs', str(runs['plain8']), str(runs['resnet8']), '--out', str(out)])
  assert_drawn(out)
  for name, workdir in runs.items():
    curves = plot_curves.read_curves(workdir)
    assert curves['name'] == name
    for split, splits in (('train', ('train',)), ('test', ('test',))):
      rows = file_rows(workdir, splits)
      assert len(rows) == (6 if split == 'train' else 2)
      assert list(zip(*curves[split])) == rows


def independent_stds(workdir, config, num_images):
  """The statistic from the intermediates of one forward pass over the images, reduced in NumPy."""
  ds = data.load(config.data, config.seed)
  _, state = helpers.final_params(workdir)
  variables = jax.tree.map(
    np.asarray, {'params': state['params'], 'batch_stats': state['batch_stats']}
  )
  images = in_memory.preprocess_eval(ds.eval_images[:num_images], ds.mean_image)
  _, sown = models.create(config.model).apply(
    variables, images, train=False, mutable=['intermediates']
  )
  responses = [
    np.asarray(y, np.float64)
    for block in sown['intermediates'].values()
    for y in block['responses']
  ]
  return np.array([y.reshape(-1, y.shape[-1]).std(axis=0).mean() for y in responses])


@pytest.mark.slow
def test_layer_responses_match_numpy(runs, tmp_path):
  out = tmp_path / 'fig7.png'
  layer_responses.main(
    [
      '--workdir',
      str(runs['plain8']),
      '--workdir',
      str(runs['resnet8']),
      '--out',
      str(out),
      '--num_images',
      str(NUM_IMAGES),
      '--batch_size',
      '48',
    ]
  )
  assert_drawn(out)
  written = json.loads((tmp_path / 'fig7.png.json').read_text())
  assert sorted(written) == ['plain8', 'resnet8']
  assert all(len(s) == 6 for s in written.values())  # ResNet-8: 3 blocks of two 3x3 layers
  expected = independent_stds(runs['plain8'], helpers.small_run(model__residual=False), NUM_IMAGES)
  np.testing.assert_allclose(written['plain8'], expected, rtol=1e-4)
  assert not np.allclose(written['plain8'], written['resnet8'])  # each run's own checkpoint


def write_run(runs_dir, name, steps, error, seed=0, exact_error=None, depth=20, **config_overrides):
  """A workdir as a finished (or stopped) cifar10_<depth> run leaves it, without checkpoints.

  exact_error None: a results.json from before the exact-BN error was recorded (`{split}_error` alone).
  """
  config_name = f'cifar10_{depth}'
  config = json.loads(
    defaults.load_file(REPO / 'configs' / f'{config_name}.py').to_json_best_effort()
  )
  config['seed'] = seed
  for key, value in config_overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  split = 'val' if config['data']['val_split'] else 'test'
  results = {
    'config': config_name,
    f'{split}_error': error,
    f'{split}_loss': 0.3,
    'steps': steps,
    'wall_time_s': 7200.0,
    'start_step': 0,
    'device_kind': 'NVIDIA H100',
    'device_count': 1,
    'platform': 'gpu',
  }
  if exact_error is not None:
    results.update(
      {
        'bn_statistics': 'moving_average',
        f'{split}_error_moving_average_bn': error,
        f'{split}_error_exact_bn': exact_error,
        'exact_bn_images': 10_000,
      }
    )
  workdir = runs_dir / name
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(config))
  (workdir / 'results.json').write_text(json.dumps(results))


def fake_runs_dir(tmp_path):
  runs_dir = tmp_path / 'runs'
  runs_dir.mkdir()
  write_run(runs_dir, 'seed0', 64_000, 0.0900, exact_error=0.0880)
  write_run(runs_dir, 'seed1', 64_000, 0.0850, seed=1)  # results.json without the exact-BN error
  write_run(runs_dir, 'short', 2_000, 0.0500)  # partial: must not count
  write_run(
    runs_dir, 'synthetic', 64_000, 0.0100, data__source='synthetic'
  )  # another recipe: must not count
  return runs_dir


def table_rows(text):
  """{'ResNet-20': row, ...} of the table before text's first '## ' section (Table 6 in the file)."""
  rows = {}
  for line in text.split('\n## ')[0].splitlines():
    if line.startswith('| ResNet-'):
      rows[line.split(' | ')[0].lstrip('| ')] = line
  return rows


def test_cifar_table(tmp_path):
  runs_dir, out = fake_runs_dir(tmp_path), tmp_path / 'table6.md'
  cifar_table.main(['--runs_dir', str(runs_dir), '--out', str(out)])
  rows = table_rows(out.read_text())
  assert sorted(rows, key=lambda n: int(n.split('-')[1])) == [
    f'ResNet-{d}' for d in cifar_table.DEPTHS
  ]
  # moving-average BN errors 9.00 and 8.50: best 8.50, mean 8.75, sample std 0.35; the exact-BN
  # error only of seed 0 (8.80), seed 1's results.json predates it.
  assert '| 8.50 (8.75 ± 0.35) | 8.80 (1 seed); — for 1 of 2 seeds | 2 |' in rows['ResNet-20']
  assert 'seed 0: 9.00% / 8.80%' in rows['ResNet-20'] and 'seed 1: 8.50% / —' in rows['ResNet-20']
  assert 'NVIDIA H100 × 1' in rows['ResNet-20'] and '2.0 h' in rows['ResNet-20']
  assert all('not reproduced yet' in row for name, row in rows.items() if name != 'ResNet-20')
  text = out.read_text()
  assert '2,000 of 64,000 steps' in text and 'data.source=synthetic' in text
  assert '## 45k/5k validation runs (not in Table 6)\n\nThe paper' in text and '\nnone\n' in text


def test_cifar_table_reports_validation_runs_apart(tmp_path):
  runs_dir, out = fake_runs_dir(tmp_path), tmp_path / 'table6.md'
  write_run(runs_dir, 'val0', 64_000, 0.1000, exact_error=0.0960, data__val_split=5000)
  write_run(runs_dir, 'val1', 64_000, 0.0900, seed=1, exact_error=0.0940, data__val_split=5000)
  write_run(runs_dir, 'val_short', 30_000, 0.0700, seed=2, data__val_split=5000)  # partial
  write_run(runs_dir, 'val1k', 64_000, 0.0500, data__val_split=1000)  # another split: not counted
  cifar_table.main(['--runs_dir', str(runs_dir), '--out', str(out)])
  text = out.read_text()
  # Table 6 counts the two 50k runs only
  assert '| 8.50 (8.75 ± 0.35) |' in table_rows(text)['ResNet-20']
  val_section = text.split('## 45k/5k validation runs')[1].split('\n## ')[0]
  # moving-average BN 10.00 and 9.00: best 9.00, mean 9.50, std 0.71; exact 9.60 and 9.40: 9.40, 9.50, 0.14
  assert table_rows(val_section) == {
    'ResNet-20': '| ResNet-20 | 9.00 (9.50 ± 0.71) | 9.40 (9.50 ± 0.14) | 2 | '
    'seed 0: 10.00% / 9.60%, NVIDIA H100 × 1, 64,000 steps, 2.0 h; '
    'seed 1: 9.00% / 9.40%, NVIDIA H100 × 1, 64,000 steps, 2.0 h |'
  }
  partial = text.split('## Partial runs')[1].split('\n## ')[0]
  assert 'seed 2 (45k/5k validation run (data.val_split=5000)), 30,000 of 64,000 steps' in partial
  other = text.split('## Other runs')[1]
  assert '`' + str(runs_dir / 'val1k') + '`' in other and 'data.val_split' in other


def test_cifar_table_launches_only_missing_runs(tmp_path, monkeypatch):
  runs_dir, calls = fake_runs_dir(tmp_path), []

  def fake_run(cmd, **kwargs):
    del kwargs
    calls.append(cmd)
    return cifar_table.subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(cifar_table.subprocess, 'run', fake_run)
  cifar_table.main(
    [
      '--runs_dir',
      str(runs_dir),
      '--out',
      str(tmp_path / 't.md'),
      '--launch',
      '--seeds',
      '3',
      '--depths',
      '20',
      '32',
    ]
  )
  launched = [tuple([c[3], c[4].rsplit('/', 1)[1], *c[5:]]) for c in calls]
  assert launched == [
    ('--config=configs/cifar10_32.py', 'cifar10_32_seed0', '--config.seed=0'),
    ('--config=configs/cifar10_32.py', 'cifar10_32_seed1', '--config.seed=1'),
    ('--config=configs/cifar10_20.py', 'cifar10_20_seed2', '--config.seed=2'),
    ('--config=configs/cifar10_32.py', 'cifar10_32_seed2', '--config.seed=2'),
  ]


def test_cifar_table_paper_protocol_launches_validation_runs_then_50k_runs(tmp_path, monkeypatch):
  """--protocol=paper end to end, each launched command leaving a finished run as training would."""
  runs_dir, out, calls = fake_runs_dir(tmp_path), tmp_path / 't.md', []
  write_run(runs_dir, 'cifar10_20_val5k_seed0', 64_000, 0.1000, data__val_split=5000)
  flags = ('--config=configs/cifar10_', '--workdir=', '--config.seed=', '--config.data.val_split=')

  def fake_run(cmd, **kwargs):
    del kwargs
    calls.append(cmd)
    args = {flag: arg[len(flag) :] for arg in cmd for flag in flags if arg.startswith(flag)}
    workdir = pathlib.Path(args['--workdir='])
    overrides = {'data__val_split': int(args['--config.data.val_split='])} if len(args) == 4 else {}
    write_run(
      workdir.parent,
      workdir.name,
      64_000,
      0.0700 + 0.001 * len(calls),
      seed=int(args['--config.seed=']),
      exact_error=0.0600,
      depth=int(args['--config=configs/cifar10_'].removesuffix('.py')),
      **overrides,
    )
    return cifar_table.subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(cifar_table.subprocess, 'run', fake_run)
  argv = ['--runs_dir', str(runs_dir), '--out', str(out), '--seeds', '2', '--depths', '20', '32']
  cifar_table.main(argv + ['--launch', '--protocol=paper'])
  launched = [tuple([c[3], c[4].rsplit('/', 1)[1], *c[5:]]) for c in calls]
  assert launched == [
    (
      '--config=configs/cifar10_32.py',
      'cifar10_32_val5k_seed0',
      '--config.seed=0',
      '--config.data.val_split=5000',
    ),
    (
      '--config=configs/cifar10_20.py',
      'cifar10_20_val5k_seed1',
      '--config.seed=1',
      '--config.data.val_split=5000',
    ),
    (
      '--config=configs/cifar10_32.py',
      'cifar10_32_val5k_seed1',
      '--config.seed=1',
      '--config.data.val_split=5000',
    ),
    ('--config=configs/cifar10_32.py', 'cifar10_32_seed0', '--config.seed=0'),
    ('--config=configs/cifar10_32.py', 'cifar10_32_seed1', '--config.seed=1'),
  ]
  text = out.read_text()
  val_section = text.split('## 45k/5k validation runs')[1].split('\n## ')[0]
  assert sorted(table_rows(val_section)) == ['ResNet-20', 'ResNet-32']
  # val errors of ResNet-32: 7.10 and 7.30 (the first and third launch), best 7.10, mean 7.20, std 0.14
  assert '| ResNet-32 | 7.10 (7.20 ± 0.14) | 6.00 (6.00 ± 0.00) | 2 |' in val_section
  assert '| 7.40 (7.45 ± 0.07) | 6.00 (6.00 ± 0.00) | 2 |' in table_rows(text)['ResNet-32']
  assert 'val5k' not in text.split('## Partial runs')[1]  # every launched run finished
  calls.clear()
  cifar_table.main(argv + ['--launch', '--protocol=paper'])  # everything is there now
  assert calls == []


@pytest.mark.slow
def test_table1_script_reproduces_the_committed_table():
  assert table1.render() == table1.OUT.read_text()
