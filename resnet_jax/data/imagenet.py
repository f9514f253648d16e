"""ImageNet input (paper section 3.4): JPEGs streamed through tf.data, every batch a function of (seed, step).

Training, the paper's recipe: the shorter side resized to a random S in [256, 480], a random 224x224 crop or
its horizontal flip, the per-pixel mean subtracted, AlexNet's PCA "lighting" noise (std 0.1). The crop's
window is found in the original image and only that window is decoded (decode_and_crop_jpeg), then resized
to 224: the pixels of resize-then-crop for a fraction of the decoding. `data.augment='inception'` draws the
later random-resized crop (8-100% of the area, aspect 3/4 to 4/3) instead of the scale augmentation.

Epoch e's order is a permutation from (seed, e) and example j of step s draws its randomness from
(seed, s, j), as for CIFAR: a resumed run reads exactly what it would have read, and no tf.data iterator is
ever saved. Each process reads only its share of each global batch.

Paths and labels are tensors: tf.data reads and decodes the files in a parallel map, and a file that does
not decode ends the stream with a DataError naming it.

Evaluation views: '1crop' (shorter side 256, centre 224; only the JPEG window it is resampled from is
decoded), '10crop' (the four corners and the centre, and
their flips), and the fully-convolutional 'scale' view used by multi-scale testing (shorter side s, the
whole image). Every view is `normalize`d as the config says: by default (the paper) the 224 views subtract
the per-pixel mean image of the 1-crop views of `data.mean_images` training images and divide by 255; a
converted model's config fixes its framework's preprocessing instead (`data.input_scale`, `channel_mean`,
`channel_std`, `mean_image_file`) and needs no training images. Whole images of other sizes cannot take a
224x224 mean, so the scale view subtracts its per-channel mean. Labels are the index of the class's
WordNet id in the sorted list of the 1000 ILSVRC2012 synsets that tfds ships, so a folder holding a subset
of the classes keeps the real label ids; a folder tree of any other classes (fine-tuning) numbers its
class folders in sorted order.
"""

import ast
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import os
import re

import numpy as np

from resnet_jax import defaults
from resnet_jax.data import common
from resnet_jax.data.common import DataError

NUM_CLASSES = 1000
_WNID = re.compile(r'n\d{8}')  # a WordNet noun id, as ILSVRC names its class folders
# AlexNet's PCA of ImageNet RGB pixels (in 0..1 units): eigenvalues, and eigenvectors as columns.
EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
EIGVEC = np.array(
  [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]], np.float32
)
ASPECTS = (
  1.0,
  1.25,
  4 / 3,
  1.5,
  1.75,
  2.0,
)  # long/short side ratios of the multi-scale shape buckets


def _tf():
  import tensorflow as tf  # lazily: the JAX side never needs it

  tf.config.set_visible_devices([], 'GPU')  # keep TensorFlow off the accelerators JAX uses
  return tf


def ilsvrc_wnids() -> list[str]:
  """The 1000 ILSVRC2012 WordNet ids in tfds' (sorted) label order, read without importing TensorFlow."""
  spec = importlib.util.find_spec('tensorflow_datasets')
  path = spec and os.path.join(
    spec.submodule_search_locations[0], 'datasets', 'imagenet2012', 'labels.txt'
  )
  if not path or not os.path.exists(path):
    raise DataError(
      'ImageNet labels come from the ILSVRC2012 synset list that tensorflow_datasets ships; '
      'install tensorflow-datasets (pip install tensorflow-datasets).'
    )
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def normalize(image, cfg, mean_image):
  """The network input from pixels in 0..255 (a tf tensor or NumPy array, RGB, channels last).

  (pixels - mean image) / (1 / input_scale), then (x - channel_mean) / channel_std: with the defaults
  today's (x - mean) / 255, with torchvision's fields ToTensor's x / 255 and Normalize's arithmetic.
  """
  x = (image - mean_image) / (1 / cfg.input_scale)
  if len(cfg.channel_mean):
    x = x - np.asarray(cfg.channel_mean, np.float32)
  if len(cfg.channel_std):
    x = x / np.asarray(cfg.channel_std, np.float32)
  return x


