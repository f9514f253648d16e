"""Converted workdirs: what resnet_jax.tools.convert writes is an ordinary run (training's checkpoint layout, a
config every tool reads), preprocessed as the weights' framework did, and the CLIs around it."""

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from test_pretrained import (
  assert_close,
  caffe_forward,
  caffe_layers,
  random_torchvision,
  write_mean,
)

from resnet_jax import (
  caffe_proto,
  checkpointing,
  complexity,
  defaults,
  evaluation,
  models,
  optim,
  parallel,
  pretrained,
  train,
)
from resnet_jax.data import imagenet
from resnet_jax.workdir import Workdir

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
pytest.importorskip('tensorflow')

TENCH = 'n01440764/n01440764_tench.JPEG'  # 500x375: torchvision's and our resize and crop agree


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """A random-weight torchvision ResNet-18 .pth and a random Caffe ResNet-50 with its mean image."""
  folder = tmp_path_factory.mktemp('weights')
  net = random_torchvision(18)
  torch.save(net.state_dict(), folder / 'resnet18.pth')
  layers = caffe_layers(50)
  (folder / 'ResNet-50-model.caffemodel').write_bytes(caffe_proto.write_net(layers, 'ResNet-50'))
  mean_bgr = write_mean(folder / 'ResNet_mean.binaryproto', np.random.default_rng(1))
  return {'folder': folder, 'torch': net, 'caffe_layers': layers, 'mean_bgr': mean_bgr}


