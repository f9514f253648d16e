"""Parameters and multiply-adds of every network, beside the paper's Table 1 and Table 6 figures.

python experiments/table1.py   # writes experiments/results/table1.md
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnet_jax import complexity, defaults

OUT = ROOT / 'experiments' / 'results' / 'table1.md'

PAPER_GFLOPS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}  # Table 1, multiply-adds x10^9
PAPER_CIFAR_PARAMS = {
  20: '0.27M',
  32: '0.46M',
  44: '0.66M',
  56: '0.85M',
  110: '1.7M',
  1202: '19.4M',
}
IMAGENET = [
  'plain18',
  'resnet18',
  'plain34',
  'resnet34a',
  'resnet34b',
  'resnet34c',
  'resnet50',
  'resnet101',
  'resnet152',
]


def rows(names):
  for name in names:
    config = defaults.load_file(ROOT / 'configs' / f'{name}.py')
    _, params, macs = complexity.count(config)
    yield name, config, params, macs


def render() -> str:
  """The whole of results/table1.md."""
  lines = [
    '# Network sizes against the paper',
    '',
    'Written by `python experiments/table1.py`. Parameters are trainable '
    'ones (BN scale and bias included, running statistics not); multiply-adds are those of the convs '
    "and the dense layer for one image, counted from the layers' shapes.",
    '',
    '## ImageNet (Table 1), 224x224 input',
    '',
    '| config | shortcut | params | GMACs | paper GFLOPs (Table 1) |',
    '|---|---|---:|---:|---:|',
  ]
  for name, config, params, macs in rows(f'imagenet_{n}' for n in IMAGENET):
    shortcut = config.model.shortcut if config.model.residual else 'none (plain)'
    lines.append(
      f'| {name} | {shortcut} | {params:,} | {macs / 1e9:.3f} | {PAPER_GFLOPS[config.model.depth]} |'
    )
  lines += [
    '',
    "Table 1 rounds to one decimal, which fits both shortcut options: option A (Table 2's ResNet-18/34) "
    'and the plain nets have no projection convs, so slightly fewer multiply-adds than option B.',
    '',
    '## CIFAR-10 (Table 6), 32x32 input, option A',
    '',
    '| config | params | GMACs | paper params (Table 6) |',
    '|---|---:|---:|---:|',
  ]
  for name, config, params, macs in rows(f'cifar10_{d}' for d in PAPER_CIFAR_PARAMS):
    lines.append(
      f'| {name} | {params:,} | {macs / 1e9:.3f} | {PAPER_CIFAR_PARAMS[config.model.depth]} |'
    )
  return '\n'.join(lines) + '\n'


def main():
  OUT.parent.mkdir(parents=True, exist_ok=True)
  OUT.write_text(render())
  print(OUT.read_text())


if __name__ == '__main__':
  main()
