"""Two processes on one machine (loopback, gloo collectives, 2 CPU devices each) train as one with 4 devices.

The processes run the real CLI (`resnet_jax.main` with --coordinator_address, --num_processes, --process_id);
TensorFlow is kept out of them, as on a JAX-only machine, since importing it would cost each one seconds.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO
from helpers import as_flags, checkpoint_steps, small_run

from resnet_jax import models, optim, parallel, train, writers

pytestmark = pytest.mark.slow  # two CLI processes against one

TIMEOUT = 300  # seconds for both processes together; both are killed past it or when either fails
_MAIN = (
  "import runpy, sys; sys.modules['tensorflow'] = None; {inject}sys.argv[0] = 'resnet_jax.main'; "
  "runpy.run_module('resnet_jax.main', run_name='__main__')"
)  # python -m resnet_jax.main, without TF; `inject`: statements run first (a fault to inject)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(workdir, config, address, process_id, log, inject=''):
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
    'JAX_PLATFORMS': 'cpu',
    'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',  # today's default, named so that it stays
    'JAX_COMPILATION_CACHE_DIR': jax.config.jax_compilation_cache_dir or '',  # conftest's cache
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5',
  }
  cmd = [
    sys.executable,
    '-c',
    _MAIN.format(inject=inject),
    '--config=configs/cifar10_20.py',
    f'--workdir={workdir}',
    *as_flags(config),
    f'--coordinator_address={address}',
    '--num_processes=2',
    f'--process_id={process_id}',
  ]
  with open(log, 'w') as f:  # a file, not a pipe, which a chatty process could fill and block on
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f)


def wait_all(procs, timeout, stop_at_first_failure=True):
  """The return codes, None for a process killed because its peer failed or the time ran out."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in procs) and not (
      stop_at_first_failure and any(p.poll() for p in procs)
    ):
      assert time.time() < deadline, f'the two processes did not finish in {timeout} s'
      time.sleep(0.1)
    return [p.poll() for p in procs]
  finally:
    kill(procs)


def train_two_processes(workdir, config, tries=2):
  """(the workdir, process 0's and 1's logs). A rendezvous timeout is retried: gloo waits a fixed 30 s for
  its peer at the first collective, which processes that drifted apart on a busy machine can miss (see
  parallel.sync_processes)."""
  for attempt in range(tries):
    address, run = f'127.0.0.1:{free_port()}', workdir / f'attempt{attempt}'
    logs = [workdir / f'attempt{attempt}-process{i}.log' for i in range(2)]
    run.mkdir(parents=True)
    codes = wait_all([start(run, config, address, i, logs[i]) for i in range(2)], TIMEOUT)
    logs = [log.read_text() for log in logs]
    if not any(codes):
      return run, logs
    failed = [log for code, log in zip(codes, logs) if code]
    if attempt == tries - 1 or not any(
      'Gloo context initialization failed' in log for log in failed
    ):
      raise AssertionError(f'a process failed ({codes}):\n{not_info(failed[0])[-4000:]}')


def not_info(log):
  return '\n'.join(line for line in log.splitlines() if not re.match(r'I\d{4} ', line))


