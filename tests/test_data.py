"""Tests for the input pipeline: paper augmentation, step-addressed order, process shares and sources."""

import os
import re
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from helpers import write_image_folder
from PIL import Image

from resnet_jax import data, defaults, validate
from resnet_jax.data import common, in_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  cfg = defaults.get_config().data
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _dataset(n=100, m=37, labels_are_indices=False, seed=0):
  """A small in-memory dataset; with labels_are_indices the label of a training image is its index."""
  rng = np.random.default_rng(seed)
  train = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = (
    np.arange(n, dtype=np.int32) if labels_are_indices else rng.integers(0, 10, n).astype(np.int32)
  )
  evals = rng.integers(0, 256, (m, 32, 32, 3), dtype=np.uint8)
  mean = train.mean(axis=0).astype(np.float32)
  return in_memory.Dataset(
    train,
    labels,
    evals,
    rng.integers(0, 10, m).astype(np.int32),
    mean,
    n if labels_are_indices else 10,
    'test',
  )


def _paper_input(ds, image):
  return (image.astype(np.float32) - ds.mean_image) / 255


def _expected_train(ds, step, batch_size, seed, normalize=_paper_input):
  """The paper's augmentation computed image by image with plain NumPy, from the documented draws."""
  n = len(ds.train_labels)
  spe = n // batch_size
  perm = np.random.default_rng([seed, step // spe]).permutation(n)
  index = perm[(step % spe) * batch_size : (step % spe + 1) * batch_size]
  rng = np.random.default_rng([seed, step, 1])
  dy, dx, flip = (
    rng.integers(0, 9, batch_size),
    rng.integers(0, 9, batch_size),
    rng.random(batch_size) < 0.5,
  )
  images = []
  for i, j in enumerate(index):
    x = normalize(ds, ds.train_images[j])
    padded = np.pad(x, ((4, 4), (4, 4), (0, 0)))
    crop = padded[dy[i] : dy[i] + 32, dx[i] : dx[i] + 32]
    images.append(crop[:, ::-1] if flip[i] else crop)
  return np.stack(images), ds.train_labels[index], dy, dx, flip


def test_shapes_and_dtypes():
  ds = _dataset()
  batch = in_memory.train_batch(ds, 3, 16, seed=0)
  assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
  for batch in ds.eval_batches(8, 1, 2):
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and batch['mask'].dtype == np.float32
    assert batch['mask'].shape == (4,)


@pytest.mark.parametrize('step', [0, 5, 13])
def test_train_images_are_exact_padded_crops(step):
  ds = _dataset()
  batch = in_memory.train_batch(ds, step, 32, seed=3)
  images, labels, dy, dx, flip = _expected_train(ds, step, 32, seed=3)
  # Equal to the last bit but for the rounding of /255 (the code multiplies by 1/255): a wrong crop, flip
  # or padding would be off by ~0.1.
  np.testing.assert_allclose(batch['image'], images, rtol=2.5e-7, atol=0)
  np.testing.assert_array_equal(batch['label'], labels)
  for got, want in zip(in_memory.augmentation(3, step, 32), (dy, dx, flip)):
    np.testing.assert_array_equal(got, want)
  assert dy.min() >= 0 and dy.max() <= 8 and dx.min() >= 0 and dx.max() <= 8
  assert flip.any() and not flip.all()
  assert len(set(dy.tolist())) >= 3 and len(set(dx.tolist())) >= 3


def test_padding_is_the_mean_colour():
  """An image equal to the mean becomes all zeros, padding included, whatever the crop."""
  ds = _dataset()
  const = np.full((100, 32, 32, 3), 77, np.uint8)
  ds = in_memory.Dataset(
    const,
    ds.train_labels,
    const[:5],
    ds.eval_labels[:5],
    const.mean(0).astype(np.float32),
    10,
    'test',
  )
  assert not in_memory.train_batch(ds, 0, 32, seed=0)['image'].any()


def test_mean_image_subtracted():
  ds = data.load(_config(source='synthetic', train_limit=1000, eval_limit=20), seed=0)
  np.testing.assert_allclose(ds.mean_image, ds.train_images.mean(axis=0), rtol=0, atol=1e-4)
  assert ds.mean_image.dtype == np.float32 and ds.mean_image.shape == (32, 32, 3)
  batch = next(ds.eval_batches(20))
  expected = (ds.eval_images.astype(np.float32) - ds.train_images.mean(axis=0)) / 255
  np.testing.assert_allclose(batch['image'], expected, atol=1e-6)
  np.testing.assert_array_equal(batch['label'], ds.eval_labels)
  assert batch['mask'].sum() == 20


TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_default_input_is_todays_bit_for_bit():
  """The paper's (x - mean image) * float32(1/255), exactly as before the input fields existed."""
  ds = _dataset()
  before = lambda images: (images.astype(np.float32) - ds.mean_image) * np.float32(1 / 255)  # noqa: E731
  np.testing.assert_array_equal(next(ds.eval_batches(37))['image'], before(ds.eval_images))
  np.testing.assert_array_equal(ds.normalize(ds.train_images), before(ds.train_images))


@pytest.mark.parametrize('source', ['synthetic', 'image_folder'])
def test_a_converted_models_input_in_training_and_evaluation(source, tmp_path):
  """ToTensor then Normalize (pytorch_resnet_cifar10's), no mean image: every batch, crops included."""
  fields = dict(channel_mean=TORCH_MEAN, channel_std=TORCH_STD)
  if source == 'image_folder':
    write_image_folder(tmp_path / 'folder', per_class=(8, 4))
    folder, cache = str(tmp_path / 'folder'), str(tmp_path / 'cache')
    cfg = _config(source=source, image_folder=folder, cache_dir=cache, **fields)
  else:
    cfg = _config(source=source, train_limit=64, eval_limit=10, **fields)
  ds = data.load(cfg, seed=0)
  assert ds.mean_image.shape == (32, 32, 3) and not ds.mean_image.any()
  torch_input = lambda image: (image / 255.0 - np.array(TORCH_MEAN)) / np.array(TORCH_STD)  # noqa: E731
  batch = next(ds.eval_batches(len(ds.eval_labels)))
  np.testing.assert_allclose(batch['image'], torch_input(ds.eval_images), rtol=0, atol=2e-6)
  batch = in_memory.train_batch(ds, 1, 8, seed=2)
  images, labels, *_ = _expected_train(ds, 1, 8, 2, lambda ds, image: torch_input(image))
  np.testing.assert_allclose(batch['image'], images, rtol=0, atol=2e-6)
  np.testing.assert_array_equal(batch['label'], labels)


def test_a_fixed_mean_image_and_scale(tmp_path):
  """mean_image_file and input_scale as Caffe's: (x - the file's mean) * 1, no training mean."""
  mean = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype(np.float32)
  np.save(tmp_path / 'mean.npy', mean)
  cfg = _config(source='synthetic', train_limit=16, eval_limit=4, input_scale=1.0)
  cfg.mean_image_file = str(tmp_path / 'mean.npy')
  ds = data.load(cfg, seed=0)
  np.testing.assert_array_equal(ds.mean_image, mean)
  batch = next(ds.eval_batches(4))
  np.testing.assert_allclose(batch['image'], ds.eval_images - mean.astype(np.float64), atol=1e-4)


def test_epochs_cover_each_index_once_and_differ():
  ds = _dataset(n=96, labels_are_indices=True)
  spe = common.steps_per_epoch(96, 16)
  assert spe == 6
  epochs = [
    np.concatenate(
      [in_memory.train_batch(ds, s, 16, seed=0)['label'] for s in range(e * spe, (e + 1) * spe)]
    )
    for e in range(2)
  ]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(96))
  assert not np.array_equal(epochs[0], epochs[1])
  # N not a multiple of B: the remainder is dropped, nothing repeats within the epoch.
  ds = _dataset(n=100, labels_are_indices=True)
  order = np.concatenate([in_memory.train_batch(ds, s, 16, seed=0)['label'] for s in range(6)])
  assert len(np.unique(order)) == 96
  np.testing.assert_array_equal(
    common.epoch_permutation(0, 1, 100), np.random.default_rng([0, 1]).permutation(100)
  )


def test_batches_depend_only_on_seed_and_step():
  ds = _dataset()
  a, b = in_memory.train_batch(ds, 7, 16, seed=0), in_memory.train_batch(ds, 7, 16, seed=0)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(a['image'], in_memory.train_batch(ds, 7, 16, seed=1)['image'])
  assert not np.array_equal(a['image'], in_memory.train_batch(ds, 8, 16, seed=0)['image'])
  stream = ds.train_batches(7, 16, seed=0)
  np.testing.assert_array_equal(next(stream)['image'], a['image'])
  np.testing.assert_array_equal(
    next(stream)['image'], in_memory.train_batch(ds, 8, 16, seed=0)['image']
  )


@pytest.mark.parametrize('processes', [2, 4])
def test_process_shares_concatenate_to_the_global_batch(processes):
  ds = _dataset()
  for step in (0, 9):
    whole = in_memory.train_batch(ds, step, 32, seed=0)
    shares = [
      in_memory.train_batch(ds, step, 32, seed=0, process_index=p, process_count=processes)
      for p in range(processes)
    ]
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), whole[key])
  whole = list(ds.eval_batches(8))
  shares = [list(ds.eval_batches(8, p, processes)) for p in range(processes)]
  assert all(len(s) == len(whole) == -(-len(ds.eval_labels) // 8) for s in shares)
  for b, batch in enumerate(whole):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(np.concatenate([s[b][key] for s in shares]), batch[key])


def test_eval_sees_every_image_once():
  ds = _dataset(m=37)
  assert -(-len(ds.eval_labels) // 8) == 5
  per_process = [list(ds.eval_batches(8, p, 2)) for p in range(2)]
  mask = np.concatenate([per_process[p][b]['mask'] for b in range(5) for p in range(2)])
  labels = np.concatenate([per_process[p][b]['label'] for b in range(5) for p in range(2)])
  images = np.concatenate([per_process[p][b]['image'] for b in range(5) for p in range(2)])
  assert mask.sum() == 37 and set(np.unique(mask)) == {0.0, 1.0}
  np.testing.assert_array_equal(labels[mask == 1], ds.eval_labels)
  np.testing.assert_allclose(images[mask == 1], (ds.eval_images - ds.mean_image) / 255, atol=1e-6)
  assert not images[mask == 0].any()


def test_bad_batch_sizes():
  ds = _dataset()
  with pytest.raises(data.DataError):
    in_memory.train_batch(ds, 0, 30, seed=0, process_index=0, process_count=4)
  with pytest.raises(data.DataError):
    common.steps_per_epoch(100, 128)
  with pytest.raises(data.DataError):
    next(ds.eval_batches(10, 0, 3))


def test_val_split_and_limits():
  full = data.load(_config(source='synthetic'), seed=0)
  assert full.train_images.shape == (50_000, 32, 32, 3) and full.eval_images.shape == (
    10_000,
    32,
    32,
    3,
  )
  assert full.eval_split == 'test' and full.num_classes == 10
  split = data.load(_config(source='synthetic', val_split=5000), seed=0)
  assert (
    len(split.train_labels) == 45_000
    and len(split.eval_labels) == 5000
    and split.eval_split == 'val'
  )
  rows = lambda images: {x.tobytes() for x in images}  # noqa: E731
  train_rows, val_rows = rows(split.train_images), rows(split.eval_images)
  assert not train_rows & val_rows
  assert train_rows | val_rows == rows(full.train_images)  # the test set is not used
  limited = data.load(
    _config(source='synthetic', val_split=5000, train_limit=2000, eval_limit=300), seed=0
  )
  assert len(limited.train_labels) == 2000 and len(limited.eval_labels) == 300
  assert rows(limited.train_images) <= train_rows
  assert rows(limited.eval_images) <= rows(split.eval_images)
  assert rows(limited.eval_images) != rows(
    split.eval_images[:300]
  )  # a seeded sample, not the first 300
  np.testing.assert_allclose(limited.mean_image, limited.train_images.mean(axis=0), atol=1e-4)
  with pytest.raises(data.DataError):
    data.load(_config(source='synthetic', val_split=50_000), seed=0)


def test_unknown_source_and_dataset():
  for overrides, field in (
    ({'source': 'nope'}, 'data.source'),
    ({'name': 'mnist'}, 'data.name'),
    ({'train_limit': -1}, 'data.train_limit'),
  ):
    config = defaults.get_config()
    config.data.update(overrides)
    with pytest.raises(validate.ConfigError, match=re.escape(field)):
      validate.check(config)


def _expected_folder(pixels, split):
  classes = sorted({rel.split('/')[1] for rel in pixels})
  rels = sorted(
    (classes.index(rel.split('/')[1]), rel) for rel in pixels if rel.startswith(split + '/')
  )
  return np.stack([pixels[rel] for _, rel in rels]), np.array([label for label, _ in rels])


def test_image_folder_pixels_and_class_order(tmp_path):
  pixels = write_image_folder(tmp_path / 'data')
  gray = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)  # converted to RGB
  Image.fromarray(gray).save(tmp_path / 'data/train/apple/0003.png')
  pixels['train/apple/0003.png'] = np.repeat(gray[..., None], 3, axis=-1)
  cfg = _config(
    source='image_folder', image_folder=str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache')
  )
  data.check(cfg)
  ds = data.load(cfg, seed=0)
  assert ds.num_classes == 3 and ds.eval_split == 'test'
  for split, images, labels in (
    ('train', ds.train_images, ds.train_labels),
    ('test', ds.eval_images, ds.eval_labels),
  ):
    want_images, want_labels = _expected_folder(pixels, split)
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)
  assert ds.train_labels.tolist() == [0] * 4 + [1] * 3 + [2] * 3  # apple, mango, zebra


def test_image_folder_cache_reused_and_invalidated(tmp_path, monkeypatch):
  pixels = write_image_folder(tmp_path / 'data')
  cfg = _config(
    source='image_folder', image_folder=str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache')
  )
  first = data.load(cfg, seed=0)
  decode = in_memory._decode_files

  def fail(*args):
    raise AssertionError('decoded again')

  monkeypatch.setattr(in_memory, '_decode_files', fail)
  np.testing.assert_array_equal(data.load(cfg, seed=0).train_images, first.train_images)
  (cache,) = os.listdir(tmp_path / 'cache')
  assert cache.endswith('.npz')
  changed = np.zeros((32, 32, 3), np.uint8)
  Image.fromarray(changed).save(tmp_path / 'data/test/mango/0001.png')
  with pytest.raises(AssertionError, match='decoded again'):
    data.load(cfg, seed=0)
  monkeypatch.setattr(in_memory, '_decode_files', decode)
  pixels['test/mango/0001.png'] = changed
  np.testing.assert_array_equal(
    data.load(cfg, seed=0).eval_images, _expected_folder(pixels, 'test')[0]
  )
  for name in os.listdir(tmp_path / 'cache'):  # a damaged cache is decoded again
    (tmp_path / 'cache' / name).write_bytes(b'PK damaged')
  np.testing.assert_array_equal(
    data.load(cfg, seed=0).eval_images, _expected_folder(pixels, 'test')[0]
  )


def test_image_folder_tar_gz(tmp_path):
  pixels = write_image_folder(tmp_path / 'data' / 'mycopy', fmt='png')
  archive = tmp_path / 'mycopy.tar.gz'
  with tarfile.open(archive, 'w:gz') as f:
    f.add(tmp_path / 'data' / 'mycopy', arcname='mycopy')
  cfg = _config(source='image_folder', image_folder=str(archive), cache_dir=str(tmp_path / 'cache'))
  data.check(cfg)
  ds = data.load(cfg, seed=0)
  np.testing.assert_array_equal(ds.train_images, _expected_folder(pixels, 'train')[0])
  np.testing.assert_array_equal(ds.eval_labels, _expected_folder(pixels, 'test')[1])
  flat = tmp_path / 'flat.tar.gz'  # the splits at the top of the archive, no enclosing folder
  with tarfile.open(flat, 'w:gz') as f:
    f.add(tmp_path / 'data' / 'mycopy', arcname='.')
  cfg.image_folder = str(flat)
  np.testing.assert_array_equal(data.load(cfg, seed=0).train_images, ds.train_images)
  (tmp_path / 'data/mycopy/train/zebra/0001.png').write_bytes(b'garbage')
  with tarfile.open(archive, 'w:gz') as f:
    f.add(tmp_path / 'data' / 'mycopy', arcname='mycopy')
  cfg.image_folder = str(archive)
  with pytest.raises(data.DataError, match=re.escape(f'{archive}:mycopy/train/zebra/0001.png')):
    data.load(cfg, seed=0)


def test_image_folder_bad_files(tmp_path):
  write_image_folder(tmp_path / 'data', fmt='jpg')
  cfg = _config(
    source='image_folder', image_folder=str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache')
  )
  bad = tmp_path / 'data/train/mango/0001.jpg'
  bad.write_bytes(b'not a jpeg at all')
  with pytest.raises(data.DataError, match=re.escape(str(bad))):
    data.load(cfg, seed=0)
  Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(bad, format='JPEG')
  with pytest.raises(data.DataError, match=re.escape(str(bad))):
    data.load(cfg, seed=0)


def test_image_folder_missing_or_empty(tmp_path):
  def config(path):
    return _config(source='image_folder', image_folder=str(path), cache_dir=str(tmp_path / 'cache'))

  (tmp_path / 'empty').mkdir()
  (tmp_path / 'noclasses' / 'train').mkdir(parents=True)
  (tmp_path / 'noclasses' / 'test').mkdir()
  (tmp_path / 'noimages' / 'train' / 'cat').mkdir(parents=True)
  (tmp_path / 'noimages' / 'test' / 'cat').mkdir(parents=True)
  for path in ('missing', 'empty', 'noclasses', 'noimages'):
    for fn in (data.check, lambda cfg: data.load(cfg, seed=0)):
      with pytest.raises(data.DataError, match=re.escape(str(tmp_path / path))):
        fn(config(tmp_path / path))
  with pytest.raises(data.DataError, match='image_folder'):
    data.check(config(''))


def test_tfds_offline_fails_fast(tmp_path, monkeypatch):
  pytest.importorskip('tensorflow_datasets')
  try:
    socket.create_connection(('www.cs.toronto.edu', 443), timeout=3).close()
    pytest.skip('the CIFAR-10 download host is reachable, so the offline path cannot be exercised')
  except OSError:
    pass
  import tensorflow_datasets as tfds

  def no_download(*args, **kwargs):  # offline, tfds would retry for minutes
    raise AssertionError('a download was attempted')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_download)
  cfg = _config(source='tfds', data_dir=str(tmp_path))
  for fn in (data.check, lambda cfg: data.load(cfg, seed=0)):
    with pytest.raises(data.DataError, match='cannot be reached') as e:
      fn(cfg)
    assert str(tmp_path) in str(e.value) and 'image_folder' in str(e.value)