def fixed_mean_image(cfg) -> np.ndarray | None:
  """The mean image the config fixes (float32 [crop, crop, 3], 0..255), or None: computed from data."""
  crop = int(cfg.image_size)
  if cfg.mean_image_file:
    path = os.path.expanduser(cfg.mean_image_file)
    try:
      mean = np.load(path)
    except (OSError, ValueError) as e:
      raise DataError(
        f'cannot read data.mean_image_file={path} ({type(e).__name__}): pass the mean image '
        '(.npy) written by resnet_jax.tools.convert.'
      ) from None
    if mean.shape != (crop, crop, 3):
      raise DataError(
        f'data.mean_image_file={path} holds an array of shape {mean.shape} where the crop '
        f'data.image_size={crop} needs ({crop}, {crop}, 3): set data.image_size to its size.'
      )
    return mean.astype(np.float32)
  if len(cfg.channel_mean):
    return np.zeros((crop, crop, 3), np.float32)
  return None


def ilsvrc_names() -> list[str]:
  """The 1000 ILSVRC2012 class names ('tench, Tinca tinca', ...) in label order (the sorted WordNet ids).

  tensorflow_datasets ships them as IMAGENET_LABELS_LIST in datasets/siscore/labels.py; the list is read
  from the file, not imported (tfds imports TensorFlow).
  """
  spec = importlib.util.find_spec('tensorflow_datasets')
  path = spec and os.path.join(
    spec.submodule_search_locations[0], 'datasets', 'siscore', 'labels.py'
  )
  names = None
  if path and os.path.exists(path):
    with open(path) as f:
      for node in ast.parse(f.read()).body:
        targets = [getattr(t, 'id', None) for t in getattr(node, 'targets', ())]
        if 'IMAGENET_LABELS_LIST' in targets:
          names = ast.literal_eval(node.value)
  if not names or len(names) != NUM_CLASSES:
    raise DataError(
      'ImageNet class names come from the list tensorflow_datasets ships (datasets/siscore/labels.py); '
      'install tensorflow-datasets (pip install tensorflow-datasets).'
    )
  return list(names)


# ------------------------------------------------------------------------------------------ records


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Random access to one split: encoded images (or their file paths) and labels."""

  name: str
  size: int
  paths: list | None = None  # image_folder: one file per example
  labels: np.ndarray | None = None
  source: object = None  # tfds: an array_record data source of {'image': bytes, 'label': int}
  index: np.ndarray | None = None  # a subset (data.train_limit, eval_limit): example i is index[i]

  def row(self, i: int) -> int:
    """Example i's position in the whole split (its file in `paths`, its record in `source`)."""
    return int(i if self.index is None else self.index[i])

  def get(self, i: int) -> tuple[bytes, int]:
    """(path or encoded image, label); paths are read inside tf.data, in parallel."""
    i = self.row(i)
    if self.paths is not None:
      return self.paths[i].encode(), int(self.labels[i])
    record = self.source[i]
    return record['image'], int(record['label'])

  def label(self, i: int) -> int:
    if self.paths is not None:  # no need to read the record
      return int(self.labels[i if self.index is None else self.index[i]])
    return self.get(i)[1]

  def image_bytes(self, i: int) -> bytes:
    data, _ = self.get(i)
    if self.paths is not None:
      with open(data, 'rb') as f:
        return f.read()
    return data


def _subset(split: Split, keep: np.ndarray) -> Split:
  index = keep if split.index is None else split.index[keep]
  return dataclasses.replace(split, size=len(keep), index=index)


