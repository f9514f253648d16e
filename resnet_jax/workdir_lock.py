"""One training per workdir: WORKDIR/lock.json, held by the training that writes it, ignored by tools.

A module of its own, not part of checkpointing.py: the lock guards the whole workdir (config.json,
metrics.jsonl, results.json, checkpoints) and is taken before anything in it is read or written.

The file is JSON: {"host", "pid", "started", "heartbeat", "token"} (times in seconds since the epoch;
`token` tells one holder from another with the same host and pid). It appears complete or not at all: it
is written under a private name and hard-linked to lock.json, which fails when lock.json exists, so of two
trainings starting at once exactly one wins. A daemon thread rewrites "heartbeat" every few seconds.

A lock is stale, and is taken over with a warning, when its holder is on this host and its pid is gone, or
on another host and its heartbeat is older than train.lock_timeout_s; otherwise the training stops in one
sentence naming the holder. Under jax.distributed process 0 takes the lock and tells the others, which
share it (they never read it); they stop with process 0's sentence when it refuses.
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid

import jax
from absl import logging

from resnet_jax import parallel
from resnet_jax.workdir import Workdir

_held = set()  # lock paths this process holds: its own pid in a lock file is then no stale leftover


class WorkdirLocked(RuntimeError):
  """Another training holds the workdir."""


def _read(path):
  """The holder's record; {} for an unreadable file; None when there is no lock."""
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  return record if isinstance(record, dict) else {}


def _since(seconds) -> str:
  return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(seconds))


def _stale(path, holder, timeout_s):
  """Why the lock `holder` is stale, or None while its training may be alive."""
  if not {'host', 'pid', 'heartbeat', 'token'} <= holder.keys():
    age = time.time() - os.path.getmtime(path)
    return f'it is unreadable and {age:.0f} s old' if age > timeout_s else None
  if holder['host'] == socket.gethostname():
    if holder['pid'] == os.getpid():  # this process: held by another training here, or a leftover
      return None if path in _held else 'it names this process, which does not hold it'
    try:
      os.kill(holder['pid'], 0)
    except ProcessLookupError:
      return f'process {holder["pid"]} is gone'
    except PermissionError:  # alive, under another user
      pass
    return None
  age = time.time() - holder['heartbeat']
  return f'its last heartbeat is {age:.0f} s old' if age > timeout_s else None


def _refusal(path, holder) -> str:
  if 'host' not in holder:
    return (
      f'the workdir {os.path.dirname(path)} is locked by an unreadable {path} that is not yet '
      f'stale: wait, or delete {path} if you know no training uses this workdir.'
    )
  return (
    f'the workdir {os.path.dirname(path)} is being trained by pid {holder["pid"]} on '
    f'{holder["host"]} since {_since(holder.get("started", 0))} (last heartbeat '
    f'{_since(holder["heartbeat"])}): wait for it to finish, stop it, or delete {path} if you '
    'know it is dead.'
  )


def _take_over(path, holder, token) -> bool:
  """Moves the stale lock aside; False when what was moved was no longer `holder` (put back)."""
  aside = f'{path}.{token}.stale'
  try:
    os.rename(path, aside)
  except FileNotFoundError:  # released or taken over meanwhile
    return False
  moved = _read(aside) or {}
  if moved.get('token') != holder.get('token'):  # someone took it over between our read and rename
    with contextlib.suppress(FileExistsError):
      os.link(aside, path)
    os.unlink(aside)
    return False
  os.unlink(aside)
  return True


class Lock:
  """A held lock.json: its heartbeat thread runs until release()."""

  def __init__(self, path, record, timeout_s):
    self.path = path
    self.record = record
    self._stop = threading.Event()
    interval = min(60.0, max(0.5, timeout_s / 10))
    self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
    self._thread.start()

  def _beat(self, interval):
    while not self._stop.wait(interval):
      if (_read(self.path) or {}).get('token') != self.record['token']:
        logging.error('%s was taken over by another training: no more heartbeats.', self.path)
        return
      self.record = {**self.record, 'heartbeat': time.time()}
      beat = f'{self.path}.{self.record["token"]}.beat'
      try:
        _write_new(beat, self.record)
        os.replace(beat, self.path)
      except OSError as e:  # a full disk: the next beat tries again
        logging.warning('Cannot refresh the heartbeat of %s (%s).', self.path, e)

  def release(self):
    self._stop.set()
    self._thread.join()
    if (_read(self.path) or {}).get('token') == self.record['token']:
      os.unlink(self.path)
    _held.discard(self.path)


def _write_new(path, record):
  with open(path, 'w') as f:
    json.dump(record, f)


def acquire(workdir, timeout_s) -> Lock:
  """Takes the workdir's lock, taking over a stale one; raises WorkdirLocked while another holds it."""
  path = Workdir(workdir).lock
  for _ in range(5):  # a lock released or taken over meanwhile: look again
    now = time.time()
    token = uuid.uuid4().hex
    record = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': now,
      'heartbeat': now,
      'token': token,
    }
    private = f'{path}.{token}.new'
    _write_new(private, record)
    try:
      os.link(private, path)  # atomic, and fails when lock.json exists
      _held.add(path)
      return Lock(path, record, timeout_s)
    except FileExistsError:
      pass
    finally:
      os.unlink(private)
    holder = _read(path)
    if holder is None:
      continue
    reason = _stale(path, holder, timeout_s)
    if reason is None:
      raise WorkdirLocked(_refusal(path, holder))
    if _take_over(path, holder, token):
      logging.warning(
        'Took over the stale lock %s of pid %s on %s (%s).',
        path,
        holder.get('pid'),
        holder.get('host'),
        reason,
      )
  raise WorkdirLocked(
    f'the lock {path} kept changing while this training tried to take it: another training is '
    'starting in the same workdir; wait for it or stop it.'
  )


@contextlib.contextmanager
def held(workdir, timeout_s):
  """The workdir's lock for the duration of the block: process 0 holds it for every process."""
  lock = None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, timeout_s)
    except BaseException as e:
      parallel.from_process_zero('workdir_lock', str(e) or type(e).__name__)
      raise
    parallel.from_process_zero('workdir_lock', '')
  else:
    refusal = parallel.from_process_zero('workdir_lock')
    if refusal:
      raise WorkdirLocked(refusal)
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
