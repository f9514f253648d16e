"""Checkpoints: training writes them and survives failures; tools only read them.

Training (`restore_or_init`, `save`):
- A damaged latest checkpoint is moved aside to checkpoints/corrupt/ (never deleted) and the previous one
  is used: orbax's save() on an existing step does nothing, so a bad step left in place stays "latest".
- A checkpoint of another network (a reused workdir) is refused before anything in the workdir changes;
  one of the same network in the other `model.scan_blocks` layout is converted.
- A checkpoint that cannot be written (a full disk, any error of the asynchronous write, which surfaces at
  the next save or wait) stops the run with CheckpointWriteError, naming the space it needs and the last
  good checkpoint; the failed step's temporary directory is removed, so a rerun resumes from that one.
- SIGTERM/SIGINT ask the loop to save and stop after the current step (orbax's own preemption check works
  only under jax.distributed, so a single process needs its own handler).

Tools (`open_workdir`): the config and the newest complete, readable checkpoint of a finished or running
run; a damaged one is named and skipped, nothing in the workdir is created, moved or deleted. A checkpoint
that a running training deletes while it is read (it keeps train.keep_checkpoints) is no damage: the
newest one is read again.
"""

import contextlib
import dataclasses
import errno
import functools
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from resnet_jax import defaults, models, parallel


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of a different model or optimizer."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. the disk is full); the earlier ones are intact."""


def checkpoint_dir(workdir) -> str:
  """Absolute: orbax reads no metadata from a relative path."""
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints')


def manager(workdir, keep):
  # cleanup_tmp_directories: a write cut short (a kill, a full disk) leaves a temporary directory that
  # the next writer removes; only writers (the lock holder, convert) open a manager.
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), options=options, item_handlers=ocp.StandardCheckpointHandler()
  )


def save(mngr, state, step):
  """Starts writing `state` as `step`; raises CheckpointWriteError for this or the previous write."""
  try:
    mngr.save(step, args=ocp.args.StandardSave(state))
  except Exception as e:  # noqa: BLE001  # orbax's background writes fail as ValueError, OSError, ...
    raise _write_failed(mngr, state, step, e) from e


def wait_until_saved(mngr, state):
  """Blocks until the checkpoints started are written; raises CheckpointWriteError if one failed."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _write_failed(mngr, state, None, e) from e


@contextlib.contextmanager
def failed_writes_first(mngr, state):
  """A full disk may show first in another file (metrics.jsonl) while a checkpoint is written in the
  background: a checkpoint write that failed meanwhile is then the error raised, its temporary directory
  removed. `state`: any state of the run (its size goes into the message)."""
  try:
    yield
  except OSError as e:
    if not isinstance(e, CheckpointWriteError):
      wait_until_saved(mngr, state)
    raise


_TMP = re.compile(
  r'^(\d+)\.orbax-checkpoint-tmp'
)  # orbax writes STEP.orbax-checkpoint-tmp..., renames


def _unfinished(directory) -> dict:
  """{step: [temporary paths]} of the checkpoints started but not finished in `directory`."""
  found = {}
  for name in os.listdir(directory) if os.path.isdir(directory) else ():
    match = _TMP.match(name)
    if match:
      found.setdefault(int(match[1]), []).append(os.path.join(directory, name))
  return found


def _write_failed(mngr, state, step, error) -> CheckpointWriteError:
  """The one-sentence error, after removing the failed steps' temporary directories (only those)."""
  directory = str(mngr.directory)
  unfinished = {}
  # The first failed future raises while orbax's other threads may still be writing (and re-creating)
  # the step's temporary directory: remove it until none appears in two looks, for at most 2 s.
  clean = 0
  for _ in range(20):
    with contextlib.suppress(Exception):
      mngr.wait_until_finished()
    found = _unfinished(directory)
    clean = 0 if found else clean + 1
    if clean == 2:
      break
    unfinished.update(found)
    if jax.process_index() == 0:
      for paths in found.values():
        for path in paths:
          shutil.rmtree(path, ignore_errors=True)
    time.sleep(0.1)
  failed = max(unfinished, default=step)
  complete = complete_steps(directory)
  needed = sum(
    x.nbytes for x in jax.tree.leaves(state)
  )  # the state's bytes, or a written one's size
  if complete:
    needed = max(needed, _disk_usage(os.path.join(directory, str(complete[0]))))
  free = shutil.disk_usage(directory).free
  full = getattr(error, 'errno', None) == errno.ENOSPC or 'No space left on device' in str(error)
  reason = 'no space left on device' if full else f'{type(error).__name__}: {_first_line(error)}'
  last = f'step {complete[0]}' if complete else 'none yet'
  failure = CheckpointWriteError(
    f'cannot write the checkpoint{f" of step {failed}" if failed is not None else ""} to '
    f'{directory} ({reason}); one takes about {needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB '
    f'are free; the last good checkpoint is {last}: free some space and rerun the same command to '
    'continue from it.'
  )
  failure.errno = errno.ENOSPC if full else errno.EIO
  return failure


