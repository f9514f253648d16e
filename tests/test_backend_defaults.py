"""The program each backend runs by default: the GPU/TPU choices, forced on the CPU, compute what the
CPU's choices compute (models.backend_defaults lists every backend-dependent default)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import model_config

from resnet_jax import models


def _outputs(overrides, scan_blocks, train, x, labels):
  """(logits, new BN statistics or None, parameter gradients) of ResNet-8 with the same variables."""
  config = model_config('cifar', 8, scan_blocks=scan_blocks, **overrides)
  model = models.create(config.model)
  variables = model.init(jax.random.key(0), x[:1], train=False)

  def loss(params):
    out = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=train,
      mutable=['batch_stats'] if train else False,
    )
    logits, stats = out if train else (out, None)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1).mean()
    return ce, (logits, stats)

  (_, (logits, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  return logits, stats, grads


@pytest.mark.slow  # eight ResNet-8 gradient compilations
@pytest.mark.parametrize('scan_blocks', [False, True], ids=['unrolled', 'scanned'])
@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_gpu_and_tpu_defaults_compute_what_the_cpu_defaults_compute(scan_blocks, train):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, 16, 16, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))
  cpu, accelerator = models.backend_defaults('cpu'), models.backend_defaults('gpu')
  assert models.backend_defaults('tpu') == accelerator and cpu != accelerator
  logits_a, stats_a, grads_a = _outputs(cpu, scan_blocks, train, x, labels)
  logits_b, stats_b, grads_b = _outputs(accelerator, scan_blocks, train, x, labels)
  np.testing.assert_allclose(logits_a, logits_b, rtol=1e-5, atol=1e-5)
  if train:
    for a, b in zip(jax.tree.leaves(stats_a), jax.tree.leaves(stats_b)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(grads_a) == jax.tree.structure(grads_b)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_auto_is_the_backends_default():
  auto = models.create(model_config('cifar', 8).model)
  chosen = models.backend_defaults(jax.default_backend())
  assert auto.materialize == (chosen['activations'] == 'materialized')
  assert auto.explicit_conv_grads == chosen['conv_grads']
