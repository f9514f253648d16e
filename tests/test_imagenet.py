"""ImageNet: labels, the paper's augmentation, the 1/10-crop and multi-scale views, evaluation and training."""

import json
import os

import jax
import numpy as np
import pytest

from resnet_jax import data as data_lib
from resnet_jax import defaults, evaluation, models, optim, parallel, train
from resnet_jax.data import imagenet

tf = pytest.importorskip('tensorflow')


def _config(folder, cache, **data):
  config = defaults.get_imagenet_config()
  config.data.update(
    {
      'source': 'image_folder',
      'image_folder': str(folder),
      'train_split': 'val',
      'eval_split': 'val',
      'cache_dir': str(cache),
      'image_size': 64,
      'scale_min': 72,
      'scale_max': 136,
      'eval_resize': 72,
      'eval_scales': (48, 64),
      **data,
    }
  )
  return config


@pytest.fixture(scope='module')
def sample(imagenet_sample_folder, tmp_path_factory):
  """The 100-image sample at a 64-pixel crop (the paper's geometry scaled by 64/224)."""
  config = _config(imagenet_sample_folder, tmp_path_factory.mktemp('mean'))
  return config, data_lib.load(config.data, config.seed)


def _bytes(folder, wnid):
  path = next((folder / 'val' / wnid).iterdir())
  return path.read_bytes()


def test_sample_labels_are_ilsvrc_ids(sample, imagenet_sample_folder):
  with open(
    os.path.join(
      os.path.dirname(__import__('tensorflow_datasets').__file__),
      'datasets',
      'imagenet2012',
      'labels.txt',
    )
  ) as f:
    synsets = f.read().split()
  _, ds = sample
  wnids = sorted(os.listdir(imagenet_sample_folder / 'val'))
  assert len(synsets) == 1000 and synsets[0] == 'n01440764'  # tench is class 0
  assert ds.eval_labels.tolist() == [synsets.index(w) for w in wnids]
  assert ds.eval_labels[0] == 0 and ds.num_classes == 1000


def test_scale_augmentation_draws_shorter_sides_across_256_480():
  draws = [
    imagenet.scale_window(
      tf, tf.constant([375, 500]), tf.constant([s, 7], tf.int64), (256, 480), 224
    )
    for s in range(400)
  ]
  scales = np.array([int(d[0]) for d in draws])
  assert scales.min() >= 256 and scales.max() <= 480 and scales.min() < 270 and scales.max() > 466
  for scale, y, x, h, w in draws[
    :50
  ]:  # a square of the crop's size in the image resized to shorter side S
    assert (
      int(h) == int(w) == round(224 * 375 / int(scale))
      and 0 <= int(y) <= 375 - int(h)
      and 0 <= int(x) <= 500 - int(w)
    )


def test_train_batches_are_step_addressed_and_shared(sample):
  config, ds = sample
  gen = ds.train_batches(0, 16, seed=3)
  first = [next(gen) for _ in range(8)]  # 6 steps per epoch: crosses into epoch 1
  assert first[0]['image'].shape == (16, 64, 64, 3) and first[0]['image'].dtype == np.float32
  assert first[0]['label'].dtype == np.int32
  resumed = next(ds.train_batches(7, 16, seed=3))
  np.testing.assert_array_equal(resumed['image'], first[7]['image'])
  halves = [next(ds.train_batches(7, 16, 3, p, 2)) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h['label'] for h in halves]), first[7]['label'])
  np.testing.assert_allclose(
    np.concatenate([h['image'] for h in halves]), first[7]['image'], atol=1e-6
  )
  epoch0 = np.concatenate([b['label'] for b in first[:6]])
  assert (
    len(set(epoch0.tolist())) == 96
  )  # distinct images within an epoch (the sample has one per class)
  assert abs(float(np.mean(first[0]['image']))) < 0.1  # mean subtracted


def test_ten_crops_are_corners_centre_and_flips(sample, imagenet_sample_folder):
  config, _ = sample
  data = _bytes(imagenet_sample_folder, 'n01530575')
  resized = imagenet.resize_shorter(
    tf, data, config.data.eval_resize, config.data.antialias
  ).numpy()
  crops = imagenet.ten_crop_view(tf, data, config.data, np.zeros(3, np.float32)).numpy() * 255
  c, (h, w) = 64, resized.shape[:2]
  assert crops.shape == (10, c, c, 3) and min(h, w) == config.data.eval_resize
  expected = [
    resized[:c, :c],
    resized[:c, w - c :],
    resized[h - c :, :c],
    resized[h - c :, w - c :],
    resized[(h - c) // 2 : (h - c) // 2 + c, (w - c) // 2 : (w - c) // 2 + c],
  ]
  expected += [e[:, ::-1] for e in expected]
  np.testing.assert_allclose(crops, np.stack(expected), atol=1e-3)
  centre = imagenet.one_crop_view(tf, data, config.data, np.zeros(3, np.float32)).numpy() * 255
  np.testing.assert_allclose(centre, expected[4], atol=1e-3)


def test_eval_views_count_every_image_once(imagenet_sample_folder, tmp_path):
  config = _config(imagenet_sample_folder, tmp_path, eval_limit=37, mean_images=20)
  ds = data_lib.load(config.data, 0)
  for mode, shape in (('1crop', (64, 64, 3)), ('10crop', (10, 64, 64, 3))):
    labels = []
    for p in (0, 1):  # two processes' shares of each global batch of 16
      for b in ds.eval_batches(16, p, 2, mode):
        assert b['image'].shape == (8, *shape) and b['image'].dtype == np.float32
        labels.append((p, b['label'][b['mask'] > 0]))
    got = np.concatenate([line for p in (0, 1) for q, line in labels if q == p])
    assert sorted(got.tolist()) == sorted(ds.eval_labels.tolist()) and len(got) == 37


def _tiny_model_variables(num_classes=1000):
  config = defaults.get_config().model
  config.update(depth=8, num_classes=num_classes)
  model = models.create(config)
  return model, model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), train=False)


