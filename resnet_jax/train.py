"""The training loop: state, the per-device train and eval steps, and `train_and_evaluate(config, workdir)`.

The steps are written per device (as under pmap, axis 'batch') and mapped over every device of every host
with shard_map (parallel.py). Inside, BatchNorm averages its statistics over the axis (sync BN over the
global batch) and the loss is pmean'd: gradients of replicated params then come back already averaged.
A further pmean of the gradients would be a no-op at best; a psum would scale them by the device count.
"""
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

from resnet_jax import (bn_stats, checkpointing, device_data, input_pipeline, models, optim, parallel, precision,
                        validate, writers)


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


def create_train_state(config, model, tx, rng) -> TrainState:
  size = config.data.image_size
  variables = model.init(rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables['batch_stats'],
                    opt_state=tx.init(params), warmup_done=optim.initial_warmup_done(config.optimizer),
                    plateau=optim.initial_plateau(), loss_scale=precision.initial(config.model),
                    nonfinite_steps=jnp.zeros((), jnp.int32), first_nonfinite=-jnp.ones((), jnp.int32))


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
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, batch['image'],
                                  train=True, mutable=['batch_stats'])
    logits = logits.astype(jnp.float32)
    loss = jax.lax.pmean(cross_entropy(logits, batch['label']).mean(), parallel.AXIS)
    return loss * state.loss_scale.scale if scale_loss else loss, (loss, logits, updates['batch_stats'])

  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if scale_loss:
    grads = jax.tree.map(lambda g: g / state.loss_scale.scale, grads)
  error = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) != batch['label']), parallel.AXIS)
  opt_state = optim.set_learning_rate(state.opt_state, lr)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = dict(params=params, batch_stats=batch_stats, opt_state=opt_state,
             warmup_done=optim.warmup_done_after(opt_config, state.step, state.warmup_done, error))
  if scale_loss:
    grads_finite = _all_finite(grads)
    finite = _all_finite(loss, batch_stats) & (~grads_finite | _all_finite(params))
    keep = grads_finite & (finite | ~jnp.asarray(skip_nonfinite))
    new['loss_scale'] = precision.adjust(state.loss_scale, grads_finite)
    old = {k: getattr(state, k) for k in new if k != 'loss_scale'}
    new.update(jax.tree.map(lambda n, o: jnp.where(keep, n, o), {k: new[k] for k in old}, old))
  else:
    finite = _all_finite(loss, grads, params, batch_stats)
    if skip_nonfinite:
      new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: getattr(state, k) for k in new})
  new_state = state.replace(
      step=state.step + 1, nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite=jnp.where((state.first_nonfinite < 0) & ~finite, state.step, state.first_nonfinite), **new)
  return new_state, TrainMetrics.single_from_model_output(loss=loss, error=error)


def scan_steps(step_fn, state, batches):
  """k steps in one call: `batches` leaves are [b, k, ...] (the device's share of k global batches)."""
  state, metrics = jax.lax.scan(step_fn, state, jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), batches))
  return state, jax.tree.map(lambda x: x.sum(axis=0), metrics)  # summed Averages are the merged Average


