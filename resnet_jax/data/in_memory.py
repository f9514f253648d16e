"""Datasets held in host memory as uint8 arrays: CIFAR-10 (tfds), an image folder or archive, synthetic data.

Paper section 4.2: subtract the per-pixel mean, pad 4 pixels with zeros, take a random 32x32 crop and
flip half the images; evaluate on the single original view. A converted model's config fixes its
framework's input instead (data.input_scale, channel_mean, channel_std, mean_image_file, as ImageNet's
`imagenet.normalize`): then no mean image is computed. TensorFlow is imported only by the tfds loader;
an image folder is decoded once with PIL and cached.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import multiprocessing
import os
import posixpath
import socket
import tarfile
import time
import zlib

import numpy as np
from absl import logging

from resnet_jax import writers
from resnet_jax.data import common, imagenet
from resnet_jax.data.common import DataError

# tfds' label order, which is also the sorted folder names of an image folder of CIFAR-10.
CIFAR10_CLASSES = (
  'airplane',
  'automobile',
  'bird',
  'cat',
  'deer',
  'dog',
  'frog',
  'horse',
  'ship',
  'truck',
)
PAD = 4  # pixels of zero padding on each side; crop offsets are drawn from [0, 2 * PAD]
# Pixels are scaled by multiplying with this constant, not dividing by 255: XLA rewrites a division by a
# constant into this multiplication, so the host and the on-device paths agree bit for bit.
INV_255 = np.float32(1 / 255)
_FORMAT = 1  # bump to invalidate the decoded-image caches


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """The whole dataset in memory; batches are pure functions of (seed, step)."""

  train_images: np.ndarray  # uint8 [N, H, W, 3]
  train_labels: np.ndarray  # int32 [N]
  eval_images: np.ndarray  # uint8 [M, H, W, 3]
  eval_labels: np.ndarray  # int32 [M]
  mean_image: (
    np.ndarray
  )  # float32 [H, W, 3], per-pixel mean of train_images (or the config's), 0..255
  num_classes: int
  eval_split: str  # 'test', or 'val' when data.val_split > 0
  # The config's input (data.*): x = (pixels - mean image) * input_scale, then (x - mean) / std.
  input_scale: float = 1 / 255
  channel_mean: tuple = ()  # () = none
  channel_std: tuple = ()  # () = 1
  eval_modes = ('1crop',)  # the single original view

  @property
  def num_train(self) -> int:
    return len(self.train_labels)

  def train_batches(self, start_step, batch_size, seed, process_index=0, process_count=1):
    """This process's share of the augmented global batch of each step from `start_step` on."""
    for step in itertools.count(start_step):
      yield train_batch(self, step, batch_size, seed, process_index, process_count)

  def eval_batches(self, batch_size, process_index=0, process_count=1, mode='1crop'):
    """The eval set in order; the last global batch is zero-padded, and 'mask' is 1 for real images."""
    del mode  # one view only
    share = common.process_share(batch_size, process_index, process_count, 'train.eval_batch_size')
    for index in common.eval_indices(len(self.eval_labels), batch_size, share):
      real = index >= 0
      images = np.zeros((len(index), *self.eval_images.shape[1:]), np.float32)
      images[real] = self.normalize(self.eval_images[index[real]])
      labels = np.where(real, self.eval_labels[np.maximum(index, 0)], 0).astype(np.int32)
      yield {'image': images, 'label': labels, 'mask': real.astype(np.float32)}

  def normalize(self, images_uint8):
    """The network input of uint8 images, as the config says (the paper: (x - mean image) / 255)."""
    return preprocess_eval(
      images_uint8, self.mean_image, self.input_scale, self.channel_mean, self.channel_std
    )


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What differs between datasets, so that another one is one more entry in SPECS."""

  title: str
  tfds_name: str
  download_host: str  # tested before tfds tries to download, since offline retries take minutes
  num_classes: int
  synthetic_sizes: tuple[int, int]  # (train, eval)


SPECS = {
  'cifar10': _Spec('CIFAR-10', 'cifar10', 'www.cs.toronto.edu', 10, (50_000, 10_000)),
  # Only the synthetic source is read here; data/imagenet.py streams the real images.
  'imagenet2012': _Spec('ImageNet', 'imagenet2012', 'image-net.org', 1000, (2_560, 512)),
}
_FIX_OFFLINE = (
  '--config.data.source=image_folder --config.data.image_folder=PATH with a local copy '
  '(a train/ and test/ tree of class folders, or a .tar.gz of one)'
)


def _splits(cfg) -> tuple[str, str]:
  return (cfg.train_split, cfg.eval_split)


def check(data_config) -> None:
  """Fast (seconds) checks before anything heavy; raises DataError."""
  spec = SPECS[data_config.name]
  if data_config.source == 'tfds':
    _tfds_builder(spec, data_config.data_dir)
  elif data_config.source == 'image_folder':
    path = _folder_path(data_config)
    if os.path.isdir(path):
      _index(_list_dir(path, _splits(data_config)), path, _splits(data_config))
    elif not tarfile.is_tarfile(path):
      raise DataError(
        f'data.image_folder={path} is neither a directory nor a readable .tar.gz; '
        'point it at a train/ and test/ tree of class folders or an archive of one.'
      )


def load(data_config, seed: int) -> Dataset:
  """Loads (or decodes and caches) the images, then applies val_split, train_limit and eval_limit.

  The limits take fixed, seeded samples, so a limited set spreads over the classes of a sorted folder.
  """
  spec = SPECS[data_config.name]
  size = int(data_config.image_size)
  ti, tl, ei, el, num_classes = _LOADERS[data_config.source](spec, data_config, seed)
  for name, images in (('training', ti), ('evaluation', ei)):
    if images.shape[1:] != (size, size, 3):
      raise DataError(
        f'the {name} images have shape {images.shape[1:]} but data.image_size={size}; '
        f'set --config.data.image_size={images.shape[1]}.'
      )
  eval_split = data_config.eval_split
  if data_config.val_split:
    k, n = int(data_config.val_split), len(tl)
    if k >= n:
      raise DataError(
        f'data.val_split={k} leaves no training images out of {n}; use fewer (paper: 5000).'
      )
    perm = np.random.default_rng([seed, 12345]).permutation(n)
    val, rest = np.sort(perm[:k]), np.sort(perm[k:])
    ti, tl, ei, el, eval_split = ti[rest], tl[rest], ti[val], tl[val], 'val'
  if 0 < data_config.train_limit < len(tl):  # a limit at or above the size keeps everything
    keep = common.seeded_subset(len(tl), data_config.train_limit, seed, 54321)
    ti, tl = ti[keep], tl[keep]
  if 0 < data_config.eval_limit < len(el):
    keep = common.seeded_subset(len(el), data_config.eval_limit, seed, 54322)
    ei, el = ei[keep], el[keep]
  mean = imagenet.fixed_mean_image(data_config)  # a converted model's, else None
  if mean is None:
    mean = ti.mean(axis=0, dtype=np.float64).astype(np.float32)
  return Dataset(
    ti,
    tl.astype(np.int32),
    ei,
    el.astype(np.int32),
    mean,
    num_classes,
    eval_split,
    float(data_config.input_scale),
    tuple(data_config.channel_mean),
    tuple(data_config.channel_std),
  )


# ----------------------------------------------------------------------------------------- sources


def _tfds_builder(spec: _Spec, data_dir: str):
  """A tfds builder that is prepared, or can be: offline download_and_prepare retries for minutes."""
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(
      f'data.source=tfds needs tensorflow_datasets, which is not installed; install it '
      f'(with tensorflow-cpu) or use {_FIX_OFFLINE}.'
    ) from None
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir or None)
  if not builder.is_prepared():
    try:
      socket.create_connection((spec.download_host, 443), timeout=3).close()
    except OSError:  # socket.gaierror (no DNS) and timeouts are OSErrors too
      where = data_dir or f'{os.path.dirname(os.path.dirname(builder.data_dir))} (the tfds default)'
      raise DataError(
        f'{spec.title} is not in {where} and the download host {spec.download_host} cannot be reached; '
        f'prepare it on a connected machine (tfds build {spec.tfds_name} --data_dir=DIR), copy DIR here '
        f'and pass --config.data.data_dir=DIR, or use {_FIX_OFFLINE}.'
      ) from None
  return builder


def _load_tfds(spec, cfg, seed):
  del seed
  import tensorflow_datasets as tfds

  builder = _tfds_builder(spec, cfg.data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare()
  arrays = []
  for split in _splits(cfg):
    images, labels = tfds.as_numpy(
      builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
    )
    arrays += [np.asarray(images, np.uint8), np.asarray(labels, np.int32)]
  return (*arrays, builder.info.features['label'].num_classes)


def _load_synthetic(spec, cfg, seed):
  """Random images for benchmarks: no files, the configured size, the dataset's number of classes."""
  rng, size = np.random.default_rng(seed), int(cfg.image_size)
  arrays = []
  for n in spec.synthetic_sizes:
    arrays += [
      rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
      rng.integers(0, spec.num_classes, n).astype(np.int32),
    ]
  return (*arrays, spec.num_classes)


