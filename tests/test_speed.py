"""Speed machinery against the plain path: k steps per dispatch, bfloat16, float16 loss scaling."""

import jax
import numpy as np
import pytest
from test_train import random_batch, state_and_steps, tiny_config

from resnet_jax import parallel, precision


def _run(config, batches, mesh, k=1):
  state, (train_fn, _) = state_and_steps(config, mesh)
  metrics = []
  for i in range(0, len(batches), k):
    group = batches[i : i + k]
    batch = group[0] if k == 1 else jax.tree.map(lambda *xs: np.stack(xs, axis=1), *group)
    state, m = train_fn(state, parallel.to_global(batch, mesh))
    metrics.append(m)
  total = metrics[0]
  for m in metrics[1:]:
    total = total.merge(m)
  return jax.device_get(state), {k: float(v) for k, v in total.compute().items()}


def test_steps_per_dispatch_equals_single_steps():
  mesh = parallel.make_mesh(jax.devices()[:2])
  batches = [random_batch(16, seed) for seed in range(4)]
  one, m1 = _run(tiny_config(), batches, mesh)
  four, m4 = _run(tiny_config(steps_per_dispatch=4), batches, mesh, k=4)
  assert int(one.step) == int(four.step) == 4
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-6)
  for a, b in zip(
    jax.tree.leaves((one.params, one.batch_stats, one.opt_state)),
    jax.tree.leaves((four.params, four.batch_stats, four.opt_state)),
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_stays_close_to_float32():
  mesh = parallel.make_mesh(jax.devices()[:1])
  batches = [
    random_batch(32, seed % 2) for seed in range(10)
  ]  # two batches, five times: the loss must fall
  f32, m32 = _run(tiny_config(), batches, mesh)
  config = tiny_config()
  config.model.dtype = 'bfloat16'
  bf16, m16 = _run(config, batches, mesh)
  assert all(
    x.dtype == np.float32
    for x in jax.tree.leaves((bf16.params, bf16.opt_state))
    if x.dtype.kind == 'f'
  )
  assert abs(m16['loss'] - m32['loss']) < 0.05 * m32['loss'], (m16, m32)
  kernels = [
    (p, q)
    for (path, p), q in zip(
      jax.tree_util.tree_leaves_with_path(f32.params), jax.tree.leaves(bf16.params)
    )
    if 'kernel' in str(path[-1])
  ]
  rel = [np.linalg.norm(p - q) / np.linalg.norm(p) for p, q in kernels]
  assert len(kernels) > 5 and max(rel) < 0.03, max(rel)


def test_float16_loss_scaling_skips_overflows_and_counts_them():
  mesh = parallel.make_mesh(jax.devices()[:1])
  config = tiny_config()
  config.model.dtype = 'float16'
  state, (train_fn, _) = state_and_steps(config, mesh)
  assert float(state.loss_scale.scale) == precision.INITIAL_SCALE
  state = state.replace(
    loss_scale=state.loss_scale.replace(scale=jax.numpy.float32(2.0**127))
  )  # will overflow
  before = jax.device_get(state.params)
  state, _ = train_fn(state, parallel.to_global(random_batch(8), mesh))
  assert int(state.loss_scale.overflow_steps) == 1 and float(state.loss_scale.scale) == 2.0**126
  assert int(state.nonfinite_steps) == 0  # an overflow is not divergence
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)  # the update was skipped
  state = state.replace(loss_scale=state.loss_scale.replace(scale=jax.numpy.float32(1024.0)))
  for seed in range(2):
    state, m = train_fn(state, parallel.to_global(random_batch(8, seed), mesh))
  assert int(state.loss_scale.overflow_steps) == 1 and float(state.loss_scale.scale) == 1024.0
  assert np.isfinite(float(m.compute()['loss']))
  moved = max(
    float(np.abs(a - b).max())
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)))
  )
  assert moved > 1e-4


@pytest.mark.slow
def test_on_device_data_with_steps_per_dispatch_trains_as_the_host_path(tmp_path):
  """The whole loop: on-device batches, 3 steps per call, equal to host batches one step at a time."""
  from helpers import small_run

  from resnet_jax import train

  mesh = parallel.make_mesh(jax.devices()[:2])
  common = dict(
    train__num_steps=6,
    train__log_every_steps=3,
    train__eval_every_steps=6,
    train__checkpoint_every_steps=6,
    data__prefetch=0,
  )
  host = train.train_and_evaluate(small_run(**common), str(tmp_path / 'host'), mesh)
  device = train.train_and_evaluate(
    small_run(data__on_device=True, train__steps_per_dispatch=3, **common),
    str(tmp_path / 'device'),
    mesh,
  )
  assert host['steps'] == device['steps'] == 6
  np.testing.assert_allclose(device['test_error'], host['test_error'], atol=1e-6)
  np.testing.assert_allclose(device['test_loss'], host['test_loss'], rtol=1e-5)


def test_loss_scale_rule_against_a_plain_loop(monkeypatch):
  """The rule as plain Python: double after `interval` finite steps in a row (never to inf), halve
  on an overflow (never below 1) and restart the count."""
  interval = 3
  monkeypatch.setattr(precision, 'GROWTH_INTERVAL', interval)
  steps = [True] * 7 + [False] * 2 + [True, False] * 3 + [False] * 20 + [True] * 4
  state = precision.LossScale(np.float32(2.0**126), np.int32(0), np.int32(0))
  scale, count = 2.0**126, 0
  for finite in steps:
    state = precision.adjust(state, np.bool_(finite))
    count = count + 1 if finite else 0
    if not finite:
      scale = max(scale / 2, 1.0)
    elif count == interval:
      scale, count = (scale * 2 if scale * 2 < 2.0**128 else scale), 0
    assert float(state.scale) == scale and int(state.good_steps) == count
  assert int(state.overflow_steps) == steps.count(False)
