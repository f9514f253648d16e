"""Checkpoints that survive the failures of long preemptible runs.

- A damaged latest checkpoint is moved aside to checkpoints/corrupt/ (never deleted) and the previous one
  is used: orbax's save() on an existing step does nothing, so a bad step left in place stays "latest".
- A checkpoint of another network (a reused workdir) is refused before anything in the workdir changes.
- SIGTERM/SIGINT ask the loop to save and stop after the current step (orbax's own preemption check works
  only under jax.distributed, so a single process needs its own handler).
"""
import os
import signal
import time

import jax
import orbax.checkpoint as ocp
from absl import logging

from resnet_jax import parallel


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of a different model or optimizer."""


def manager(workdir, keep):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def _shapes(tree):
  """{'params/stage1_block1/conv1/kernel': shape}: attribute, dict and index keys alike, as orbax lists them."""
  name = lambda k: str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k))))
  return {'/'.join(map(name, path)): tuple(v.shape) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_matches(mngr, step, target, workdir):
  """Compares the saved tree's names and shapes with the target's; raises CheckpointMismatch."""
  try:
    saved = mngr.item_metadata(step)
  except Exception:  # pylint: disable=broad-except  # unreadable metadata: treated as damage by the caller
    return False
  saved, wanted = _shapes(saved), _shapes(target)
  if saved != wanted:
    diff = sorted(set(saved.items()) ^ set(wanted.items()))[0][0]
    raise CheckpointMismatch(
        f'the checkpoint of step {step} in {workdir} does not match this config (first difference at '
        f'{diff}): it was written for another network or optimizer; resume it with its own config '
        f'({os.path.join(workdir, "config.json")}) or choose a new --workdir.')
  return True


def _move_aside(mngr, step):
  src = os.path.join(str(mngr.directory), str(step))
  dst = os.path.join(str(mngr.directory), 'corrupt', f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  os.rename(src, dst)
  return dst


def restore_or_init(workdir, keep, state, mesh):
  """(manager, state): the newest readable checkpoint of `workdir`, else `state` placed on the mesh."""
  parallel.sync_processes('restore_or_init')  # device_put of a global array is a collective
  state = jax.device_put(state, parallel.replicated(mesh))
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  while True:
    mngr = manager(workdir, keep)
    step = mngr.latest_step()
    if step is None:
      return mngr, state
    try:
      if _check_matches(mngr, step, target, workdir):
        restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
        logging.info('Resuming from the checkpoint of step %d in %s.', step, mngr.directory)
        return mngr, restored
    except CheckpointMismatch:
      mngr.close()
      raise
    except Exception as e:  # pylint: disable=broad-except  # any failure to read means damage
      logging.warning('The checkpoint of step %d cannot be read (%s).', step, str(e).splitlines()[0][:200])
    mngr.close()
    logging.warning('Moved the damaged checkpoint of step %d to %s; trying the previous one.', step,
                    _move_aside(mngr, step))


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
    logging.warning('Received %s: saving a checkpoint after this step, then stopping.', signal.Signals(signum).name)
    self.signal = signum

  def requested(self, mngr, step):
    """All processes agree: under jax.distributed orbax's sync point decides, else the local signal."""
    if jax.process_count() > 1:
      return mngr.reached_preemption(step)
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def load_config(workdir):
  """The config a workdir was trained with (its config.json), on top of today's defaults.

  Fields added to configs/default.py after the run was started take their default values, so tools keep
  working on older runs; tuples come back as tuples.
  """
  import json  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  config = default.get_config()

  def merge(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and key in node:
        merge(node[key], value)
      else:
        node[key] = tuple(value) if isinstance(node.get(key), tuple) else value

  merge(config, saved)
  return config
