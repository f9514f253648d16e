"""Converted weights against the frameworks they come from: torchvision's ResNets, and Caffe's
layer semantics in PyTorch over a .caffemodel made here with the released models' layer names."""

import jax
import numpy as np
import pytest

from resnet_jax import caffe_proto, defaults, models, pretrained

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
F = torch.nn.functional


def our_model(overrides):
  config = defaults.get_imagenet_config()
  config.model.update(overrides)
  return models.create(config.model)


def assert_close(ours, reference):
  ours, reference = np.asarray(ours), np.asarray(reference)
  assert ours.shape == reference.shape and ours.dtype == np.float32
  assert np.abs(ours - reference).max() < 1e-4 * np.abs(reference).max()


def assert_one_sentence(error):
  text = str(error.value)
  assert text.endswith('.') and '. ' not in text and '\n' not in text, text


def assert_variables_fit(model, variables, size):
  """The converted tree is exactly the one the network initialises: names, shapes and dtypes."""
  x = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
  want = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  assert set(want) == {'params', 'batch_stats'}
  assert jax.tree.structure(got) == jax.tree.structure(dict(want))
  assert jax.tree.leaves(got) == jax.tree.leaves(dict(want))


def random_torchvision(depth, seed=0):
  """A torchvision ResNet in eval mode with random weights and random BN statistics."""
  torch.manual_seed(seed)
  net = getattr(torchvision.models, f'resnet{depth}')(weights=None)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.5)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.2)
    net.fc.bias.normal_(0, 0.1)
  return net.eval()


@pytest.mark.parametrize(
  'depth',
  [
    18,
    34,
    50,
    pytest.param(101, marks=pytest.mark.slow),
    pytest.param(152, marks=pytest.mark.slow),
  ],
)
def test_torchvision_logits_and_first_block_match(depth):
  net = random_torchvision(depth)
  x = np.random.default_rng(depth).normal(size=(2, 64, 64, 3)).astype(np.float32)
  outputs = {}
  net.layer1[0].register_forward_hook(lambda module, args, out: outputs.update(block=out))
  with torch.no_grad():
    logits = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  overrides, variables = pretrained.from_torchvision(net.state_dict(), depth)
  assert overrides == {
    'family': 'imagenet',
    'depth': depth,
    'residual': True,
    'shortcut': 'B',
    'stride_on_3x3': True,
    'num_classes': 1000,
    'stem_pool': 'symmetric',
  }
  model = our_model(overrides)
  assert_variables_fit(model, variables, 64)
  ours, state = model.apply(variables, x, train=False, capture_intermediates=True)
  assert_close(ours, logits)
  block = state['intermediates']['stage1_block1']['__call__'][0]
  assert_close(block, outputs['block'].numpy().transpose(0, 2, 3, 1))


# The released models' block names (ResNet-50/101/152-deploy.prototxt), res2 .. res5.
CAFFE_BLOCKS = {
  50: (['a', 'b', 'c'], ['a', 'b', 'c', 'd'], ['a', 'b', 'c', 'd', 'e', 'f'], ['a', 'b', 'c']),
  101: (
    ['a', 'b', 'c'],
    ['a', 'b1', 'b2', 'b3'],
    ['a'] + [f'b{k}' for k in range(1, 23)],
    ['a', 'b', 'c'],
  ),
}


