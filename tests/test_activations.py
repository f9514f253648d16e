"""model.activations='materialized' (the CPU default) against XLA's fused activations: same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_config

from resnet_jax import models


def _loss_and_grads(config, x, labels):
  model = models.create(config.model)
  variables = model.init(jax.random.key(0), x[:1], train=False)

  def loss(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      mutable=['batch_stats'],
    )
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1).mean()
    return ce, (logits, updates['batch_stats'])

  (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return variables, logits, stats, grads


@pytest.mark.parametrize(
  'family,depth,size,overrides',
  [
    ('cifar', 8, 16, {}),
    ('cifar', 8, 16, {'scan_blocks': True}),
    pytest.param('imagenet', 50, 32, {}, marks=pytest.mark.slow),
  ],
)
def test_materialized_activations_give_the_fused_logits_and_gradients(
  family, depth, size, overrides
):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, size, size, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 4))
  runs = {}
  for mode in ('fused', 'materialized'):
    config = model_config(family, depth, activations=mode, **overrides)
    runs[mode] = _loss_and_grads(config, x, labels)
  fused, materialized = runs['fused'], runs['materialized']
  # the same variables (names and shapes), so checkpoints are unaffected
  assert jax.tree.structure(fused[0]) == jax.tree.structure(materialized[0])
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(materialized)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_materialize_is_the_identity_and_auto_follows_the_backend():
  x = jnp.array([[1.0, -0.0, np.inf, np.nan]])
  np.testing.assert_array_equal(jax.jit(models.materialize)(x), x)
  np.testing.assert_array_equal(jax.jit(models.materialize)(x[:, ::-1]), x[:, ::-1])
  assert 'conditional' in jax.jit(models.materialize).lower(x).compile().as_text()
  auto = models.create(model_config('cifar', 8).model)
  assert auto.materialize == (jax.default_backend() == 'cpu')
  with pytest.raises(ValueError, match='model.activations'):
    models.create(model_config('cifar', 8, activations='fast').model)
