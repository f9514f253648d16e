"""Starting from a trained network: stage features, fine-tuning on any class folder (init_from), frozen BN."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest
from conftest import REPO
from flax import traverse_util
from helpers import model_config, run_cli
from PIL import Image
from test_pretrained import assert_one_sentence

from resnet_jax import checkpointing, defaults, finetune, models, optim, pretrained, train, validate
from resnet_jax.data import DataError, imagenet

FINETUNE = str(REPO / 'configs' / 'finetune_folder.py')


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree), sep='/')


@pytest.mark.parametrize(
  'family, depth, size, strides',
  [
    ('imagenet', 18, 64, {'stem': 2, 'conv2': 4, 'conv3': 8, 'conv4': 16, 'conv5': 32}),
    ('cifar', 8, 32, {'stem': 1, 'conv2': 1, 'conv3': 2, 'conv4': 4}),
  ],
)
def test_features_are_the_classifiers_stages(family, depth, size, strides):
  model = models.create(model_config(family, depth).model)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  features = model.apply(variables, x, train=False, method=models.ResNet.features)
  assert {k: size // v.shape[1] for k, v in features.items()} == strides
  assert all(v.shape[1] == v.shape[2] for v in features.values())
  last = np.asarray(features[list(strides)[-1]], np.float64)
  fc = variables['params']['fc']
  expected = last.mean(axis=(1, 2)) @ np.asarray(fc['kernel'], np.float64) + np.asarray(fc['bias'])
  logits = model.apply(variables, x, train=False)
  assert np.abs(logits - expected).max() < 1e-5 * np.abs(expected).max()  # float32 sums


def test_freeze_bn_gives_bn_zero_updates_weight_decay_included():
  config = defaults.get_config()
  config.optimizer.weight_decay = 0.1  # on every parameter ('all'): it would move BN too
  model = models.create(model_config('cifar', 8).model)
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  params = variables['params']
  grads = jax.tree.map(np.ones_like, params)
  tx = optim.create(config.optimizer, freeze_bn=True)
  updates = _flat(tx.update(grads, tx.init(params), params)[0])
  bn_modules = {k.rsplit('/', 1)[0] for k in _flat(variables['batch_stats'])}
  frozen = [k for k in updates if k.rsplit('/', 1)[0] in bn_modules]
  assert len(frozen) == 2 * 7  # ResNet-8: the stem and two per block; scale and bias
  assert all(not updates[k].any() for k in frozen)
  assert all(updates[k].all() for k in updates if k not in frozen)  # conv, fc: -lr(g + wd w) != 0


def _write_images(root, classes, sizes=((40, 56), (64, 48), (50, 50)), per_class=(6, 2), seed=0):
  """JPEGs of varied sizes whose class is their colour (plus noise): root/{train,val}/<class>/."""
  rng = np.random.default_rng(seed)
  for split, count in zip(('train', 'val'), per_class):
    for label, name in enumerate(classes):
      os.makedirs(root / split / name, exist_ok=True)
      colour = np.eye(3)[label % 3] * 200 + 20
      for i in range(count):
        h, w = sizes[i % len(sizes)]
        pixels = colour + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
          root / split / name / f'{i}.jpg'
        )


def _folder_config(root, **data):
  config = defaults.get_imagenet_config()
  config.data.update(source='image_folder', image_folder=str(root), eval_split='val', **data)
  return config


def test_any_class_folders_are_numbered_in_sorted_order(tmp_path):
  _write_images(tmp_path, ('zebra', 'apple', 'mango'))
  ds = imagenet.ImageNet(_folder_config(tmp_path, mean_images=4).data, seed=0)
  assert ds.num_classes == 3
  assert ds.eval_labels.tolist() == [0, 0, 1, 1, 2, 2]  # apple, mango, zebra
  assert sorted({ds.train.label(i) for i in range(ds.num_train)}) == [0, 1, 2]


def test_wordnet_folders_keep_their_ilsvrc_ids(tmp_path):
  wnids = imagenet.ilsvrc_wnids()
  _write_images(tmp_path, (wnids[7], wnids[400]), per_class=(1, 1))
  label, num_classes = imagenet.folder_classes([str(tmp_path / 'train'), str(tmp_path / 'val')])
  assert num_classes == 1000 and label[wnids[400]] == 400


@pytest.mark.parametrize('bad', ['one class', 'empty split'])
def test_bad_folders_are_refused_in_one_sentence(bad, tmp_path):
  if bad == 'one class':
    _write_images(tmp_path, ('cat',))
  else:
    _write_images(tmp_path, ('cat', 'dog'))
    for name in ('cat', 'dog'):
      for f in (tmp_path / 'val' / name).iterdir():
        f.unlink()
  with pytest.raises(DataError) as error:
    imagenet.check(_folder_config(tmp_path).data)
  assert_one_sentence(error)


def _write_run(workdir, config):
  """A workdir at step 0 holding a random init of `config`'s network, as a converted one."""
  model = models.create(config.model)
  size = config.data.image_size
  variables = model.init(jax.random.key(7), np.zeros((1, size, size, 3), np.float32), train=False)
  mngr = checkpointing.manager(workdir, 1)
  checkpointing.save(mngr, pretrained.train_state(config, variables), 0)
  mngr.wait_until_finished()
  mngr.close()
  (pathlib.Path(workdir) / 'config.json').write_text(config.to_json_best_effort())
  return variables