@pytest.mark.slow
def test_works_without_tensorflow(tmp_path):
  """A JAX-only machine may have no TensorFlow: importing and the non-tfds sources must not need it."""
  write_image_folder(tmp_path / 'data')
  code = f"""
import sys
sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None  # any import of them fails
from resnet_jax import defaults
from resnet_jax import data, validate
from resnet_jax.data import common, in_memory
cfg = defaults.get_config().data
cfg.source, cfg.image_folder, cfg.cache_dir = 'image_folder', {str(tmp_path / 'data')!r}, {str(tmp_path / 'c')!r}
assert data.load(cfg, 0).train_images.shape == (9, 32, 32, 3)
cfg.source = 'tfds'
try:
  data.check(cfg)
except data.DataError as e:
  assert 'tensorflow_datasets' in str(e)
else:
  raise AssertionError('no DataError')
"""
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True, timeout=60)


@pytest.mark.slow
def test_real_cifar10_folder(cifar_folder, cifar_cache_dir, monkeypatch):
  cfg = _config(
    source='image_folder', image_folder=str(cifar_folder), cache_dir=str(cifar_cache_dir)
  )
  ds = data.load(cfg, seed=0)
  assert ds.train_images.shape == (50_000, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.eval_images.shape == (10_000, 32, 32, 3) and ds.eval_split == 'test'
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [5000] * 10)
  classes = sorted(os.listdir(os.path.join(cifar_folder, 'train')))
  assert classes[0] == 'airplane' and classes[-1] == 'truck'
  for label in (0, 3, 9):  # labels follow the sorted class folders, files in sorted order
    first = sorted(os.listdir(os.path.join(cifar_folder, 'train', classes[label])))[0]
    x = np.asarray(
      Image.open(os.path.join(cifar_folder, 'train', classes[label], first)).convert('RGB')
    )
    np.testing.assert_array_equal(ds.train_images[label * 5000], x)
    assert ds.train_labels[label * 5000] == label
  np.testing.assert_allclose(ds.mean_image.mean(axis=(0, 1)), [125.3, 123.0, 113.9], atol=5)
  monkeypatch.setattr(
    in_memory, '_decode_files', lambda *a: pytest.fail('decoded again, not cached')
  )
  again = data.load(cfg, seed=0)
  np.testing.assert_array_equal(again.eval_images, ds.eval_images)
