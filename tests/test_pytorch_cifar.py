"""pytorch_resnet_cifar10's CIFAR ResNets converted: against a small PyTorch definition written here
(option A padding planes//4 zero channels on both sides, as that project does), on random weights and,
in the slow tier, on its released ResNet-20 and ResNet-56 and the real CIFAR-10 JPEGs."""

import io
import sys

import numpy as np
import pytest
from conftest import SHARED_DATA
from test_pretrained import assert_one_sentence

from resnet_jax import checkpointing, evaluation, models, parallel, pretrained

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
nn = torch.nn
F = torch.nn.functional

WEIGHTS = SHARED_DATA.parent / 'weights' / 'pytorch_resnet_cifar10'
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Block(nn.Module):
  def __init__(self, cin, cout, stride, option):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.pad = None
    if stride != 1 or cin != cout:
      if option == 'A':
        self.pad = cout // 4  # planes // 4 zero channels before and after
      else:
        self.shortcut = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
        )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.pad is not None:
      x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
    elif hasattr(self, 'shortcut'):
      x = self.shortcut(x)
    return F.relu(out + x)


class CifarResNet(nn.Module):
  """conv1, bn1, layer1..3 of n blocks (16, 32, 64 channels), global pool, linear."""

  def __init__(self, depth, num_classes=10, option='A'):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16)
    cin = 16
    for i, width in enumerate((16, 32, 64)):
      blocks = []
      for j in range(n):
        blocks.append(Block(cin, width, 2 if i > 0 and j == 0 else 1, option))
        cin = width
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.linear = nn.Linear(64, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.linear(x.mean((2, 3)))


def random_net(depth, seed=0, option='A'):
  torch.manual_seed(seed)
  net = CifarResNet(depth, option=option)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.5)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
  return net.eval()


def as_released(net):
  """What pytorch_resnet_cifar10 saves: a DataParallel state_dict in a checkpoint dict."""
  return {'state_dict': {f'module.{k}': v for k, v in net.state_dict().items()}, 'best_prec1': 90.0}


