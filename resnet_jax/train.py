"""The training loop: state, the per-device train and eval steps, and `train_and_evaluate(config, workdir)`.

The steps are written per device (as under pmap, axis 'batch') and mapped over every device of every host
with shard_map (parallel.py). Inside, BatchNorm averages its statistics over the axis (sync BN over the
global batch) and the loss is pmean'd: gradients of replicated params then come back already averaged.
A further pmean of the gradients would be a no-op at best; a psum would scale them by the device count.
"""
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

from resnet_jax import input_pipeline, models, optim, parallel, writers


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  warmup_done: jax.Array  # the lr warm-up's data-dependent switch (ResNet-110)


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
                    opt_state=tx.init(params), warmup_done=optim.initial_warmup_done(config.optimizer))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state, batch, *, model, tx, opt_config):
  """One SGD step on this device's share of the global batch."""
  lr = optim.learning_rate(opt_config, state.step, state.warmup_done)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats}, batch['image'],
                                  train=True, mutable=['batch_stats'])
    loss = jax.lax.pmean(cross_entropy(logits, batch['label']).mean(), parallel.AXIS)
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  error = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) != batch['label']), parallel.AXIS)
  opt_state = optim.set_learning_rate(state.opt_state, lr)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  new_state = state.replace(
      step=state.step + 1, params=optax.apply_updates(state.params, updates), batch_stats=batch_stats,
      opt_state=opt_state, warmup_done=optim.warmup_done_after(opt_config, state.step, state.warmup_done, error))
  return new_state, TrainMetrics.single_from_model_output(loss=loss, error=error)


def eval_step(state, batch, *, model):
  """Masked sums over this device's share, added over all devices: padding never counts."""
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False)
  local = EvalMetrics.single_from_model_output(
      loss=cross_entropy(logits, batch['label']), error=(jnp.argmax(logits, -1) != batch['label']).astype(
          jnp.float32), mask=batch['mask'])
  return jax.tree.map(lambda x: jax.lax.psum(x, parallel.AXIS), local)


def compile_steps(config, model, tx, mesh):
  """The jitted, mapped steps. `model` must have been built with bn_axis_name=parallel.AXIS."""
  train = parallel.map_step(
      lambda s, b: train_step(s, b, model=model, tx=tx, opt_config=config.optimizer), mesh,
      in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()), donate_argnums=0)
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


def checkpoint_manager(workdir, config):
  options = ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'), options=options)


def restore_or_init(manager, state, mesh):
  """The latest checkpoint if the workdir has one (the data position is its step), else `state`."""
  state = jax.device_put(state, parallel.replicated(mesh))
  step = manager.latest_step()
  if step is None:
    return state
  logging.info('Resuming from the checkpoint of step %d in %s.', step, manager.directory)
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return manager.restore(step, args=ocp.args.StandardRestore(target))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, mesh=None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the results.json dict."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  start_time = time.time()
  ds = input_pipeline.load(config.data, config.seed)
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  tx = optim.create(config.optimizer)
  manager = checkpoint_manager(workdir, config)
  state = restore_or_init(manager, create_train_state(config, model, tx, jax.random.key(config.seed)), mesh)
  start_step, num_steps = int(state.step), config.train.num_steps
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  writer, progress = writers.Writer(workdir, is_main), writers.Progress(start_step, num_steps, config.train.batch_size)
  train_fn, eval_fn = compile_steps(config, model, tx, mesh)
  batches = parallel.prefetch(input_pipeline.train_batches(
      ds, start_step, config.train.batch_size, config.seed, jax.process_index(), jax.process_count()),
      mesh, config.data.prefetch)
  logging.info('Training %s from step %d to %d on %d devices.', config.name, start_step, num_steps,
               jax.device_count())
  train_metrics, eval_results = None, None
  for step in range(start_step + 1, num_steps + 1):
    state, m = train_fn(state, next(batches))
    train_metrics = m if train_metrics is None else train_metrics.merge(m)
    if step % config.train.log_every_steps == 0 or step == num_steps:
      scalars = {k: float(v) for k, v in train_metrics.compute().items()}
      lr = float(optim.current_learning_rate(state.opt_state))
      writer.write(step, 'train', {**scalars, 'lr': lr, **progress.measure(step)})
      train_metrics = None
    if step % config.train.eval_every_steps == 0 or step == num_steps:
      eval_results = evaluate(eval_fn, state, ds, config, mesh)
      writer.write(step, ds.eval_split, eval_results)
    if step % config.train.checkpoint_every_steps == 0 or step == num_steps:
      manager.save(step, args=ocp.args.StandardSave(state))
    if step % config.train.log_every_steps == 0:
      progress.restart(step)
  manager.wait_until_finished()
  if eval_results is None:  # nothing left to train: report the restored state
    eval_results = evaluate(eval_fn, state, ds, config, mesh)
  results = {'config': config.name, f'{ds.eval_split}_error': eval_results['error'],
             f'{ds.eval_split}_loss': eval_results['loss'], 'steps': int(state.step),
             'wall_time_s': time.time() - start_time, 'start_step': start_step, **provenance()}
  if is_main:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  writer.close()
  manager.close()
  return results
