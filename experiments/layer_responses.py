"""The paper's Fig. 7: standard deviations of the 3x3 layers' responses, plain nets against ResNets.

  python experiments/layer_responses.py --workdir runs/cifar10_plain20 --workdir runs/cifar10_20 \
      --out experiments/results/fig7.png [--num_images 1000]

The responses are each 3x3 layer's outputs after BN and before the addition and the ReLU (the blocks sow
them as 'responses'). The statistic, per layer: the std of each channel over the images and spatial
positions, then the mean over channels. Per-channel stds are used because BN acts per channel, so this is
the scale the paper's argument is about (residual functions closer to zero); a std over channels as well
would add the spread of the BN biases to it. The images are the first N of the run's evaluation split
(the test set, or the held-out images of a run with data.val_split), with the run's own mean image; the
network is in eval mode (BN running statistics) and uses the latest checkpoint. The numbers are written
beside the figure as <out>.json: {run name: [std per layer, in layer order]}.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from resnet_jax import checkpointing, data, models
from resnet_jax.workdir import Workdir


def make_moments_fn(model):
  """Per 3x3 layer and channel, over the real images of a batch: (count, mean, sum of squared deviations).

  Reduced on the device so that only [C] vectors come back, even for ResNet-1202's 600 layers; centred
  within the batch so that a large mean costs float32 little precision.
  """

  @jax.jit
  def moments(variables, images, mask):
    _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
    weight = mask[:, None, None, None]
    out = {}
    for block, sown in models.unstack_blocks(
      state['intermediates']
    ).items():  # scan_blocks: per block
      stats = []
      for y in sown['responses']:
        y = y.astype(jnp.float32)  # a bfloat16 model's responses: reduce in float32
        count = jnp.sum(mask) * y.shape[1] * y.shape[2]
        mean = jnp.sum(y * weight, axis=(0, 1, 2)) / jnp.maximum(count, 1)
        m2 = jnp.sum(jnp.square(y - mean) * weight, axis=(0, 1, 2))
        stats.append((count, mean, m2))
      out[block] = stats
    return out

  return moments


def _merge(a, b):
  """Chan et al.'s pairwise update of (count, mean, M2), in float64."""
  (na, ma, sa), (nb, mb, sb) = a, b
  n = na + nb
  delta = mb - ma
  return n, ma + delta * nb / n, sa + sb + np.square(delta) * na * nb / n


def layer_stds(workdir, num_images=1000, batch_size=200):
  """The std of each 3x3 layer's response (per channel over images and positions, averaged over channels)."""
  config = Workdir(workdir).config()
  ds = data.load(config.data, config.seed)
  ds = dataclasses.replace(
    ds, eval_images=ds.eval_images[:num_images], eval_labels=ds.eval_labels[:num_images]
  )
  moments = make_moments_fn(models.create(config.model))
  variables = checkpointing.open_workdir(workdir, config).variables
  totals = {}
  for batch in ds.eval_batches(batch_size):
    for block, stats in jax.device_get(moments(variables, batch['image'], batch['mask'])).items():
      stats = [tuple(np.asarray(x, np.float64) for x in s) for s in stats]
      totals[block] = (
        stats if block not in totals else [_merge(t, s) for t, s in zip(totals[block], stats)]
      )
  layers = [s for block in sorted(totals, key=models.parse_block) for s in totals[block]]
  return np.array([np.sqrt(m2 / n).mean() for n, _, m2 in layers])


def run_labels(workdirs):
  """Config names, with the workdir's basename added where two runs share one."""
  names = [Workdir(w).config().get('name', pathlib.Path(w).name) for w in workdirs]
  return [
    f'{n} ({pathlib.Path(w).name})' if names.count(n) > 1 else n for n, w in zip(names, workdirs)
  ]


def plot(stds, out):
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6))
  for label, s in stds.items():
    x = np.arange(1, len(s) + 1)
    top.plot(x, s, '-', marker='.', label=label)
    bottom.plot(x, np.sort(s)[::-1], '-', marker='.', label=label)
  top.set_xlabel('layer index (original)')
  bottom.set_xlabel('layer index (sorted by magnitude)')
  for ax in (top, bottom):
    ax.set_ylabel('std')
    ax.grid(alpha=0.3)
  top.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=150)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--workdir', action='append', required=True, help='a training workdir; repeat per run'
  )
  parser.add_argument('--out', required=True, help='the figure; the numbers go to <out>.json')
  parser.add_argument('--num_images', type=int, default=1000, help='the first N evaluation images')
  parser.add_argument('--batch_size', type=int, default=200, help='images per forward pass')
  args = parser.parse_args(argv)
  stds = {
    label: layer_stds(w, args.num_images, args.batch_size)
    for label, w in zip(run_labels(args.workdir), args.workdir)
  }
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  plot(stds, out)
  out.with_name(out.name + '.json').write_text(
    json.dumps({k: v.tolist() for k, v in stds.items()}, indent=1)
  )
  print(f'wrote {out} and {out.name}.json')


if __name__ == '__main__':
  main()