def torch_logits(net, images_uint8):
  """ToTensor and Normalize, written out: RGB in [0, 1], then per channel (x - mean) / std."""
  x = torch.from_numpy(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255
  x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
  with torch.no_grad():
    return net(x).numpy()


def our_logits(config, variables, images_uint8):
  x = np.asarray(images_uint8, np.float32) / 255
  x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  return np.asarray(models.create(config.model).apply(variables, x, train=False))


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize('depth', [20, 32])
def test_random_weights_give_the_pytorch_logits(depth, images, tmp_path, monkeypatch):
  """Random BN statistics and weights in every channel: without the channel orders (padding at one
  end, as ours) the logits are far off."""
  net = random_net(depth)
  torch.save(as_released(net), tmp_path / 'net.th')
  config, variables, mean_image = pretrained.convert(
    'pytorch_resnet_cifar10', tmp_path / 'net.th', None
  )
  assert mean_image is None and config.name == f'pytorch_resnet_cifar10_resnet{depth}'
  assert (config.model.family, config.model.depth, config.model.shortcut) == ('cifar', depth, 'A')
  assert config.data.name == 'cifar10' and config.data.input_scale == 1 / 255
  assert config.data.channel_mean == MEAN and config.data.channel_std == STD
  assert config.data.mean_image_file == ''
  ours, theirs = our_logits(config, variables, images), torch_logits(net, images)
  assert np.abs(ours - theirs).max() < 1e-4
  identity = [np.arange(width) for width in pretrained.CIFAR_WIDTHS]
  monkeypatch.setattr(pretrained, 'cifar_stream_orders', lambda: identity)
  config, unordered, _ = pretrained.convert('pytorch_resnet_cifar10', tmp_path / 'net.th', None)
  assert np.abs(our_logits(config, unordered, images) - theirs).max() > 1e-2


def test_bare_state_dict_without_module_prefix(images, tmp_path):
  net = random_net(20, seed=1)
  torch.save(net.state_dict(), tmp_path / 'bare.pth')
  config, variables, _ = pretrained.convert('pytorch_resnet_cifar10', tmp_path / 'bare.pth', 20)
  assert np.abs(our_logits(config, variables, images) - torch_logits(net, images)).max() < 1e-4


def test_stream_orders_are_permutations():
  orders = pretrained.cifar_stream_orders()
  for order, width in zip(orders, (16, 32, 64)):
    assert sorted(order.tolist()) == list(range(width))
  # Stage 2 keeps stage 1's 16 channels between their 8 + 8 zero channels.
  assert orders[1][:16].tolist() == list(range(8, 24))


def _snapshot(folder):
  return sorted(
    (str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob('*') if p.is_file()
  )


def _wrong_files(folder):
  """{case: (path, words the message must have)} of files people mistake for these."""
  torchvision_net = torchvision.models.resnet18(weights=None)
  torch.save(torchvision_net.state_dict(), folder / 'resnet18.pth')
  torch.save(as_released(random_net(20, option='B')), folder / 'optionB.th')
  full = io.BytesIO()
  torch.save(as_released(random_net(20)), full)
  (folder / 'truncated.th').write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
  (folder / 'notes.th').write_text('not weights at all\n')
  return {
    'imagenet': (folder / 'resnet18.pth', '--format=torchvision'),
    'option_b': (folder / 'optionB.th', 'option A'),
    'truncated': (folder / 'truncated.th', 'truncated'),
    'not_torch': (folder / 'notes.th', 'not a PyTorch file'),
  }


def test_wrong_files_end_in_one_sentence_and_leave_the_workdir(tmp_path):
  workdir = tmp_path / 'workdir'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('kept')
  before = _snapshot(workdir)
  for case, (path, words) in _wrong_files(tmp_path).items():
    with pytest.raises(pretrained.ConversionError, match=words) as error:
      pretrained.write_workdir(workdir, 'pytorch_resnet_cifar10', path, None)
    assert_one_sentence(error)
    assert _snapshot(workdir) == before, case
    with pytest.raises(pretrained.ConversionError):
      pretrained.write_workdir(tmp_path / 'new', 'pytorch_resnet_cifar10', path, None)
    assert not (tmp_path / 'new').exists(), case


def test_depth_is_read_and_a_given_one_checked(tmp_path):
  torch.save(as_released(random_net(20)), tmp_path / 'net.th')
  with pytest.raises(pretrained.ConversionError, match='pass --depth=20 or leave it out') as error:
    pretrained.convert('pytorch_resnet_cifar10', tmp_path / 'net.th', 56)
  assert_one_sentence(error)


def test_without_torch_the_message_names_the_extra(tmp_path, monkeypatch):
  torch.save(as_released(random_net(20)), tmp_path / 'net.th')
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch now raises ImportError
  with pytest.raises(
    pretrained.ConversionError, match=r"torch extra \(pip install -e '.\[torch\]'"
  ):
    pretrained.write_workdir(tmp_path / 'w', 'pytorch_resnet_cifar10', tmp_path / 'net.th', None)
  assert not (tmp_path / 'w').exists()


# ------------------------------------------------------------------------- the released files, slow


def _released(name):
  path = WEIGHTS / name
  if not path.exists():
    pytest.skip(f"{path} is absent: put pytorch_resnet_cifar10's file there")
  return path


@pytest.mark.slow
@pytest.mark.parametrize(
  'depth,name,count', [(20, 'resnet20-12fca82f.th', 10_000), (56, 'resnet56-4bfd9763.th', 2_000)]
)
def test_released_weights_on_the_real_test_set(
  depth, name, count, cifar_folder, cifar_cache_dir, tmp_path
):
  """Logits within 1e-4 of PyTorch's on real images, and `evaluate`'s test error on `count` JPEGs (all
  10,000 for ResNet-20; a seeded subset for ResNet-56, whose full test set is in
  experiments/results/pretrained_cifar.md) within 2 images of PyTorch's on the same decoded pixels."""
  path = _released(name)
  config = pretrained.cifar_config(depth)
  config.data.update(
    source='image_folder',
    image_folder=str(cifar_folder),
    cache_dir=str(cifar_cache_dir),
    eval_limit=0 if count == 10_000 else count,
  )
  workdir = tmp_path / name
  pretrained.write_workdir(workdir, 'pytorch_resnet_cifar10', path, None, config=config)
  run = checkpointing.open_workdir(workdir)
  from resnet_jax import data as data_lib

  ds = data_lib.load(run.config.data, run.config.seed)
  assert len(ds.eval_labels) == count

  net = CifarResNet(depth)
  checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  net.load_state_dict({k.removeprefix('module.'): v for k, v in checkpoint['state_dict'].items()})
  net.eval()
  theirs = np.concatenate(
    [torch_logits(net, ds.eval_images[i : i + 500]) for i in range(0, count, 500)]
  )
  ours = our_logits(run.config, run.variables, ds.eval_images[:1000])
  max_diff = float(np.abs(ours - theirs[:1000]).max())
  assert max_diff < 1e-4

  result = evaluation.evaluate_workdir(workdir, '1crop', mesh=parallel.make_mesh())
  their_errors = int((theirs.argmax(1) != ds.eval_labels).sum())
  our_errors = round(result['top1_error'] * count)
  print(
    f'\nResNet-{depth}: max |logit diff| {max_diff:.2e} on 1,000 images; test error on {count:,} ours '
    f'{100 * our_errors / count:.2f}% ({our_errors}), PyTorch {100 * their_errors / count:.2f}% '
    f'({their_errors})'
  )
  assert result['count'] == count and abs(our_errors - their_errors) <= 2
  assert their_errors < count / 5  # a trained network: the copy's labels and the weights agree


def _converted_workdir(tmp_path, net):
  torch.save(as_released(net), tmp_path / 'net.th')
  workdir = tmp_path / 'converted'
  pretrained.write_workdir(workdir, 'pytorch_resnet_cifar10', tmp_path / 'net.th', None)
  return workdir


def test_predict_names_cifar_classes_with_pytorchs_probabilities(images, tmp_path):
  from PIL import Image

  from resnet_jax import prediction

  net = random_net(20, seed=2)
  workdir = _converted_workdir(tmp_path, net)
  paths = []
  for i, image in enumerate(images[:3]):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(tmp_path / 'big.png')
  results, failed = prediction.classify(
    checkpointing.open_workdir(workdir), [*paths, str(tmp_path / 'big.png')], 3
  )
  assert failed == [
    (str(tmp_path / 'big.png'), 'is 30x40 pixels where the model takes 32x32: resize it.')
  ]
  probabilities = torch.softmax(torch.from_numpy(torch_logits(net, images[:3])), -1).numpy()
  names = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
  for result, p in zip(results, probabilities):
    best = [c['label'] for c in result['top']]
    assert best == list(np.argsort(-p)[:3])
    assert [c['name'] for c in result['top']] == [names[k] for k in best]
    np.testing.assert_allclose([c['probability'] for c in result['top']], p[best], atol=1e-5)


@pytest.mark.slow
def test_convert_and_predict_clis(images, tmp_path):
  import subprocess

  from conftest import REPO
  from PIL import Image

  torch.save(as_released(random_net(20, seed=3)), tmp_path / 'resnet20.th')
  workdir = tmp_path / 'w'
  run = lambda module, *args: subprocess.run(  # noqa: E731
    [sys.executable, '-m', f'resnet_jax.tools.{module}', *map(str, args)],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  args = ['--format=pytorch_resnet_cifar10', f'--weights={tmp_path / "resnet20.th"}']
  result = run('convert', *args, f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'wrote pytorch_resnet_cifar10_resnet20 (step 0)' in result.stderr
  wrong = run('convert', *args, '--depth=56', f'--workdir={tmp_path / "x"}')
  assert wrong.returncode == 2 and wrong.stderr.strip().splitlines()[-1] == (
    'error: The weights are a ResNet-20 where --depth=56 was given: pass --depth=20 or leave it out.'
  )
  assert not (tmp_path / 'x').exists()
  Image.fromarray(images[0]).save(tmp_path / 'image.png')
  result = run('predict', f'--workdir={workdir}', '--top=2', tmp_path / 'image.png')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0] == str(tmp_path / 'image.png') and len(lines) == 3
  names = {'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'}
  assert all(line.split()[-1] in names for line in lines[1:])


@pytest.mark.slow
def test_finetuning_from_a_converted_model_feeds_it_its_input(tmp_path):
  """init_from a converted network with the source's input fields, a negligible lr and frozen BN: the
  run's evaluation scores are PyTorch's on the same images, so its input is normalised as PyTorch's."""
  from helpers import small_run

  from resnet_jax import data as data_lib
  from resnet_jax import train

  net = random_net(8, seed=4)
  with torch.no_grad():
    net.linear.weight.mul_(20)  # scores that vary from image to image
  workdir = _converted_workdir(tmp_path, net)
  config = small_run(
    model__freeze_bn=True,
    optimizer__learning_rate=1e-12,
    train__num_steps=2,
    train__eval_every_steps=2,
  )
  config.init_from = str(workdir)
  config.data.update(channel_mean=MEAN, channel_std=STD)
  results = train.train_and_evaluate(config, str(tmp_path / 'finetuned'))
  assert results['steps'] == 2
  run = checkpointing.open_workdir(tmp_path / 'finetuned')
  ds = data_lib.load(run.config.data, run.config.seed)
  scores, labels = evaluation.evaluate_scores(
    '1crop', models.create(run.config.model), run.variables, ds, run.config, parallel.make_mesh()
  )
  theirs = torch.softmax(torch.from_numpy(torch_logits(net, ds.eval_images)), -1).numpy()
  np.testing.assert_allclose(scores, theirs, rtol=0, atol=1e-5)
  assert np.abs(theirs - theirs.mean(0)).max() > 1e-2  # they do depend on the image