def _split_folder(root: str, split: str) -> str:
  folder = os.path.join(root, split)
  if (
    not os.path.isdir(folder) and split == 'validation' and os.path.isdir(os.path.join(root, 'val'))
  ):
    folder = os.path.join(root, 'val')  # the common name of ImageNet's validation folder
  if not os.path.isdir(folder):
    raise DataError(
      f'{folder} does not exist; data.image_folder should hold one folder per split '
      f'(data.train_split, data.eval_split) with a folder of images per class.'
    )
  return folder


def _class_folders(folder: str) -> list[str]:
  return sorted(
    name
    for name in os.listdir(folder)
    if os.path.isdir(os.path.join(folder, name)) and not name.startswith('.')
  )


def folder_classes(folders: list[str]) -> tuple[dict, int]:
  """({class folder name: label}, number of classes) of split folders.

  ImageNet's WordNet ids (every folder an ILSVRC2012 synset) keep their ILSVRC label, so a folder of some
  of the classes keeps the real ids, out of 1000; any other names are numbered in sorted order over all
  splits, and there are as many classes as names.
  """
  names = sorted(set().union(*(_class_folders(f) for f in folders)))
  if names and all(_WNID.fullmatch(n) for n in names):
    wnids = ilsvrc_wnids()
    if set(names) <= set(wnids):
      return {w: i for i, w in enumerate(wnids)}, NUM_CLASSES
  if len(names) == 1:
    raise DataError(
      f'{" and ".join(folders)} hold a single class folder ({names[0]}), and a classifier needs '
      'at least two classes: add a folder of images per class.'
    )
  return {name: i for i, name in enumerate(names)}, len(names)


def _folder_split(folder: str, split: str, label: dict) -> Split:
  paths, labels = [], []
  for name in _class_folders(folder):
    files = sorted(
      f
      for f in os.listdir(os.path.join(folder, name))
      if f.lower().endswith(common.IMAGE_EXTENSIONS) and not f.startswith('.')
    )
    paths += [os.path.join(folder, name, f) for f in files]
    labels += [label[name]] * len(files)
  if not paths:
    raise DataError(
      f'{folder} holds no class folders with images; it should hold <class>/<image>.JPEG.'
    )
  return Split(split, len(paths), paths=paths, labels=np.array(labels, np.int32))


def _tfds_split(cfg, split: str) -> Split:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise DataError(
      'data.source=tfds needs tensorflow_datasets, which is not installed; install it or use '
      'data.source=image_folder.'
    ) from None
  try:  # download=False: ImageNet cannot be downloaded, and offline retries take minutes
    source = tfds.data_source(
      'imagenet2012',
      split=split,
      data_dir=cfg.data_dir or None,
      download=False,
      decoders={'image': tfds.decode.SkipDecoding()},
    )
  except Exception as e:  # tfds raises several types here
    raise DataError(
      f'cannot open split {split!r} of imagenet2012 in tfds ({type(e).__name__}: {str(e).splitlines()[0]}); '
      'put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in the manual dir and run `tfds build '
      'imagenet2012 --file_format=array_record` (see the README), or use data.source=image_folder.'
    ) from None
  return Split(split, len(source), source=source)


def check(cfg) -> None:
  """Fast checks: the splits exist and are readable (lists the folders; opens the tfds sources)."""
  _splits(cfg)
  fixed_mean_image(cfg)


def _splits(cfg) -> tuple[Split | None, Split, int]:
  """(train, eval, number of classes); with fixed preprocessing the training split may be absent (None)."""
  if cfg.source == 'image_folder':
    root = os.path.abspath(os.path.expanduser(cfg.image_folder))
    if not os.path.isdir(root):
      raise DataError(
        f'data.image_folder={root} is not a directory; ImageNet is read from a folder of '
        'split/<class>/<image>.JPEG (extract the archives first).'
      )
    folders = {cfg.eval_split: _split_folder(root, cfg.eval_split)}
    try:
      folders[cfg.train_split] = _split_folder(root, cfg.train_split)
    except DataError:
      if not defaults.fixed_preprocessing(cfg):  # the mean image comes from training images
        raise
    label, num_classes = folder_classes(list(folders.values()))
    train = None
    if cfg.train_split in folders:
      train = _folder_split(folders[cfg.train_split], cfg.train_split, label)
    return train, _folder_split(folders[cfg.eval_split], cfg.eval_split, label), num_classes
  eval_split = _tfds_split(cfg, cfg.eval_split)
  try:
    train = _tfds_split(cfg, cfg.train_split)
  except DataError:
    if not defaults.fixed_preprocessing(cfg):
      raise
    train = None
  return train, eval_split, NUM_CLASSES


