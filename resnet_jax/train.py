"""The training loop: state, the per-device train and eval steps, and `train_and_evaluate(config, workdir)`.

The steps are written per device (as under pmap, axis 'batch') and mapped over every device of every host
with shard_map (parallel.py). Inside, BatchNorm averages its statistics over the axis (sync BN over the
global batch) and the loss is pmean'd: gradients of replicated params then come back already averaged.
A further pmean of the gradients would be a no-op at best; a psum would scale them by the device count.
"""

import functools
import itertools
import json
import os
import platform
import subprocess
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from clu import metrics
from jax.sharding import PartitionSpec as P

from resnet_jax import (
  checkpointing,
  defaults,
  exact_bn,
  finetune,
  models,
  optim,
  parallel,
  precision,
  validate,
  workdir_lock,
  writers,
)
from resnet_jax import data as data_lib
from resnet_jax.data import on_device
from resnet_jax.workdir import Workdir


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  warmup_done: jax.Array  # the lr warm-up's data-dependent switch (ResNet-110)
  plateau: optim.Plateau  # the held-out error's history, for schedule='plateau' (ImageNet)
  loss_scale: precision.LossScale  # float16's dynamic loss scale (1 otherwise)
  nonfinite_steps: jax.Array  # steps whose loss, gradients or new params were not finite
  first_nonfinite: jax.Array  # the first such step's index, -1 while there is none


class Diverged(RuntimeError):
  """The loss became non-finite and config.train.on_nonfinite is 'stop'."""


class Preempted(RuntimeError):
  """A termination signal arrived; the state of `step` is saved."""

  def __init__(self, message, signum):
    super().__init__(message)
    self.signum = signum


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  error: metrics.Average.from_output('error')


EvalMetrics = TrainMetrics  # the same quantities; evaluation weights them by the padding mask


def create_train_state(config, model, tx, rng, variables=None) -> TrainState:
  """The state at step 0: `variables` ({'params', 'batch_stats'}, e.g. converted weights) or, by
  default, the network initialised from `rng`.

  The init is compiled: run eagerly it dispatches every layer's forward operations one by one, which only
  the shapes need (under jit they are dead code).
  """
  if variables is None:
    size = config.data.image_size
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(rng, jnp.zeros((1, size, size, 3), jnp.float32))
  params = variables['params']
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables['batch_stats'],
    opt_state=tx.init(params),
    warmup_done=optim.initial_warmup_done(config.optimizer),
    plateau=optim.initial_plateau(),
    loss_scale=precision.initial(config.model),
    nonfinite_steps=jnp.zeros((), jnp.int32),
    first_nonfinite=-jnp.ones((), jnp.int32),
  )


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _all_finite(*trees):
  return jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def train_step(state, batch, *, model, tx, opt_config, skip_nonfinite=False, scale_loss=False):
  """One SGD step on this device's share of the global batch.

  A step whose loss, gradients or new params are not finite is counted; with `skip_nonfinite` its update
  is also dropped (the state stays as it was but for the step and the counters). With `scale_loss`
  (float16), gradients that overflow only skip the update and halve the loss scale; a non-finite loss or
  new params still count as divergence.
  """
  lr = optim.learning_rate(opt_config, state.step, state.warmup_done, state.plateau.drops)

  def loss_fn(params):
    variables = {'params': params, 'batch_stats': state.batch_stats}
    logits, updates = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'])
    logits = logits.astype(jnp.float32)
    loss = jax.lax.pmean(cross_entropy(logits, batch['label']).mean(), parallel.AXIS)
    scaled = loss * state.loss_scale.scale if scale_loss else loss
    return scaled, (loss, logits, updates['batch_stats'])

  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if scale_loss:
    grads = jax.tree.map(lambda g: g / state.loss_scale.scale, grads)
  error = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) != batch['label']), parallel.AXIS)
  opt_state = optim.set_learning_rate(state.opt_state, lr)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  updated = state.replace(
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    warmup_done=optim.warmup_done_after(opt_config, state.step, state.warmup_done, error),
  )
  if scale_loss:  # an overflow of the scaled gradients is no divergence: it only skips the update
    grads_finite = _all_finite(grads)
    finite = _all_finite(loss, batch_stats) & (~grads_finite | _all_finite(params))
    keep = grads_finite & (finite | (not skip_nonfinite))
  else:
    finite = _all_finite(loss, grads, params, batch_stats)
    keep = finite | (not skip_nonfinite)
  if scale_loss or skip_nonfinite:
    updated = jax.tree.map(lambda new, old: jnp.where(keep, new, old), updated, state)
  new_state = updated.replace(
    step=state.step + 1,
    loss_scale=precision.adjust(state.loss_scale, grads_finite) if scale_loss else state.loss_scale,
    nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
    first_nonfinite=jnp.where(
      (state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite
    ),
  )
  return new_state, TrainMetrics.single_from_model_output(loss=loss, error=error)


def scan_steps(step_fn, state, batches):
  """k steps in one call: `batches` leaves are [b, k, ...] (the device's share of k global batches)."""
  state, metrics = jax.lax.scan(
    step_fn, state, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), batches)
  )
  return state, jax.tree.map(
    lambda x: x.sum(axis=0), metrics
  )  # summed Averages are the merged Average