def eval_step(state, batch, *, model):
  """Masked sums over this device's share, added over all devices: padding never counts."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'],
                       train=False).astype(jnp.float32)
  local = EvalMetrics.single_from_model_output(
      loss=cross_entropy(logits, batch['label']), error=(jnp.argmax(logits, -1) != batch['label']).astype(
          jnp.float32), mask=batch['mask'])
  return jax.tree.map(lambda x: jax.lax.psum(x, parallel.AXIS), local)


def compile_steps(config, model, tx, mesh, data=None):
  """The jitted, mapped steps. `model` must have been built with bn_axis_name=parallel.AXIS.

  With train.steps_per_dispatch = k > 1, one call runs k steps on batches stacked along axis 1. With `data`
  (device_data.put), the step takes device_data.step_arrays instead of images and makes its batches itself.
  """
  def step(s, b):
    return train_step(s, b, model=model, tx=tx, opt_config=config.optimizer,
                      skip_nonfinite=config.train.on_nonfinite == 'skip', scale_loss=precision.dynamic(config.model))

  k = config.train.get('steps_per_dispatch', 1)
  if data is None:
    train = parallel.map_step(step if k == 1 else lambda s, b: scan_steps(step, s, b), mesh,
                              in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()), donate_argnums=0)
  else:  # the dataset is an argument, not a closed-over constant of the compiled step
    on_device = parallel.map_step(lambda s, d, xs: scan_steps(lambda s, x: step(s, device_data.batch(d, x)), s, xs),
                                  mesh, in_specs=(P(), P(), P(parallel.AXIS)), out_specs=(P(), P()),
                                  donate_argnums=0)
    train = lambda s, xs: on_device(s, data, xs)  # noqa: E731
  evaluate = parallel.map_step(lambda s, b: eval_step(s, b, model=model), mesh,
                               in_specs=(P(), P(parallel.AXIS)), out_specs=P())
  return train, evaluate


def evaluate(eval_fn, state, ds, config, mesh):
  batches = input_pipeline.eval_batches(ds, config.train.eval_batch_size, jax.process_index(), jax.process_count())
  total = None
  for batch in parallel.prefetch(batches, mesh, config.data.prefetch):
    m = eval_fn(state, batch)
    total = m if total is None else total.merge(m)
  return {k: float(v) for k, v in total.compute().items()}


def provenance():
  """What produced a result: commit, library versions, devices."""
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(__file__), capture_output=True,
                            text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  versions = {m.__name__: getattr(m, '__version__', None) for m in (jax, flax, optax, ocp, np)}
  return {'git_commit': commit, 'versions': versions, 'python': platform.python_version(),
          'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
          'process_count': jax.process_count(), 'platform': jax.default_backend()}


def _stacked(batches, k):
  """Groups k consecutive host batches into one, stacked along axis 1 (axis 0 stays the batch)."""
  if k == 1:
    yield from batches
    return
  while True:
    group = [next(batches) for _ in range(k)]
    yield jax.tree.map(lambda *xs: np.stack(xs, axis=1), *group)


def _check_finite(state, config, manager, workdir):
  """Stops before a non-finite state can be logged as progress or saved (on_nonfinite='stop')."""
  if config.train.on_nonfinite == 'stop' and int(state.nonfinite_steps) > 0:
    manager.wait_until_finished()
    last = manager.latest_step()
    where = f'the last good checkpoint is step {last} in {manager.directory}' if last is not None else (
        'no checkpoint was written before it')
    raise Diverged(f'the loss became non-finite at step {int(state.first_nonfinite) + 1}; {where}; lower '
                   f'optimizer.learning_rate, or set train.on_nonfinite=skip to skip such steps.')


def _setup(config, workdir, mesh):
  """Data, model, optimizer, and the state restored from `workdir` (or fresh)."""
  ds = input_pipeline.load(config.data, config.seed)
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  tx = optim.create(config.optimizer)
  manager, state = checkpointing.restore_or_init(
      workdir, config.train.keep_checkpoints, create_train_state(config, model, tx, jax.random.key(config.seed)),
      mesh)
  return ds, model, tx, manager, state


def _recompute_bn(state, ds, model, config, mesh, num_images):
  batches = parallel.prefetch(bn_stats.training_batches(ds, config, num_images), mesh, config.data.prefetch)
  return state.replace(batch_stats=bn_stats.recompute(model, state.params, state.batch_stats, batches, mesh))


def recalibrate_checkpoint(config, workdir, num_images, mesh=None):
  """(eval before, eval after, state, ds, mesh) for exact BN statistics on the latest checkpoint."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  ds, model, tx, manager, state = _setup(config, workdir, mesh)
  manager.close()
  _, eval_fn = compile_steps(config, model, tx, mesh)
  before = evaluate(eval_fn, state, ds, config, mesh)
  state = _recompute_bn(state, ds, model, config, mesh, num_images)
  return before, evaluate(eval_fn, state, ds, config, mesh), state, ds, mesh


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the results.json dict."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  is_main = jax.process_index() == 0
  start_time = time.time()
  os.makedirs(workdir, exist_ok=True)
  ds, model, tx, manager, state = _setup(config, workdir, mesh)
  start_step, num_steps = int(state.step), config.train.num_steps
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  k = config.train.steps_per_dispatch
  if start_step % k:
    raise validate.ConfigError(f'the checkpoint at step {start_step} is not a multiple of train.steps_per_dispatch'
                               f'={k}: resume with a divisor of {start_step} (e.g. 1).')
  writer, progress = writers.Writer(workdir, is_main), writers.Progress(start_step, num_steps, config.train.batch_size)
  pi, pc, batch_size = jax.process_index(), jax.process_count(), config.train.batch_size
  if config.data.get('on_device'):  # the host sends indices and augmentation draws only
    train_fn, eval_fn = compile_steps(config, model, tx, mesh, device_data.put(ds, mesh))
    host = (device_data.step_arrays(len(ds.train_labels), first, k, batch_size, config.seed, pi, pc)
            for first in itertools.count(start_step, k))
  else:
    train_fn, eval_fn = compile_steps(config, model, tx, mesh)
    host = _stacked(input_pipeline.train_batches(ds, start_step, batch_size, config.seed, pi, pc), k)
  batches = parallel.prefetch(host, mesh, config.data.prefetch)
  logging.info('Training %s from step %d to %d on %d devices.', config.name, start_step, num_steps,
               jax.device_count())

  def save(step):
    _check_finite(state, config, manager, workdir)
    manager.save(step, args=ocp.args.StandardSave(state))

  train_metrics, eval_results, moving_average_results = None, None, None
  with checkpointing.PreemptionHandler() as preemption:
    for step in range(start_step + k, num_steps + 1, k):
      state, m = train_fn(state, next(batches))
      train_metrics = m if train_metrics is None else train_metrics.merge(m)
      if step % config.train.log_every_steps == 0 or step == num_steps:
        _check_finite(state, config, manager, workdir)
        scalars = {k: float(v) for k, v in train_metrics.compute().items()}
        scalars.update(lr=float(optim.current_learning_rate(state.opt_state)), **progress.measure(step))
        if config.train.on_nonfinite == 'skip':
          scalars['skipped_steps'] = int(state.nonfinite_steps)
        if precision.dynamic(config.model):
          scalars.update(loss_scale=float(state.loss_scale.scale), overflow_steps=int(state.loss_scale.overflow_steps))
        writer.write(step, 'train', scalars)
        train_metrics = None
      if step == num_steps and config.train.recompute_bn_stats:  # the released models' exact statistics
        moving_average_results = evaluate(eval_fn, state, ds, config, mesh)
        state = _recompute_bn(state, ds, model, config, mesh, config.train.bn_stats_images)
      if step % config.train.eval_every_steps == 0 or step == num_steps:
        eval_results = evaluate(eval_fn, state, ds, config, mesh)
        plateau = optim.plateau_after(config.optimizer, state.plateau, eval_results['error'])
        state = state.replace(plateau=jax.device_put(plateau, parallel.replicated(mesh)))
        writer.write(step, ds.eval_split, {**eval_results, 'lr_drops': int(plateau.drops)})
      saved = step % config.train.checkpoint_every_steps == 0 or step == num_steps
      if saved:
        save(step)
      if preemption.requested(manager, step):
        if not saved:
          save(step)
        manager.wait_until_finished()
        writer.close()
        raise Preempted(f'stopped by a signal after step {step}; its checkpoint is in {manager.directory}: rerun '
                        'the same command to continue.', preemption.signal)
      if step % config.train.log_every_steps == 0:
        progress.restart(step)
  manager.wait_until_finished()
  if eval_results is None:  # nothing left to train: report the restored state
    eval_results = evaluate(eval_fn, state, ds, config, mesh)
  results = {'config': config.name, f'{ds.eval_split}_error': eval_results['error'],
             f'{ds.eval_split}_loss': eval_results['loss'], 'steps': int(state.step),
             'wall_time_s': time.time() - start_time, 'start_step': start_step,
             'nonfinite_steps': int(state.nonfinite_steps), **provenance()}
  if moving_average_results:
    results[f'{ds.eval_split}_error_moving_average_bn'] = moving_average_results['error']
  if is_main:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  writer.close()
  manager.close()
  return results