# ------------------------------------------------------------------------------------------ views


def _shape(tf, data):
  """Height and width from the JPEG header alone; other formats are decoded."""
  return tf.cond(
    tf.io.is_jpeg(data),
    lambda: tf.image.extract_jpeg_shape(data)[:2],
    lambda: tf.shape(tf.io.decode_image(data, channels=3, expand_animations=False))[:2],
  )


def _decode_window(tf, data, y, x, h, w):
  """Decodes only the window [y, y+h) x [x, x+w) of a JPEG; the decoders of the other formats (PNG, GIF,
  BMP, WebP) have no window, so those images are decoded whole and cropped."""
  return tf.cond(
    tf.io.is_jpeg(data),
    lambda: tf.image.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3),
    lambda: tf.image.crop_to_bounding_box(
      tf.io.decode_image(data, channels=3, expand_animations=False), y, x, h, w
    ),
  )


def _resize(tf, image, h, w, antialias):
  """Bilinear to h x w, float32. `antialias` widens the kernel where the image shrinks (ScaleAndTranslate,
  as PIL and torchvision resize); where it grows both are the same interpolation, which ResizeBilinear
  computes about 3x faster, so it does so then."""
  image, size = tf.cast(image, tf.float32), tf.stack([h, w])
  if not antialias:
    return tf.image.resize(image, size, 'bilinear')
  shape = tf.shape(image)
  return tf.cond(
    tf.logical_or(shape[0] > h, shape[1] > w),
    lambda: tf.image.resize(image, size, 'bilinear', antialias=True),
    lambda: tf.image.resize(image, size, 'bilinear'),
  )


def scale_window(tf, shape, seed, scale_range, crop):
  """The paper's scale augmentation as a window of the original image: S drawn in [lo, hi], then a random
  crop x crop square of the image resized to shorter side S, i.e. a square of side crop * min(h, w) / S."""
  h, w = shape[0], shape[1]
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  scale = tf.random.stateless_uniform([], s1, scale_range[0], scale_range[1] + 1, dtype=tf.int32)
  short = tf.minimum(h, w)
  side = tf.cast(tf.round(crop * tf.cast(short, tf.float32) / tf.cast(scale, tf.float32)), tf.int32)
  side = tf.clip_by_value(side, 1, short)
  offset = tf.random.stateless_uniform([2], s2, 0, 2**30, dtype=tf.int32) % (
    tf.stack([h, w]) - side + 1
  )
  return scale, offset[0], offset[1], side, side


def _inception_window(tf, shape, seed):
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    tf.concat([shape, [3]], 0),
    tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    seed=seed,
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return begin[0], begin[1], size[0], size[1]


def train_view(tf, data, seed, cfg, mean_image):
  """One augmented training crop, normalized, float32 [crop, crop, 3]."""
  crop = int(cfg.image_size)
  seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  shape = _shape(tf, data)
  if cfg.augment == 'inception':
    y, x, h, w = _inception_window(tf, shape, seeds[0])
  else:
    _, y, x, h, w = scale_window(tf, shape, seeds[0], (cfg.scale_min, cfg.scale_max), crop)
  image = _resize(tf, _decode_window(tf, data, y, x, h, w), crop, crop, cfg.antialias)
  image = tf.cond(
    tf.random.stateless_uniform([], seeds[1]) < 0.5,
    lambda: tf.image.flip_left_right(image),
    lambda: image,
  )
  if cfg.lighting_std:
    alpha = tf.random.stateless_normal([3], seeds[2]) * cfg.lighting_std
    image += tf.linalg.matvec(tf.constant(EIGVEC), alpha * tf.constant(EIGVAL)) * 255
  return normalize(image, cfg, mean_image)