def _folder_path(cfg) -> str:
  if not cfg.image_folder:
    raise DataError('data.source=image_folder needs a path; pass --config.data.image_folder=PATH.')
  path = os.path.abspath(os.path.expanduser(cfg.image_folder))
  if not os.path.exists(path):
    raise DataError(
      f'data.image_folder={path} does not exist; point it at a train/ and test/ tree of '
      'class folders or a .tar.gz of one.'
    )
  return path


def _list_dir(root: str, splits) -> dict[str, tuple[int, int]]:
  """{'split/class/file': (size, mtime)} for every file two levels under each split folder."""
  files = {}
  for split in splits:
    top = os.path.join(root, split)
    for c in os.scandir(top) if os.path.isdir(top) else []:
      for f in os.scandir(c.path) if c.is_dir() else []:
        st = f.stat()
        files[f'{split}/{c.name}/{f.name}'] = (st.st_size, st.st_mtime_ns)
  return files


def _read_archive(path: str, splits) -> tuple[dict[str, bytes], str]:
  """All files of a .tar.gz in one streaming pass (3x faster than extracting 60k files) and the top
  folder that holds the splits, if there is one."""
  try:
    with tarfile.open(path, 'r|*') as f:
      files = {posixpath.normpath(m.name): f.extractfile(m).read() for m in f if m.isfile()}
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(
      f'cannot read the archive {path} ({e}); replace it or extract it and pass the folder.'
    ) from None
  tops = {name.split('/', 1)[0] for name in files}
  if len(tops) == 1 and not any(name.startswith(splits[0] + '/') for name in files):
    prefix = tops.pop() + '/'
    return {name[len(prefix) :]: data for name, data in files.items()}, prefix
  return files, ''


