"""Shared test set-up: 8 fake CPU devices, a persistent compilation cache, the real data fixtures."""

import os
import pathlib
import sys
import tarfile

# torchvision imports triton, which the CPU never uses and which crashes the process (a segmentation fault
# while loading its LLVM) when TensorFlow was loaded first, as it is in this session: keep it out.
sys.modules.setdefault('triton', None)

# Before jax is imported anywhere: eight CPU devices so data-parallel code runs as on a pod slice. XLA:CPU
# ends the process when a device's thread reaches a collective 40 s after the others (by default); allow a
# loaded 2-core machine minutes, in the test processes and the CLIs they start. (The notebook kernel's stall
# of 2026-12-04 was a hang on an idle machine, not load: test_notebook runs it on one device.)
os.environ.setdefault(
  'XLA_FLAGS',
  '--xla_force_host_platform_device_count=8 --xla_cpu_collective_call_warn_stuck_timeout_seconds=120 '
  '--xla_cpu_collective_call_terminate_timeout_seconds=300',
)
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_CACHE = pathlib.Path(
  os.environ.get('RESNET_JAX_TEST_CACHE', pathlib.Path.home() / '.cache' / 'resnet_jax_tests')
)
# A persistent compilation cache, set in the environment so that the CLI processes the tests start share it:
# each would otherwise compile the same ResNet-8 steps again.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(_CACHE / 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
  os.environ.get('RESNET_JAX_SHARED_DATA', REPO.parent / 'shared' / 'data')
)


def _extract(tmp_path_factory, name, top):
  tar = SHARED_DATA / name
  if not tar.exists():
    pytest.skip(f'{tar} is absent: put it there, or set RESNET_JAX_SHARED_DATA to its folder')
  out = tmp_path_factory.getbasetemp() / f'{top}-extracted'
  if not (out / top).exists():
    with tarfile.open(tar) as f:
      f.extractall(out, filter='data')
  return out / top


@pytest.fixture(scope='session')
def cifar_folder(tmp_path_factory):
  """The real CIFAR-10 JPEG copy, extracted once per session: <dir>/{train,test}/<class>/*.jpg."""
  return _extract(tmp_path_factory, 'cifar10-jpg.tar.gz', 'cifar10-jpg')


@pytest.fixture(scope='session')
def imagenet_sample_folder(tmp_path_factory):
  """The 100-image ImageNet sample: <dir>/val/<wnid>/*.JPEG."""
  return _extract(tmp_path_factory, 'imagenet-sample-100.tar.gz', 'imagenet-sample')


@pytest.fixture(scope='session')
def cifar_cache_dir(tmp_path_factory):
  """One decoded-array cache for every test that loads the real CIFAR copy: decoded once per session."""
  return tmp_path_factory.getbasetemp() / 'cifar-cache'
