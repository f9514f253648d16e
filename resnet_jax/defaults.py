"""Every config field and its default (the paper's CIFAR-10 recipe for ResNet-20), and how configs are read.

The experiment files in the repository's configs/ call `get_config()` or `get_imagenet_config()` and override
fields; they are loaded by path, never installed. Command-line overrides such as
`--config.train.num_steps=200` work on every field listed here.
"""

import importlib.util
import os

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.name = 'default'
  config.seed = 0
  # A workdir (trained or converted) whose newest checkpoint's params and BN statistics start this run
  # (a new classifier when model.num_classes differs; optimizer and step from 0). Only read while this
  # run's workdir has no checkpoint: a resumed run continues from its own. '' = a random init.
  config.init_from = ''

  config.model = ml_collections.ConfigDict()
  config.model.family = 'cifar'  # 'cifar' | 'imagenet'
  config.model.depth = 20
  config.model.residual = True  # False: the paper's plain counterpart
  # 'A' zero-pad identity | 'B' projection when shape changes | 'C' always
  config.model.shortcut = 'A'
  config.model.num_classes = 10  # 0: the data's number of classes (e.g. an image folder's)
  config.model.dtype = 'float32'  # computation dtype
  config.model.param_dtype = 'float32'
  config.model.stride_on_3x3 = False  # True: "v1.5" bottleneck; the paper strides the first 1x1
  config.model.init_mode = 'fan_in'  # He init over 'fan_in' (the paper) or 'fan_out'
  config.model.zero_init_last_bn = False  # not in the paper
  # BN statistics over groups of this many examples (the paper's per-GPU BN: 64 for CIFAR, 32 for
  # ImageNet); 0 = over the global batch, synchronised across devices (this codebase's default).
  config.model.bn_group_size = 0
  # True: recompute each block's activations in the backward pass (less memory)
  config.model.remat = False
  # True: nn.scan over each stage's identical blocks (flat compile time)
  config.model.scan_blocks = False
  # 'materialized': every ReLU output is written to memory once (a conditional XLA cannot fuse
  # through), so the backward pass reads it instead of recomputing the BN/ReLU/residual chain inside
  # its transposes | 'fused': XLA's own fusion | 'auto': models.backend_defaults (materialized on
  # the CPU, fused elsewhere).
  config.model.activations = 'auto'
  # How the convolutions' gradients are computed: 'xla' (autodiff's own) | 'explicit' (resnet_jax/
  # loop_conv.py: both as NHWC convolutions, which XLA:CPU runs fast inside nn.scan's loop, where it
  # runs its own 20x slower) | 'scanned': explicit in scanned blocks only | 'auto':
  # models.backend_defaults (scanned on the CPU, xla elsewhere). The same numbers either way.
  config.model.conv_grads = 'auto'
  # ImageNet stem's 3x3/2 max pool: 'symmetric' pads 1 each side | 'caffe' as the released Caffe
  # models (no padding, ceil rounding: windows start one pixel later).
  config.model.stem_pool = 'symmetric'
  # True: BN keeps its statistics and affine terms fixed in training (running statistics in training
  # mode, zero updates to scale and bias), as the paper's detection fine-tuning does.
  config.model.freeze_bn = False

  config.data = ml_collections.ConfigDict()
  config.data.name = 'cifar10'
  config.data.source = 'tfds'  # 'tfds' | 'image_folder' | 'synthetic'
  config.data.data_dir = ''  # tfds data_dir; '' = tfds default (~/tensorflow_datasets)
  config.data.image_folder = ''  # split/class/image tree, or a .tar.gz of one
  config.data.cache_dir = ''  # decoded arrays and mean image; '' = ~/.cache/resnet_jax
  config.data.image_size = 32  # CIFAR: the image size; ImageNet: the training and 1-crop crop size
  config.data.train_split = 'train'  # tfds split names; image_folder: the split folders' names
  config.data.eval_split = 'test'
  # True: dataset on the accelerator, augmentation inside the compiled step
  config.data.on_device = False
  config.data.val_split = 0  # >0: hold out this many training images and evaluate on them (45k/5k)
  # >0: a fixed, seeded random subset of this many training / evaluation images (debugging, tests); a
  # sample, not the first files, so that a sorted folder's classes are all represented.
  config.data.train_limit = 0
  config.data.eval_limit = 0
  config.data.prefetch = 2  # batches placed on devices ahead of the step
  # The network input (ImageNet and CIFAR): x = (pixels in 0..255 - mean image) * input_scale, then
  # (x - channel_mean) / channel_std. The mean image is data.mean_image_file (float32 [crop, crop, 3]
  # RGB .npy; relative to the workdir in a workdir's config.json) when set; else none when
  # channel_mean is set; else the per-pixel mean computed from training images (the paper). A
  # converted model's config says how its framework preprocessed (torchvision: 1/255, ImageNet's
  # channel mean and std, as pytorch_resnet_cifar10's; Caffe: 1, the released mean image); the
  # defaults are the paper's.
  config.data.input_scale = 1 / 255
  config.data.channel_mean = ()  # in input units (after input_scale); () = none
  config.data.channel_std = ()  # () = 1
  config.data.mean_image_file = ''

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # global, over all devices of all hosts
  config.train.eval_batch_size = 1024  # a power of two divides any device count up to it
  config.train.num_steps = 64_000
  config.train.log_every_steps = 100
  config.train.eval_every_steps = 2_000
  config.train.checkpoint_every_steps = 2_000
  config.train.keep_checkpoints = 3
  # The workdir's lock (lock.json) of a training on another host is stale after this long without a
  # heartbeat (refreshed every lock_timeout_s/10, at most every minute); on this host, once its pid is gone.
  config.train.lock_timeout_s = 600
  # The released models' BN statistics: exact averages over this many training images after training.
  config.train.recompute_bn_stats = False
  config.train.bn_stats_images = 10_000
  # k > 1: k steps per compiled call (lax.scan); intervals multiples of k
  config.train.steps_per_dispatch = 1
  # a non-finite loss: 'stop' (naming the step) | 'skip' the step's update
  config.train.on_nonfinite = 'stop'

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 1e-4
  # 'all': decay every parameter, as Caffe (its Scale layers included) | 'kernels': conv and dense
  # kernels only (not BN scale/bias nor the fc bias), later practice.
  config.optimizer.weight_decay_on = 'all'
  # 'caffe': v = m*v + lr*g | 'pytorch': v = m*v + g, w -= lr*v | 'dampened': v = m*v + (1-m)*lr*g
  config.optimizer.momentum_style = 'caffe'
  # 'steps': decay at `boundaries` | 'plateau': when the held-out error stalls
  config.optimizer.schedule = 'steps'
  config.optimizer.boundaries = (32_000, 48_000)  # iterations where the lr is multiplied by decay
  # 'steps': `boundaries` are iterations (the paper's configs) | 'fractions': the lr drops at
  # `boundary_fractions` of train.num_steps (the paper's 32k and 48k of 64k), for shortened runs.
  config.optimizer.boundaries_at = 'steps'
  config.optimizer.boundary_fractions = (0.5, 0.75)
  config.optimizer.decay = 0.1
  # schedule='plateau': decay after this many evaluations in a row without the held-out error falling more
  # than plateau_threshold (a fraction: 0.001 = 0.1 points) below its best.
  config.optimizer.plateau_patience = 3
  config.optimizer.plateau_threshold = 0.001
  # ResNet-110's warm-up: warmup_learning_rate until the training error of a step's batch falls
  # below warmup_error, or for at most warmup_max_steps. 0 = no warm-up.
  config.optimizer.warmup_learning_rate = 0.0
  config.optimizer.warmup_error = 0.8
  config.optimizer.warmup_max_steps = 2_000
  return config