def _index(names, where: str, split_names):
  """Classes in sorted folder-name order (as tfds) and, per split, [(name, label)] in sorted order."""
  expected = f'{where} should hold {" and ".join(s + "/" for s in split_names)} with a folder of images per class'
  parts = [name.split('/') for name in names]
  splits = []
  for split in split_names:
    files = sorted(
      (p[1], p[2])
      for p in parts
      if len(p) == 3
      and p[0] == split
      and p[2].lower().endswith(common.IMAGE_EXTENSIONS)
      and not p[1].startswith('.')
      and not p[2].startswith('.')
    )
    if not files:
      raise DataError(f'{where}/{split} holds no class folders with images; {expected}.')
    splits.append(files)
  classes = sorted({c for c, _ in splits[0]})
  unknown = sorted({c for c, _ in splits[1]} - set(classes))
  if unknown:
    raise DataError(
      f'{where}/{split_names[1]} has classes {unknown} absent from {split_names[0]}/; {expected}.'
    )
  label = {c: i for i, c in enumerate(classes)}
  return classes, [
    [(f'{s}/{c}/{f}', label[c]) for c, f in files] for s, files in zip(split_names, splits)
  ]


def _decode_chunk(items, size: int) -> np.ndarray:
  """Decodes [(name, bytes or None to read the file `name`)] to uint8 RGB."""
  from PIL import Image

  out = np.empty((len(items), size, size, 3), np.uint8)
  for i, (name, data) in enumerate(items):
    try:
      with Image.open(name if data is None else io.BytesIO(data)) as image:
        if image.size != (size, size):
          raise DataError(
            f'{name} is {image.size[0]}x{image.size[1]} pixels but data.image_size={size}; '
            'resize the images or set --config.data.image_size.'
          )
        out[i] = np.asarray(image.convert('RGB'))
    except DataError:
      raise
    except Exception as e:  # PIL raises many types on bad files
      raise DataError(f'cannot decode image {name} ({e}); replace or delete the file.') from None
  return out