def eval_step(state, batch, *, model):
  """Masked sums over this device's share, added over all devices: padding never counts."""
  logits = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  ).astype(jnp.float32)
  local = EvalMetrics.single_from_model_output(
    loss=cross_entropy(logits, batch['label']),
    error=(jnp.argmax(logits, -1) != batch['label']).astype(jnp.float32),
    mask=batch['mask'],
  )
  return jax.tree.map(lambda x: jax.lax.psum(x, parallel.AXIS), local)


def compile_steps(config, model, tx, mesh, data=None):
  """The jitted, mapped steps. `model` must have been built with bn_axis_name=parallel.AXIS.

  With train.steps_per_dispatch = k > 1, one call runs k steps on batches stacked along axis 1. With `data`
  (on_device.put), the step takes on_device.step_arrays instead of images and makes its batches itself.
  """

  opt_config = optim.resolve_boundaries(config.optimizer, config.train.num_steps)

  def step(s, b):
    return train_step(
      s,
      b,
      model=model,
      tx=tx,
      opt_config=opt_config,
      skip_nonfinite=config.train.on_nonfinite == 'skip',
      scale_loss=precision.dynamic(config.model),
    )

  k = config.train.get('steps_per_dispatch', 1)
  if data is None:
    train = parallel.map_step(
      step if k == 1 else lambda s, b: scan_steps(step, s, b),
      mesh,
      in_specs=(P(), P(parallel.AXIS)),
      out_specs=(P(), P()),
      donate_argnums=0,
    )
  else:  # the dataset is an argument, not a closed-over constant of the compiled step
    mapped = parallel.map_step(
      lambda s, d, xs: scan_steps(lambda s, x: step(s, on_device.batch(d, x)), s, xs),
      mesh,
      in_specs=(P(), P(), P(parallel.AXIS)),
      out_specs=(P(), P()),
      donate_argnums=0,
    )
    train = lambda s, xs: mapped(s, data, xs)  # noqa: E731
  evaluate = parallel.map_step(
    lambda s, b: eval_step(s, b, model=model), mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P()
  )
  return train, evaluate


def evaluate(eval_fn, state, ds, config, mesh) -> dict:
  """Loss and error over the whole eval set (1-crop views for ImageNet)."""
  batches = ds.eval_batches(config.train.eval_batch_size, jax.process_index(), jax.process_count())
  total = None
  for batch in parallel.prefetch(batches, mesh, config.data.prefetch):
    m = eval_fn(state, batch)
    total = m if total is None else total.merge(m)
  return {k: float(v) for k, v in total.compute().items()}


def provenance():
  """What produced a result: commit, library versions, devices."""
  try:
    commit = (
      subprocess.run(
        ['git', 'rev-parse', 'HEAD'],
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=10,
      ).stdout.strip()
      or None
    )
  except (OSError, subprocess.SubprocessError):
    commit = None
  versions = {m.__name__: getattr(m, '__version__', None) for m in (jax, flax, optax, ocp, np)}
  return {
    'git_commit': commit,
    'versions': versions,
    'python': platform.python_version(),
    'device_kind': jax.devices()[0].device_kind,
    'device_count': jax.device_count(),
    'process_count': jax.process_count(),
    'platform': jax.default_backend(),
  }