def test_init_from_keeps_the_backbone_and_makes_a_new_head(tmp_path):
  source_config = model_config('cifar', 8)
  source = _write_run(tmp_path / 'source', source_config)
  config = model_config('cifar', 8, num_classes=5)
  config.init_from = str(tmp_path / 'source')
  model = models.create(config.model)
  loaded = finetune.source_variables(config, tmp_path / 'new')
  start, theirs = _flat(finetune.initial_variables(config, model, loaded)), _flat(source)
  head = {k for k in start if k.startswith('params/fc/')}
  assert start['params/fc/kernel'].shape == (64, 5)
  assert not np.allclose(start['params/fc/kernel'], theirs['params/fc/kernel'][:, :5])
  assert all(np.array_equal(start[k], theirs[k]) for k in start if k not in head)
  same_classes = model_config('cifar', 8)
  same_classes.init_from = config.init_from
  kept = finetune.initial_variables(same_classes, models.create(same_classes.model), loaded)
  assert all(np.array_equal(v, theirs[k]) for k, v in _flat(kept).items())
  _write_run(tmp_path / 'resumed', config)  # a run with its own checkpoint continues from it
  assert finetune.source_variables(config, tmp_path / 'resumed') is None


def test_init_from_refuses_a_missing_or_another_network(tmp_path):
  _write_run(tmp_path / 'source', model_config('cifar', 8))
  config = model_config('cifar', 14)
  config.init_from = str(tmp_path / 'absent')
  with pytest.raises(validate.ConfigError) as error:
    finetune.source_variables(config, tmp_path / 'new')
  assert_one_sentence(error)
  config.init_from = str(tmp_path / 'source')
  loaded = finetune.source_variables(config, tmp_path / 'new')
  with pytest.raises(validate.ConfigError) as error:
    finetune.initial_variables(config, models.create(config.model), loaded)
  assert_one_sentence(error)
  assert 'stage1_block2/' in str(
    error.value
  )  # ResNet-8's first stage has one block, ResNet-14's two
  assert str(error.value).endswith('as in its config.json (--config.model.depth=8).')