@pytest.mark.slow
def test_multiscale_averages_scales_and_flips(imagenet_sample_folder, tmp_path):
  """evaluate_scores against a direct computation: each image at each scale's bucket shape and its flip."""
  config = _config(imagenet_sample_folder, tmp_path, eval_limit=9, mean_images=20)
  config.train.eval_batch_size = 8
  ds = data_lib.load(config.data, 0)
  model, variables = _tiny_model_variables()
  mesh = parallel.make_mesh()
  scores, labels = evaluation.evaluate_scores('multiscale', model, variables, ds, config, mesh)
  mean = ds.mean_image.mean(axis=(0, 1))
  expected = []
  for i in range(9):
    data, per_view = ds.eval.image_bytes(i), []
    h, w = ds.eval_image_sizes()[i]
    for scale in config.data.eval_scales:
      bh, bw = imagenet.bucket_shape(h, w, scale)
      x = imagenet.scale_view(tf, data, bh, bw, config.data, mean).numpy()[None]
      for view in (x, x[:, :, ::-1]):
        per_view.append(jax.nn.softmax(model.apply(variables, view, train=False))[0])
    expected.append(np.mean(per_view, axis=0))
  np.testing.assert_allclose(scores, np.stack(expected), atol=1e-5)
  assert labels.tolist() == ds.eval_labels.tolist()
  result = evaluation.errors(scores, labels)
  assert result['count'] == 9 and 0 <= result['top5_error'] <= result['top1_error'] <= 1


@pytest.mark.slow
def test_evaluate_cli_refuses_ten_crops_of_cifar(tmp_path):
  import subprocess
  import sys

  from conftest import REPO

  out = subprocess.run(
    [
      sys.executable,
      '-m',
      'resnet_jax.tools.evaluate',
      '--config=configs/cifar10_20.py',
      f'--workdir={tmp_path}',
      '--mode=10crop',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
    'error: --mode=10crop needs ImageNet images (data.name=imagenet2012 with data.source tfds or image_folder); '
    'CIFAR and synthetic data have one view: use --mode=1crop.'
  ]


def test_tfds_mock_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = defaults.get_imagenet_config()
  config.data.update(
    source='tfds',
    cache_dir=str(tmp_path),
    image_size=32,
    scale_min=40,
    scale_max=64,
    eval_resize=40,
    mean_images=8,
  )
  with tfds.testing.mock_data(num_examples=21):
    ds = data_lib.load(config.data, 0)
    batch = next(ds.train_batches(0, 8, 0))
    evals = list(ds.eval_batches(8))
  assert batch['image'].shape == (8, 32, 32, 3) and np.all(
    (0 <= batch['label']) & (batch['label'] < 1000)
  )
  assert sum(int(b['mask'].sum()) for b in evals) == 21 and evals[0]['image'].shape == (
    8,
    32,
    32,
    3,
  )


def test_plateau_rule():
  opt = defaults.get_imagenet_config().optimizer  # patience 3, threshold 0.001
  p, drops = optim.initial_plateau(), []
  for error in (0.9, 0.8, 0.7995, 0.8, 0.79, 0.7, 0.7, 0.7, 0.7, 0.6991):
    p = optim.plateau_after(opt, p, error)
    drops.append(int(p.drops))
  # 0.7995 and 0.8 stall (less than 0.001 below 0.8), 0.79 resets the count, three 0.7s after 0.7 drop the lr
  assert drops == [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
  lr = optim.learning_rate(opt, np.int32(10**6), True, p.drops)
  np.testing.assert_allclose(float(lr), 0.01, rtol=1e-6)
  opt.schedule = 'steps'  # boundaries at epochs 30, 60, 90 instead
  assert float(
    optim.learning_rate(opt, np.int32(30 * defaults.STEPS_PER_EPOCH), True, 0)
  ) == pytest.approx(0.01)


@pytest.mark.slow
def test_resnet18_memorises_the_sample(imagenet_sample_folder, tmp_path):
  """The paper's ImageNet pipeline and loop at a 32-pixel crop (a CPU budget; experiments/README.md has a
  112-pixel run): 60 steps cut the training loss by >= 30%."""
  config = _config(
    imagenet_sample_folder,
    tmp_path / 'cache',
    image_size=32,
    scale_min=36,
    scale_max=68,
    eval_resize=36,
  )
  config.model.depth = 18
  config.train.update(
    batch_size=16,
    eval_batch_size=64,
    num_steps=60,
    log_every_steps=10,
    eval_every_steps=60,
    checkpoint_every_steps=60,
    bn_stats_images=32,
  )
  one_device = parallel.make_mesh(
    jax.devices()[:1]
  )  # 8 fake devices on 2 cores cost more than they show
  result = train.train_and_evaluate(config, str(tmp_path / 'run'), mesh=one_device)
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    losses = [r['loss'] for r in map(json.loads, f) if r['split'] == 'train']
  assert losses[-1] <= 0.7 * losses[0], losses
  assert result['steps'] == 60 and 'val_error' in result