STEPS_PER_EPOCH = 1_281_167 // 256  # ImageNet-1k training images per global batch of 256: 5,004


def get_imagenet_config():
  """The paper's ImageNet recipe (section 3.4): batch 256, lr 0.1 divided by 10 when the error plateaus, up to
  60 x 10^4 iterations, weight decay 1e-4, momentum 0.9, no dropout, scale and colour augmentation."""
  config = get_config()
  config.model.family = 'imagenet'
  config.model.depth = 50
  config.model.shortcut = 'B'
  config.model.num_classes = 1000

  config.data.name = 'imagenet2012'
  config.data.image_size = 224  # the training and 1-crop/10-crop crop size
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'  # image_folder: a folder validation/ or val/
  # 'paper': shorter side in [scale_min, scale_max], crop | 'inception'
  config.data.augment = 'paper'
  config.data.scale_min = 256
  config.data.scale_max = 480
  config.data.lighting_std = 0.1  # AlexNet's PCA colour noise; 0 = off
  config.data.eval_resize = 256  # 1-crop and 10-crop: the shorter side before cropping
  # Every resize is bilinear. False: not antialiased, as the Caffe-era pipelines (OpenCV's, Torch's
  # image.scale) | True: the kernel widens where the image shrinks, as PIL and torchvision resize (and
  # as this codebase did before 2026-12-04: runs saved without the field read True, see from_saved).
  config.data.antialias = False
  config.data.eval_scales = (224, 256, 384, 480, 640)  # multi-scale testing: the shorter sides
  config.data.mean_images = 10_000  # training images whose 1-crop views give the per-pixel mean
  config.data.threads = 0  # tf.data threads; 0 = one per core

  config.train.batch_size = 256
  config.train.eval_batch_size = 256  # 10-crop evaluates 10x as many views per batch
  config.train.num_steps = 600_000
  config.train.log_every_steps = 500
  # the plateau rule watches the 1-crop error each epoch
  config.train.eval_every_steps = STEPS_PER_EPOCH
  config.train.checkpoint_every_steps = STEPS_PER_EPOCH
  config.train.recompute_bn_stats = True  # the released models' exact post-training BN statistics

  config.optimizer.schedule = 'plateau'
  config.optimizer.plateau_patience = 3
  config.optimizer.plateau_threshold = 0.001
  config.optimizer.boundaries = tuple(
    e * STEPS_PER_EPOCH for e in (30, 60, 90)
  )  # for schedule='steps'
  return config


def fixed_preprocessing(data_config) -> bool:
  """The config fixes the input's mean (a converted model's, or a run's saved mean image): no mean image
  is computed from training images."""
  return bool(data_config.mean_image_file) or len(data_config.channel_mean) > 0


def load_file(path):
  """The config of an experiment file such as configs/cifar10_20.py, loaded by path."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def from_saved(saved: dict):
  """A saved config (a workdir's config.json) on top of today's defaults.

  Fields added after the run was started take their default values, so tools keep working on older runs,
  except where the default is not what such a run did (data.antialias); tuples come back as tuples.
  """
  config = get_config()

  def merge(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and key in node:
        merge(node[key], value)
      else:
        node[key] = tuple(value) if isinstance(node.get(key), tuple) else value

  merge(config, saved)
  data = saved.get('data', {})
  if data.get('name') == 'imagenet2012' and 'antialias' not in data:
    config.data.antialias = True  # ImageNet runs saved before the switch resized with antialiasing
  return config
