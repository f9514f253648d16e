"""The native tf.data ImageNet input against the generator-fed pipeline it replaced, kept here as the
reference: the same training and 10-crop batches bit for bit, the same mean image, and antialiased 1-crop
views that decode only their window within float rounding of the whole image resized; the resize itself
against NumPy."""

import itertools

import numpy as np
import pytest

from resnet_jax import data as data_lib
from resnet_jax import defaults
from resnet_jax.data import common, imagenet

tf = pytest.importorskip('tensorflow')


def _generator_pipeline(split, items, view, shape, local_batch, threads):
  """The replaced input: a Python generator hands tf.data a batch of (data, label, seed, valid) per call."""

  def generate():
    items_left = iter(items)
    while chunk := list(itertools.islice(items_left, local_batch)):
      records = [split.get(i) if i >= 0 else (b'', 0) for i, _ in chunk]
      yield (
        np.array([data for data, _ in records], object),
        np.array([label for _, label in records], np.int32),
        np.array([seed for _, seed in chunk], np.int64).reshape(-1, 2),
        np.array([i >= 0 for i, _ in chunk]),
      )

  ds = tf.data.Dataset.from_generator(
    generate,
    output_signature=(
      tf.TensorSpec([None], tf.string),
      tf.TensorSpec([None], tf.int32),
      tf.TensorSpec([None, 2], tf.int64),
      tf.TensorSpec([None], tf.bool),
    ),
  ).unbatch()

  def fn(data, label, seed, valid):
    def real():
      return view(tf, tf.io.read_file(data) if split.paths is not None else data, seed)

    image = tf.cond(valid, real, lambda: tf.zeros(shape, tf.float32))
    return {
      'image': tf.ensure_shape(image, shape),
      'label': label,
      'mask': tf.cast(valid, tf.float32),
    }

  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(local_batch)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  yield from ds.with_options(options).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _whole_image_one_crop(tf, data, cfg, mean_image):
  """The replaced 1-crop view: the whole image decoded and resized, then its centre."""
  crop = imagenet._crops(
    tf, imagenet.resize_shorter(tf, data, cfg.eval_resize, cfg.antialias), cfg.image_size, False
  )
  return imagenet.normalize(crop, cfg, mean_image)


@pytest.fixture(scope='module')
def sample(imagenet_sample_folder, tmp_path_factory):
  config = defaults.get_imagenet_config()
  config.data.update(
    source='image_folder',
    image_folder=str(imagenet_sample_folder),
    train_split='val',
    eval_split='val',
    cache_dir=str(tmp_path_factory.mktemp('mean')),
    image_size=64,
    scale_min=72,
    scale_max=136,
    eval_resize=72,
    mean_images=40,
    eval_limit=45,
    threads=2,
    antialias=True,  # the 1-crop view then decodes only its window
  )
  return config.data, data_lib.load(config.data, 0)


def test_mean_image_is_the_generator_pipelines(sample):
  cfg, ds = sample
  index = np.sort(np.random.default_rng(12345).permutation(ds.train.size)[:40])
  batches = _generator_pipeline(
    ds.train,
    [(i, (0, 0)) for i in index],
    lambda tf, d, s: imagenet._crops(tf, imagenet.resize_shorter(tf, d, 72, True), 64, False) / 255,
    (64, 64, 3),
    64,
    0,
  )
  total = sum(b['image'].astype(np.float64).sum(0) for b in batches)
  np.testing.assert_array_equal(ds.mean_image, (total * 255 / 40).astype(np.float32))


@pytest.mark.parametrize('start', [0, 5])
def test_training_batches_are_the_generator_pipelines(sample, start):
  """Bit for bit, from step 0 and resumed at step 5 (crossing the epoch of 6 steps), two processes."""
  cfg, ds = sample
  for process in (0, 1):
    share = common.process_share(16, process, 2, 'train.batch_size')

    def items(share=share):
      for step in itertools.count(start):
        index = common.step_indices(ds.train.size, step, 16, 3, share)
        seeds = np.random.default_rng([3, step, 2]).integers(0, 2**62, (16, 2))
        yield from zip(index, seeds[share])

    view = lambda tf, d, s: imagenet.train_view(tf, d, s, cfg, ds.mean_image)  # noqa: E731
    old = _generator_pipeline(ds.train, items(), view, (64, 64, 3), 8, 2)
    new = ds.train_batches(start, 16, 3, process, 2)
    for _ in range(3):
      a, b = next(old), next(new)
      np.testing.assert_array_equal(b['label'], a['label'])
      np.testing.assert_array_equal(b['image'], a['image'])
    new.close()