def _decode_files(items, size: int, where: str) -> np.ndarray:
  """Decodes in worker processes when that pays, since PIL holds the GIL; logs the progress by quarters.

  Only idle cores count: worker processes competing with another busy job are slower than one process.
  """
  workers = min(len(os.sched_getaffinity(0)) - round(os.getloadavg()[0]), 16)
  pooled = len(items) >= 5000 and workers >= 2
  chunk = -(
    -len(items) // (4 * workers if pooled else 20)
  )  # a few per worker, or 20 for the progress
  chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
  progress = writers.Milestones(f'Decoding {len(items):,} images of {where}', len(items), 'images')
  logging.info(
    '%s in %d process(es), once: later runs read the cached arrays.',
    progress.what,
    workers if pooled else 1,
  )
  if pooled:
    try:  # spawn, not fork: forking a process that runs JAX threads can deadlock
      with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')
      ) as ex:
        decoded = ex.map(_decode_chunk, chunks, itertools.repeat(size))
        return np.concatenate(list(progress.track(decoded, len)))
    except concurrent.futures.process.BrokenProcessPool:
      progress = writers.Milestones(progress.what, len(items), 'images')
  decoded = (_decode_chunk(c, size) for c in chunks)
  return np.concatenate(list(progress.track(decoded, len)))


def _load_image_folder(spec, cfg, seed):
  """Decodes a folder (or .tar.gz) once and caches the arrays, keyed by the path and every file's stat."""
  del seed
  path, size = _folder_path(cfg), int(cfg.image_size)
  names = _splits(cfg)
  key = hashlib.sha256(f'{_FORMAT}\n{spec.tfds_name}\n{size}\n{path}\n{names}\n'.encode())
  if os.path.isdir(path):
    files = _list_dir(path, names)
    classes, splits = _index(files, path, names)
    key.update(repr(sorted(files.items())).encode())  # names, sizes and mtimes
  else:  # the archive's own stat stands for its files, so a cached load does not read it
    st = os.stat(path)
    key.update(f'{st.st_size} {st.st_mtime_ns}'.encode())
  cache = os.path.join(common.cache_dir(cfg), f'{spec.tfds_name}-folder-{key.hexdigest()[:20]}.npz')
  try:
    with np.load(cache) as f:
      loaded = (
        f['train_images'],
        f['train_labels'],
        f['eval_images'],
        f['eval_labels'],
        len(f['classes']),
      )
    logging.info('Read the images of %s, decoded by an earlier run, from %s.', path, cache)
    return loaded
  except Exception:  # absent or damaged: decode again
    pass
  start = time.perf_counter()
  if os.path.isdir(path):
    items = [[(os.path.join(path, rel), None) for rel, _ in s] for s in splits]
  else:
    logging.info('Reading the archive %s.', path)
    files, prefix = _read_archive(path, names)
    classes, splits = _index(files, path, names)
    items = [[(f'{path}:{prefix}{rel}', files[rel]) for rel, _ in s] for s in splits]
  images = _decode_files(items[0] + items[1], size, path)  # one pool for both splits
  arrays = {'train_images': images[: len(items[0])], 'eval_images': images[len(items[0]) :]}
  for name, files in zip(('train', 'eval'), splits):
    arrays[f'{name}_labels'] = np.array([label for _, label in files], np.int32)
  common.write_atomically(cache, lambda tmp: np.savez(tmp, classes=np.array(classes), **arrays))
  logging.info(
    'Decoded %s images in %.0f s and cached them in %s: later runs read that file instead.',
    f'{len(images):,}',
    time.perf_counter() - start,
    cache,
  )
  return (
    arrays['train_images'],
    arrays['train_labels'],
    arrays['eval_images'],
    arrays['eval_labels'],
    len(classes),
  )


