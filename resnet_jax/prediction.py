"""The top classes of images under a workdir's model, converted or trained, preprocessed as its config says
(ImageNet: the 1-crop view, shorter side data.eval_resize and the centre data.image_size crop; CIFAR:
the whole image, which must be data.image_size square).

For each image, its top classes: WordNet id (ImageNet), class name and probability. An image that cannot be read or
decoded is named with its problem and the others are still classified. The workdir is only read; the
mean image is the one training saved there. The command is resnet_jax.tools.predict.
"""

BATCH = 32  # images per forward pass


def mean_image(config):
  """The config's fixed mean image (a converted model's, or the one training saved in the workdir), else
  the one computed (and cached) from its training images."""
  from resnet_jax import data as data_lib
  from resnet_jax.data import imagenet

  fixed = imagenet.fixed_mean_image(config.data)
  if fixed is not None:
    return fixed
  return data_lib.load(config.data, config.seed).mean_image


def _cifar_view(data, config, mean):
  """A CIFAR model's input: the whole image, as evaluation sees it."""
  import io

  import numpy as np
  from PIL import Image, UnidentifiedImageError

  from resnet_jax.data import in_memory

  size = int(config.data.image_size)
  try:
    with Image.open(io.BytesIO(data)) as image:
      pixels = np.asarray(image.convert('RGB'))
  except (UnidentifiedImageError, OSError) as e:
    raise in_memory.DataError(f'not an image PIL can decode ({type(e).__name__}).') from None
  if pixels.shape[:2] != (size, size):
    raise in_memory.DataError(
      f'{pixels.shape[1]}x{pixels.shape[0]} pixels where the model takes {size}x{size}: resize it.'
    )
  cfg = config.data
  return in_memory.preprocess_eval(
    pixels[None], mean, cfg.input_scale, cfg.channel_mean, cfg.channel_std
  )[0]


def inputs(paths, config, mean):
  """(network inputs of the images that decode, their paths, [(path, problem)] of the others)."""
  from resnet_jax.data import imagenet

  cifar = config.data.name != 'imagenet2012'
  images, good, failed = [], [], []
  for path in paths:
    try:
      with open(path, 'rb') as f:
        data = f.read()
      if cifar:
        images.append(_cifar_view(data, config, mean))
      else:
        images.append(imagenet.one_crop(data, config.data, mean))
      good.append(path)
    except OSError as e:
      failed.append((path, f'cannot be read ({e.strerror or type(e).__name__}).'))
    except imagenet.DataError as e:
      failed.append((path, f'is {e}'))
  return images, good, failed


def classify(run, paths, top):
  """([{'image', 'top': [{'label', 'wnid', 'name', 'probability'}]}], [(path, problem)])."""
  import jax
  import numpy as np

  from resnet_jax import models
  from resnet_jax.data import imagenet, in_memory

  config = run.config
  images, good, failed = inputs(paths, config, mean_image(config))
  if not images:
    return [], failed
  model = models.create(config.model)
  probabilities = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)))
  scores = np.concatenate(
    [
      np.asarray(probabilities(run.variables, np.stack(images[i : i + BATCH])))
      for i in range(0, len(images), BATCH)
    ]
  )
  known = config.model.num_classes == imagenet.NUM_CLASSES
  wnids = imagenet.ilsvrc_wnids() if known else None
  names = imagenet.ilsvrc_names() if known else None
  if config.data.name == 'cifar10' and config.model.num_classes == len(in_memory.CIFAR10_CLASSES):
    names = in_memory.CIFAR10_CLASSES
  results = []
  for path, p in zip(good, scores):
    best = np.argsort(-p, kind='stable')[:top]
    results.append(
      {
        'image': path,
        'top': [
          {
            'label': int(k),
            'wnid': wnids[k] if known else None,
            'name': names[k] if names else f'class {k}',
            'probability': float(p[k]),
          }
          for k in best
        ],
      }
    )
  return results, failed


def as_text(results):
  lines = []
  for result in results:
    lines.append(result['image'])
    for c in result['top']:
      lines.append(f'  {c["probability"]:.4f}  {c["wnid"] or c["label"]}  {c["name"]}')
  return '\n'.join(lines)
