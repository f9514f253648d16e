"""Long preemptible runs: kill and resume, signals, damaged checkpoints, a full disk, readers beside a writer,
divergence, wrong workdirs, bad input."""

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from helpers import (
  as_flags,
  assert_same_checkpoints,
  checkpoint_steps,
  final_params,
  last_rows,
  run_cli,
  small_run,
)
from PIL import Image

from resnet_jax import checkpointing, parallel, train, workdir_lock

pytestmark = pytest.mark.slow  # CLI processes killed, signalled and rerun

LONG = dict(
  train__num_steps=24,
  train__checkpoint_every_steps=4,
  train__log_every_steps=1,
  train__eval_every_steps=24,
)  # long enough that a signal sent at step 5 or 6 lands well before the end


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The uninterrupted run every interrupted one must end equal to."""
  workdir = tmp_path_factory.mktemp('straight')
  train.train_and_evaluate(small_run(**LONG), str(workdir))
  return workdir


_WITHOUT_TF = (
  "import runpy, sys; sys.modules['tensorflow'] = None; sys.argv[0] = 'resnet_jax.main'; "
  "runpy.run_module('resnet_jax.main', run_name='__main__')"
)  # python -m resnet_jax.main without TensorBoard, whose TensorFlow import costs each start seconds


def start_cli(workdir, config, tensorflow=True):
  cmd = [
    sys.executable,
    *(['-m', 'resnet_jax.main'] if tensorflow else ['-c', _WITHOUT_TF]),
    '--config=configs/cifar10_20.py',
    f'--workdir={workdir}',
    *as_flags(config),
  ]
  return subprocess.Popen(
    cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )


def wait_for_step(workdir, step, proc, timeout=300):
  """Blocks until metrics.jsonl shows a train row at `step` or later."""
  path, start = pathlib.Path(workdir) / 'metrics.jsonl', time.time()
  while time.time() - start < timeout:
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    if path.exists():
      rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith('}')]
      if any(r['split'] == 'train' and r['step'] >= step for r in rows):
        return
    time.sleep(0.02)
  raise AssertionError(f'step {step} not reached')


def test_half_then_a_new_process_is_bit_identical(tmp_path, straight):
  train.train_and_evaluate(small_run(**{**LONG, 'train__num_steps': 8}), str(tmp_path))
  run_cli(tmp_path, *as_flags(small_run(**LONG)))  # the same config, in a new process, from step 8
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['split'] == 'train'] == list(
    range(1, LONG['train__num_steps'] + 1)
  )
  # The 8-step run ended, so it evaluated at step 8 and fed that error to the lr-on-plateau bookkeeping,
  # which the straight run never saw: whether the two agree there at step 24 depends on whether step
  # 24's error beats step 8's. Everything that trains must be bit-identical.
  assert_same_checkpoints(straight, tmp_path, without=('plateau',))


def test_sigkill_then_same_command_is_bit_identical(tmp_path, straight):
  config = small_run(**LONG)
  proc = start_cli(tmp_path, config)
  wait_for_step(tmp_path, 6, proc)  # between the checkpoints of steps 4 and 8
  proc.kill()
  proc.wait()
  assert not (tmp_path / 'results.json').exists()
  killed_at = max(
    json.loads(line)['step'] for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()
  )
  assert killed_at < LONG['train__num_steps']
  run_cli(tmp_path, *as_flags(config))
  assert_same_checkpoints(straight, tmp_path)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_current_step_and_restart_continues(tmp_path, straight, sig):
  config = small_run(**LONG)
  proc = start_cli(tmp_path, config)
  wait_for_step(tmp_path, 5, proc)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + sig, err[-2000:]
  stopped = int(err.split('stopped by a signal after step ')[1].split(';')[0])
  assert (
    5 <= stopped < LONG['train__num_steps'] and checkpoint_steps(tmp_path)[-1] == stopped
  )  # not only the periodic ones
  assert 'rerun the same command to continue' in err.strip().splitlines()[-1]
  assert not (tmp_path / 'lock.json').exists()  # released on the way out
  if sig == signal.SIGTERM:
    run_cli(tmp_path, *as_flags(config))
    assert_same_checkpoints(straight, tmp_path)


def _leftover_temporaries(workdir):
  return sorted(
    p.name for p in (pathlib.Path(workdir) / 'checkpoints').glob('*.orbax-checkpoint-tmp*')
  )


def _assert_same_run(straight, workdir):
  """Bit-identical final state, the same last row per (step, split), the same results.json numbers."""
  assert_same_checkpoints(straight, workdir)
  assert last_rows(workdir) == last_rows(straight)
  numbers = ('test_error', 'test_loss', 'steps', 'nonfinite_steps')
  results = [
    json.loads((pathlib.Path(w) / 'results.json').read_text()) for w in (straight, workdir)
  ]
  assert [{k: r[k] for k in numbers} for r in results] == [{k: results[0][k] for k in numbers}] * 2
  assert not (pathlib.Path(workdir) / 'checkpoints' / 'corrupt').exists()
  assert not (pathlib.Path(workdir) / 'lock.json').exists()


@contextlib.contextmanager
def small_disk(path, size):
  """A size-limited tmpfs at `path` (needs mount privileges); yields a function that resizes it."""
  path.mkdir()
  mounted = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True
  )
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here ({mounted.stderr.strip()}): the injected variant runs')
  try:
    yield lambda new: subprocess.run(
      ['mount', '-o', f'remount,size={new}', str(path)], check=True, capture_output=True
    )
  finally:
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


_FULL_AFTER = 16
_INJECT = f"""
import asyncio, errno, runpy, sys
import jax
from orbax.checkpoint._src.handlers import base_pytree_checkpoint_handler as handler
original = handler.BasePyTreeCheckpointHandler._write_metadata_after_commits
async def full_disk(self, commit_futures, **kwargs):
  # the arrays are written, the metadata write finds the disk full: what a real full disk does too
  directory = str(jax.tree.leaves(kwargs['param_infos'])[0].parent_dir)
  step = int(directory.split('/checkpoints/')[1].split('.')[0])
  if step >= {_FULL_AFTER}:
    for f in commit_futures:
      await asyncio.to_thread(f.result)
    raise OSError(errno.ENOSPC, 'No space left on device')
  return await original(self, commit_futures, **kwargs)