def _eval_reference(ds, view, shape, batch):
  share = common.process_share(batch, 0, 1, 'train.eval_batch_size')
  items = [(i, (0, 0)) for b in common.eval_indices(ds.eval.size, batch, share) for i in b]
  return list(_generator_pipeline(ds.eval, items, view, shape, batch, 2))


def test_ten_crop_batches_are_the_generator_pipelines(sample):
  cfg, ds = sample
  view = lambda tf, d, s: imagenet.ten_crop_view(tf, d, cfg, ds.mean_image)  # noqa: E731
  old = _eval_reference(ds, view, (10, 64, 64, 3), 16)
  new = list(ds.eval_batches(16, mode='10crop'))
  assert len(new) == len(old) == 3  # 45 images: the last batch padded
  for a, b in zip(old, new):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(b[key], a[key])


def test_one_crop_batches_decode_the_window_within_rounding(sample):
  """The window's resampling weights are computed from translated positions: float32 rounding moves a
  pixel by at most 0.0052 of 255 on the sample (0.00004 on average), far below a level of 255."""
  cfg, ds = sample
  view = lambda tf, d, s: _whole_image_one_crop(tf, d, cfg, ds.mean_image)  # noqa: E731
  old = _eval_reference(ds, view, (64, 64, 3), 16)
  new = list(ds.eval_batches(16, mode='1crop'))
  assert len(new) == len(old) == 3
  for a, b in zip(old, new):
    np.testing.assert_array_equal(b['label'], a['label'])
    np.testing.assert_array_equal(b['mask'], a['mask'])
    np.testing.assert_allclose(b['image'] * 255, a['image'] * 255, rtol=0, atol=0.01)
    assert np.abs(b['image'] - a['image']).mean() * 255 < 1e-4


def test_one_crop_of_every_sample_image_at_224(imagenet_sample_folder):
  """centre_crop against the whole image resized, at the paper's 256 / 224, every sample image."""
  for path in sorted((imagenet_sample_folder / 'val').glob('*/*')):
    data = tf.constant(path.read_bytes())
    whole = imagenet._crops(tf, imagenet.resize_shorter(tf, data, 256, True), 224, False).numpy()
    window = imagenet.centre_crop(tf, data, 256, 224).numpy()
    np.testing.assert_allclose(window, whole, rtol=0, atol=0.01, err_msg=str(path))


def _triangle(n_in, n_out, widen):
  """[n_out, n_in] weights of a bilinear resize along one axis, in NumPy: a triangle centred on each output
  pixel's position in the input (half-pixel centres), of radius 1 input pixel, or 1 / scale where `widen`
  and the axis shrinks, normalised over the pixels inside the image (the edges clamp)."""
  radius = max(n_in / n_out, 1.0) if widen else 1.0
  centres = (np.arange(n_out) + 0.5) * n_in / n_out
  weights = np.maximum(0, 1 - np.abs(np.arange(n_in)[None] + 0.5 - centres[:, None]) / radius)
  return weights / weights.sum(1, keepdims=True)


def _numpy_resize(image, oh, ow, widen):
  (h, w, c), rows = image.shape, _triangle(image.shape[0], oh, widen)
  resized = (rows @ image.reshape(h, w * c)).reshape(oh, w, c)
  return np.einsum('owc,pw->opc', resized, _triangle(w, ow, widen), optimize=True)


@pytest.mark.parametrize('antialias', [False, True])
def test_resize_is_numpys_bilinear(imagenet_sample_folder, antialias):
  """imagenet._resize against the NumPy resize above, shrinking (by 1.3 and 2.6) and enlarging: within
  0.005 of 255 on the sample's first five images (float32 weights)."""
  path = sorted((imagenet_sample_folder / 'val').glob('*/*'))[0]
  image = tf.io.decode_image(path.read_bytes(), channels=3).numpy().astype(np.float64)
  h, w = image.shape[:2]
  for oh, ow in ((h * 10 // 13, w * 10 // 13), (h * 5 // 13, w * 5 // 13), (h * 3 // 2, w + 7)):
    got = imagenet._resize(tf, image.astype(np.uint8), oh, ow, antialias).numpy()
    want = _numpy_resize(image, oh, ow, antialias)
    np.testing.assert_allclose(got, want, rtol=0, atol=0.01, err_msg=f'{h}x{w} to {oh}x{ow}')
    if oh < h:  # the switch changes the shrunk pixels by more than half a level of 255 on average
      assert np.abs(_numpy_resize(image, oh, ow, not antialias) - want).mean() > 0.5, (oh, ow)
