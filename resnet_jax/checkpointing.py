"""Checkpoints: training writes them and survives failures; tools only read them.

Training (`restore_or_init`, `save`):
- A latest checkpoint that cannot be read is moved aside to checkpoints/corrupt/ (never deleted), and the
  previous one used, only on evidence that its files are damaged (`damage_evidence`: a file missing or
  shorter than when it was written, metadata that does not parse, a structure this code never writes).
  Any other failure to read it (an I/O error, no memory, a library that cannot read intact files) stops
  the run with CheckpointUnreadable and moves nothing: a transient fault must not cost the progress.
  When every checkpoint was damaged the run stops too (NoUsableCheckpoint): starting again from step 0
  is the caller's explicit choice (`fresh_start`). Under jax.distributed process 0 decides and moves;
  every process restores the same step and a failure on any one stops them all.
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
import json
import os
import pathlib
import re
import shutil
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from resnet_jax import models, parallel
from resnet_jax.workdir import Workdir


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of a different model or optimizer."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (e.g. the disk is full); the earlier ones are intact."""


class CheckpointUnreadable(RuntimeError):
  """A checkpoint could not be read and its files show no damage: nothing was moved."""


class NoUsableCheckpoint(RuntimeError):
  """Every checkpoint of the workdir was damaged and moved aside: no silent start from step 0."""


def _whole_arrays_on_the_cpu():
  """orbax writes a replicated array as one slice per device ("replica-parallel"), each cut by its own
  XLA call; where the devices are CPUs, whose copies all sit in host memory, the slicing is all cost: 1.5 s
  of each ResNet-8 save on 8 CPU devices (a 12.3 s run of 6 steps and 2 saves took 9.4 s without it).
  Accelerators keep orbax's default. The checkpoints read the same either way."""
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if jax.default_backend() == 'cpu' and getattr(handler, '_use_replica_parallel', False):
    # No public switch for the registered handler; registering another one logs a warning on every run.
    handler._use_replica_parallel = False


def manager(workdir, keep):
  # cleanup_tmp_directories: a write cut short (a kill, a full disk) leaves a temporary directory that
  # the next writer removes; only writers (the lock holder, convert) open a manager.
  _whole_arrays_on_the_cpu()
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep, create=True, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(
    Workdir(workdir).checkpoints, options=options, item_handlers=ocp.StandardCheckpointHandler()
  )


def save(mngr, state, step):
  """Starts writing `state` as `step`; raises CheckpointWriteError for this or the previous write."""
  # orbax waits for the previous write anyway; after it, that write's sizes are final
  wait_until_saved(mngr, state)
  try:
    mngr.save(step, args=ocp.args.StandardSave(state))
  except Exception as e:  # noqa: BLE001  # orbax's background writes fail as ValueError, OSError, ...
    raise _write_failed(mngr, state, step, e) from e
  _unrecorded.setdefault(str(mngr.directory), set()).add(step)


_unrecorded = {}  # {checkpoint directory: steps this process started writing, FILES not yet written}