handler.BasePyTreeCheckpointHandler._write_metadata_after_commits = full_disk
sys.argv[0] = 'resnet_jax.main'
runpy.run_module('resnet_jax.main', run_name='__main__')
"""


@pytest.mark.slow
@pytest.mark.parametrize('disk', ['tmpfs', 'injected'])
def test_full_disk_stops_in_one_sentence_and_the_rerun_continues(tmp_path, straight, disk):
  config = as_flags(small_run(**LONG))
  with contextlib.ExitStack() as stack:
    if disk == 'tmpfs':  # room for three checkpoints of ~0.8 MiB, not for four
      resize = stack.enter_context(small_disk(tmp_path / 'disk', '2600k'))
      workdir = tmp_path / 'disk' / 'run'
      cmd = [sys.executable, '-m', 'resnet_jax.main']
    else:
      workdir = tmp_path / 'run'
      cmd = [sys.executable, '-c', _INJECT]
    cmd += ['--config=configs/cifar10_20.py', f'--workdir={workdir}', *config]
    full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    # one sentence of ours; orbax's background threads log their own error lines around it (one line
    # each) and tensorstore prints a traceback of its own, but none passes through this package
    errors = [line for line in full.stderr.splitlines() if line.startswith('error: ')]
    assert full.returncode == 2 and len(errors) == 1, full.stderr[-3000:]
    assert f'{REPO}/resnet_jax/' not in full.stderr
    last = errors[0]
    assert last.startswith('error: cannot write the checkpoint of step '), last
    failed = int(last.split('of step ')[1].split(' ')[0])
    good = int(last.split('the last good checkpoint is step ')[1].split(':')[0])
    assert '(no space left on device)' in last and 'MiB are free' in last
    assert checkpoint_steps(workdir)[-1] == good < failed < LONG['train__num_steps']
    if disk == 'injected':
      assert failed == _FULL_AFTER
    assert _leftover_temporaries(workdir) == []  # nothing a resume could mistake for a step
    assert not (workdir / 'results.json').exists() and not (workdir / 'lock.json').exists()
    if disk == 'tmpfs':
      resize('64m')  # space freed
    run_cli(workdir, *config)
    _assert_same_run(straight, workdir)
    print(f'{disk}: {last}')


KILLS = dict(
  train__num_steps=12,
  train__checkpoint_every_steps=1,
  train__log_every_steps=1,
  train__eval_every_steps=6,
)


def _last_train_step(workdir):
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return 0
  rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith('}')]
  return max((r['step'] for r in rows if r['split'] == 'train'), default=0)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_the_same_command_ends_as_uninterrupted(tmp_path):
  """Kills land anywhere in the loop: in a step, a log write, an evaluation, a checkpoint write."""
  config = small_run(**KILLS)
  straight = tmp_path / 'straight'
  train.train_and_evaluate(config, str(straight))
  workdir = tmp_path / 'killed'
  rng = np.random.default_rng(0)
  kills, inside_save = [], 0
  while len(kills) < 4:
    proc = start_cli(workdir, config, tensorflow=False)
    wait_for_step(workdir, _last_train_step(workdir) + 1, proc)  # past start-up: in the loop
    time.sleep(rng.uniform(0, 1.0))
    if proc.poll() is not None:  # finished before the kill
      break
    proc.kill()
    proc.wait()
    leftovers = _leftover_temporaries(workdir)  # a save was under way when the process died
    inside_save += bool(leftovers)
    kills.append((_last_train_step(workdir), leftovers))
  final = run_cli(workdir, *as_flags(config))
  assert 'Took over the stale lock' in final.stderr  # the killed run's lock: its pid is gone
  _assert_same_run(straight, workdir)
  print(
    f'{len(kills)} kills (last logged step, leftover temporaries): {kills}; {inside_save} in a save'
  )
  assert len(kills) >= 3


@pytest.mark.slow
def test_readers_beside_a_writer_read_complete_steps_and_leave_it_alone(tmp_path):
  flags = dict(
    train__num_steps=60,
    train__checkpoint_every_steps=2,
    train__log_every_steps=2,
    train__eval_every_steps=60,
  )
  config = small_run(**flags)
  straight = tmp_path / 'straight'  # every checkpoint kept: the history a reader must match
  train.train_and_evaluate(small_run(**flags, train__keep_checkpoints=100), str(straight))
  workdir = tmp_path / 'run'
  writer = start_cli(workdir, config)
  wait_for_step(workdir, 3, proc=writer)  # the checkpoint of step 2 is under way or written
  while not (workdir / 'checkpoints').exists() or not checkpoint_steps(workdir):
    assert writer.poll() is None
    time.sleep(0.02)
  with pytest.raises(workdir_lock.WorkdirLocked, match=f'being trained by pid {writer.pid} '):
    train.train_and_evaluate(config, str(workdir))  # a second training, refused at once
  evaluate = subprocess.Popen(
    [sys.executable, '-m', 'resnet_jax.tools.evaluate', f'--workdir={workdir}'],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  reads = []
  while writer.poll() is None:
    run = checkpointing.open_workdir(workdir)
    reads.append((run.step, run.state['params']))
    time.sleep(0.05)  # many reads a checkpoint still, without taking a core from the writer
  evaluate_running = evaluate.poll() is None
  out, err = evaluate.communicate(timeout=300)
  assert evaluate.returncode == 0, err[-3000:]
  evaluated = json.loads(out.strip().splitlines()[-1])
  assert writer.returncode == 0, writer.stderr.read()[-3000:]
  steps = sorted({step for step, _ in reads})
  history = {
    step: ocp.StandardCheckpointer().restore(straight / 'checkpoints' / str(step) / 'default')
    for step in steps
  }
  for step, params in reads:  # the uninterrupted run's params at that step, bit for bit
    expected = jax.tree.leaves(history[step]['params'])
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params), expected)), step
  assert evaluated['step'] in range(2, 61, 2) and evaluated['count'] == 100
  _assert_same_run(straight, workdir)  # the writer undisturbed: same end, nothing moved to corrupt/
  print(
    f'{len(reads)} reads of steps {steps}; evaluate read step {evaluated["step"]} '
    f'(still running when the writer ended: {evaluate_running})'
  )


def _truncate_data(step_dir):
  files = [p for p in (step_dir / 'default').rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for p in files:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garble_metadata(step_dir):
  (step_dir / 'default' / '_METADATA').write_text('{not json')


def _delete_metadata(step_dir):
  (step_dir / 'default' / '_METADATA').unlink()


def _delete_array_files(step_dir):
  files = list((step_dir / 'default' / 'd').iterdir())  # the arrays' data, as merged at the commit
  assert files
  for p in files:
    p.unlink()


_EVIDENCE = {
  _truncate_data: 'is truncated (',
  _garble_metadata: 'default/_METADATA does not parse as JSON',
  _delete_metadata: 'default/_METADATA is missing',
  _delete_array_files: 'is missing (written with ',
}


@pytest.mark.parametrize('damage', list(_EVIDENCE), ids=lambda f: f.__name__.strip('_'))
def test_damaged_latest_checkpoint_is_moved_aside_naming_the_evidence_and_the_previous_used(
  tmp_path, straight, damage, caplog
):
  config = small_run(**{**LONG, 'train__num_steps': 12})
  train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint_steps(tmp_path) == [4, 8, 12]
  damage(tmp_path / 'checkpoints' / '12')
  caplog.set_level('WARNING')
  train.train_and_evaluate(small_run(**LONG), str(tmp_path))
  moved = [r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage()]
  assert len(moved) == 1 and _EVIDENCE[damage] in moved[0], moved
  corrupt = list((tmp_path / 'checkpoints' / 'corrupt').iterdir())
  assert [p.name.split('-')[0] for p in corrupt] == ['12']  # kept, not deleted
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['split'] == 'train'][12:14] == [9, 10]  # resumed from step 8
  assert_same_checkpoints(straight, tmp_path)


def test_nonfinite_loss_stops_naming_the_step_and_writes_no_nan_checkpoint(tmp_path):
  config = small_run(train__num_steps=10, train__checkpoint_every_steps=1, train__log_every_steps=1)
  # the first update is finite but huge; the next forward pass is not
  config.optimizer.learning_rate = 1e38
  with pytest.raises(train.Diverged) as err:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(err.value)
  step = int(message.split('non-finite at step ')[1].split(';')[0])
  assert f'the last good checkpoint is step {step - 1}' in message and '\n' not in message
  assert checkpoint_steps(tmp_path)[-1] == step - 1
  for s in checkpoint_steps(tmp_path):
    state = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / str(s) / 'default')
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


def test_nonfinite_steps_can_be_skipped_and_counted(tmp_path):
  config = small_run(train__num_steps=6, train__on_nonfinite='skip')
  config.optimizer.learning_rate = 1e38
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['nonfinite_steps'] > 0
  _, state = final_params(tmp_path)
  assert all(
    np.all(np.isfinite(x)) for x in jax.tree.leaves((state['params'], state['batch_stats']))
  )
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-2]['skipped_steps'] == results['nonfinite_steps']


def _snapshot(path):
  return {
    str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    for p in sorted(path.rglob('*'))
  }


def test_workdir_of_another_network_is_refused_untouched(tmp_path):
  train.train_and_evaluate(small_run(train__num_steps=3), str(tmp_path))
  before = _snapshot(tmp_path)
  result = run_cli(tmp_path, *as_flags(small_run(model__depth=14)), check=False)
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert 'does not match this config' in result.stderr.strip().splitlines()[-1]
  assert _snapshot(tmp_path) == before
  with pytest.raises(checkpointing.CheckpointMismatch):  # the same through the Python API
    train.train_and_evaluate(small_run(model__depth=14), str(tmp_path))


def test_same_seed_same_metrics(tmp_path):
  timing = {'time', 'steps_per_sec', 'images_per_sec', 'eta_min'}
  runs = []
  for name in ('a', 'b'):
    train.train_and_evaluate(small_run(), str(tmp_path / name))
    rows = [
      json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()
    ]
    runs.append([{k: v for k, v in r.items() if k not in timing} for r in rows])
  assert runs[0] == runs[1] and len(runs[0]) == 5


def _folder(root, corrupt=False, empty=False):
  for split in ('train', 'test'):
    (root / split / 'cat').mkdir(parents=True)
    if not empty:
      for i in range(3):
        Image.fromarray(np.full((32, 32, 3), i * 40, np.uint8)).save(
          root / split / 'cat' / f'{i}.png'
        )
  if corrupt:
    (root / 'train' / 'cat' / '1.png').write_bytes(b'not a png at all')
  return root


BAD_INPUTS = [  # (id, flags, what the one line must say); {tmp} is the test's temporary directory
  ('config file', ['--config=configs/nope.py'], 'the config file configs/nope.py does not exist'),
  (
    'unknown field',
    ['--config.train.epochs=3'],
    '--config.train.epochs is not a field of the config',
  ),
  (
    'misspelt field',
    ['--config.train.num_step=3'],
    '--config.train.num_step is not a field of the config configs/cifar10_20.py: did you mean '
    '--config.train.num_steps?',
  ),
  (
    'unknown section',
    ['--config.trainer.lr=3'],
    '--config.trainer.lr is not a field of the config',
  ),
  ('not a number', ['--config.train.num_steps=abc'], 'flag --config.train.num_steps=abc'),
  (
    'negative lr',
    ['--config.optimizer.learning_rate=-0.1'],
    'optimizer.learning_rate must be positive, got -0.1',
  ),
  (
    'zero lr',
    ['--config.optimizer.learning_rate=0'],
    'optimizer.learning_rate must be positive, got 0',
  ),
  (
    'momentum',
    ['--config.optimizer.momentum=1.5'],
    'optimizer.momentum must be in [0, 1), got 1.5',
  ),
  (
    'momentum style',
    ['--config.optimizer.momentum_style=nesterov'],
    "optimizer.momentum_style must be one of ('caffe', 'pytorch', 'dampened'), got 'nesterov'",
  ),
  (
    'batch vs devices',
    ['--config.train.batch_size=100'],
    'train.batch_size=100 is not divisible by the 8 devices',
  ),
  (
    'num_steps 0',
    ['--config.train.num_steps=0'],
    'train.num_steps must be a positive integer, got 0',
  ),
  ('depth', ['--config.model.depth=21'], 'CIFAR ResNet depth must be 6n+2, got 21'),
  ('shortcut', ['--config.model.shortcut=D'], "Unknown shortcut option 'D'"),
  (
    'source',
    ['--config.data.source=ftp'],
    "data.source must be one of ('tfds', 'image_folder', 'synthetic')",
  ),
  (
    'dataset',
    ['--config.data.name=mnist'],
    "data.name must be one of ('cifar10', 'imagenet2012'), got 'mnist'",
  ),
  (
    'missing folder',
    ['--config.data.source=image_folder', '--config.data.image_folder={tmp}/nowhere'],
    'data.image_folder={tmp}/nowhere does not exist',
  ),
  (
    'empty folder',
    ['--config.data.source=image_folder', '--config.data.image_folder={tmp}/empty'],
    '{tmp}/empty/train holds no class folders with images',
  ),
  (
    'unreadable image',
    [
      '--config.data.source=image_folder',
      '--config.data.image_folder={tmp}/corrupt',
      '--config.train.batch_size=8',
      '--config.data.cache_dir={tmp}/cache',
    ],
    'cannot decode image {tmp}/corrupt/train/cat/1.png',
  ),
  (
    'workdir under a file',
    ['--workdir={tmp}/file/run'],
    'the workdir {tmp}/file/run cannot be created or written',
  ),
  ('workdir is a file', ['--workdir={tmp}/file'], 'the workdir {tmp}/file is a file'),
  ('offline tfds', ['--config.data.data_dir={tmp}/tfds'], 'CIFAR-10 is not in {tmp}/tfds'),
  ('stray argument', ['extra'], "unexpected arguments ['extra']"),
]


@pytest.mark.parametrize(
  'flags,message', [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input_is_refused_in_one_line(tmp_path, flags, message):
  _folder(tmp_path / 'empty', empty=True)
  _folder(tmp_path / 'corrupt', corrupt=True)
  (tmp_path / 'file').write_text('a regular file')
  (tmp_path / 'tfds').mkdir()
  flags = [f.format(tmp=tmp_path) for f in flags]
  config = next((f for f in flags if f.startswith('--config=')), '--config=configs/cifar10_20.py')
  workdir = next((f for f in flags if f.startswith('--workdir=')), f'--workdir={tmp_path}/run')
  cmd = [
    sys.executable,
    '-m',
    'resnet_jax.main',
    config,
    workdir,
    *[f for f in flags if not f.startswith(('--config=', '--workdir='))],
  ]
  env = {
    **os.environ,
    'JAX_LOG_COMPILES': '1',
  }  # JAX then logs every compilation: there must be none
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 2, result.stderr[-1500:]
  assert last.startswith('error: ') and message.format(tmp=tmp_path) in last, last
  assert 'Traceback' not in result.stderr
  assert 'Compiling' not in result.stderr  # refused before anything was compiled
  assert not (tmp_path / 'run').exists()  # and before the workdir was created


# ------------------------------------------------------------ unreadable is not damaged (restore_or_init)

_FAIL_RESTORE = """
import errno, runpy, sys
import orbax.checkpoint as ocp
sys.modules['tensorflow'] = None
def fail(*args, **kwargs):
  raise {error}
