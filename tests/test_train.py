"""The training step and optimizer against independent computations: one device, NumPy loops."""

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from jax.sharding import PartitionSpec as P

from resnet_jax import defaults, models, optim, parallel, train


def tiny_config(**train_overrides):
  config = defaults.get_config()
  config.model.depth = 8
  config.train.update(train_overrides)
  return config


def state_and_steps(config, mesh):
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  tx = optim.create(config.optimizer)
  state = train.create_train_state(config, model, tx, jax.random.key(0))
  return jax.device_put(state, parallel.replicated(mesh)), train.compile_steps(
    config, model, tx, mesh
  )


def random_batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
    'label': rng.integers(0, 10, size=n).astype(np.int32),
  }


def test_eight_devices_equal_one_device():
  assert jax.device_count() == 8, 'conftest sets 8 fake CPU devices'
  config = tiny_config()
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = parallel.make_mesh(devices)
    state, (train_fn, _) = state_and_steps(config, mesh)
    for seed in range(2):  # two steps: the second uses the first one's momentum and BN statistics
      state, m = train_fn(state, parallel.to_global(random_batch(16, seed), mesh))
    results.append((jax.device_get(state), jax.device_get(m.compute())))
  (one, m1), (eight, m8) = results
  np.testing.assert_allclose(m1['loss'], m8['loss'], atol=1e-5)
  for a, b in zip(
    jax.tree.leaves((one.params, one.batch_stats)),
    jax.tree.leaves((eight.params, eight.batch_stats)),
  ):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  moved = max(
    float(np.abs(a - b).max())
    for a, b in zip(
      jax.tree.leaves(one.params),
      jax.tree.leaves(
        jax.device_get(state_and_steps(config, parallel.make_mesh(jax.devices()[:1]))[0].params)
      ),
    )
  )
  assert moved > 1e-3  # the comparison is not vacuous: the params did change


def test_sync_bn_uses_the_global_batch():
  """Per-device halves with different statistics: sync BN must normalise with the global ones."""
  config = tiny_config()
  mesh = parallel.make_mesh(jax.devices()[:2])
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  batch = random_batch(8)['image']
  batch[4:] += 3.0  # the second device's share has a different mean
  apply = lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])[1]['batch_stats']
  mapped = parallel.map_step(apply, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P())
  stats = mapped(variables, parallel.to_global(batch, mesh))
  plain_model = models.create(config.model)
  expected = plain_model.apply(variables, batch, train=True, mutable=['batch_stats'])[1][
    'batch_stats'
  ]
  np.testing.assert_allclose(stats['stem_bn']['mean'], expected['stem_bn']['mean'], atol=1e-5)
  np.testing.assert_allclose(stats['stem_bn']['var'], expected['stem_bn']['var'], rtol=1e-4)


def test_schedule_at_every_boundary():
  opt = defaults.get_config().optimizer  # lr 0.1, /10 at 32k and 48k
  for step, expected in [
    (0, 0.1),
    (31_999, 0.1),
    (32_000, 0.01),
    (47_999, 0.01),
    (48_000, 0.001),
    (63_999, 0.001),
  ]:
    assert float(optim.learning_rate(opt, jnp.asarray(step), jnp.asarray(True))) == pytest.approx(
      expected
    )
  opt.warmup_learning_rate = 0.01
  assert float(optim.learning_rate(opt, jnp.asarray(5), jnp.asarray(False))) == pytest.approx(0.01)
  assert not bool(optim.initial_warmup_done(opt))
  assert bool(optim.initial_warmup_done(defaults.get_config().optimizer))  # no warm-up configured


def test_warmup_rule():
  opt = defaults.get_config().optimizer
  opt.warmup_error, opt.warmup_max_steps = 0.8, 100
  done = lambda step, error, d=False: bool(
    optim.warmup_done_after(opt, jnp.asarray(step), jnp.asarray(d), error)
  )
  assert not done(0, 0.85)
  assert done(0, 0.79)
  assert done(99, 0.95)  # the cap
  assert done(5, 0.95, d=True)  # once switched, it stays switched