def wait_until_saved(mngr, state):
  """Blocks until the checkpoints started are written; raises CheckpointWriteError if one failed."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # noqa: BLE001
    raise _write_failed(mngr, state, None, e) from e
  steps = _unrecorded.pop(str(mngr.directory), set())
  if jax.process_index() == 0:
    for step in sorted(steps & set(complete_steps(str(mngr.directory)))):  # not rotated away
      record_files(os.path.join(str(mngr.directory), str(step)))


FILES = 'files.json'  # in a finished step's directory: {relative path: size} of what orbax wrote


def record_files(step_dir) -> None:
  """Writes FILES for a checkpoint this run wrote, once orbax has finished it: the sizes that
  `damage_evidence` compares against. Never rewritten; a checkpoint without it (killed between the two,
  or older) is judged on its metadata alone."""
  path = os.path.join(step_dir, FILES)
  if os.path.exists(path):
    return
  sizes = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      full = os.path.join(root, name)
      sizes[os.path.relpath(full, step_dir)] = os.path.getsize(full)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(sizes, f, indent=0, sort_keys=True)
  os.replace(tmp, path)


_REQUIRED = ('_CHECKPOINT_METADATA', 'default/_METADATA', 'default/manifest.ocdbt')
_JSON = ('_CHECKPOINT_METADATA', 'default/_METADATA', 'default/_sharding', FILES)


def damage_evidence(step_dir, state_fields=None):
  """Why the checkpoint in `step_dir` is damaged, in words, or None when its files show no damage.

  Evidence only: a file orbax always writes is missing; a file is missing or shorter than FILES recorded
  after the write; a metadata file does not parse; the saved tree's top level is not the TrainState's
  fields (`state_fields`). Reading errors (OSError) propagate: an unreadable file is no proof of damage.
  """
  for name in _REQUIRED:
    if not os.path.exists(os.path.join(step_dir, name)):
      return f'{name} is missing'
  parsed = {}
  for name in _JSON:
    path = os.path.join(step_dir, name)
    if name not in _REQUIRED and not os.path.exists(path):  # optional: FILES, _sharding
      continue
    with open(path) as f:
      text = f.read()
    try:
      parsed[name] = json.loads(text)
    except ValueError as e:
      return f'{name} does not parse as JSON ({e})'
  for name, size in parsed.get(FILES, {}).items():
    path = os.path.join(step_dir, name)
    if not os.path.exists(path):
      return f'{name} is missing (written with {size} bytes)'
    actual = os.path.getsize(path)
    if actual < size:
      return f'{name} is truncated ({actual} of {size} bytes)'
  tree = parsed['default/_METADATA'].get('tree_metadata')
  if not isinstance(tree, dict) or not tree:
    return 'default/_METADATA holds no tree'
  saved_fields = {_top_level(key) for key in tree}
  if state_fields is not None and not saved_fields <= set(state_fields):
    unknown = sorted(saved_fields - set(state_fields))
    return f'default/_METADATA holds fields this code never saves ({", ".join(unknown)})'
  return None


def _top_level(key) -> str:
  """The first element of an orbax tree-metadata key such as "('params', 'conv1', 'kernel')"."""
  match = re.match(r"""\(\s*['"]([^'"]+)['"]""", key)
  return match[1] if match else key


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
    f'({Workdir(workdir).config_json}) or choose a new --workdir.'
  )


def _move_aside(workdir, step):
  src = os.path.join(Workdir(workdir).checkpoints, str(step))
  dst = os.path.join(Workdir(workdir).corrupt, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.rename(src, dst)
  return dst


def _moved_earlier(workdir) -> list:
  directory = Workdir(workdir).corrupt
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def _read_here(directory, step, saved_target):
  """This process's own copy of a replicated checkpoint, as host arrays.

  Read without orbax's cross-process barriers (every process alone), so that a process that fails to
  read cannot leave the others waiting in one: the processes agree on the outcome afterwards.
  """
  local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  host_target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local), saved_target
  )
  alone = ocp.options.MultiprocessingOptions(
    primary_host=jax.process_index(), active_processes={jax.process_index()}
  )
  with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
    restored = checkpointer.restore(os.path.join(directory, str(step), 'default'), host_target)
  return jax.tree.map(np.asarray, restored)


def _try_restore(mngr, step, target, workdir):
  """(host state or None, the scan_blocks layout to convert it to or None, '' or why it could not be
  read on this process)."""
  try:
    saved_target, scan_blocks = _restore_target(mngr, step, target, workdir)
    if saved_target is None:
      return None, None, 'its metadata cannot be read'
    return _read_here(str(mngr.directory), step, saved_target), scan_blocks, ''
  except CheckpointMismatch as e:  # another network's, unless its files are damaged: decided below
    return None, None, f'{_MISMATCH}{e}'
  except Exception as e:  # noqa: BLE001  # classified by the files' evidence, not by the error's type
    return None, None, f'{type(e).__name__}: {_first_line(e)}'


_MISMATCH = 'mismatch:'


def _decide(mngr, step, failures, state_fields):
  """Process 0's verdict on a checkpoint some process could not read: 'move:EVIDENCE' or 'stop:WHY'."""
  step_dir = os.path.join(str(mngr.directory), str(step))
  try:
    evidence = damage_evidence(step_dir, state_fields)
  except OSError as e:
    return f'stop:{failures}; reading its files failed too ({type(e).__name__}: {_first_line(e)})'
  return f'move:{evidence}' if evidence else f'stop:{failures}'


def restore_or_init(workdir, keep, state, mesh, fresh_start=False):
  """(manager, state): the newest checkpoint of `workdir` that every process reads, else `state`.

  Raises CheckpointUnreadable (nothing moved) when a checkpoint cannot be read without evidence of
  damage, and NoUsableCheckpoint when checkpoints existed and all were damaged, unless `fresh_start`.
  `state` may be a function that makes it: then only its shapes are traced, and its values are computed
  only when there is no checkpoint to restore (a restored run never pays for a random init).
  """
  parallel.sync_processes('restore_or_init')  # device_put of a global array is a collective
  replicated = parallel.replicated(mesh)
  make = state if callable(state) else lambda: state
  shapes = jax.eval_shape(make)
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes
  )
  state_fields = (
    [f.name for f in dataclasses.fields(shapes)] if dataclasses.is_dataclass(shapes) else None
  )
  moved = []
  while True:
    mngr = manager(workdir, keep)
    latest = mngr.latest_step()
    step = parallel.from_process_zero('latest-step', '' if latest is None else str(latest))
    if not step:
      earlier = _moved_earlier(workdir)
      if earlier and not fresh_start:
        mngr.close()
        raise NoUsableCheckpoint(
          f'no checkpoint in {mngr.directory} can be restored: '
          f'{", ".join(moved) if moved else "all"} were damaged and are in {Workdir(workdir).corrupt} '
          f'({", ".join(earlier)}); restore a good copy into {mngr.directory} and rerun, or start '
          'again from step 0 on purpose with --fresh_start (the damaged ones stay where they are).'
        )
      return mngr, jax.device_put(make(), replicated)
    step = int(step)
    host, scan_blocks, failure = _try_restore(mngr, step, target, workdir)
    outcomes = parallel.from_all_processes('restore-outcome', failure)
    if not any(outcomes):
      restored = jax.device_put(host, replicated)  # together: a collective across processes
      if scan_blocks is not None:  # saved in the other layout
        convert = functools.partial(models.convert_layout, scan_blocks=scan_blocks)
        restored = jax.jit(convert, out_shardings=replicated)(restored)
        logging.info('Converted the checkpoint of step %d to scan_blocks=%s.', step, scan_blocks)
      logging.info('Resuming from the checkpoint of step %d in %s.', step, mngr.directory)
      return mngr, restored
    mismatch = next((f[len(_MISMATCH) :] for f in outcomes if f.startswith(_MISMATCH)), None)
    described = '; '.join(
      f'process {i}: {f}' if len(outcomes) > 1 else f for i, f in enumerate(outcomes) if f
    )
    verdict = None
    if jax.process_index() == 0:
      verdict = _decide(mngr, step, described, state_fields)
    verdict = parallel.from_process_zero('restore-verdict', verdict or '')
    kind, _, detail = verdict.partition(':')
    if kind == 'stop' and mismatch is not None:
      mngr.close()
      raise CheckpointMismatch(mismatch)
    if kind == 'stop':
      mngr.close()
      raise CheckpointUnreadable(
        f'cannot read the checkpoint of step {step} in {mngr.directory} ({detail}), and its files '
        'show no damage, so nothing was moved: fix the cause (the filesystem, permissions, memory, '
        'or the orbax-checkpoint version) and rerun the same command to resume from it.'
      )
    mngr.close()
    if jax.process_index() == 0:
      moved_to = _move_aside(workdir, step)
      logging.warning(
        'The checkpoint of step %d is damaged (%s; reading it gave: %s); moved it to %s and trying '
        'the previous one.',
        step,
        detail,
        described,
        moved_to,
      )
    moved.append(str(step))
    parallel.sync_processes('moved-aside')  # the others list the steps again only after the move


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
  run_dir = Workdir(workdir)
  workdir = run_dir.path
  if config is None:
    if not run_dir.has_config():
      raise FileNotFoundError(
        f'{workdir} holds no config.json: pass the --workdir of a training run.'
      )
    config = run_dir.config()
  config = run_dir.with_saved_statistics(config)
  directory = run_dir.checkpoints
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
      target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), _item_metadata(path)
      )
      with ocp.StandardCheckpointer() as checkpointer:
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


def _item_metadata(item_dir):
  """The saved tree's shapes and dtypes, read by the item's handler: a Checkpointer's metadata() would
  also look for the step's _CHECKPOINT_METADATA inside the item directory (the manager writes it one
  level up, in the step directory) and warn on every read that it does not exist."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(pathlib.Path(item_dir)).tree
  finally:
    handler.close()


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