def resize_shorter(tf, data, size, antialias):
  """The whole image decoded and resized so that its shorter side is `size`, float32 0..255."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  new = tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32)
  return _resize(tf, image, new[0], new[1], antialias)


def _crops(tf, image, crop, corners):
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  centre = tf.image.crop_to_bounding_box(image, (h - crop) // 2, (w - crop) // 2, crop, crop)
  if not corners:
    return centre
  boxes = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop)]
  views = [tf.image.crop_to_bounding_box(image, y, x, crop, crop) for y, x in boxes] + [centre]
  return tf.stack(views + [tf.image.flip_left_right(v) for v in views])


def centre_crop(tf, data, size, crop):
  """The centre crop x crop of the image resized to shorter side `size`, float32 0..255, decoding only the
  window of the JPEG that the crop's pixels are resampled from.

  The pixels are those of resize_shorter(antialias=True) then the centre crop, to float rounding: the same
  antialiased triangle kernel at the same scale (ScaleAndTranslate, which tf.image.resize calls),
  translated to the window, which reaches a kernel's support (plus a pixel) beyond the crop's source, so
  every weight the whole resize gives the crop's pixels sees the same source pixels; only the weights'
  float arithmetic differs.
  """
  shape = _shape(tf, data)
  hw = tf.cast(shape, tf.float32)
  new = tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32)  # resize_shorter's size
  scale = tf.cast(new, tf.float32) / hw  # tf.image.resize's scale
  first = (new - crop) // 2  # the crop's first row and column in the resized image
  support = (
    tf.maximum(1 / scale, 1.0) + 1
  )  # the triangle kernel's radius in source pixels, and one more
  begin = tf.maximum(tf.cast(tf.floor(tf.cast(first, tf.float32) / scale - support), tf.int32), 0)
  end = tf.minimum(
    tf.cast(tf.math.ceil(tf.cast(first + crop, tf.float32) / scale + support), tf.int32), shape
  )
  window = _decode_window(tf, data, begin[0], begin[1], end[0] - begin[0], end[1] - begin[1])
  image = tf.raw_ops.ScaleAndTranslate(
    images=tf.cast(window, tf.float32)[None],
    size=tf.constant([crop, crop]),
    scale=scale,
    translation=tf.cast(begin, tf.float32) * scale - tf.cast(first, tf.float32),
    kernel_type='triangle',
    antialias=True,
  )
  return image[0]


def one_crop_view(tf, data, cfg, mean_image):
  """Shorter side data.eval_resize, the centre crop: [crop, crop, 3].

  Antialiased, only the crop's window is decoded (centre_crop). Without antialiasing the whole image is
  decoded and resized: ResizeBilinear over it measured faster than the window's decode resampled at the
  crop's positions (crop_and_resize), 390-410 against 335-385 images/s on one core.
  """
  crop = int(cfg.image_size)
  if cfg.antialias:
    view = centre_crop(tf, data, cfg.eval_resize, crop)
  else:
    view = _crops(tf, resize_shorter(tf, data, cfg.eval_resize, False), crop, False)
  return normalize(view, cfg, mean_image)


def one_crop(data: bytes, cfg, mean_image) -> np.ndarray:
  """one_crop_view of one encoded image, eagerly: float32 [crop, crop, 3]; DataError if it does not decode."""
  tf = _tf()
  try:
    return one_crop_view(tf, tf.constant(data), cfg, mean_image).numpy()
  except tf.errors.OpError:
    raise DataError('not an image file TensorFlow decodes (JPEG, PNG, GIF, BMP or WebP).') from None


def ten_crop_view(tf, data, cfg, mean_image):
  """Corners (top-left, top-right, bottom-left, bottom-right), centre, then their flips: [10, crop, crop, 3].

  The corners span the whole shorter side and most of the longer one, so the whole image is decoded.
  """
  crops = _crops(
    tf, resize_shorter(tf, data, cfg.eval_resize, cfg.antialias), int(cfg.image_size), True
  )
  return normalize(crops, cfg, mean_image)


def scale_view(tf, data, height, width, cfg, channel_mean):
  """The whole image resized to height x width (a shape bucket of multi-scale testing), normalized
  with the mean image's per-channel mean."""
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  return normalize(_resize(tf, image, height, width, cfg.antialias), cfg, channel_mean)


