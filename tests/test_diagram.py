"""The layer walk against the paper's structure, and Fig. 3 drawn from it (traced, not compiled)."""

import collections
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from helpers import cifar_params, model_config

from resnet_jax import complexity, defaults, diagram

SVG = '{http://www.w3.org/2000/svg}'
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem not in ('default', '__init__'))


def elements(svg_text):
  """Every element of the SVG with a class, by class name."""
  by_class = collections.defaultdict(list)
  for element in ET.fromstring(svg_text).iter():
    for name in element.get('class', '').split():
      by_class[name].append(element)
  return by_class


def draw(cfg, collapse=False):
  return elements(diagram.to_svg(diagram.layout(complexity.walk(cfg), collapse=collapse)))


def cost(element):
  """(params, MACs) from an element's tooltip."""
  title = element.find(f'{SVG}title').text
  params = re.search(r'params: ([\d,]+)', title)[1]
  macs = re.search(r'MACs: ([\d,]+)', title)[1]
  return int(params.replace(',', '')), int(macs.replace(',', ''))


# The paper's counts: depth = weighted layers; one shortcut per block; dimensions increase at the
# first block of each later stage (and at ResNet-50's first block, 64 -> 256).
@pytest.mark.parametrize(
  'cfg,layers,shortcuts,increases,projections',
  [
    (model_config('cifar', 20, shortcut='A'), 20, 9, 2, 0),
    (model_config('imagenet', 34, shortcut='A'), 34, 16, 3, 0),
    (model_config('imagenet', 50, shortcut='B'), 50, 16, 4, 4),
    (model_config('imagenet', 34, residual=False, shortcut='A'), 34, 0, 0, 0),
    (model_config('imagenet', 34, shortcut='C'), 34, 16, 3, 16),
  ],
  ids=['cifar20', 'resnet34a', 'resnet50b', 'plain34', 'resnet34c'],
)
def test_fig3_counts(cfg, layers, shortcuts, increases, projections):
  drawn = draw(cfg)
  assert len(drawn['layer']) == layers
  assert len(drawn['shortcut']) == shortcuts
  assert len(drawn['increase']) == increases
  assert len(drawn['projection']) == projections
  assert len(drawn['fc']) == 1 and len(drawn['conv']) == layers - 1


def test_increases_are_dotted_and_projections_labelled():
  drawn = draw(model_config('imagenet', 50, shortcut='B'))
  for arc in drawn['shortcut']:
    dotted = 'stroke-dasharray' in arc.find(f'{SVG}path').attrib
    assert dotted == ('increase' in arc.get('class').split())
  labels = sorted(arc.find(f'{SVG}text').text for arc in drawn['projection'])
  assert labels == [
    '1x1 conv, 1024, /2',
    '1x1 conv, 2048, /2',
    '1x1 conv, 256',
    '1x1 conv, 512, /2',
  ]


def test_box_labels_are_the_papers():
  drawn = draw(model_config('imagenet', 34, shortcut='A'))
  texts = [box.find(f'{SVG}text').text for box in drawn['layer']]
  assert texts[0] == '7x7 conv, 64, /2' and texts[-1] == 'fc 1000'
  assert texts.count('3x3 conv, 128, /2') == 1 and texts.count('3x3 conv, 64') == 6
  assert [box.find(f'{SVG}text').text for box in drawn['pool']] == ['pool, /2', 'avg pool']
  sizes = [label.text for sep in drawn['separator'] for label in sep.iter(f'{SVG}text')]
  assert sizes == ['112x112', '56x56', '28x28', '14x14', '7x7', '1x1']  # Table 1's output sizes


@pytest.mark.parametrize(
  'cfg',
  [
    model_config('cifar', 20),
    model_config('imagenet', 50, shortcut='B'),
    model_config('imagenet', 34, shortcut='C'),
  ],
  ids=['cifar20', 'r50b', 'r34c'],
)
def test_tooltips_add_up_to_the_totals(cfg):
  drawn = draw(cfg)
  costs = [cost(e) for e in drawn['layer'] + drawn['projection']]
  _, params, macs = complexity.count(cfg)
  assert sum(p for p, _ in costs) == params and sum(m for _, m in costs) == macs


@pytest.mark.parametrize(
  'cfg,repeat',
  [(model_config('imagenet', 152), 'x 35'), (model_config('cifar', 110), 'x 17')],
  ids=['resnet152', 'cifar110'],
)
def test_collapse_draws_repeated_blocks_once(cfg, repeat):
  network = complexity.walk(cfg)
  full = elements(diagram.to_svg(diagram.layout(network, collapse=False)))
  collapsed = elements(diagram.to_svg(diagram.layout(network)))  # deep: collapsed by default
  assert len(collapsed['layer']) < len(full['layer']) // 5
  marks = [label.text for mark in collapsed['repeat'] for label in mark.iter(f'{SVG}text')]
  assert repeat in marks and not full['repeat']
  # Every stage keeps its first block (the one that changes dimensions) and its "x n" run.
  assert len(collapsed['increase']) == len(full['increase'])


def test_shallow_networks_are_not_collapsed_by_default():
  network = complexity.walk(model_config('imagenet', 34, shortcut='A'))
  full = diagram.to_svg(diagram.layout(network, collapse=False))
  assert diagram.to_svg(diagram.layout(network)) == full


