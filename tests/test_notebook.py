"""experiments/colab.ipynb runs top to bottom in quick mode: the notebook stays in step with the library."""

import os

import jax
import nbclient
import nbformat
import pytest
from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow  # the whole notebook

NOTEBOOK = REPO / 'experiments' / 'colab.ipynb'


def test_colab_notebook_runs_in_quick_mode(request, tmp_path, monkeypatch):
  """The kernel inherits this environment with one CPU device: quick mode, the session's CIFAR cache."""
  if (
    SHARED_DATA / 'cifar10-jpg.tar.gz'
  ).exists():  # the decoded cache is shared with the other real-data tests
    monkeypatch.setenv('RESNET_JAX_NOTEBOOK_DATA', str(request.getfixturevalue('cifar_folder')))
    monkeypatch.setenv(
      'RESNET_JAX_NOTEBOOK_CACHE_DIR', str(request.getfixturevalue('cifar_cache_dir'))
    )
  else:  # not skipped: the notebook must also run where only synthetic data exists
    monkeypatch.setenv('RESNET_JAX_NOTEBOOK_DATA', 'synthetic')
  monkeypatch.setenv('RESNET_JAX_NOTEBOOK_QUICK', '1')
  # One CPU device, as a Colab runtime has one accelerator: with 8 fake devices the kernel twice ended or
  # hung in an XLA:CPU all-reduce that 5 of 8 device threads reached, on an idle machine (2026-12-04).
  monkeypatch.setenv(
    'XLA_FLAGS',
    os.environ['XLA_FLAGS'].replace(
      '--xla_force_host_platform_device_count=8', '--xla_force_host_platform_device_count=1'
    ),
  )
  monkeypatch.delenv('RESNET_JAX_NOTEBOOK_WORKDIR', raising=False)  # its own temporary folder...
  monkeypatch.setenv('TMPDIR', str(tmp_path / 'tmp'))
  (tmp_path / 'tmp').mkdir()
  # conftest's persistent compilation cache: the resumed run reuses the first run's steps, and a second
  # run of this test all of them.
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv(
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
    str(jax.config.jax_persistent_cache_min_compile_time_secs),
  )
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert all(
    not c.get('outputs') and not c.get('execution_count')
    for c in notebook.cells
    if c.cell_type == 'code'
  ), 'commit the notebook with its outputs cleared'
  client = nbclient.NotebookClient(
    notebook,
    timeout=300,
    kernel_name='python3',
    resources={'metadata': {'path': str(NOTEBOOK.parent)}},
  )
  client.execute()  # raises CellExecutionError naming the cell and its traceback
  printed = ''.join(
    o.get('text', '') for c in notebook.cells if c.cell_type == 'code' for o in c.outputs
  )
  assert 'resumed at step 30, stopped at step 40' in printed
  assert 'data: ' in printed.splitlines()[1]  # the first code cell says which data it uses
  assert (
    'oneDNN' not in printed and 'cpu_feature_guard' not in printed
  )  # no TensorFlow start-up lines
  left = [
    p.name for p in (tmp_path / 'tmp').iterdir() if p.name != 'torchinductor_root'
  ]  # torch's cache
  assert left == []  # ...which the last cell removes, with the conversion's scratch folder
