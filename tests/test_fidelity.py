"""Choices the paper leaves open, checked: ResNet-1202's start."""

import json

import jax
import numpy as np
import pytest
from conftest import REPO

from resnet_jax import defaults, parallel, train


@pytest.mark.slow
def test_resnet1202_warm_up_stays_finite_and_the_loss_falls(tmp_path):
  """The config's own recipe (warm-up at 0.01, scanned and recomputed blocks), 30 steps on one batch of 8."""
  config = defaults.load_file(REPO / 'configs' / 'cifar10_1202.py')
  assert config.optimizer.warmup_learning_rate == 0.01 and config.model.scan_blocks
  # The warm-up phase itself: on 8 images a batch's error falls below 80% by chance within a few steps
  # and would end the warm-up; at the paper's batch of 128 it stays near 90% for the first hundreds of
  # steps. Hold the warm-up for this check.
  config.optimizer.warmup_error = 0.0
  # The same 8 images (random crops and flips of them) at every step, on one device: ~2.5 s a step.
  config.data.update(source='synthetic', train_limit=8, eval_limit=8)
  config.train.update(
    batch_size=8,
    eval_batch_size=8,
    num_steps=30,
    log_every_steps=1,
    eval_every_steps=30,
    checkpoint_every_steps=30,
    bn_stats_images=8,
  )
  train.train_and_evaluate(config, str(tmp_path), mesh=parallel.make_mesh(jax.devices()[:1]))
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = np.array([r['loss'] for r in rows if r['split'] == 'train'])
  assert len(losses) == 30 and np.all(np.isfinite(losses))
  assert all(r['lr'] == pytest.approx(0.01) for r in rows if r['split'] == 'train')
  # At initialisation the first loss is far above ln 10 (large pooled features; see the config), and even
  # at 0.01 the first steps overshoot before it falls. Measured over 40 steps (2026-11-30, seeds 0-2): peaks
  # of 2.4-13.5x the first loss, then the last ten steps' lowest at 0.07-0.12 of it; seed 0 (this test's)
  # peaked at 6.4x on step 10 and was at 0.085 on step 24 (2026-12-04). Over the last ten of 30 it must
  # reach a third.
  assert losses[-10:].min() < losses[0] / 3, losses.round(2).tolist()