@pytest.fixture(scope='module')
def torchvision_workdir(weights, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('converted') / 'torchvision_resnet18'
  config, written = pretrained.write_workdir(
    workdir, 'torchvision', weights['folder'] / 'resnet18.pth', 18
  )
  assert written and config.name == 'torchvision_resnet18'
  return workdir


def test_a_conversion_written_before_a_new_field_is_found_again(
  weights, torchvision_workdir, tmp_path
):
  """A workdir converted before data.antialias existed: the same conversion finds it there (its saved
  config reads the field as it was) and writes nothing; another preprocessing is refused."""
  workdir = tmp_path / 'old'
  shutil.copytree(torchvision_workdir, workdir)
  config_json = workdir / 'config.json'
  saved = json.loads(config_json.read_text())
  del saved['data']['antialias']
  config_json.write_text(json.dumps(saved))
  before = _snapshot(workdir)
  _, written = pretrained.write_workdir(
    workdir, 'torchvision', weights['folder'] / 'resnet18.pth', 18
  )
  assert not written and _snapshot(workdir) == before
  saved['data']['antialias'] = False  # not what torchvision's conversion sets
  config_json.write_text(json.dumps(saved))
  with pytest.raises(pretrained.ConversionError, match='already holds another run'):
    pretrained.write_workdir(workdir, 'torchvision', weights['folder'] / 'resnet18.pth', 18)


def _leaves(state):
  return sorted((np.shape(x), str(np.asarray(x).dtype)) for x in jax.tree.leaves(state))


def test_torchvision_workdir_is_a_run_with_the_weights(weights, torchvision_workdir):
  run = checkpointing.open_workdir(torchvision_workdir)
  config = run.config
  assert run.step == 0 and config.name == 'torchvision_resnet18'
  assert (config.model.depth, config.model.stride_on_3x3, config.model.stem_pool) == (
    18,
    True,
    'symmetric',
  )
  assert config.data.input_scale == 1 / 255 and config.data.mean_image_file == ''
  assert config.data.channel_mean == (0.485, 0.456, 0.406)
  assert config.data.channel_std == (0.229, 0.224, 0.225)
  # Exactly the state training writes: the same fields, shapes and dtypes as create_train_state's.
  model = models.create(config.model)
  initial = train.create_train_state(
    config, model, optim.create(config.optimizer), jax.random.key(0)
  )
  assert set(run.state) == set(train.TrainState.__dataclass_fields__)
  assert _leaves(run.state) == _leaves(initial)
  # Training's own restore takes it (a converted model can be fine-tuned).
  mesh = parallel.make_mesh(jax.devices()[:1])
  mngr, restored = checkpointing.restore_or_init(torchvision_workdir, 1, initial, mesh)
  mngr.close()
  assert int(restored.step) == 0
  np.testing.assert_array_equal(
    restored.params['fc']['kernel'], weights['torch'].fc.weight.detach().numpy().T
  )
  # pretrained.load's logits are torchvision's.
  model, variables = pretrained.load(torchvision_workdir)
  x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    logits = weights['torch'](torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  assert_close(model.apply(variables, x, train=False), logits)
  # summary reads its config: the converted parameters are the network's.
  _, params, _ = complexity.count(config)
  assert params == sum(np.size(v) for v in jax.tree.leaves(variables['params']))


@pytest.mark.slow
def test_caffe_workdir_logits_are_caffes(weights, tmp_path):
  folder = weights['folder']
  workdir = tmp_path / 'caffe_resnet50'
  config, _ = pretrained.write_workdir(
    workdir,
    'caffe',
    folder / 'ResNet-50-model.caffemodel',
    50,
    mean=folder / 'ResNet_mean.binaryproto',
  )
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['name'] == 'caffe_resnet50' and saved['data']['mean_image_file'] == 'mean_image.npy'
  assert saved['data']['input_scale'] == 1.0 and saved['data']['channel_mean'] == []
  run = checkpointing.open_workdir(workdir)
  mean_rgb = imagenet.fixed_mean_image(run.config.data)
  np.testing.assert_array_equal(mean_rgb, weights['mean_bgr'][0].transpose(1, 2, 0)[..., ::-1])
  image_rgb = np.random.default_rng(2).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
  image_bgr = image_rgb[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) - weights['mean_bgr']
  with torch.no_grad():
    logits = caffe_forward(weights['caffe_layers'], 50, torch.from_numpy(image_bgr)).numpy()
  model, variables = pretrained.load(workdir)
  x = imagenet.normalize(image_rgb.astype(np.float32), run.config.data, mean_rgb)
  assert_close(model.apply(variables, x, train=False), logits)


def test_torchvision_one_crop_is_transforms_output(torchvision_workdir, imagenet_sample_folder):
  """Our 1-crop input against Compose([Resize(256), CenterCrop(224), ToTensor(), Normalize]). The
  resampling differs (tf.image.resize's antialiased bilinear vs PIL's, and the JPEG decoders): over the
  100 sample images whose resized size and crop offset agree (71), the mean absolute difference is at most
  0.031 (normalised units, about 1.8 levels of 255), and ours is darker on average by 0.0066-0.0194
  (0.0135 over all 100, under one level of 255); the bounds leave a little room."""
  from PIL import Image
  from torchvision import transforms

  config = Workdir(torchvision_workdir).config().data
  path = imagenet_sample_folder / 'val' / TENCH
  transform = transforms.Compose(
    [
      transforms.Resize(256),
      transforms.CenterCrop(224),
      transforms.ToTensor(),
      transforms.Normalize(config.channel_mean, config.channel_std),
    ]
  )
  with Image.open(path) as image:
    reference = transform(image.convert('RGB')).permute(1, 2, 0).numpy()
  ours = imagenet.one_crop(path.read_bytes(), config, imagenet.fixed_mean_image(config))
  assert ours.shape == reference.shape == (224, 224, 3)
  difference = np.abs(ours - reference)
  assert difference.mean() < 0.04, difference.mean()
  assert abs(float(ours.mean() - reference.mean())) < 0.025  # no error in scale or mean
  assert (
    config.antialias
  )  # torchvision resizes with PIL's antialiasing; without it we are further off
  config.antialias = False
  plain = imagenet.one_crop(path.read_bytes(), config, imagenet.fixed_mean_image(config))
  assert np.abs(plain - reference).mean() > 1.5 * difference.mean()


def _converted_on_sample(weights, folder, tmp_path, source, **data):
  """A converted workdir whose config reads the sample's val/ folder (no training split)."""
  base = defaults.get_imagenet_config()
  base.data.update(source='image_folder', image_folder=str(folder), eval_split='val', **data)
  base.train.eval_batch_size = 32
  workdir = tmp_path / source
  if source == 'torchvision':
    pretrained.write_workdir(workdir, source, weights['folder'] / 'resnet18.pth', 18, config=base)
  else:
    files = weights['folder']
    pretrained.write_workdir(
      workdir,
      source,
      files / 'ResNet-50-model.caffemodel',
      50,
      mean=files / 'ResNet_mean.binaryproto',
      config=base,
    )
  return workdir


@pytest.mark.slow
def test_evaluate_converted_models_on_the_sample(weights, imagenet_sample_folder, tmp_path):
  """1-crop and 10-crop of the 100 images with only a val/ folder: no mean image is computed."""
  workdir = _converted_on_sample(
    weights, imagenet_sample_folder, tmp_path, 'torchvision', image_size=112, eval_resize=128
  )
  mesh = parallel.make_mesh(jax.devices()[:1])
  for mode in ('1crop', '10crop'):
    result = evaluation.evaluate_workdir(workdir, mode, mesh=mesh)
    assert result['count'] == 100 and result['step'] == 0 and result['mode'] == mode
    assert 0 <= result['top5_error'] <= result['top1_error'] <= 1
    assert json.loads((workdir / f'eval_{mode}.json').read_text())['count'] == 100
  workdir = _converted_on_sample(weights, imagenet_sample_folder, tmp_path, 'caffe', eval_limit=16)
  result = evaluation.evaluate_workdir(workdir, '1crop', mesh=mesh)
  assert result['count'] == 16


def test_class_names_are_torchvisions():
  """tfds' ImageNet names against torchvision's list (an independent copy): the same classes in the same
  order; torchvision renamed the two cranes and dropped a comma."""
  names = imagenet.ilsvrc_names()
  categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta['categories']
  differ = [(a, b) for a, b in zip(names, categories) if a.split(',')[0] != b]
  assert len(names) == 1000 and names[0] == 'tench, Tinca tinca'
  assert [b for _, b in differ] == ['crane bird', 'crane', 'maillot tank suit']


# ------------------------------------------------------------------------------------------ CLIs


def _cli(module, *args, timeout=600):
  return subprocess.run(
    [sys.executable, '-m', f'resnet_jax.tools.{module}', *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _one_error_line(result):
  lines = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  text = lines[0]
  assert text.endswith('.') and '. ' not in text, text
  return text


def _snapshot(folder):
  """{relative path: sha256} of every file under `folder` ({} when absent)."""
  folder = pathlib.Path(folder)
  if not folder.exists():
    return {}
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob('*'))
    if p.is_file()
  }


@pytest.mark.slow
def test_convert_cli_writes_workdirs(weights, tmp_path):
  folder = weights['folder']
  result = _cli(
    'convert',
    '--format=torchvision',
    f'--weights={folder / "resnet18.pth"}',
    '--depth=18',
    f'--workdir={tmp_path / "tv"}',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout == ''
  result = _cli(
    'convert',
    '--format=caffe',
    f'--weights={folder / "ResNet-50-model.caffemodel"}',
    f'--mean={folder / "ResNet_mean.binaryproto"}',
    '--depth=50',
    f'--workdir={tmp_path / "caffe"}',
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / 'caffe' / 'mean_image.npy').exists()
  assert checkpointing.open_workdir(tmp_path / 'caffe').config.name == 'caffe_resnet50'
  described = _cli('summary', f'--workdir={tmp_path / "caffe"}', '--json')
  assert described.returncode == 0, described.stderr[-2000:]
  _, params, _ = complexity.count(Workdir(tmp_path / 'caffe').config())
  assert json.loads(described.stdout)['params'] == params > 25_000_000
  # The same conversion again finds it there and writes nothing.
  before = _snapshot(tmp_path / 'tv')
  again = _cli(
    'convert',
    '--format=torchvision',
    f'--weights={folder / "resnet18.pth"}',
    '--depth=18',
    f'--workdir={tmp_path / "tv"}',
  )
  assert again.returncode == 0 and 'already holds' in again.stderr
  assert _snapshot(tmp_path / 'tv') == before


@pytest.mark.slow
def test_convert_cli_refuses_wrong_inputs(weights, torchvision_workdir, tmp_path):
  folder = weights['folder']
  (tmp_path / 'notes.caffemodel').write_text('name: "ResNet-50"\n')
  other = tmp_path / 'resnet34.pth'
  torch.save(torchvision.models.resnet34(weights=None).state_dict(), other)
  cases = [
    (  # not a caffemodel
      ['--format=caffe', f'--weights={tmp_path / "notes.caffemodel"}', '--depth=50'],
      tmp_path / 'new1',
      'is not a .caffemodel but a text file',
    ),
    (  # a caffemodel given as torchvision weights
      ['--format=torchvision', f'--weights={folder / "ResNet-50-model.caffemodel"}', '--depth=50'],
      tmp_path / 'new2',
      'is not a PyTorch file',
    ),
    (  # the depth does not match the weights
      ['--format=torchvision', f'--weights={folder / "resnet18.pth"}', '--depth=34'],
      tmp_path / 'new3',
      'needs: pass --depth=18.',
    ),
    (  # a workdir holding another network (a ResNet-18): its config.json differs
      ['--format=torchvision', f'--weights={other}', '--depth=34'],
      torchvision_workdir,
      'already holds another run (torchvision_resnet18)',
    ),
  ]
  for args, workdir, message in cases:
    if '--format=caffe' in args:
      args.append(f'--mean={folder / "ResNet_mean.binaryproto"}')
    before = _snapshot(workdir)
    result = _cli('convert', *args, f'--workdir={workdir}')
    assert message in _one_error_line(result)
    assert _snapshot(workdir) == before  # unchanged, or still absent
  # Other weights of the same network over a workdir's checkpoint: refused, untouched.
  torch.save(random_torchvision(18, seed=1).state_dict(), tmp_path / 'other18.pth')
  before = _snapshot(torchvision_workdir)
  result = _cli(
    'convert',
    '--format=torchvision',
    f'--weights={tmp_path / "other18.pth"}',
    '--depth=18',
    f'--workdir={torchvision_workdir}',
  )
  assert 'already holds a checkpoint of another network or other weights' in _one_error_line(result)
  assert _snapshot(torchvision_workdir) == before


@pytest.mark.slow
def test_predict_cli(torchvision_workdir, imagenet_sample_folder, tmp_path):
  images = sorted((imagenet_sample_folder / 'val').glob('*/*.JPEG'))[:3]
  undecodable = tmp_path / 'notes.JPEG'
  undecodable.write_text('not an image\n')
  missing = tmp_path / 'missing.JPEG'
  args = [f'--workdir={torchvision_workdir}', '--top=3', *images, missing, undecodable]
  before = _snapshot(torchvision_workdir)
  result = _cli('predict', *args)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert errors == [
    f'error: {missing} cannot be read (No such file or directory).',
    f'error: {undecodable} is not an image file TensorFlow decodes (JPEG, PNG, GIF, BMP or WebP).',
  ]
  lines = result.stdout.splitlines()
  assert [line for line in lines if not line.startswith('  ')] == [str(p) for p in images]
  wnids = imagenet.ilsvrc_wnids()
  for line in lines:
    if line.startswith('  '):
      probability, wnid, name = line.split(maxsplit=2)
      assert 0 < float(probability) <= 1 and wnid in wnids and name
  as_json = _cli('predict', '--json', *args)
  assert as_json.returncode == 2
  results = json.loads(as_json.stdout)
  assert [r['image'] for r in results] == [str(p) for p in images]
  names = imagenet.ilsvrc_names()
  for r in results:
    assert len(r['top']) == 3
    probabilities = [c['probability'] for c in r['top']]
    assert probabilities == sorted(probabilities, reverse=True)
    for c in r['top']:
      assert c['wnid'] == wnids[c['label']] and c['name'] == names[c['label']]
  # Exactly the 1-crop view through pretrained.load: the printed probabilities are the model's.
  model, variables = pretrained.load(torchvision_workdir)
  config = Workdir(torchvision_workdir).config().data
  x = imagenet.one_crop(images[0].read_bytes(), config, imagenet.fixed_mean_image(config))
  p = np.asarray(jax.nn.softmax(model.apply(variables, x[None], train=False)))[0]
  top = results[0]['top'][0]
  assert top['label'] == int(np.argmax(p))
  np.testing.assert_allclose(top['probability'], p.max(), rtol=1e-4)
  assert _snapshot(torchvision_workdir) == before  # predict only reads


def test_default_preprocessing_is_the_papers_bit_for_bit():
  """The new fields' defaults keep (x - mean image) / 255 exactly; torchvision's are ToTensor+Normalize."""
  rng = np.random.default_rng(0)
  pixels = rng.uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
  mean = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
  config = defaults.get_imagenet_config().data
  assert not defaults.fixed_preprocessing(config) and imagenet.fixed_mean_image(config) is None
  np.testing.assert_array_equal(imagenet.normalize(pixels, config, mean), (pixels - mean) / 255)
  spec = pretrained.PREPROCESSING['torchvision']
  config.update(channel_mean=spec['mean'], channel_std=spec['std'])
  assert defaults.fixed_preprocessing(config)
  zeros = imagenet.fixed_mean_image(config)
  assert zeros.shape == (224, 224, 3) and not zeros.any()
  reference = torchvision.transforms.Normalize(spec['mean'], spec['std'])(
    torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255
  )
  np.testing.assert_allclose(
    imagenet.normalize(pixels, config, 0.0), reference.permute(0, 2, 3, 1).numpy(), atol=1e-6
  )


def test_preprocessing_fields_are_validated():
  from resnet_jax import validate

  config = defaults.get_imagenet_config()
  config.data.channel_std = (0.2, 0.0, 0.2)
  with pytest.raises(validate.ConfigError, match='data.channel_std must be positive'):
    validate.check(config)
  config = defaults.get_config()  # CIFAR takes a converted model's input too
  config.data.update(channel_mean=(0.5, 0.5, 0.5), channel_std=(0.2, 0.2, 0.2), input_scale=1.0)
  validate.check(config)


def test_rewriting_finds_the_conversion_and_completes_an_interrupted_one(
  weights, torchvision_workdir, tmp_path
):
  import shutil

  workdir = tmp_path / 'copy'
  shutil.copytree(torchvision_workdir, workdir)
  pth = weights['folder'] / 'resnet18.pth'
  before = _snapshot(workdir)
  assert pretrained.write_workdir(workdir, 'torchvision', pth, 18)[1] is False
  assert _snapshot(workdir) == before
  (workdir / 'config.json').unlink()  # interrupted before its last write
  assert pretrained.write_workdir(workdir, 'torchvision', pth, 18)[1] is True
  assert _snapshot(workdir) == before
