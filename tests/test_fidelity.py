"""Choices the paper leaves open, checked: ResNet-1202's start."""

import json

import numpy as np
import pytest
from conftest import REPO

from resnet_jax import defaults, train


@pytest.mark.slow
def test_resnet1202_warm_up_stays_finite_and_bounded(tmp_path):
  """The config's own recipe (warm-up at 0.01, scanned and recomputed blocks) on one batch of 8."""
  config = defaults.load_file(REPO / 'configs' / 'cifar10_1202.py')
  assert config.optimizer.warmup_learning_rate == 0.01 and config.model.scan_blocks
  # The warm-up phase itself: on 8 images a batch's error falls below 80% by chance within a few steps
  # and ends the warm-up (at lr 0.1 the loss then jumped from 20 to 750 in a trial); at the paper's batch
  # of 128 the error stays near 90% for the first hundreds of steps. Hold the warm-up for this check.
  # Measured (2026-11-30): at lr 0.01 the loss stayed between 20 and 60 over 8 steps, without falling
  # yet; what this checks is that the warm-up keeps the first steps finite and bounded.
  config.optimizer.warmup_error = 0.0
  # One batch of 8 images (one per test device), seen at every step: the cheapest run in which a loss
  # can fall. (At initialisation a 1202-layer net's logits are large: the first loss is far above ln 10.)
  config.data.update(source='synthetic', train_limit=8, eval_limit=8)
  config.train.update(
    batch_size=8,
    eval_batch_size=8,
    num_steps=6,
    log_every_steps=1,
    eval_every_steps=6,
    checkpoint_every_steps=6,
    bn_stats_images=8,
  )
  train.train_and_evaluate(config, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['loss'] for r in rows if r['split'] == 'train']
  assert len(losses) == 6 and np.all(np.isfinite(losses))
  assert all(r['lr'] == pytest.approx(0.01) for r in rows if r['split'] == 'train')
  assert max(losses) < 5 * losses[0], losses  # at lr 0.1 it reached 38x the first loss
