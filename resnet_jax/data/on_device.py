"""CIFAR batches made on the device: the uint8 images live there, and the crop and flip run in the step.

The host then sends only example indices and augmentation draws (a few KB per step instead of 1.5 MB of
float images), computed by the host path's own rules, so a batch equals `in_memory.train_batch` bit for
bit and a resumed run sees the same data whichever path it uses. No TensorFlow is imported.
The step arrays are laid out as train.py's stacked batches, [batch, k], so parallel.to_global, prefetch
and train.scan_steps take them as they are:

  data = device_data.put(ds, mesh)  # once; in_spec P()
  xs = parallel.to_global(device_data.step_arrays(len(ds.train_labels), first, k, batch_size, seed,
                                                  jax.process_index(), jax.process_count()), mesh)
  fn = parallel.map_step(  # per device: x holds one step's share, each array [b]
      lambda s, data, xs: train.scan_steps(lambda s, x: step(s, device_data.batch(data, x)), s, xs),
      mesh, in_specs=(P(), P(), P(parallel.AXIS)), out_specs=(P(), P()), donate_argnums=0)
"""

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import parallel
from resnet_jax.data import common, in_memory


def put(ds: in_memory.Dataset, mesh) -> dict:
  """The training images (uint8), labels, mean image and the config's other input fields where they
  differ from the paper's, replicated on every device of the mesh."""
  arrays = {
    'images': np.asarray(ds.train_images, np.uint8),
    'labels': np.asarray(ds.train_labels, np.int32),
    'mean': np.asarray(ds.mean_image, np.float32),
  }
  if np.float32(ds.input_scale) != in_memory.INV_255:
    arrays['scale'] = np.float32(ds.input_scale)
  if len(ds.channel_mean):
    arrays['channel_mean'] = np.asarray(ds.channel_mean, np.float32)
  if len(ds.channel_std):
    arrays['channel_std'] = np.asarray(ds.channel_std, np.float32)
  sharding = parallel.replicated(
    mesh
  )  # every process holds the whole dataset, as for the host path
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


def step_arrays(
  num_train: int,
  first: int,
  k: int,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> dict:
  """This process's share of steps [first, first + k): {'index', 'dy', 'dx', 'flip'}, each [local_batch, k].

  Host work of microseconds per step; the device does the rest in `batch`.
  """
  share = common.process_share(batch_size, process_index, process_count, 'train.batch_size')
  rows = []
  for step in range(int(first), int(first) + int(k)):
    dy, dx, flip = in_memory.augmentation(seed, step, batch_size)
    rows.append(
      (
        common.step_indices(num_train, step, batch_size, seed, share),
        dy[share],
        dx[share],
        flip[share],
      )
    )
  index, dy, dx, flip = (np.stack(a, axis=1) for a in zip(*rows))
  return {
    'index': index.astype(np.int32),
    'dy': dy.astype(np.int32),
    'dx': dx.astype(np.int32),
    'flip': flip.astype(bool),
  }


def _crop(padded, dy, dx):
  h, w, c = padded.shape
  size = (h - 2 * in_memory.PAD, w - 2 * in_memory.PAD, c)
  return jax.lax.dynamic_slice(padded, (dy, dx, 0), size)


def batch(data: dict, x: dict) -> dict:
  """One step's batch on this device, equal to in_memory.train_batch's bit for bit: the same float32
  operations in the same order (normalize, then zero padding, crop and flip)."""
  pad = in_memory.PAD
  scale = data.get('scale', in_memory.INV_255)
  images = (data['images'][x['index']].astype(jnp.float32) - data['mean']) * scale
  if 'channel_mean' in data:
    images = images - data['channel_mean']
  if 'channel_std' in data:
    images = images / data['channel_std']
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crops = jax.vmap(_crop)(padded, x['dy'], x['dx'])
  crops = jnp.where(
    x['flip'][:, None, None, None], crops[:, :, ::-1], crops
  )  # a flip reverses columns
  return {'image': crops, 'label': data['labels'][x['index']]}