def test_layer_table_in_network_order():
  network = complexity.walk(model_config('imagenet', 50, shortcut='B'))
  assert network.layers[0].path == 'stem_conv' and network.layers[1].kind == 'max_pool'
  assert network.layers[-1].path == 'fc' and network.layers[-2].kind == 'avg_pool'
  block_order = [layer.block for layer in network.layers if layer.block]
  assert block_order == sorted(block_order, key=lambda b: tuple(map(int, re.findall(r'\d+', b))))
  sizes = {}
  for block in network.blocks:
    sizes.setdefault(block.stage, set()).add(block.shape)
  assert sizes == {1: {(56, 56, 256)}, 2: {(28, 28, 512)}, 3: {(14, 14, 1024)}, 4: {(7, 7, 2048)}}
  assert [len([b for b in network.blocks if b.stage == s]) for s in (1, 2, 3, 4)] == [3, 4, 6, 3]


# Parameters as torchvision's resnet50 and the paper's Table 6 (0.27M) count them; MACs: Table 1's
# 3.8 GFLOPs (one decimal) and 41M for ResNet-20 (16 + 32 + 64 filters on 32/16/8 maps).
@pytest.mark.parametrize(
  'cfg,params,gmacs',
  [
    (model_config('imagenet', 50, shortcut='B'), 25_557_032, 3.8),
    (model_config('cifar', 20), cifar_params(20), 0.041),
  ],
  ids=['r50', 'c20'],
)
def test_layer_table_sums_to_the_totals(cfg, params, gmacs):
  network = complexity.walk(cfg)
  assert sum(layer.params for layer in network.layers) == params == complexity.count(cfg)[1]
  macs = sum(layer.macs for layer in network.layers)
  assert abs(macs / 1e9 - gmacs) / gmacs < 0.02
  table = complexity.table(network)
  assert table.splitlines()[-1].split()[-2:] == [f'{params:,}', f'{macs:,}']


def test_scanned_blocks_come_out_per_block():
  unscanned = complexity.walk(model_config('cifar', 20))
  scanned = complexity.walk(model_config('cifar', 20, scan_blocks=True, remat=True))
  assert scanned == unscanned and len(scanned.blocks) == 9


@pytest.mark.slow
def test_cli_writes_the_diagram(tmp_path):
  from conftest import REPO

  out = tmp_path / 'cifar20.svg'
  subprocess.run(
    [
      sys.executable,
      '-m',
      'resnet_jax.tools.summary',
      '--config=configs/cifar10_20.py',
      f'--diagram={out}',
      '--config.model.shortcut=B',
    ],
    cwd=REPO,
    check=True,
    capture_output=True,
    text=True,
  )
  drawn = elements(out.read_text())
  assert len(drawn['layer']) == 20 and len(drawn['projection']) == 2


@pytest.mark.slow
def test_every_config_draws():  # ~15 s on one core, mostly tracing ResNet-1202
  for name in CONFIGS:
    cfg = defaults.load_file(CONFIG_DIR / f'{name}.py')
    network = complexity.walk(cfg)
    drawn = elements(diagram.to_svg(diagram.layout(network)))
    assert drawn['layer'] and drawn['layer'][-1].find(f'{SVG}text').text.startswith('fc '), name
    assert bool(drawn['shortcut']) == cfg.model.residual, name


def test_boxes_do_not_overlap_and_labels_fit():
  network = complexity.walk(model_config('imagenet', 152, stride_on_3x3=True, shortcut='C'))
  for collapse in (False, True):
    drawing = diagram.layout(network, collapse=collapse)
    boxes = [
      (shape, item)
      for item in drawing.items
      for shape in item.shapes
      if isinstance(shape, diagram.Rect)
    ]
    tops = sorted(rect.y for rect, _ in boxes)
    assert all(b - a > diagram.BOX_H for a, b in zip(tops, tops[1:]))
    labels = [
      shape for item in drawing.items for shape in item.shapes if isinstance(shape, diagram.Label)
    ]
    assert all(0 <= label.y <= drawing.height for label in labels)
    for rect, item in boxes:
      text = next(s for s in item.shapes if isinstance(s, diagram.Label)).text
      assert 0.6 * diagram.FONT * len(text) < rect.w  # DejaVu Sans averages ~0.6 em per character
    side = [
      label
      for item in drawing.items
      if 'projection' in item.classes
      for label in item.shapes
      if isinstance(label, diagram.Label)
    ]
    assert all(label.x > boxes[0][0].x + diagram.BOX_W for label in side)
    assert max(label.x + 0.6 * label.size * len(label.text) for label in side) <= drawing.width


def test_matplotlib_draws_the_same_layout(tmp_path):
  from conftest import REPO

  sys.path.insert(0, str(REPO))  # experiments/ is no installed package
  from experiments import fig3

  drawing = diagram.layout(complexity.walk(model_config('cifar', 20, shortcut='B')), collapse=False)
  figure = fig3.figure(drawing, scale=1.0)
  shapes = [shape for item in drawing.items for shape in item.shapes]
  axes = figure.axes[0]
  assert len(axes.patches) == sum(not isinstance(s, diagram.Label) for s in shapes)
  assert sorted(t.get_text() for t in axes.texts) == sorted(
    s.text for s in shapes if isinstance(s, diagram.Label)
  )
  figure.savefig(tmp_path / 'c20.png')
  assert (tmp_path / 'c20.png').stat().st_size > 10_000