def bucket_shape(h: int, w: int, scale: int) -> tuple[int, int]:
  """Shorter side `scale`, longer side `scale` x the nearest of ASPECTS (a few shapes, so a few compiles)."""
  ratio = max(h, w) / min(h, w)
  aspect = min(ASPECTS, key=lambda a: abs(np.log(a / ratio)))
  long = int(round(scale * aspect))
  return (scale, long) if h <= w else (long, scale)


# ------------------------------------------------------------------------------------------ the dataset


def _first_line(error) -> str:
  """TensorFlow's reason without its op suffix: 'Unknown image file format. One of JPEG, ...'."""
  lines = (getattr(error, 'message', None) or str(error)).strip().splitlines() or ['']
  line = re.sub(r'\{\{[^}]*\}\}', '', lines[0])  # {{function_node ...}}: where in the graph
  return re.sub(r'\s*\[Op:\w+\].*$', '', line).strip()


def _bad_image(tf, split, index, seeds, view, error) -> DataError:
  """The DataError naming the first example of a failed batch that `view` cannot make, found by making
  them again one at a time (tf.data's error does not say which file it was reading)."""
  for i, seed in zip(index, seeds):
    if i < 0:
      continue
    row = split.row(i)
    name = split.paths[row] if split.paths is not None else f'record {row} of split {split.name}'
    try:
      data = split.image_bytes(int(i))
    except OSError as e:
      return DataError(
        f'cannot read {name} ({e.strerror or type(e).__name__}); restore or delete the file.'
      )
    try:
      view(tf, tf.constant(data), tf.constant(seed, tf.int64))
    except Exception as e:  # noqa: BLE001  # a decoder's error, or any other of the view's
      reason = _first_line(e) if isinstance(e, tf.errors.OpError) else f'{type(e).__name__}: {e}'
      return DataError(f'cannot decode image {name} ({reason}); replace or delete the file.')
  return DataError(
    f'cannot read a batch of split {split.name} ({_first_line(error)}); check that its images decode.'
  )


