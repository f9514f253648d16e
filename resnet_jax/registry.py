"""The released ResNets this codebase converts, by name, and the cache their downloads go to.

  python -m resnet_jax.tools.convert --pretrained=cifar10_resnet20 --workdir=runs/cifar10_resnet20

MODELS maps a name to where the file is published, its sha256, the conversion format, the depth and
the input the network expects (PREPROCESSING). `fetch` downloads into the cache (RESNET_JAX_WEIGHTS_DIR,
default ~/.cache/resnet_jax/weights): into a temporary file that is renamed into place only once its
hash is verified, so the cache never holds a half-written or unverified file. A file already there is
verified again before it is used. Standard library only: neither torch nor JAX is imported here.
"""

import dataclasses
import hashlib
import os
import sys
import urllib.error
import urllib.request

CACHE_ENV = 'RESNET_JAX_WEIGHTS_DIR'
DEFAULT_CACHE_DIR = '~/.cache/resnet_jax/weights'
TIMEOUT_S = 4  # per connect and read: a dead network is reported within seconds, not minutes
CHUNK = 1 << 16

# What input each source's networks expect, from uint8 RGB pixels: x * scale (after subtracting the
# mean image when `mean_image`), then (x - mean) / std per channel.
PREPROCESSING = {
  # torchvision.transforms: ToTensor (RGB in [0, 1]), then Normalize(mean, std).
  'torchvision': {
    'channel_order': 'rgb',
    'scale': 1 / 255,
    'mean': (0.485, 0.456, 0.406),
    'std': (0.229, 0.224, 0.225),
    'mean_image': False,
    'antialias': True,  # PIL's resize
  },
  # Caffe: pixels in 0..255 minus the per-pixel mean image (mean_image_from_binaryproto); BGR in
  # the files, RGB here because from_caffe reverses conv1's input channels.
  'caffe': {
    'channel_order': 'rgb',
    'scale': 1.0,
    'mean': (0.0, 0.0, 0.0),
    'std': (1.0, 1.0, 1.0),
    'mean_image': True,
    'antialias': False,  # not documented; the Caffe-era pipelines did not antialias
  },
  # pytorch_resnet_cifar10's trainer: ToTensor, then Normalize with ImageNet's statistics.
  'pytorch_resnet_cifar10': {
    'channel_order': 'rgb',
    'scale': 1 / 255,
    'mean': (0.485, 0.456, 0.406),
    'std': (0.229, 0.224, 0.225),
    'mean_image': False,
    'antialias': None,  # CIFAR's images are not resized
  },
}


class DownloadError(ValueError):
  """An unknown name, a dead link, or a download that failed or did not verify; the message names
  the URL and how to pass a local file instead."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One released network. `sha256` is the full digest, or its first 8 hex digits where only the
  prefix that the publisher puts in the file name is known; `url` is None where no link works."""

  format: str  # pretrained.FORMATS
  depth: int
  url: str | None
  sha256: str | None
  note: str = ''

  @property
  def filename(self):
    return self.url.rsplit('/', 1)[-1] if self.url else None

  @property
  def preprocessing(self):
    return PREPROCESSING[self.format]


_CIFAR_URL = 'https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/'
_TORCHVISION_URL = 'https://download.pytorch.org/models/'
_CAFFE_NOTE = (
  "The paper's models (github.com/KaimingHe/deep-residual-networks) were shared by OneDrive links "
  'that no longer work: convert a local copy with --format=caffe --weights=ResNet-{depth}-model.'
  'caffemodel --mean=ResNet_mean.binaryproto --depth={depth}.'
)