def caffe_layers(depth, seed=0):
  """[(name, type, blobs)] of a released-style Caffe ResNet with random weights and BN statistics.

  A BatchNorm layer stores running sums and their weight; one layer gets weight 0, which Caffe reads
  as zero mean and variance."""
  rng = np.random.default_rng(seed)
  layers = []

  def conv(name, out_ch, in_ch, k):
    std = np.sqrt(2.0 / (in_ch * k * k))
    layers.append((name, 'Convolution', [rng.normal(0, std, (out_ch, in_ch, k, k))]))

  def bn(suffix, channels):
    factor = 0.0 if suffix == '2b_branch2b' else rng.uniform(0.5, 5.0)
    mean = rng.normal(0, 0.5, channels) * factor
    var = rng.uniform(0.5, 2.0, channels) * factor
    layers.append((f'bn{suffix}', 'BatchNorm', [mean, var, np.array([factor])]))
    gamma_beta = [rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.2, channels)]
    layers.append((f'scale{suffix}', 'Scale', gamma_beta))

  conv('conv1', 64, 3, 7)
  bn('_conv1', 64)
  in_ch = 64
  for stage, names in enumerate(CAFFE_BLOCKS[depth], 2):
    width = 64 * 2 ** (stage - 2)
    for block in names:
      b = f'{stage}{block}'
      if block == 'a':
        conv(f'res{b}_branch1', 4 * width, in_ch, 1)
        bn(f'{b}_branch1', 4 * width)
      conv(f'res{b}_branch2a', width, in_ch, 1)
      bn(f'{b}_branch2a', width)
      conv(f'res{b}_branch2b', width, width, 3)
      bn(f'{b}_branch2b', width)
      conv(f'res{b}_branch2c', 4 * width, width, 1)
      bn(f'{b}_branch2c', 4 * width)
      in_ch = 4 * width
  layers.append(
    ('fc1000', 'InnerProduct', [rng.normal(0, 0.02, (1000, 2048)), rng.normal(0, 0.1, 1000)])
  )
  return layers


def caffe_forward(layers, depth, image_bgr):
  """Caffe's ResNet forward in PyTorch (NCHW, BGR input minus the mean): BatchNorm from its three
  blobs, then Scale; pool1 3x3/2 with ceil rounding; bottlenecks stride their first 1x1."""
  blobs = {
    name: [torch.from_numpy(np.asarray(b, np.float32)) for b in arrays]
    for name, _, arrays in layers
  }

  def conv_bn(x, name, stride=1, pad=0, relu=True):
    x = F.conv2d(
      x, blobs[f'res{name}' if name != '_conv1' else 'conv1'][0], stride=stride, padding=pad
    )
    mean, var, factor = blobs[f'bn{name}']
    s = 0.0 if factor[0] == 0 else 1.0 / factor[0]
    x = (x - (mean * s)[:, None, None]) / torch.sqrt(var * s + 1e-5)[:, None, None]
    gamma, beta = blobs[f'scale{name}']
    x = x * gamma[:, None, None] + beta[:, None, None]
    return F.relu(x) if relu else x

  x = conv_bn(image_bgr, '_conv1', stride=2, pad=3)
  x = F.max_pool2d(x, 3, 2, ceil_mode=True)
  for stage, names in enumerate(CAFFE_BLOCKS[depth], 2):
    for block in names:
      b = f'{stage}{block}'
      stride = 2 if block == 'a' and stage > 2 else 1
      shortcut = conv_bn(x, f'{b}_branch1', stride, relu=False) if block == 'a' else x
      y = conv_bn(x, f'{b}_branch2a', stride)
      y = conv_bn(y, f'{b}_branch2b', pad=1)
      y = conv_bn(y, f'{b}_branch2c', relu=False)
      x = F.relu(shortcut + y)
  weight, bias = blobs['fc1000']
  return x.mean(dim=(2, 3)) @ weight.T + bias


def write_mean(path, rng):
  mean_bgr = rng.uniform(0, 255, (1, 3, 224, 224)).astype(np.float32)
  path.write_bytes(caffe_proto.array_to_blob(mean_bgr).SerializeToString())
  return mean_bgr