def _stacked(batches, k):
  """Groups k consecutive host batches into one, stacked along axis 1 (axis 0 stays the batch)."""
  if k == 1:
    yield from batches
    return
  while True:
    group = [next(batches) for _ in range(k)]
    yield jax.tree.map(lambda *xs: np.stack(xs, axis=1), *group)


def itstime(step: int, every: int, num_steps: int) -> bool:
  """Periodic work: every `every` steps, and always at the last step."""
  return step % every == 0 or step == num_steps


def check_finite(state, config, manager):
  """Stops before a non-finite state can be logged as progress or saved (on_nonfinite='stop')."""
  if config.train.on_nonfinite == 'stop' and int(state.nonfinite_steps) > 0:
    checkpointing.wait_until_saved(manager, state)
    last = manager.latest_step()
    where = (
      f'the last good checkpoint is step {last} in {manager.directory}'
      if last is not None
      else ('no checkpoint was written before it')
    )
    raise Diverged(
      f'the loss became non-finite at step {int(state.first_nonfinite) + 1}; {where}; lower '
      f'optimizer.learning_rate, or set train.on_nonfinite=skip to skip such steps.'
    )


def check_num_classes(ds, config):
  """Labels beyond the classifier's outputs would only show up as a non-finite loss."""
  if ds.num_classes > config.model.num_classes:
    where = config.data.image_folder or config.data.name
    raise data_lib.DataError(
      f'the data ({where}) has {ds.num_classes} classes but model.num_classes={config.model.num_classes}; '
      f'set --config.model.num_classes={ds.num_classes}.'
    )


def host_batches(ds, config, mesh, start_step):
  """(the training set on the devices or None, this process's batches from start_step on, k steps each):
  host-made batches, or with data.on_device only the indices and augmentation draws."""
  k, batch_size, seed = config.train.steps_per_dispatch, config.train.batch_size, config.seed
  process_index, process_count = jax.process_index(), jax.process_count()
  if config.data.get('on_device'):
    device_data = on_device.put(ds, mesh)
    batches = (
      on_device.step_arrays(ds.num_train, first, k, batch_size, seed, process_index, process_count)
      for first in itertools.count(start_step, k)
    )
    return device_data, batches
  batches = ds.train_batches(start_step, batch_size, seed, process_index, process_count)
  return None, _stacked(batches, k)


def recompute_bn(state, ds, model, config, mesh):
  """(the state with exact BN statistics over train.bn_stats_images training images, the exact_bn.Pass);
  the state itself under model.freeze_bn, whose statistics stay as loaded."""
  if config.model.get('freeze_bn', False):
    return state, exact_bn.Pass()
  stats, done = exact_bn.measured_pass(
    model, state.params, state.batch_stats, ds, config, mesh, config.train.bn_stats_images
  )
  return state.replace(batch_stats=stats), done


def _write(path, text):
  """Whole or not at all: a tool reading the file beside a (killed) training never sees half of it."""
  with open(f'{path}.tmp', 'w') as f:
    f.write(text)
  os.replace(f'{path}.tmp', path)


def save_preprocessing(ds, config, workdir):
  """Saves the mean image computed from the training images into the workdir, so evaluation and the
  tools need no training images; a config that fixes its preprocessing already says it all."""
  path = Workdir(workdir).mean_image
  if defaults.fixed_preprocessing(config.data) or os.path.exists(path):
    return
  np.save(f'{path}.tmp.npy', np.asarray(ds.mean_image, np.float32))
  os.replace(f'{path}.tmp.npy', path)