# ---------------------------------------------------------------- end to end, from converted weights

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A torchvision ResNet-18 with random weights, converted: 1000 classes, torchvision preprocessing."""
  from test_pretrained import random_torchvision

  folder = tmp_path_factory.mktemp('torchvision')
  torch.save(random_torchvision(18).state_dict(), folder / 'resnet18.pth')
  config, _ = pretrained.write_workdir(folder / 'run', 'torchvision', folder / 'resnet18.pth', 18)
  return folder / 'run', config


def _finetune_config(converted, root, **model):
  workdir, source = converted
  config = defaults.load_file(FINETUNE)
  config.init_from = str(workdir)
  config.model.update(depth=18, **model)
  config.data.update(
    image_folder=str(root),
    image_size=32,
    scale_min=36,
    scale_max=48,
    eval_resize=36,
    channel_mean=source.data.channel_mean,  # the source's preprocessing
    channel_std=source.data.channel_std,
    lighting_std=0.0,
    threads=2,
  )
  config.train.update(
    batch_size=16,
    eval_batch_size=16,
    num_steps=12,
    log_every_steps=2,
    eval_every_steps=12,
    checkpoint_every_steps=12,
    bn_stats_images=16,
  )
  return config


def _train_losses(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [row['loss'] for row in rows if row['split'] == 'train']


@pytest.mark.slow
def test_finetune_a_converted_resnet18_on_a_folder(converted, tmp_path):
  _write_images(tmp_path / 'data', ('zebra', 'apple', 'mango'))
  config = _finetune_config(converted, tmp_path / 'data')
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['steps'] == 12
  losses = _train_losses(tmp_path / 'run')
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  run = checkpointing.open_workdir(tmp_path / 'run')
  assert run.config.model.num_classes == 3 and run.config.init_from == str(converted[0])
  assert run.state['params']['fc']['kernel'].shape == (512, 3)


@pytest.mark.slow
def test_freeze_bn_leaves_bn_as_loaded(converted, tmp_path):
  _write_images(tmp_path / 'data', ('zebra', 'apple', 'mango'))
  config = _finetune_config(converted, tmp_path / 'data', freeze_bn=True)
  config.train.num_steps = config.train.eval_every_steps = config.train.checkpoint_every_steps = 4
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  before = _flat(checkpointing.open_workdir(converted[0]).variables)
  after = _flat(checkpointing.open_workdir(tmp_path / 'run').variables)
  bn_modules = {k.split('/', 1)[1].rsplit('/', 1)[0] for k in after if k.startswith('batch_stats/')}
  bn = [k for k in after if k.split('/', 1)[1].rsplit('/', 1)[0] in bn_modules]
  assert len(bn) == 4 * 20  # ResNet-18: stem, 16 block BNs, 3 projections; scale, bias, mean, var
  assert all(np.array_equal(after[k], before[k]) for k in bn)
  conv = 'params/stage1_block1/conv1/kernel'
  assert not np.array_equal(after[conv], before[conv])


def _snapshot(folder):
  return sorted(str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob('*'))


@pytest.mark.slow
def test_cli_refuses_bad_inputs_in_one_line(converted, tmp_path):
  data = tmp_path / 'data'
  _write_images(data, ('zebra', 'apple'), per_class=(1, 1))
  _write_images(tmp_path / 'one', ('zebra',), per_class=(1, 1))
  _write_images(tmp_path / 'empty', ('zebra', 'apple'), per_class=(1, 0))
  common = (
    '--config.data.image_size=32',
    '--config.data.scale_min=36',
    '--config.data.eval_resize=36',
  )
  cases = {
    'no config.json': (
      f'--config.init_from={tmp_path / "absent"}',
      f'--config.data.image_folder={data}',
    ),
    'other network': (
      f'--config.init_from={converted[0]}',
      '--config.model.depth=34',
      f'--config.data.image_folder={data}',
    ),
    'single class': (
      f'--config.init_from={converted[0]}',
      f'--config.data.image_folder={tmp_path / "one"}',
    ),
    'holds no class folders with images': (
      f'--config.init_from={converted[0]}',
      f'--config.data.image_folder={tmp_path / "empty"}',
    ),
  }
  before = _snapshot(tmp_path)
  for expected, flags in cases.items():
    result = run_cli(tmp_path / 'run', *common, *flags, config=FINETUNE, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith('error: '), result.stderr[-2000:]
    assert expected in lines[-1]
  assert _snapshot(tmp_path) == before
