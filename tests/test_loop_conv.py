"""model.conv_grads='explicit' (loop_conv: the CPU default inside nn.scan) against autodiff's own gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_config, random_variables

from resnet_jax import loop_conv, models, optim, parallel, train

NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize(
  'kernel,padding,cin,cout,dtype',
  [
    (3, ((1, 1), (1, 1)), 5, 7, jnp.float32),
    (1, 'VALID', 6, 4, jnp.float32),
    (3, 'SAME', 4, 4, jnp.float32),
    (
      3,
      ((0, 2), (1, 0)),
      3,
      2,
      jnp.float32,
    ),  # asymmetric: the input gradient's padding is not mirrored
    (3, ((1, 1), (1, 1)), 8, 8, jnp.bfloat16),
  ],
)
def test_gradients_equal_autodiffs(kernel, padding, cin, cout, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 9, 7, cin)), dtype)
  w = jnp.asarray(rng.standard_normal((kernel, kernel, cin, cout)), dtype)
  target = jnp.asarray(rng.standard_normal((3, 9, 7, cout)), jnp.float32)

  def loss(conv):
    def f(x, w):
      y = conv(x, w, (1, 1), padding, dimension_numbers=NHWC).astype(jnp.float32)
      return jnp.sum(
        y[:, : target.shape[1], : target.shape[2]] * target[:, : y.shape[1], : y.shape[2]]
      )

    return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

  (ref, ref_grads), (ours, our_grads) = (
    loss(jax.lax.conv_general_dilated),
    loss(loop_conv.conv_general_dilated),
  )
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(ours, ref, rtol=tol)
  for a, b in zip(our_grads, ref_grads):
    assert a.dtype == b.dtype and a.shape == b.shape
    scale = float(jnp.abs(b.astype(jnp.float32)).max())
    np.testing.assert_allclose(
      np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol * scale
    )


@pytest.mark.parametrize(
  'kernel_shape,kwargs',
  [((3, 3, 4, 4), {'window_strides': (2, 2)}), ((3, 3, 2, 4), {'feature_group_count': 2})],
)
def test_strided_and_grouped_convolutions_are_lax_own(kernel_shape, kwargs):
  """What the explicit backward does not cover goes to lax unchanged: the same program."""
  x, w = jnp.ones((2, 8, 8, 4)), jnp.ones(kernel_shape)
  kwargs = {'window_strides': (1, 1), **kwargs}

  def grads(conv):
    f = lambda x, w: conv(x, w, padding='SAME', dimension_numbers=NHWC, **kwargs).sum()  # noqa: E731
    return jax.jit(jax.grad(f, (0, 1))).lower(x, w).as_text()

  assert grads(loop_conv.conv_general_dilated) == grads(jax.lax.conv_general_dilated)


def _scanned_grads(conv_grads, family='cifar', depth=20, size=16):
  """The variables, ((loss, logits), gradients) and compiled HLO of a scanned net's loss."""
  config = model_config(family, depth, scan_blocks=True, conv_grads=conv_grads)
  model = models.create(config.model)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 4))
  variables = random_variables(
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x[:1])
  )

  def loss(params):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      mutable=['batch_stats'],
    )
    return train.cross_entropy(logits, labels).mean(), logits

  compiled = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables['params']).compile()
  return variables, compiled(variables['params']), compiled.as_text()


def _assert_close(a, b):
  """Equal up to float32 reassociation, relative to the array's own scale (gradients reach ~100)."""
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def _loop_convolution_labels(hlo):
  """The dim_labels of the convolutions inside the scan's loop (their op names run through while/body)."""
  lines = [line for line in hlo.splitlines() if ' convolution(' in line and '/while/body/' in line]
  assert lines, 'no convolution inside a loop: is the net scanned?'
  return {re.search(r'dim_labels=([^,]+),', line).group(1) for line in lines}


@pytest.mark.parametrize(
  'family,depth,size',
  [('cifar', 20, 16), pytest.param('imagenet', 50, 96, marks=pytest.mark.slow)],  # stage 4: 3x3
)
def test_scanned_blocks_give_autodiffs_logits_and_gradients(family, depth, size):
  (variables, xla, xla_hlo), (variables_e, explicit, explicit_hlo) = (
    _scanned_grads('xla', family, depth, size),
    _scanned_grads('explicit', family, depth, size),
  )
  # the same variables (names, shapes, values): checkpoints and conversions are unaffected
  jax.tree.map(np.testing.assert_array_equal, variables, variables_e)
  for a, b in zip(jax.tree.leaves(explicit), jax.tree.leaves(xla)):
    assert a.shape == b.shape
    _assert_close(a, b)
  # What makes it fast on XLA:CPU: every convolution inside the scan's loop in the NHWC/HWIO form.
  if jax.default_backend() == 'cpu':
    assert _loop_convolution_labels(explicit_hlo) == {'b01f_01io->b01f'}
    assert (
      len(_loop_convolution_labels(xla_hlo)) > 1
    )  # autodiff's own labels: what the switch replaces


@pytest.mark.slow
def test_data_parallel_step_with_scanned_explicit_gradients_equals_xlas():
  """The real step on 4 devices (shard_map, sync BN): the kernel gradients are summed over devices."""
  results = {}
  for conv_grads in ('xla', 'explicit'):
    config = model_config('cifar', 20, scan_blocks=True, conv_grads=conv_grads)
    config.train.batch_size = 16
    mesh = parallel.make_mesh(jax.devices()[:4])
    model = models.create(config.model, bn_axis_name=parallel.AXIS)
    tx = optim.create(config.optimizer)
    state = jax.device_put(
      train.create_train_state(config, model, tx, jax.random.key(0)), parallel.replicated(mesh)
    )
    step, _ = train.compile_steps(config, model, tx, mesh)
    rng = np.random.default_rng(1)
    batch = {
      'image': rng.standard_normal((16, 16, 16, 3)).astype(np.float32),
      'label': rng.integers(0, 10, 16).astype(np.int32),
    }
    state, _ = step(state, jax.device_put(batch, parallel.data_sharded(mesh)))
    results[conv_grads] = jax.device_get((state.params, state.opt_state))
  for a, b in zip(jax.tree.leaves(results['explicit']), jax.tree.leaves(results['xla'])):
    _assert_close(a, b)


def test_auto_follows_the_backend_and_bad_values_are_named():
  auto = models.create(model_config('cifar', 8).model)
  assert auto.explicit_conv_grads == ('scanned' if jax.default_backend() == 'cpu' else 'none')
  assert (
    models.create(model_config('cifar', 8, conv_grads='explicit').model).explicit_conv_grads
    == 'all'
  )
  with pytest.raises(ValueError, match='model.conv_grads'):
    models.create(model_config('cifar', 8, conv_grads='fast').model)