def test_resnet110_schedule_is_the_papers():
  """Sec. 4.2: "0.01 to warm up the training until the training error is below 80% (about 400
  iterations), and then go back to 0.1", divided by 10 at 32k and 48k iterations of 64k."""
  opt = defaults.load_file(str(REPO / 'configs' / 'cifar10_110.py')).optimizer
  expected = {0: 0.01, 400: 0.01, 401: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01}
  expected.update({48_000: 0.001, 63_999: 0.001})
  done = optim.initial_warmup_done(opt)
  for step in range(64_000):
    if step in expected:
      lr = float(optim.learning_rate(opt, jnp.asarray(step), done))
      assert lr == pytest.approx(expected[step], rel=1e-6), step
    if not done:  # the batch's training error falls below 80% at step 400
      done = optim.warmup_done_after(opt, jnp.asarray(step), done, 0.9 if step < 400 else 0.79)


@pytest.mark.parametrize('threshold,cap,switch_after', [(1.01, 100, 1), (0.0, 3, 3)])
def test_warmup_switch_in_the_train_step(threshold, cap, switch_after):
  config = tiny_config()
  config.optimizer.update(warmup_learning_rate=0.01, warmup_error=threshold, warmup_max_steps=cap)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state, (train_fn, _) = state_and_steps(config, mesh)
  lrs = []
  for step in range(4):
    state, _ = train_fn(state, parallel.to_global(random_batch(8, step), mesh))
    lrs.append(float(optim.current_learning_rate(state.opt_state)))
  assert lrs == pytest.approx([0.01] * switch_after + [0.1] * (4 - switch_after))


