"""The pretrained registry and its download cache, against a loopback HTTP server this test starts
(no other network): verified files only, a one-sentence error naming the URL and --weights otherwise."""

import hashlib
import http.server
import os
import re
import socket
import subprocess
import sys
import threading

import pytest
from conftest import REPO, SHARED_DATA

from resnet_jax import registry

WEIGHTS = SHARED_DATA.parent / 'weights' / 'pytorch_resnet_cifar10'
GOOD = bytes(range(256)) * 400  # 100 kB: several chunks, a moving progress bar


def _one_sentence(text):
  return text.endswith('.') and '. ' not in text and '\n' not in text


@pytest.fixture(scope='module')
def server():
  """http://127.0.0.1:PORT/ serving GOOD at /good.th and /other.th, and /short.th whose body stops
  halfway through its Content-Length."""

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      if self.path not in ('/good.th', '/other.th', '/short.th'):
        self.send_error(404)
        return
      self.send_response(200)
      self.send_header('Content-Length', str(len(GOOD)))
      self.end_headers()
      self.wfile.write(GOOD[: len(GOOD) // 2] if self.path == '/short.th' else GOOD)

    def log_message(self, *args):
      pass

  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()
  httpd.server_close()
  thread.join()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  folder = tmp_path / 'cache'
  monkeypatch.setenv(registry.CACHE_ENV, str(folder))
  return folder


def _closed_port():
  """A loopback port nothing listens on: connections are refused, as with no network."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _entry(monkeypatch, url, sha256):
  monkeypatch.setitem(
    registry.MODELS, 'test_net', registry.Entry('pytorch_resnet_cifar10', 20, url, sha256)
  )


def test_download_is_verified_cached_and_shows_progress(server, cache, monkeypatch, capsys):
  digest = hashlib.sha256(GOOD).hexdigest()
  _entry(monkeypatch, f'{server}/good.th', digest)
  path = registry.fetch('test_net')
  assert path == str(cache / 'good.th')
  assert hashlib.sha256(open(path, 'rb').read()).hexdigest() == digest
  assert sorted(p.name for p in cache.iterdir()) == ['good.th']  # no temporary file left
  err = capsys.readouterr().err
  assert '[' + '#' * 30 + ']' in err and '0.1/0.1 MB' in err
  # Cached and verified: no network needed the second time.
  _entry(monkeypatch, f'http://127.0.0.1:{_closed_port()}/good.th', digest)
  assert registry.fetch('test_net') == path


def test_a_published_prefix_is_verified(server, cache, monkeypatch):
  _entry(monkeypatch, f'{server}/good.th', hashlib.sha256(GOOD).hexdigest()[:8])
  assert open(registry.fetch('test_net', progress=False), 'rb').read() == GOOD


def test_a_damaged_cached_file_is_downloaded_again(server, cache, monkeypatch):
  _entry(monkeypatch, f'{server}/good.th', hashlib.sha256(GOOD).hexdigest())
  cache.mkdir()
  (cache / 'good.th').write_bytes(GOOD[:100])  # e.g. written by hand, never verified
  assert open(registry.fetch('test_net', progress=False), 'rb').read() == GOOD


@pytest.mark.parametrize(
  'case,words',
  [
    ('checksum', 'has sha256'),
    ('truncated', f'ended after {len(GOOD) // 2} of {len(GOOD)} bytes'),
    ('refused', 'Cannot download'),
  ],
)
def test_failures_name_the_url_and_the_local_file_fix(case, words, server, cache, monkeypatch):
  digest = hashlib.sha256(GOOD).hexdigest()
  url = {
    'checksum': f'{server}/other.th',
    'truncated': f'{server}/short.th',
    'refused': f'http://127.0.0.1:{_closed_port()}/good.th',
  }[case]
  _entry(monkeypatch, url, '0' * 64 if case == 'checksum' else digest)
  with pytest.raises(registry.DownloadError) as error:
    registry.fetch('test_net', progress=False)
  text = str(error.value)
  assert words in text and url in text and '--weights=FILE' in text and _one_sentence(text), text
  assert not cache.exists() or not any(cache.iterdir())  # nothing a later run would trust


def test_unknown_names_and_dead_links_say_what_to_do(cache):
  with pytest.raises(registry.DownloadError, match='pass one of cifar10_resnet20') as error:
    registry.fetch('resnet20')
  assert _one_sentence(str(error.value))
  with pytest.raises(registry.DownloadError, match='no longer work.*--format=caffe') as error:
    registry.fetch('caffe_resnet50')
  assert _one_sentence(str(error.value))
  assert not cache.exists()


def test_entries():
  cifar = {f'cifar10_resnet{d}': d for d in (20, 32, 44, 56, 110, 1202)}
  torchvision = {f'torchvision_resnet{d}': d for d in (18, 34, 50, 101, 152)}
  caffe = {f'caffe_resnet{d}': d for d in (50, 101, 152)}
  assert registry.MODELS.keys() == cifar.keys() | torchvision.keys() | caffe.keys()
  for names, fmt, host in (
    (
      cifar,
      'pytorch_resnet_cifar10',
      'https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/',
    ),
    (torchvision, 'torchvision', 'https://download.pytorch.org/models/'),
  ):
    for name, depth in names.items():
      entry = registry.MODELS[name]
      assert (entry.format, entry.depth) == (fmt, depth) and entry.url.startswith(host)
      # The publishers put the sha256's first 8 hex digits in the file name.
      prefix = re.fullmatch(r'resnet\d+-([0-9a-f]{8})\.p?th', entry.filename)[1]
      assert entry.sha256.startswith(prefix) and len(entry.sha256) in (8, 64)
      assert entry.preprocessing['std'] == (0.229, 0.224, 0.225)
  for name, depth in caffe.items():
    entry = registry.MODELS[name]
    assert (
      entry.url is None and entry.preprocessing['mean_image'] and f'--depth={depth}' in entry.note
    )


@pytest.mark.parametrize('name', ['cifar10_resnet20', 'cifar10_resnet56'])
def test_full_hashes_are_the_files(name):
  entry = registry.MODELS[name]
  path = WEIGHTS / entry.filename
  if not path.exists():
    pytest.skip(f"{path} is absent: put pytorch_resnet_cifar10's file there")
  assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256


@pytest.mark.slow
def test_convert_cli_takes_a_cached_pretrained_file_and_says_which_extra(tmp_path):
  """--pretrained with the verified file in the cache (no network), and the torch extra's sentence."""
  import shutil

  source = WEIGHTS / 'resnet20-12fca82f.th'
  if not source.exists():
    pytest.skip(f"{source} is absent: put pytorch_resnet_cifar10's file there")
  cache = tmp_path / 'cache'
  cache.mkdir()
  shutil.copy(source, cache / source.name)
  env = {**os.environ, registry.CACHE_ENV: str(cache), 'JAX_PLATFORMS': 'cpu'}
  command = [sys.executable, '-m', 'resnet_jax.tools.convert', '--pretrained=cifar10_resnet20']
  result = subprocess.run(
    [*command, f'--workdir={tmp_path / "w"}'], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'wrote pytorch_resnet_cifar10_resnet20 (step 0)' in result.stderr
  assert (tmp_path / 'w' / 'config.json').exists()
  # Without torch: one line naming the extra, and no workdir.
  argv = ['convert', command[-1], f'--workdir={tmp_path / "x"}']
  code = (
    'import runpy, sys; sys.modules["torch"] = None\n'
    f'sys.argv = {argv!r}\n'
    'runpy.run_module("resnet_jax.tools.convert", run_name="__main__")\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert result.returncode == 2
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('error: ') and "install the torch extra (pip install -e '.[torch]'" in line
  assert not (tmp_path / 'x').exists()
