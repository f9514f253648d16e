"""Where metrics go: TensorBoard (clu, when TensorFlow is importable), the console, and metrics.jsonl.

clu's metric writers import TensorFlow, which a JAX-only machine may not have; without it the run logs to
the console and metrics.jsonl only, and says so once. metrics.jsonl gets one JSON object per logged step and
split: {"step", "split", <metrics>}, the source of the plots in experiments/. A resumed run logs again the
steps after its checkpoint that the interrupted one had logged: the last row of a (step, split) is the
run's (the earlier ones hold the same numbers, but for times). A line cut short by a kill is removed.
"""

import json
import os
import time

from absl import logging

from resnet_jax.workdir import Workdir


def _tensorflow_available():
  try:
    import tensorflow  # noqa: F401

    return True
  except ImportError:
    return False


def _drop_partial_line(path):
  """Truncates `path` after its last newline: a row cut by a kill would join the next one."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    size = f.seek(0, os.SEEK_END)
    start = max(0, size - 65536)  # far longer than a row
    f.seek(start)
    tail = f.read()
    if tail and not tail.endswith(b'\n'):
      f.truncate(start + tail.rfind(b'\n') + 1)


class Writer:
  """Writes scalars of one step and split to every sink; only the main process writes anything."""

  def __init__(self, workdir, is_main=True):
    self._is_main = is_main
    self._tb = None
    if not is_main:
      return
    os.makedirs(workdir, exist_ok=True)
    path = Workdir(workdir).metrics
    _drop_partial_line(path)
    self._jsonl = open(path, 'a')
    if _tensorflow_available():
      from clu import metric_writers

      self._tb = metric_writers.SummaryWriter(Workdir(workdir).tensorboard)
    else:
      logging.warning(
        'TensorFlow is not importable: no TensorBoard events; metrics go to the console and %s.',
        path,
      )

  def write(self, step, split, scalars):
    if not self._is_main:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(
      json.dumps({'step': int(step), 'split': split, **scalars, 'time': time.time()}) + '\n'
    )
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.write_scalars(int(step), {f'{split}/{k}': v for k, v in scalars.items()})
      self._tb.flush()
    logging.info('[%d] %s %s', step, split, ', '.join(f'{k}={v:.4g}' for k, v in scalars.items()))

  def close(self):
    if self._is_main:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class Milestones:
  """Progress of a long phase outside the steps (decoding images, exact BN statistics), logged as the
  training steps are: a line each time another quarter of `total` is done, so a few lines however long."""

  def __init__(self, what, total, unit, parts=4):
    self.what = what
    self.total = total
    self.unit = unit
    self.done = 0
    self._parts = parts
    self._logged = 0  # the quarters (parts) already logged

  def advance(self, n):
    self.done += n
    part = min(self.done * self._parts // max(self.total, 1), self._parts)
    if part > self._logged:
      self._logged = part
      logging.info(
        '%s: %d%% (%s of %s %s)',
        self.what,
        100 * part // self._parts,
        f'{self.done:,}',
        f'{self.total:,}',
        self.unit,
      )

  def track(self, items, size=lambda item: 1):
    """`items`, each counted as `size(item)` once the consumer asks for the next: what it really took."""
    for item in items:
      yield item
      self.advance(size(item))


class Progress:
  """Steps/s and ETA over each logging window (host time; the caller syncs on metrics before asking).

  clu's ReportProgress imports TensorFlow (in sys.modules once clu.periodic_actions is), wants a
  call at every step (k steps per dispatch skip some) and keeps evaluation time in its window (its
  source: `timed` only reports a part's share), which `restart` leaves out here."""

  def __init__(self, start_step, num_steps, batch_size):
    self._num_steps, self._batch_size = num_steps, batch_size
    self.restart(start_step)

  def restart(self, step):
    """Starts a new window at `step`, leaving out the time spent since (evaluation, checkpoints)."""
    self._last = (step, time.perf_counter())

  def measure(self, step):
    last_step, last_time = self._last
    now = time.perf_counter()
    self._last = (step, now)
    rate = (step - last_step) / max(now - last_time, 1e-9)
    return {
      'steps_per_sec': rate,
      'images_per_sec': rate * self._batch_size,
      'eta_min': (self._num_steps - step) / max(rate, 1e-9) / 60,
    }