@pytest.mark.parametrize('decay_on', ['all', 'kernels'])
@pytest.mark.parametrize('style', ['caffe', 'pytorch', 'dampened'])
def test_momentum_styles_against_numpy_across_an_lr_drop(style, decay_on):
  opt = defaults.get_config().optimizer
  opt.update(momentum_style=style, boundaries=(3,), decay=0.1, weight_decay=1e-2, momentum=0.9)
  opt.weight_decay_on = decay_on
  tx = optim.create(opt)
  rng = np.random.default_rng(0)
  params = {
    'conv': {'kernel': rng.normal(size=(3, 3)).astype(np.float32)},
    'bn': {'scale': rng.normal(size=(3,)).astype(np.float32)},
  }
  state = tx.init(params)
  w = {
    k: v.copy() for k, v in (('kernel', params['conv']['kernel']), ('scale', params['bn']['scale']))
  }
  v = {k: np.zeros_like(x) for k, x in w.items()}
  for step in range(6):
    grads = {
      'conv': {'kernel': rng.normal(size=(3, 3)).astype(np.float32)},
      'bn': {'scale': rng.normal(size=(3,)).astype(np.float32)},
    }
    lr = float(optim.learning_rate(opt, jnp.asarray(step), jnp.asarray(True)))
    state = optim.set_learning_rate(state, lr)
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for k, g in (('kernel', grads['conv']['kernel']), ('scale', grads['bn']['scale'])):
      decayed = decay_on == 'all' or k == 'kernel'  # BN's scale only with 'all'
      g = g + (opt.weight_decay * w[k] if decayed else 0)
      if style == 'caffe':
        v[k] = opt.momentum * v[k] + lr * g
        w[k] = w[k] - v[k]
      elif style == 'dampened':
        v[k] = opt.momentum * v[k] + (1 - opt.momentum) * lr * g
        w[k] = w[k] - v[k]
      else:
        v[k] = opt.momentum * v[k] + g
        w[k] = w[k] - lr * v[k]
  np.testing.assert_allclose(params['conv']['kernel'], w['kernel'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params['bn']['scale'], w['scale'], rtol=1e-5, atol=1e-6)


def test_the_two_momentum_styles_differ_only_after_the_drop():
  def run(style, steps):
    opt = defaults.get_config().optimizer
    opt.update(momentum_style=style, boundaries=(3,), weight_decay=0.0)
    tx = optim.create(opt)
    params, state = {'kernel': jnp.ones(2)}, None
    state = tx.init(params)
    for step in range(steps):
      state = optim.set_learning_rate(
        state, optim.learning_rate(opt, jnp.asarray(step), jnp.asarray(True))
      )
      updates, state = tx.update({'kernel': jnp.ones(2)}, state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    return np.asarray(params['kernel'])

  np.testing.assert_allclose(run('caffe', 3), run('pytorch', 3), rtol=1e-6)
  assert np.abs(run('caffe', 5) - run('pytorch', 5)).max() > 1e-3


def test_eval_step_counts_only_unmasked_examples():
  config = tiny_config()
  mesh = parallel.make_mesh(jax.devices()[:4])
  state, (_, eval_fn) = state_and_steps(config, mesh)
  batch = random_batch(8)
  mask = np.array([1, 1, 1, 0, 1, 0, 0, 1], np.float32)
  m = eval_fn(state, parallel.to_global({**batch, 'mask': mask}, mesh)).compute()
  model = models.create(config.model)
  logits = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False
  )
  keep = mask == 1
  loss = np.asarray(train.cross_entropy(logits, batch['label']))[keep].mean()
  error = (np.argmax(logits, -1) != batch['label'])[keep].mean()
  assert float(m['loss']) == pytest.approx(loss, rel=1e-5)
  assert float(m['error']) == pytest.approx(error)


def _bn_input(n=16, seed=0):
  x = np.random.default_rng(seed).normal(size=(n, 4, 4, 3)).astype(np.float32)
  return x + np.arange(n, dtype=np.float32)[:, None, None, None] / 4  # examples differ in mean


def test_batchnorm_matches_flax():
  x = _bn_input()
  ours, theirs = (
    models.BatchNorm(use_running_average=False),
    flax.linen.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5),
  )
  variables = theirs.init(jax.random.key(0), x)
  params = {
    'params': {'scale': jnp.arange(1.0, 4.0), 'bias': jnp.arange(3.0)},
    'batch_stats': variables['batch_stats'],
  }
  y1, s1 = ours.apply(params, x, mutable=['batch_stats'])
  y2, s2 = theirs.apply(params, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def _mapped_bn(group_size, devices, x):
  bn = models.BatchNorm(use_running_average=False, axis_name=parallel.AXIS, group_size=group_size)
  variables = bn.init(jax.random.key(0), x[: group_size or 1])
  mesh = parallel.make_mesh(devices)
  fn = parallel.map_step(
    lambda v, x: bn.apply(v, x, mutable=['batch_stats']),
    mesh,
    in_specs=(P(), P(parallel.AXIS)),
    out_specs=(P(parallel.AXIS), P()),
  )
  y, stats = fn(variables, parallel.to_global(x, mesh))
  return np.asarray(y), jax.device_get(stats)


def test_bn_groups_of_the_per_device_batch_equal_independent_per_device_bn():
  x = _bn_input(16)
  y, stats = _mapped_bn(4, jax.devices()[:4], x)
  plain = models.BatchNorm(use_running_average=False)
  variables = plain.init(jax.random.key(0), x[:1])
  outs = [plain.apply(variables, x[i : i + 4], mutable=['batch_stats']) for i in range(0, 16, 4)]
  np.testing.assert_allclose(y, np.concatenate([o[0] for o in outs]), atol=1e-5)
  mean_of_devices = jax.tree.map(lambda *s: np.mean(s, axis=0), *[o[1] for o in outs])
  for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(mean_of_devices)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  y_sync, _ = _mapped_bn(None, jax.devices()[:4], x)
  assert np.abs(y - y_sync).max() > 0.1  # grouping does change the normalisation here


def test_bn_groups_of_the_global_batch_equal_sync_bn():
  x = _bn_input(16)
  y_group, s_group = _mapped_bn(16, jax.devices()[:1], x)
  y_sync, s_sync = _mapped_bn(None, jax.devices()[:4], x)
  np.testing.assert_allclose(y_group, y_sync, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s_group), jax.tree.leaves(s_sync)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_a_restored_state_is_never_initialised(tmp_path):
  """restore_or_init given a function traces only its shapes when a checkpoint is restored, and calls it
  for values only when there is none."""
  from resnet_jax import checkpointing

  mesh = parallel.make_mesh(jax.devices()[:1])
  concrete_calls = []

  def make(value=1.0):
    x = jnp.full((3,), value) * 2
    concrete_calls.append(not isinstance(x, jax.core.Tracer))
    return {'w': x, 'step': jnp.zeros((), jnp.int32)}

  mngr, state = checkpointing.restore_or_init(tmp_path, 1, make, mesh)  # nothing to restore
  assert sum(concrete_calls) == 1
  np.testing.assert_array_equal(state['w'], [2.0, 2.0, 2.0])
  checkpointing.save(mngr, {'w': state['w'] + 5, 'step': state['step'] + 7}, 7)
  checkpointing.wait_until_saved(mngr, state)
  mngr.close()

  concrete_calls.clear()
  mngr, restored = checkpointing.restore_or_init(tmp_path, 1, make, mesh)
  mngr.close()
  assert not any(concrete_calls)  # at most traced for the shapes, never run
  np.testing.assert_array_equal(restored['w'], [7.0, 7.0, 7.0])
  assert int(restored['step']) == 7