@pytest.mark.parametrize('depth', [50, pytest.param(101, marks=pytest.mark.slow)])
def test_caffe_logits_match_caffe_semantics(depth, tmp_path):
  layers = caffe_layers(depth)
  model_file = tmp_path / f'ResNet-{depth}-model.caffemodel'
  model_file.write_bytes(caffe_proto.write_net(layers, name=f'ResNet-{depth}'))
  rng = np.random.default_rng(1)
  mean_bgr = write_mean(tmp_path / 'ResNet_mean.binaryproto', rng)
  image_rgb = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)

  image_bgr = image_rgb[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32) - mean_bgr
  with torch.no_grad():
    logits = caffe_forward(layers, depth, torch.from_numpy(image_bgr)).numpy()

  overrides, variables = pretrained.from_caffe(str(model_file), depth)
  assert overrides == {
    'family': 'imagenet',
    'depth': depth,
    'residual': True,
    'shortcut': 'B',
    'stride_on_3x3': False,
    'num_classes': 1000,
    'stem_pool': 'caffe',
  }
  assert not variables['batch_stats']['stage1_block2']['bn2']['var'].any()  # scale factor 0
  mean_rgb = pretrained.mean_image_from_binaryproto(tmp_path / 'ResNet_mean.binaryproto')
  np.testing.assert_array_equal(mean_rgb, mean_bgr[0].transpose(1, 2, 0)[..., ::-1])
  x = pretrained.preprocess(image_rgb, pretrained.PREPROCESSING['caffe'], mean_rgb)
  model = our_model(overrides)
  assert_variables_fit(model, variables, 224)
  assert_close(model.apply(variables, x, train=False), logits)


def test_caffe_stem_pool_is_caffes_pool1():
  for size in range(3, 20):
    x = np.random.default_rng(size).normal(size=(1, size, size + 1, 2)).astype(np.float32)
    padding = models.stem_pool_padding(x.shape, 'caffe')
    ours = jax.numpy.asarray(x)
    ours = np.asarray(
      jax.lax.reduce_window(
        ours, -np.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), *padding, (0, 0))
      )
    )
    reference = F.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), 3, 2, ceil_mode=True)
    np.testing.assert_array_equal(ours, reference.numpy().transpose(0, 2, 3, 1))


def test_stem_pool_is_validated():
  with pytest.raises(ValueError, match="Unknown model.stem_pool 'same'"):
    our_model({'stem_pool': 'same'})