def kill(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def saved_state(workdir, step):
  """A checkpoint as numpy arrays: its saved sharding names devices of the 2-process job, absent here."""
  path = workdir / 'checkpoints' / str(step) / 'default'
  tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def test_two_processes_equal_one_process_with_four_devices(tmp_path, monkeypatch):
  config = small_run(train__num_steps=4, train__eval_every_steps=4, train__checkpoint_every_steps=2)
  single = tmp_path / 'one_process'
  monkeypatch.setattr(writers, '_tensorflow_available', lambda: False)
  train.train_and_evaluate(config, str(single), mesh=parallel.make_mesh(jax.devices()[:4]))
  multi, (stderr_0, stderr_1) = train_two_processes(tmp_path / 'two_processes', config)

  assert checkpoint_steps(multi) == checkpoint_steps(single) == [2, 4]
  results = json.loads((multi / 'results.json').read_text())
  assert results['process_count'] == 2 and results['device_count'] == 4
  rows = [json.loads(line) for line in (multi / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['split']) for r in rows] == [
    (2, 'train'),
    (4, 'train'),
    (4, 'test'),
  ]  # no doubles
  assert '[4] test' in stderr_0 and '[4] test' not in stderr_1  # process 1 logs no metrics either
  single_rows = [json.loads(line) for line in (single / 'metrics.jsonl').read_text().splitlines()]
  for a, b in zip(rows, single_rows):
    np.testing.assert_allclose([a['loss'], a['error']], [b['loss'], b['error']], rtol=1e-4)

  # Not bit-identical: gloo adds the 4 devices' values as (d0 + d1) + (d2 + d3), XLA's in-process all-reduce
  # as ((d0 + d1) + d2) + d3. That last-bit difference can flip a ReLU whose input sits at the kink (a
  # channel that is constant over the batch normalises to 0 +- rounding: measured, a 0.4% change of one
  # kernel's gradient, gone when the images get 1e-3 noise; float64 shows it too). So the runs are compared
  # by how far they moved: a real fault (a missed or doubled all-reduce, a wrong share) is of the order of
  # the update itself, the flip well under 1% of it.
  a, b = saved_state(multi, 4), saved_state(single, 4)
  assert int(a['step']) == 4 and jax.tree.structure(a) == jax.tree.structure(b)
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  init = jax.device_get(
    train.create_train_state(
      config, model, optim.create(config.optimizer), jax.random.key(config.seed)
    )
  )
  for name, x, y, x0 in (
    ('params', a['params'], b['params'], init.params),
    ('batch_stats', a['batch_stats'], b['batch_stats'], init.batch_stats),
    ('momentum', a['opt_state'], b['opt_state'], init.opt_state),
  ):
    x, y, x0 = (
      np.concatenate([np.ravel(v) for v in jax.tree.leaves(t) if np.asarray(v).dtype == np.float32])
      for t in (x, y, x0)
    )
    moved = np.linalg.norm(y - x0)
    assert moved > 0 and np.linalg.norm(x - y) < 0.02 * moved, (name, np.linalg.norm(x - y) / moved)


def _truncate_arrays(step_dir):
  for p in (step_dir / 'default' / 'd').iterdir():
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _listing(directory):
  return sorted(str(p.relative_to(directory)) for p in directory.rglob('*'))


def _checkpointed_on_four_devices(workdir):
  """Steps 2, 4 and 6 written by one process with 4 devices: the two processes' job resumes it."""
  config = small_run(train__num_steps=6, train__eval_every_steps=6, train__checkpoint_every_steps=2)
  train.train_and_evaluate(config, str(workdir), mesh=parallel.make_mesh(jax.devices()[:4]))
  assert checkpoint_steps(workdir) == [2, 4, 6]
  return small_run(train__num_steps=8, train__eval_every_steps=8, train__checkpoint_every_steps=2)


def _two_processes(workdir, config, inject=('', '')):
  address = f'127.0.0.1:{free_port()}'
  logs = [workdir.parent / f'{workdir.name}-process{i}.log' for i in range(2)]
  procs = [start(workdir, config, address, i, logs[i], inject[i]) for i in range(2)]
  codes = wait_all(procs, TIMEOUT, stop_at_first_failure=False)
  return codes, [log.read_text() for log in logs]


def test_a_damaged_checkpoint_is_moved_once_and_both_processes_resume_the_same_step(
  tmp_path, monkeypatch
):
  monkeypatch.setattr(writers, '_tensorflow_available', lambda: False)
  workdir = tmp_path / 'run'
  config = _checkpointed_on_four_devices(workdir)
  _truncate_arrays(workdir / 'checkpoints' / '6')
  codes, logs = _two_processes(workdir, config)
  assert codes == [0, 0], not_info(logs[0])[-3000:] + not_info(logs[1])[-3000:]
  moved = [p.name.split('-')[0] for p in (workdir / 'checkpoints' / 'corrupt').iterdir()]
  assert moved == ['6']  # exactly once
  assert [log.count('is damaged (') for log in logs] == [1, 0]  # process 0 decided and said so
  assert all('Resuming from the checkpoint of step 4 ' in log for log in logs)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if r['split'] == 'train'] == [2, 4, 6, 6, 8]  # 5-8 again
  assert checkpoint_steps(workdir) == [4, 6, 8]


_EIO = (
  'import errno, orbax.checkpoint as ocp; '
  "ocp.StandardCheckpointer.restore = lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, 'Input/output error')); "
)


def test_an_io_error_on_one_process_stops_both_and_moves_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(writers, '_tensorflow_available', lambda: False)
  workdir = tmp_path / 'run'
  config = _checkpointed_on_four_devices(workdir)
  before = _listing(workdir / 'checkpoints')
  codes, logs = _two_processes(workdir, config, inject=('', _EIO))
  assert codes == [2, 2], not_info(logs[0])[-3000:] + not_info(logs[1])[-3000:]
  for log in logs:
    errors = [line for line in log.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and errors[0].startswith(
      f'error: cannot read the checkpoint of step 6 in {workdir}/checkpoints (process 1: OSError: '
      '[Errno 5] Input/output error), and its files show no damage, so nothing was moved'
    ), errors
  assert _listing(workdir / 'checkpoints') == before
  assert not (workdir / 'lock.json').exists()
