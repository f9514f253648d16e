"""Choices the paper leaves open, checked: ResNet-1202's start."""

import json

import numpy as np
import pytest
from conftest import REPO

from resnet_jax import defaults, train


@pytest.mark.slow
def test_resnet1202_warms_up_finite_and_its_loss_falls(tmp_path):
  """The config's own recipe (warm-up at 0.01, scanned and recomputed blocks) on a tiny run."""
  config = defaults.load_file(REPO / 'configs' / 'cifar10_1202.py')
  assert config.optimizer.warmup_learning_rate == 0.01 and config.model.scan_blocks
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
  assert losses[-1] < 0.8 * losses[0], losses  # memorising 8 images, starting at lr 0.01