def _read(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


class Segments:
  """The training time of every invocation of a run (a resumed run has several), kept in segments.json
  and brought up to date at each checkpoint, so results.json can report the time over all of them."""

  def __init__(self, workdir, start_step, is_main):
    self._path, self._is_main = Workdir(workdir).segments, is_main
    self._start = time.time()
    self._excluded_s = 0.0  # the exact-BN pass: reported apart from the training time
    self._done = _read(self._path) or []
    self.current = {'start_step': start_step, 'end_step': start_step, 'wall_time_s': 0.0}

  def exclude(self, seconds):
    """Leaves `seconds` (the exact-BN pass) out of this segment's training time."""
    self._excluded_s += seconds

  def update(self, step):
    wall_time_s = time.time() - self._start - self._excluded_s
    self.current.update(end_step=int(step), wall_time_s=wall_time_s)
    if self._is_main:
      _write(self._path, json.dumps(self.all(), indent=2))

  def all(self) -> list:
    return self._done + [dict(self.current)]

  def total_s(self) -> float:
    return sum(segment['wall_time_s'] for segment in self.all())


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, mesh=None, fresh_start=False
) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint (else starting from
  config.init_from's weights, if set); returns the results.json dict.

  The data is read and checked before the workdir is created, so a run that cannot start leaves nothing.
  The workdir's lock (workdir_lock) is held throughout: a second training of the same workdir stops with
  WorkdirLocked before it reads or writes anything there. `fresh_start`: train from step 0 although
  the workdir's checkpoints were all found damaged and moved aside (checkpointing.NoUsableCheckpoint).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  ds = data_lib.load(config.data, config.seed)
  if not config.model.num_classes:  # 0: as many outputs as the data has classes
    config = config.copy_and_resolve_references()
    config.model.num_classes = ds.num_classes
  check_num_classes(ds, config)
  source = finetune.source_variables(config, workdir)
  variables = None
  if source is not None:  # read and checked before the workdir is created
    variables = finetune.initial_variables(config, models.create(config.model), source)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.held(workdir, config.train.lock_timeout_s):
    return _train(config, workdir, ds, mesh, variables, fresh_start)


def _train(config, workdir, ds, mesh, variables=None, fresh_start=False):
  """`variables`: the step-0 weights (config.init_from's), else the network's random init."""
  is_main = jax.process_index() == 0
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  tx = optim.create(config.optimizer, freeze_bn=config.model.get('freeze_bn', False))
  initial = lambda: create_train_state(config, model, tx, jax.random.key(config.seed), variables)
  manager, state = checkpointing.restore_or_init(
    workdir, config.train.keep_checkpoints, initial, mesh, fresh_start
  )
  start_step, num_steps, k = (
    int(state.step),
    config.train.num_steps,
    config.train.steps_per_dispatch,
  )
  finished = _already_finished(workdir, start_step, num_steps)
  if finished is not None:
    manager.close()
    return finished  # results.json stays as it was
  _check_dispatch(start_step, k)
  if is_main:
    _write(Workdir(workdir).config_json, config.to_json_best_effort(indent=2))
    save_preprocessing(ds, config, workdir)
  writer = writers.Writer(workdir, is_main)
  progress = writers.Progress(start_step, num_steps, config.train.batch_size)
  segments = Segments(workdir, start_step, is_main)
  device_data, host = host_batches(ds, config, mesh, start_step)
  train_fn, eval_fn = compile_steps(config, model, tx, mesh, device_data)
  batches = parallel.prefetch(host, mesh, config.data.prefetch)
  _log_start(config, start_step)
  train_metrics, eval_results, moving_average_results = None, None, None
  exact_pass = exact_bn.Pass()
  with (
    checkpointing.PreemptionHandler() as preemption,
    checkpointing.failed_writes_first(manager, state),
  ):
    for step in range(start_step + k, num_steps + 1, k):
      state, step_metrics = train_fn(state, next(batches))
      train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
      if itstime(step, config.train.log_every_steps, num_steps):
        check_finite(state, config, manager)
        scalars = train_scalars(train_metrics, state, config, progress.measure(step))
        writer.write(step, 'train', scalars)
        train_metrics = None
      if step == num_steps and config.train.recompute_bn_stats:  # the released models' statistics
        moving_average_results = evaluate(eval_fn, state, ds, config, mesh)
        state, exact_pass = recompute_bn(state, ds, model, config, mesh)
        segments.exclude(exact_pass.seconds)
      if itstime(step, config.train.eval_every_steps, num_steps):
        eval_results = evaluate(eval_fn, state, ds, config, mesh)
        plateau = optim.plateau_after(config.optimizer, state.plateau, eval_results['error'])
        state = state.replace(plateau=jax.device_put(plateau, parallel.replicated(mesh)))
        writer.write(step, ds.eval_split, {**eval_results, 'lr_drops': int(plateau.drops)})
      stopping = preemption.requested(manager, step)
      if itstime(step, config.train.checkpoint_every_steps, num_steps) or stopping:
        check_finite(state, config, manager)
        checkpointing.save(manager, state, step)
        segments.update(step)
      if stopping:
        checkpointing.wait_until_saved(manager, state)
        writer.close()
        raise Preempted(
          f'stopped by a signal after step {step}; its checkpoint is in {manager.directory}: rerun '
          'the same command to continue.',
          preemption.signal,
        )
      if step % config.train.log_every_steps == 0:
        progress.restart(step)
  batches.close()  # stops the prefetch thread before anything else
  checkpointing.wait_until_saved(manager, state)
  if eval_results is None:  # nothing left to train: report the restored state
    eval_results = evaluate(eval_fn, state, ds, config, mesh)
  if moving_average_results is None:  # the test error with exact BN statistics, beside it
    moving_average_results = eval_results
    exact, exact_pass = recompute_bn(state, ds, model, config, mesh)
    segments.exclude(exact_pass.seconds)
    eval_results = evaluate(eval_fn, exact, ds, config, mesh)
  segments.update(int(state.step))
  results = final_results(
    config, ds, state, moving_average_results, eval_results, segments, exact_pass
  )
  if is_main:
    _write(Workdir(workdir).results, json.dumps(results, indent=2))
  writer.close()
  manager.close()
  return results


def _already_finished(workdir, start_step, num_steps):
  """The results of a run that has nothing left to train, or None."""
  finished = _read(Workdir(workdir).results)
  if start_step >= num_steps and finished and finished.get('steps') == start_step:
    logging.warning(
      '%s is already at step %d of %d: nothing to train.', workdir, start_step, num_steps
    )
    return finished
  return None


def _check_dispatch(start_step, k):
  if start_step % k:
    raise validate.ConfigError(
      f'the checkpoint at step {start_step} is not a multiple of train.steps_per_dispatch'
      f'={k}: resume with a divisor of {start_step} (e.g. 1).'
    )


def _log_start(config, start_step):
  for warning in validate.warnings(config):
    logging.warning(warning)
  logging.info(
    'Training %s from step %d to %d on %d devices.',
    config.name,
    start_step,
    config.train.num_steps,
    jax.device_count(),
  )


def final_results(config, ds, state, moving_average, exact, segments, exact_pass) -> dict:
  """results.json: the last evaluation (never the best one) with both kinds of BN statistics.

  `{split}_error` is the checkpointed model's: exact statistics when train.recompute_bn_stats (the released
  ImageNet models), else the moving averages, as training left them. `wall_time_s` is the training time of
  all segments; the exact-BN pass (exact_bn.Pass `exact_pass`) is apart, in `exact_bn_time_s`.
  """
  split = ds.eval_split
  reported = exact if config.train.recompute_bn_stats else moving_average
  return {
    'config': config.name,
    f'{split}_error': reported['error'],
    f'{split}_loss': reported['loss'],
    'bn_statistics': 'exact' if config.train.recompute_bn_stats else 'moving_average',
    f'{split}_error_moving_average_bn': moving_average['error'],
    f'{split}_error_exact_bn': exact['error'],
    'exact_bn_images': exact_pass.images,
    'steps': int(state.step),
    'wall_time_s': segments.total_s(),
    'exact_bn_time_s': exact_pass.seconds,
    'segments': segments.all(),
    'start_step': segments.current['start_step'],
    'nonfinite_steps': int(state.nonfinite_steps),
    **provenance(),
  }


def train_scalars(train_metrics, state, config, rates) -> dict:
  """What a log line of training reports: loss, error, lr, speed, and the counters that are on."""
  scalars = {k: float(v) for k, v in train_metrics.compute().items()}
  scalars.update(lr=float(optim.current_learning_rate(state.opt_state)), **rates)
  if config.train.on_nonfinite == 'skip':
    scalars['skipped_steps'] = int(state.nonfinite_steps)
  if precision.dynamic(config.model):
    scalars.update(
      loss_scale=float(state.loss_scale.scale), overflow_steps=int(state.loss_scale.overflow_steps)
    )
  return scalars