def _pipeline(split, items, view, shape, local_batch, threads):
  """`view` of the examples `items` names, `local_batch` at a time: numpy {'image', 'label', 'mask'}.

  `items` is (index, seeds), [n] example indices (-1 pads: a zero image, mask 0) and [n, 2] seed pairs, or
  a function of k giving those of batch k = 0, 1, ... (endless: training). The paths and labels are
  tensors, so tf.data reads and decodes in parallel without Python; Python runs once per batch, to draw an
  endless stream's batch or to fetch tfds records. A file that does not decode ends the stream with a
  DataError naming it.
  """
  tf = _tf()
  if callable(items):
    plan = items

    def step(k):
      index, seeds = plan(int(k))
      return np.asarray(index, np.int64), np.asarray(seeds, np.int64).reshape(-1, 2)

    batches = tf.data.Dataset.range(2**62).map(
      lambda k: tf.numpy_function(step, [k], (tf.int64, tf.int64), stateful=False)
    )
  else:
    index, seeds = np.asarray(items[0], np.int64), np.asarray(items[1], np.int64).reshape(-1, 2)
    batches = tf.data.Dataset.from_tensor_slices((index, seeds)).batch(local_batch)

    def plan(k):
      return index[k * local_batch : (k + 1) * local_batch], seeds[
        k * local_batch : (k + 1) * local_batch
      ]

  if split.paths is not None:
    rows = np.arange(split.size) if split.index is None else split.index
    paths = tf.constant(np.array(split.paths, object)[rows].astype(bytes))
    labels = tf.constant(split.labels[rows].astype(np.int32))

    def example(i, seed):
      return tf.io.read_file(paths[i]), labels[i], seed

    examples = batches.unbatch()
  else:  # tfds: array_record is read from Python, a batch per call

    def fetch(index):
      records = [split.get(i) if i >= 0 else (b'', 0) for i in index]
      return (
        np.array([data for data, _ in records], object),
        np.array([label for _, label in records], np.int32),
      )

    def records(index, seeds):
      data, label = tf.numpy_function(fetch, [index], (tf.string, tf.int32), stateful=False)
      return index, seeds, tf.ensure_shape(data, [None]), tf.ensure_shape(label, [None])

    def example(i, seed, data, label):
      return data, label, seed

    examples = batches.map(records).unbatch()

  def fn(i, seed, *record):
    valid = i >= 0

    def real():
      data, label, seed_ = example(tf.maximum(i, 0), seed, *record)
      return tf.ensure_shape(view(tf, data, seed_), shape), label

    image, label = tf.cond(valid, real, lambda: (tf.zeros(shape, tf.float32), tf.constant(0)))
    return {'image': image, 'label': label, 'mask': tf.cast(valid, tf.float32)}

  ds = examples.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.autotune.ram_budget = 0
  ds = ds.batch(local_batch).with_options(options).prefetch(tf.data.AUTOTUNE)
  batch_iter = ds.as_numpy_iterator()
  for k in itertools.count():
    try:
      batch = next(batch_iter)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      error = _bad_image(tf, split, *plan(k), view, e)
      break
    yield batch
  # Raised outside the except clause, after the iterator is gone: the error must not keep tf.data's
  # threads (and its Python callbacks) alive in a traceback while the interpreter exits.
  del batch_iter, ds, examples, batches
  raise error