def _disk_usage(path) -> int:
  return sum(
    os.stat(os.path.join(root, name)).st_blocks * 512
    for root, _, names in os.walk(path)
    for name in names
  )


def _first_line(error) -> str:
  return str(error).splitlines()[0][:200] if str(error) else ''


def _shapes(tree):
  """{'params/stage1_block1/conv1/kernel': shape}: attribute, dict and index keys alike, as orbax lists them."""
  name = lambda k: str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k))))
  return {
    '/'.join(map(name, path)): tuple(v.shape)
    for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _restore_target(mngr, step, target, workdir):
  """(target to restore `step` into, the scan_blocks layout to convert it to afterwards or None).

  The target itself, or its other `model.scan_blocks` layout when the checkpoint has that one; raises
  CheckpointMismatch for another network; (None, None) for unreadable metadata.
  """
  try:
    saved = _shapes(mngr.item_metadata(step))
  except Exception:  # noqa: BLE001  # unreadable metadata: treated as damage by the caller
    return None, None
  wanted = _shapes(target)
  if saved == wanted:
    return target, None
  sharding = jax.tree.leaves(target)[0].sharding  # the state is replicated
  for saved_scan in (True, False):
    other = jax.eval_shape(lambda t, s=saved_scan: models.convert_layout(t, s), target)
    if saved == _shapes(other):
      other = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), other
      )
      return other, not saved_scan
  diff = sorted(set(saved.items()) ^ set(wanted.items()))[0][0]
  raise CheckpointMismatch(
    f'the checkpoint of step {step} in {workdir} does not match this config (first difference at '
    f'{diff}): it was written for another network or optimizer; resume it with its own config '
    f'({os.path.join(workdir, "config.json")}) or choose a new --workdir.'
  )


def _move_aside(mngr, step):
  src = os.path.join(str(mngr.directory), str(step))
  dst = os.path.join(str(mngr.directory), 'corrupt', f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.rename(src, dst)
  return dst


def restore_or_init(workdir, keep, state, mesh):
  """(manager, state): the newest readable checkpoint of `workdir`, else `state` placed on the mesh.

  `state` may be a function that makes it: then only its shapes are traced, and its values are computed
  only when there is no checkpoint to restore (a restored run never pays for a random init).
  """
  parallel.sync_processes('restore_or_init')  # device_put of a global array is a collective
  replicated = parallel.replicated(mesh)
  make = state if callable(state) else lambda: state
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(make)
  )
  while True:
    mngr = manager(workdir, keep)
    step = mngr.latest_step()
    if step is None:
      return mngr, jax.device_put(make(), replicated)
    try:
      saved_target, scan_blocks = _restore_target(mngr, step, target, workdir)
      if saved_target is not None:
        restored = mngr.restore(step, args=ocp.args.StandardRestore(saved_target))
        if scan_blocks is not None:  # saved in the other layout
          convert = functools.partial(models.convert_layout, scan_blocks=scan_blocks)
          restored = jax.jit(convert, out_shardings=replicated)(restored)
          logging.info(
            'Converted the checkpoint of step %d to model.scan_blocks=%s.', step, scan_blocks
          )
        logging.info('Resuming from the checkpoint of step %d in %s.', step, mngr.directory)
        return mngr, restored
    except CheckpointMismatch:
      mngr.close()
      raise
    except Exception as e:  # noqa: BLE001  # any failure to read means damage
      logging.warning(
        'The checkpoint of step %d cannot be read (%s).', step, str(e).splitlines()[0][:200]
      )
    mngr.close()
    logging.warning(
      'Moved the damaged checkpoint of step %d to %s; trying the previous one.',
      step,
      _move_aside(mngr, step),
    )


