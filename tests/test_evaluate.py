"""resnet_jax.evaluation's scores: kept on the devices and copied in chunks, the numbers of a per-batch copy."""

import jax
import numpy as np
import pytest
from helpers import random_variables, small_run

from resnet_jax import data, evaluation, models, parallel


def per_batch_scores(fn, variables, batches, mesh):
  """The previous path: every batch's scores and mask copied to the host as it is done."""
  out = []
  for batch in parallel.prefetch(batches, mesh, 0):
    scores = np.asarray(jax.device_get(fn(variables, batch['image'])))
    out.append(scores[np.asarray(jax.device_get(batch['mask'])) > 0])
  return np.concatenate(out)


@pytest.mark.parametrize('chunk_rows', [1, 64, 10_000])
def test_chunked_scores_equal_per_batch_copies(chunk_rows):
  config = small_run(train__eval_batch_size=32, data__eval_limit=100)  # 4 batches, the last padded
  ds = data.load(config.data, config.seed)
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  size = config.data.image_size
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, size, size, 3), np.float32), train=False)
  )
  mesh = parallel.make_mesh(jax.devices()[:4])
  variables = jax.device_put(random_variables(shapes), parallel.replicated(mesh))
  fn = evaluation.scores_fn(model, mesh, flips=False)

  expected = per_batch_scores(fn, variables, ds.eval_batches(32), mesh)
  scores = evaluation.scores_in_chunks(fn, variables, ds.eval_batches(32), mesh, 2, chunk_rows)
  assert scores.shape == (100, config.model.num_classes)
  np.testing.assert_array_equal(scores, expected)
  assert evaluation.errors(scores, ds.eval_labels) == evaluation.errors(expected, ds.eval_labels)
  # and through the public entry point, with the default chunk
  public, labels = evaluation.evaluate_scores('1crop', model, variables, ds, config, mesh)
  np.testing.assert_array_equal(public, expected)
  np.testing.assert_array_equal(labels, ds.eval_labels)