ocp.StandardCheckpointer.restore = fail
sys.argv[0] = 'resnet_jax.main'
runpy.run_module('resnet_jax.main', run_name='__main__')
"""
_FAULTS = {
  'ESTALE': OSError(errno.ESTALE, 'Stale file handle'),
  'MemoryError': MemoryError(),
  'library': ValueError('UNKNOWN: Error opening zarr driver: unsupported format version'),
}


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error: ')]


def test_unreadable_checkpoint_stops_in_one_sentence_and_moves_nothing(tmp_path):
  train.train_and_evaluate(small_run(**{**LONG, 'train__num_steps': 8}), str(tmp_path))
  before = _snapshot(tmp_path)
  cmd = [
    sys.executable,
    '-c',
    _FAIL_RESTORE.format(error="OSError(errno.EIO, 'Input/output error')"),
    '--config=configs/cifar10_20.py',
    f'--workdir={tmp_path}',
    *as_flags(small_run(**LONG)),
  ]
  result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  errors = _error_lines(result.stderr)
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert errors[0] == (
    f'error: cannot read the checkpoint of step 8 in {tmp_path}/checkpoints (OSError: [Errno 5] '
    'Input/output error), and its files show no damage, so nothing was moved: fix the cause (the '
    'filesystem, permissions, memory, or the orbax-checkpoint version) and rerun the same command to '
    'resume from it.'
  )
  assert _snapshot(tmp_path) == before  # nothing moved, nothing written, the lock released


@pytest.mark.parametrize('fault', ['ESTALE', 'MemoryError', 'library'])
def test_other_read_failures_stop_too(tmp_path, fault, monkeypatch):
  train.train_and_evaluate(small_run(**{**LONG, 'train__num_steps': 8}), str(tmp_path))
  before = _snapshot(tmp_path)

  def fail(*args, **kwargs):
    raise _FAULTS[fault]

  monkeypatch.setattr(ocp.StandardCheckpointer, 'restore', fail)
  with pytest.raises(checkpointing.CheckpointUnreadable, match='nothing was moved') as raised:
    train.train_and_evaluate(small_run(**LONG), str(tmp_path))
  expected = {
    'ESTALE': 'OSError: [Errno 116] Stale file handle',
    'MemoryError': '(MemoryError: )',
    'library': 'ValueError: UNKNOWN: Error opening zarr driver',
  }[fault]
  assert 'step 8' in str(raised.value) and expected in str(raised.value)
  assert _snapshot(tmp_path) == before


def test_no_restorable_checkpoint_stops_until_a_fresh_start_is_asked_for(tmp_path):
  config = small_run(**{**LONG, 'train__num_steps': 8})
  train.train_and_evaluate(config, str(tmp_path))
  for step in (4, 8):
    _garble_metadata(tmp_path / 'checkpoints' / str(step))
  flags = as_flags(small_run(**LONG))
  for _ in range(2):  # the first moves both aside; the second finds none and stops again
    result = run_cli(tmp_path, *flags, check=False)
    errors = _error_lines(result.stderr)
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f'error: no checkpoint in {tmp_path}/checkpoints can be restored')
    assert '--fresh_start' in errors[0]
    corrupt = sorted(p.name for p in (tmp_path / 'checkpoints' / 'corrupt').iterdir())
    assert [name.split('-')[0] for name in corrupt] == ['4', '8']
    assert all(name in errors[0] for name in corrupt)
    assert checkpoint_steps(tmp_path) == []
  run_cli(tmp_path, *flags, '--fresh_start')
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['split'] == 'train'][8:10] == [1, 2]  # from step 0 again
  assert len(list((tmp_path / 'checkpoints' / 'corrupt').iterdir())) == 2  # kept


# ---------------------------------------------- resuming on another device count or steps_per_dispatch


def _train_rows(workdir):
  """{step: (loss, error)} of the train rows, the last row of a step counting (as the plots read them)."""
  rows = last_rows(workdir)
  return {step: (r['loss'], r['error']) for (step, split), r in rows.items() if split == 'train'}


def _gentle(**overrides):
  """12 steps over 1.5 epochs at lr 0.001: float reassociation between device counts stays ~1e-7."""
  config = small_run(
    **{
      'train__num_steps': 12,
      'train__checkpoint_every_steps': 6,
      'train__log_every_steps': 2,
      'train__eval_every_steps': 12,
      **overrides,
    }
  )
  config.optimizer.learning_rate = 0.001
  return config


@pytest.mark.parametrize(
  'field, before, after',
  [('devices', 4, 1), ('devices', 1, 4), ('dispatch', 1, 2), ('dispatch', 2, 1)],
)
def test_resume_on_another_device_count_or_dispatch_continues_the_run(
  tmp_path, field, before, after
):
  def run(workdir, setting, **overrides):
    if field == 'devices':
      mesh = parallel.make_mesh(jax.devices()[:setting])
      train.train_and_evaluate(_gentle(**overrides), str(workdir), mesh=mesh)
    else:
      config = _gentle(train__steps_per_dispatch=setting, **overrides)
      train.train_and_evaluate(config, str(workdir), mesh=parallel.make_mesh(jax.devices()[:1]))

  run(tmp_path / 'straight', after)  # uninterrupted, on what the resumed run ends on
  run(tmp_path / 'resumed', before, train__num_steps=6)  # steps 1-6 (epoch 1 ends at step 8)
  run(tmp_path / 'resumed', after)  # steps 7-12, from the checkpoint of step 6
  straight, resumed = _train_rows(tmp_path / 'straight'), _train_rows(tmp_path / 'resumed')
  assert sorted(resumed) == sorted(straight) == [2, 4, 6, 8, 10, 12]
  # The batches are a function of (seed, step) alone: a data position off by one step would change
  # the losses by ~1e-2, far beyond the 1e-5 that the devices' summation order leaves.
  np.testing.assert_allclose(
    [resumed[s] for s in (8, 10, 12)], [straight[s] for s in (8, 10, 12)], rtol=0, atol=1e-5
  )


_PLATEAU_FLAGS = [
  '--config.optimizer.schedule=plateau',
  '--config.optimizer.plateau_patience=2',
  '--config.optimizer.plateau_threshold=0.5',  # never met: the lr drops after every 2nd evaluation
]
PLATEAU = dict(
  train__num_steps=24,
  train__checkpoint_every_steps=4,
  train__log_every_steps=1,
  train__eval_every_steps=2,
)


def _lr_history(workdir):
  rows = last_rows(workdir)
  lrs = {step: r['lr'] for (step, split), r in rows.items() if split == 'train'}
  drops = {step: r['lr_drops'] for (step, split), r in rows.items() if split == 'test'}
  return lrs, drops


def test_plateau_schedule_lowers_the_lr_at_the_same_steps_after_a_kill(tmp_path):
  flags = [*as_flags(small_run(**PLATEAU)), *_PLATEAU_FLAGS]
  run_cli(tmp_path / 'straight', *flags)
  killed = tmp_path / 'killed'
  cmd = [sys.executable, '-c', _WITHOUT_TF, '--config=configs/cifar10_20.py', f'--workdir={killed}']
  proc = subprocess.Popen(
    [*cmd, *flags], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
  )
  wait_for_step(killed, 9, proc)  # after the first drop (step 6), before the run's end
  proc.kill()
  proc.wait()
  killed_at = max(_lr_history(killed)[0])
  assert 9 <= killed_at < PLATEAU['train__num_steps']
  run_cli(killed, *flags)
  straight_lrs, straight_drops = _lr_history(tmp_path / 'straight')
  lrs, drops = _lr_history(killed)
  assert sorted(set(straight_drops.values())) == [0, 1, 2, 3, 4, 5]  # the rule did act, five times
  assert lrs == straight_lrs and drops == straight_drops