@dataclasses.dataclass(frozen=True)
class Run:
  """A workdir opened for reading: its config, and the newest checkpoint that reads (host arrays)."""

  workdir: str
  config: object
  step: int
  state: dict  # the TrainState's fields as nested dicts: 'params', 'batch_stats', 'step', ...

  @property
  def variables(self) -> dict:
    """{'params', 'batch_stats'} for model.apply, in the layout of self.config.model.scan_blocks."""
    return {k: self.state[k] for k in ('params', 'batch_stats')}


def complete_steps(directory) -> list:
  """Finished checkpoints, newest first: orbax writes into a temporary name and renames when done."""
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)


def open_workdir(workdir, config=None) -> Run:
  """The config (config.json unless given) and the newest readable checkpoint of a run, read-only.

  Safe beside a running training: only finished checkpoints are read, and a damaged one is named and
  skipped, never moved. Arrays come back on the host (numpy), whatever devices saved them.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if config is None:
    if not os.path.exists(os.path.join(workdir, 'config.json')):
      raise FileNotFoundError(
        f'{workdir} holds no config.json: pass the --workdir of a training run.'
      )
    config = defaults.from_workdir(workdir)
  directory = checkpoint_dir(workdir)
  steps = complete_steps(directory)
  if not steps:
    raise FileNotFoundError(
      f'{workdir} holds no checkpoint yet: train first (python -m resnet_jax.main) or '
      'pass the workdir of a trained run.'
    )
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  damaged = set()
  while steps:
    step = steps[0]
    path = os.path.join(directory, str(step), 'default')
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        target = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          checkpointer.metadata(path).item_metadata.tree,
        )
        state = jax.tree.map(np.asarray, checkpointer.restore(path, target))
    except Exception as e:  # noqa: BLE001  # any failure to read: name it, leave it, try the previous one
      newer = [s for s in complete_steps(directory) if s > step]
      if not newer:  # no training rotated it away meanwhile: it is damaged
        logging.warning(
          'The checkpoint of step %d in %s cannot be read (%s); using an earlier one.',
          step,
          directory,
          _first_line(e),
        )
        damaged.add(step)
      steps = [s for s in complete_steps(directory) if s not in damaged]
      continue
    state = models.convert_layout(state, bool(config.model.get('scan_blocks', False)))
    return Run(workdir, config, step, state)
  raise FileNotFoundError(
    f'no checkpoint in {directory} can be read (see the warnings above); train again '
    'or restore the folder from a backup.'
  )


class PreemptionHandler:
  """Turns SIGTERM/SIGINT into a request to save and stop after the current step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if jax.process_count() > 1:  # jax.distributed's own notifier owns SIGTERM there
      return self
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning(
      'Received %s: saving a checkpoint after this step, then stopping.',
      signal.Signals(signum).name,
    )
    self.signal = signum

  def requested(self, mngr, step):
    """All processes agree: under jax.distributed orbax's sync point decides, else the local signal."""
    if jax.process_count() > 1:
      return mngr.reached_preemption(step)
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
