"""experiments/device_check.py's dry run, end to end, as on the device machine: TensorFlow unimportable."""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
from conftest import REPO
from PIL import Image

STAGES = ('env', 'bench', 'start', 'train', 'input')


def fake_archives(root):
  """A CIFAR-layout JPEG archive (3 classes, 32x32) and an ImageNet-layout one (2 classes, larger)."""
  rng = np.random.default_rng(0)
  for split, count in (('train', 4), ('test', 2)):
    for c in ('cat', 'dog', 'emu'):
      os.makedirs(root / 'cifar' / split / c)
      for i in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / 'cifar' / split / c / f'{i}.jpg')
  for c in ('a', 'b'):
    os.makedirs(root / 'sample' / 'val' / c)
    for i in range(2):
      pixels = rng.integers(0, 256, (300 + 40 * i, 400, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / 'sample' / 'val' / c / f'{i}.JPEG')
  for name in ('cifar', 'sample'):
    with tarfile.open(root / f'{name}.tar.gz', 'w:gz') as f:
      f.add(root / name, arcname=name)
  return root / 'cifar.tar.gz', root / 'sample.tar.gz'


def test_dry_run_writes_every_stage(tmp_path):
  cifar, sample = fake_archives(tmp_path)
  blocker = tmp_path / 'site'  # the device machine has no TensorFlow: importing it fails there
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text(
    "import sys\nsys.modules['tensorflow'] = None\nsys.modules['tensorflow_datasets'] = None\n"
  )
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
    filter(None, [str(blocker), str(REPO), env.get('PYTHONPATH')])
  )
  out = tmp_path / 'out'
  command = [
    sys.executable,
    'experiments/device_check.py',
    '--dry-run',
    f'--out={out}',
    f'--cifar={cifar}',
    f'--imagenet={sample}',
  ]
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]

  report = json.loads((out / 'device_check.json').read_text())
  stages = {s['stage']: s for s in report['stages']}
  assert tuple(stages) == STAGES
  assert all(s['status'] == 'ok' for s in stages.values()), [
    (s['stage'], s['status'], s['notes']) for s in report['stages']
  ]
  env_info = stages['env']['env']
  assert env_info['importable']['tensorflow'] is False and env_info['backend'] == 'cpu'
  frameworks = {r['framework'] for r in stages['bench']['results']}
  assert frameworks == {'JAX (ours)', 'PyTorch (twin)'}
  assert all(r['images_per_s'] > 0 for r in stages['bench']['results'])
  (start,) = stages['start']['results']
  assert start['model'] == 'cifar8' and start['loss_finite']
  assert start['time_to_first_step_s'] >= start['init_s'] > 0
  train = stages['train']
  assert train['step_reached'] == train['num_steps'] == 4
  assert 0 <= train['results']['test_error'] <= 1
  assert (out / 'cifar10_20_workdir.tar.gz').exists()
  paths = {row[0] for row in stages['input']['results']}
  assert paths == {'PIL + process pool'}  # no tf.data without TensorFlow
  assert any('TensorFlow is not importable' in n for n in stages['input']['notes'])
  markdown = (out / 'device_check.md').read_text()
  for stage in STAGES:
    assert f'## {stage}' in markdown
  assert 'ResNet-8 (32x32)' in markdown and 'PIL + process pool' in markdown

  # A second command on a fresh machine: the returned workdir archive, unpacked, holds the finished run.
  again = subprocess.run(
    command[:3]
    + ['--stages=train', f'--out={tmp_path / "again"}', f'--cifar={cifar}']
    + [f'--train_workdir={tmp_path / "fresh" / "w"}']
    + [f'--train_resume={out / "cifar10_20_workdir.tar.gz"}'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert again.returncode == 0, again.stderr[-3000:]
  (resumed,) = json.loads((tmp_path / 'again' / 'device_check.json').read_text())['stages']
  assert resumed['status'] == 'ok' and resumed['segments'] == train['segments']
  assert resumed['results']['test_error'] == train['results']['test_error']
  assert any(n.startswith('unpacked') for n in resumed['notes'])