_LOADERS = {'tfds': _load_tfds, 'image_folder': _load_image_folder, 'synthetic': _load_synthetic}

# ----------------------------------------------------------------------------------------- batches


def augmentation(seed: int, step: int, batch_size: int):
  """Crop offsets dy, dx in [0, 2 * PAD] and flip flags for the whole global batch of `step`."""
  rng = np.random.default_rng([int(seed), int(step), 1])
  dy = rng.integers(0, 2 * PAD + 1, batch_size)
  dx = rng.integers(0, 2 * PAD + 1, batch_size)
  return dy, dx, rng.random(batch_size) < 0.5


def preprocess_eval(
  images_uint8: np.ndarray,
  mean_image: np.ndarray,
  input_scale=1 / 255,
  channel_mean=(),
  channel_std=(),
) -> np.ndarray:
  """The single original view, float32: (x - mean image) * input_scale, then (x - channel_mean) /
  channel_std where they are set. The defaults are the paper's (x - mean) / 255, bit for bit."""
  x = (images_uint8.astype(np.float32) - np.asarray(mean_image, np.float32)) * np.float32(
    input_scale
  )
  if len(channel_mean):
    x = x - np.asarray(channel_mean, np.float32)
  if len(channel_std):
    x = x / np.asarray(channel_std, np.float32)
  return x


def _pad_crop_flip(x: np.ndarray, dy, dx, flip) -> np.ndarray:
  """Zero-pads, crops at (dy, dx) and flips each image, as one gather over the batch (~2 ms at B=128)."""
  b, h, w, c = x.shape
  hp, wp = h + 2 * PAD, w + 2 * PAD
  padded = np.zeros((b, hp, wp, c), np.float32)
  padded[:, PAD : PAD + h, PAD : PAD + w] = x
  rows = dy[:, None] + np.arange(h)
  cols = dx[:, None] + np.where(
    flip[:, None], np.arange(w)[::-1], np.arange(w)
  )  # a flip reverses columns
  pixel = (np.arange(b)[:, None, None] * hp + rows[:, :, None]) * wp + cols[:, None, :]
  return np.take(padded.reshape(b * hp * wp, c), pixel.ravel(), axis=0).reshape(b, h, w, c)


def train_batch(
  ds: Dataset, step: int, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> dict:
  """This process's share of the augmented global batch of `step`: {'image', 'label'}."""
  share = common.process_share(batch_size, process_index, process_count, 'train.batch_size')
  index = common.step_indices(ds.num_train, step, batch_size, seed, share)
  dy, dx, flip = (a[share] for a in augmentation(seed, step, batch_size))
  images = _pad_crop_flip(ds.normalize(ds.train_images[index]), dy, dx, flip)
  return {'image': images, 'label': ds.train_labels[index].astype(np.int32)}