class ImageNet:
  """One ImageNet-layout dataset, streamed; the same batch interface as the in-memory datasets."""

  eval_modes = ('1crop', '10crop', 'multiscale')

  def __init__(self, cfg, seed):
    self.cfg, self.seed = cfg, seed
    self.train, self.eval, self.num_classes = _splits(cfg)
    if self.train is not None and 0 < cfg.train_limit < self.train.size:
      self.train = _subset(
        self.train, common.seeded_subset(self.train.size, cfg.train_limit, seed, 54321)
      )
    if 0 < cfg.eval_limit < self.eval.size:
      self.eval = _subset(
        self.eval, common.seeded_subset(self.eval.size, cfg.eval_limit, seed, 54322)
      )
    self.eval_split = cfg.eval_split
    self.mean_image = self._mean_image()
    self._eval_labels = None

  @property
  def num_train(self) -> int:
    return 0 if self.train is None else self.train.size

  @property
  def eval_labels(self) -> np.ndarray:
    if self._eval_labels is None:
      self._eval_labels = np.array([self.eval.label(i) for i in range(self.eval.size)], np.int32)
    return self._eval_labels

  def _mean_image(self) -> np.ndarray:
    """The config's fixed mean image, else the per-pixel mean of the 1-crop views of data.mean_images
    training images (a fixed random subset), cached."""
    fixed = fixed_mean_image(self.cfg)
    if fixed is not None:
      return fixed
    n = min(int(self.cfg.mean_images), self.train.size)
    first = self.train.paths[:4] if self.train.paths is not None else ''
    ident = (
      f'{self.cfg.source}|{self.cfg.image_folder}|{self.cfg.data_dir}|{self.train.name}|{self.train.size}|'
      f'{n}|{self.cfg.image_size}|{self.cfg.eval_resize}|{first}'
      + ('|antialias' if self.cfg.antialias else '|bilinear')
    )
    path = os.path.join(
      common.cache_dir(self.cfg),
      f'imagenet-mean-{hashlib.sha256(ident.encode()).hexdigest()[:20]}.npy',
    )
    if os.path.exists(path):
      return np.load(path)
    index = np.sort(np.random.default_rng(12345).permutation(self.train.size)[:n])
    crop = int(self.cfg.image_size)
    batches = _pipeline(
      self.train,
      (index, np.zeros((n, 2), np.int64)),
      # The whole image resized, as when the cached means of existing runs were made: centre_crop's
      # rounding would change a recomputed mean, and every training batch with it.
      lambda tf, d, s: (
        _crops(tf, resize_shorter(tf, d, self.cfg.eval_resize, self.cfg.antialias), crop, False)
        / 255
      ),
      (crop, crop, 3),
      64,
      0,
    )
    total = sum(b['image'].astype(np.float64).sum(0) for b in batches)
    mean = (total * 255 / n).astype(np.float32)
    common.write_atomically(path, lambda tmp: np.save(tmp, mean))
    return mean

  def train_batches(self, start_step, batch_size, seed, process_index=0, process_count=1):
    """This process's share of the augmented global batch of each step from start_step on."""
    if self.train is None:
      raise DataError(
        f'the training split {self.cfg.train_split!r} is absent: training and exact BN statistics '
        'need training images (data.train_split).'
      )
    share = common.process_share(batch_size, process_index, process_count, 'train.batch_size')

    def items(k):
      step = start_step + k
      index = common.step_indices(self.train.size, step, batch_size, seed, share)
      seeds = np.random.default_rng([int(seed), step, 2]).integers(0, 2**62, (batch_size, 2))
      return index, seeds[share]

    crop = int(self.cfg.image_size)
    view = lambda tf, d, s: train_view(tf, d, s, self.cfg, self.mean_image)  # noqa: E731
    for b in _pipeline(
      self.train, items, view, (crop, crop, 3), share.stop - share.start, self.cfg.threads
    ):
      yield {'image': b['image'], 'label': b['label']}

  def view_batches(self, view, shape, batch_size, process_index=0, process_count=1, indices=None):
    """`view` of the eval images (`indices`, default all) in order; the last global batch is padded, and
    'mask' is 1 for real images."""
    indices = np.arange(self.eval.size) if indices is None else np.asarray(indices)
    share = common.process_share(batch_size, process_index, process_count, 'train.eval_batch_size')
    mine = [
      np.where(i >= 0, indices[np.maximum(i, 0)], -1)
      for i in common.eval_indices(len(indices), batch_size, share)
    ]
    index = np.concatenate(mine) if mine else np.zeros(0, np.int64)
    return _pipeline(
      self.eval,
      (index, np.zeros((len(index), 2), np.int64)),
      lambda tf, d, s: view(tf, d),
      shape,
      share.stop - share.start,
      self.cfg.threads,
    )

  def eval_batches(self, batch_size, process_index=0, process_count=1, mode='1crop'):
    crop = int(self.cfg.image_size)
    if mode == '10crop':
      return self.view_batches(
        lambda tf, d: ten_crop_view(tf, d, self.cfg, self.mean_image),
        (10, crop, crop, 3),
        batch_size,
        process_index,
        process_count,
      )
    return self.view_batches(
      lambda tf, d: one_crop_view(tf, d, self.cfg, self.mean_image),
      (crop, crop, 3),
      batch_size,
      process_index,
      process_count,
    )

  def eval_image_sizes(self) -> np.ndarray:
    """[M, 2] heights and widths of the eval images, from their headers."""
    from PIL import Image

    sizes = []
    for i in range(self.eval.size):
      with Image.open(io.BytesIO(self.eval.image_bytes(i))) as image:
        sizes.append(image.size[::-1])
    return np.array(sizes, np.int64).reshape(-1, 2)