MODELS = {
  # pytorch_resnet_cifar10 (BSD-2-Clause); the full digests were computed from the files, the others
  # are the 8 hex digits in the published file names.
  'cifar10_resnet20': Entry(
    'pytorch_resnet_cifar10',
    20,
    _CIFAR_URL + 'resnet20-12fca82f.th',
    '12fca82f0bebc4135bf1f32f6e3710e61d5108578464b84fd6d7f5c1b04036c8',
  ),
  'cifar10_resnet32': Entry(
    'pytorch_resnet_cifar10', 32, _CIFAR_URL + 'resnet32-d509ac18.th', 'd509ac18'
  ),
  'cifar10_resnet44': Entry(
    'pytorch_resnet_cifar10', 44, _CIFAR_URL + 'resnet44-014dd654.th', '014dd654'
  ),
  'cifar10_resnet56': Entry(
    'pytorch_resnet_cifar10',
    56,
    _CIFAR_URL + 'resnet56-4bfd9763.th',
    '4bfd97631478d6b638d2764fd2baff3edb1d7d82252d54439343b6596b9b5367',
  ),
  'cifar10_resnet110': Entry(
    'pytorch_resnet_cifar10', 110, _CIFAR_URL + 'resnet110-1d1ed7c2.th', '1d1ed7c2'
  ),
  'cifar10_resnet1202': Entry(
    'pytorch_resnet_cifar10', 1202, _CIFAR_URL + 'resnet1202-f3b1deed.th', 'f3b1deed'
  ),
  # torchvision's IMAGENET1K_V1 weights; torchvision publishes the sha256 prefix in the file name.
  'torchvision_resnet18': Entry(
    'torchvision', 18, _TORCHVISION_URL + 'resnet18-f37072fd.pth', 'f37072fd'
  ),
  'torchvision_resnet34': Entry(
    'torchvision', 34, _TORCHVISION_URL + 'resnet34-b627a593.pth', 'b627a593'
  ),
  'torchvision_resnet50': Entry(
    'torchvision', 50, _TORCHVISION_URL + 'resnet50-0676ba61.pth', '0676ba61'
  ),
  'torchvision_resnet101': Entry(
    'torchvision', 101, _TORCHVISION_URL + 'resnet101-63fe2227.pth', '63fe2227'
  ),
  'torchvision_resnet152': Entry(
    'torchvision', 152, _TORCHVISION_URL + 'resnet152-394f9c45.pth', '394f9c45'
  ),
  # The paper's Caffe models: local files only.
  **{
    f'caffe_resnet{depth}': Entry('caffe', depth, None, None, _CAFFE_NOTE.format(depth=depth))
    for depth in (50, 101, 152)
  },
}


def cache_dir():
  return os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def sha256_of(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def verified(path, entry):
  """Whether the file's sha256 is the entry's (or starts with its published prefix)."""
  return os.path.isfile(path) and sha256_of(path).startswith(entry.sha256)


def lookup(name):
  """The entry of `name`; raises DownloadError naming the known names."""
  if name not in MODELS:
    raise DownloadError(f'No released network is called {name!r}: pass one of {", ".join(MODELS)}.')
  return MODELS[name]


def _local_fix(entry):
  depth = f' --depth={entry.depth}' if entry.format != 'pytorch_resnet_cifar10' else ''
  return f'download it yourself and pass --format={entry.format} --weights=FILE{depth}'


def _progress(name, done, total):
  if total:
    width = 30
    filled = width * done // total
    bar = '#' * filled + '.' * (width - filled)
    text = f'\r{name} [{bar}] {done / 1e6:.1f}/{total / 1e6:.1f} MB'
  else:
    text = f'\r{name} {done / 1e6:.1f} MB'
  print(text, end='', file=sys.stderr, flush=True)


def _download(entry, tmp, progress):
  """Writes the URL's bytes to `tmp`; raises DownloadError on a network error or a short body."""
  fix = _local_fix(entry)
  try:
    with urllib.request.urlopen(entry.url, timeout=TIMEOUT_S) as response, open(tmp, 'wb') as f:
      total = int(response.headers.get('Content-Length') or 0)
      done = 0
      while chunk := response.read(CHUNK):
        f.write(chunk)
        done += len(chunk)
        if progress:
          _progress(entry.filename, done, total)
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, 'reason', None) or e
    raise DownloadError(f'Cannot download {entry.url} ({reason}): {fix}.') from None
  finally:
    if progress:
      print(file=sys.stderr, flush=True)
  if total and done != total:
    raise DownloadError(
      f'The download of {entry.url} ended after {done} of {total} bytes: rerun, or {fix}.'
    )


def fetch(name, progress=True):
  """The path of `name`'s verified file in the cache, downloaded first when it is not there yet."""
  entry = lookup(name)
  if entry.url is None:
    raise DownloadError(entry.note)
  path = os.path.join(cache_dir(), entry.filename)
  if verified(path, entry):
    return path
  os.makedirs(cache_dir(), exist_ok=True)
  tmp = f'{path}.part{os.getpid()}'
  try:
    _download(entry, tmp, progress)
    got = sha256_of(tmp)
    if not got.startswith(entry.sha256):
      raise DownloadError(
        f'The file downloaded from {entry.url} has sha256 {got[:16]} where the registry has '
        f'{entry.sha256[:16]}: rerun, or {_local_fix(entry)} with a copy you trust.'
      )
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path
