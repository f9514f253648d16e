"""One training per workdir: refusal naming the holder, stale locks taken over, atomic taking, release."""

import json
import os
import socket
import subprocess
import time

import pytest
from helpers import as_flags, run_cli, small_run

from resnet_jax import checkpointing, train, workdir_lock


def write_lock(workdir, **fields):
  record = {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'started': time.time() - 60,
    'heartbeat': time.time(),
    'token': 'someone-else',
    **fields,
  }
  (workdir / 'lock.json').write_text(json.dumps(record))
  return record


@pytest.fixture
def live_pid():
  """A process of this host that is alive for the test's duration, as another training would be."""
  proc = subprocess.Popen(['sleep', '120'])
  yield proc.pid
  proc.kill()
  proc.wait()


def dead_pid():
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def test_a_second_training_is_refused_untouched_naming_the_holder(tmp_path, live_pid):
  record = write_lock(tmp_path, pid=live_pid)
  with pytest.raises(workdir_lock.WorkdirLocked) as err:
    train.train_and_evaluate(small_run(), str(tmp_path))
  message = str(err.value)
  assert f'pid {live_pid} on {record["host"]}' in message and '\n' not in message
  assert 'wait for it to finish, stop it, or delete' in message
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    'lock.json'
  ]  # no config, metrics, checkpoints
  assert json.loads((tmp_path / 'lock.json').read_text()) == record  # and the holder's lock intact


@pytest.mark.slow
def test_the_command_line_refuses_in_one_line_with_exit_code_2(tmp_path, live_pid):
  write_lock(tmp_path, pid=live_pid)
  result = run_cli(tmp_path, *as_flags(small_run()), check=False)
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert last.startswith('error: the workdir') and f'is being trained by pid {live_pid}' in last
  assert sorted(p.name for p in tmp_path.iterdir()) == ['lock.json']


def test_a_lock_of_this_host_whose_pid_is_gone_is_taken_over(tmp_path, caplog):
  pid = dead_pid()
  write_lock(tmp_path, pid=pid, heartbeat=time.time())  # a fresh heartbeat does not matter here
  train.train_and_evaluate(small_run(train__num_steps=3), str(tmp_path))
  assert f'process {pid} is gone' in caplog.text and 'Took over the stale lock' in caplog.text
  assert (tmp_path / 'results.json').exists() and not (tmp_path / 'lock.json').exists()


@pytest.mark.parametrize('age,taken', [(30, False), (700, True)])
def test_a_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path, age, taken):
  write_lock(tmp_path, host='elsewhere.invalid', pid=1, heartbeat=time.time() - age)
  if taken:  # lock_timeout_s is 600 by default
    workdir_lock.acquire(tmp_path, 600).release()
    assert not (tmp_path / 'lock.json').exists()
  else:
    with pytest.raises(workdir_lock.WorkdirLocked, match='on elsewhere.invalid since'):
      workdir_lock.acquire(tmp_path, 600)


def test_an_unreadable_lock_is_refused_until_stale(tmp_path):
  (tmp_path / 'lock.json').write_text('{half a rec')
  with pytest.raises(workdir_lock.WorkdirLocked, match='unreadable'):
    workdir_lock.acquire(tmp_path, 600)
  old = time.time() - 700
  os.utime(tmp_path / 'lock.json', (old, old))
  workdir_lock.acquire(tmp_path, 600).release()


def test_one_process_holds_it_once(tmp_path):
  lock = workdir_lock.acquire(tmp_path, 600)
  with pytest.raises(workdir_lock.WorkdirLocked, match=f'pid {os.getpid()}'):
    workdir_lock.acquire(tmp_path, 600)  # e.g. a second training started from the same notebook
  lock.release()
  workdir_lock.acquire(tmp_path, 600).release()
  write_lock(tmp_path)  # this pid, not held: a leftover of an earlier process that had the same pid
  workdir_lock.acquire(tmp_path, 600).release()


def test_the_heartbeat_is_refreshed_while_held(tmp_path):
  lock = workdir_lock.acquire(tmp_path, 2)  # beats every 0.5 s
  first = json.loads((tmp_path / 'lock.json').read_text())
  deadline = time.time() + 60  # a limit, not a synchronisation: the loop ends at the first beat
  later = first
  while later['heartbeat'] == first['heartbeat'] and time.time() < deadline:
    time.sleep(0.01)  # polling, not spinning
    later = json.loads((tmp_path / 'lock.json').read_text())  # replaced whole, never half-written
  lock.release()
  assert later['heartbeat'] > first['heartbeat'] and later['started'] == first['started']
  assert sorted(os.listdir(tmp_path)) == []  # no private files left behind


@pytest.mark.filterwarnings('ignore:os.fork')  # the children run only this module's plain Python
@pytest.mark.parametrize('stale', [False, True], ids=['free', 'stale'])
def test_of_many_starting_at_once_exactly_one_wins(tmp_path, stale):
  """Forked processes race for a free workdir, or to take over the same stale lock.

  Pipes, not sleeps, order them: all start when the parent writes `go`, and a winner holds the lock
  until every other child has tried and exited (a winner that let go early would make the lock stale
  and fairly taken over, whatever the machine's load)."""
  if stale:
    write_lock(tmp_path, pid=dead_pid())
  go_read, go_write = os.pipe()
  done_read, done_write = os.pipe()
  children = []
  for _ in range(8):
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no cleanup; the exit code tells whether it won
      code = 3
      try:
        os.read(go_read, 1)
        workdir_lock.acquire(tmp_path, 600)
        code = 0
        os.read(done_read, 1)  # hold it while the others look
      except workdir_lock.WorkdirLocked:
        code = 1
      finally:
        os._exit(code)
    children.append(pid)
  os.write(go_write, b'g' * len(children))
  codes = {}
  deadline = time.time() + 120  # a limit, not a synchronisation: past it the assertion below fails
  while len(codes) < len(children) - 1 and time.time() < deadline:
    for pid in set(children) - set(codes):
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        codes[pid] = os.waitstatus_to_exitcode(status)
    time.sleep(0.01)
  os.write(done_write, b'd' * len(children))
  for pid in set(children) - set(codes):
    codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
  assert sorted(codes.values()) == [0] + [1] * 7
  assert sorted(os.listdir(tmp_path)) == ['lock.json']  # the winner's; no private files left


def test_released_after_an_error(tmp_path):
  config = small_run(train__num_steps=4, train__checkpoint_every_steps=1, train__log_every_steps=1)
  config.optimizer.learning_rate = 1e38
  with pytest.raises(train.Diverged):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'lock.json').exists()


def test_readers_take_no_lock(tmp_path, live_pid):
  train.train_and_evaluate(small_run(train__num_steps=3), str(tmp_path))
  record = write_lock(tmp_path, pid=live_pid)  # a training is running
  run = checkpointing.open_workdir(tmp_path)
  assert run.step == 3
  assert json.loads((tmp_path / 'lock.json').read_text()) == record