def test_torchvision_preprocessing_is_transforms_normalize():
  images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  spec = pretrained.PREPROCESSING['torchvision']
  transform = torchvision.transforms.Normalize(spec['mean'], spec['std'])
  reference = transform(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
  np.testing.assert_allclose(
    pretrained.preprocess(images, spec), reference.permute(0, 2, 3, 1).numpy(), atol=1e-5
  )


def test_load_state_dict_reads_a_pth(tmp_path):
  net = torchvision.models.resnet18(weights=None)
  torch.save(net.state_dict(), tmp_path / 'resnet18.pth')
  state_dict = pretrained.load_state_dict(tmp_path / 'resnet18.pth')
  assert all(isinstance(v, np.ndarray) for v in state_dict.values())
  np.testing.assert_array_equal(state_dict['fc.weight'], net.fc.weight.detach().numpy())


@pytest.mark.parametrize(
  'weights,depth,message',
  [
    (50, 101, 'no layer layer3.6.conv1.weight that ResNet-101 needs: pass --depth=50.'),
    (18, 34, 'no layer layer1.2.conv1.weight that ResNet-34 needs: pass --depth=18.'),
    (
      50,
      34,
      r'layer1.0.conv1.weight has shape \(64, 64, 1, 1\) where ResNet-34 needs '
      r'\(64, 64, 3, 3\): pass --depth=50.',
    ),
    (34, 18, 'a layer layer1.2.conv1.weight that ResNet-18 does not have: pass --depth=34.'),
    (18, 42, 'torchvision ResNets have depth 18, 34, 50, 101, 152, got 42'),
  ],
)
def test_torchvision_depth_mismatch_names_layer_and_fix(weights, depth, message):
  state_dict = getattr(torchvision.models, f'resnet{weights}')(weights=None).state_dict()
  with pytest.raises(pretrained.ConversionError, match=message) as error:
    pretrained.from_torchvision(state_dict, depth)
  assert_one_sentence(error)


def test_not_a_state_dict(tmp_path):
  state_dict = torchvision.models.resnet18(weights=None).state_dict()
  with pytest.raises(pretrained.ConversionError, match=r"pass checkpoint\['state_dict'\]") as error:
    pretrained.from_torchvision({'state_dict': state_dict, 'epoch': 90}, 18)
  assert_one_sentence(error)
  parallel = {f'module.{k}': v for k, v in state_dict.items()}  # DataParallel's names convert too
  assert pretrained.from_torchvision(parallel, 18)[0]['depth'] == 18
  with pytest.raises(pretrained.ConversionError, match='A list is not a state_dict') as error:
    pretrained.from_torchvision([1, 2], 18)
  assert_one_sentence(error)
  (tmp_path / 'random.pth').write_bytes(np.random.default_rng(0).bytes(4096))
  (tmp_path / 'notes.txt').write_text('conv1.weight: 64x3x7x7\n')
  for name in ('random.pth', 'notes.txt'):
    with pytest.raises(pretrained.ConversionError, match='is not a PyTorch file') as error:
      pretrained.load_state_dict(tmp_path / name)
    assert_one_sentence(error)


def test_not_a_caffemodel(tmp_path):
  rng = np.random.default_rng(0)
  prototxt = 'name: "ResNet-50"\ninput: "data"\nlayer {\n  name: "conv1"\n  type: "ReLU"\n}\n'
  cases = {
    'random.caffemodel': rng.bytes(100_000),
    'ResNet-50-deploy.prototxt': prototxt.encode(),
    'empty.caffemodel': b'',
  }
  write_mean(tmp_path / 'mean.binaryproto', rng)
  cases['mean.binaryproto'] = (tmp_path / 'mean.binaryproto').read_bytes()
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
    with pytest.raises(pretrained.ConversionError, match='not a .caffemodel') as error:
      pretrained.from_caffe(tmp_path / name, 50)
    assert_one_sentence(error)
  for data in (rng.bytes(1000), prototxt.encode()):
    with pytest.raises(pretrained.ConversionError, match='binaryproto') as error:
      pretrained.mean_image_from_binaryproto(data)
    assert_one_sentence(error)


def test_caffe_depth_mismatch_names_layer_and_fix():
  data = caffe_proto.write_net(caffe_layers(50))
  message = 'no layer res3b1_branch2a that ResNet-101 needs: pass --depth=50.'
  with pytest.raises(pretrained.ConversionError, match=message) as error:
    pretrained.from_caffe(data, 101)
  assert_one_sentence(error)
  with pytest.raises(
    pretrained.ConversionError, match='Released Caffe ResNets have depth 50, 101, 152, got 34'
  ) as error:
    pretrained.from_caffe(data, 34)
  assert_one_sentence(error)
  layers = [(n, t, b[:1] if n == 'fc1000' else b) for n, t, b in caffe_layers(50)]
  with pytest.raises(pretrained.ConversionError, match='layer fc1000 has 1 blobs') as error:
    pretrained.from_caffe(caffe_proto.write_net(layers), 50)
  assert_one_sentence(error)


def test_caffe_v1_layers_read():
  """Files from before 2015 keep their layers in NetParameter.layers (V1LayerParameter)."""
  net = caffe_proto.NetParameter(name='old')
  layer = net.layers.add(name='conv1', type=4)  # V1's CONVOLUTION
  legacy = layer.blobs.add(num=2, channels=3, height=1, width=1)
  legacy.data.extend([1, 2, 3, 4, 5, 6])
  blobs = caffe_proto.layer_blobs(caffe_proto.read_net(net.SerializeToString()))
  want = np.arange(1, 7, dtype=np.float32).reshape(2, 3, 1, 1)
  np.testing.assert_array_equal(blobs['conv1'][0], want)


def test_preprocess_needs_the_mean_image():
  images = np.zeros((1, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r'mean image of shape \(8, 8, 3\), got None'):
    pretrained.preprocess(images, pretrained.PREPROCESSING['caffe'])
