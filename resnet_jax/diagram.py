"""The paper's Fig. 3 drawn from a network's layer walk (complexity.walk), not from a list of its own.

`layout` places a column of layer boxes, the shortcuts as arcs beside it and the stages' output
sizes in plain coordinates; `to_svg` writes that layout, and other backends (experiments/fig3.py's
matplotlib one) draw the same object, so the figures cannot drift apart.
"""

import dataclasses
import math
from typing import Optional
from xml.sax import saxutils

FONT = 11  # px, box labels
SMALL = 10  # px, side labels
BOX_W = 138
BOX_H = 20
GAP = 18  # between two boxes of a stage
SEP = 12  # added where the output size changes
LEFT = 62  # output sizes
BRACKET = 34  # "x n" of collapsed blocks
DEPTH = 46  # how far an arc's control points reach beyond the column; the arc bulges 3/4 of it
TOP = 30
COLLAPSE_ABOVE = 40  # weighted layers; deeper networks draw runs of identical blocks once
STAGE_FILLS = ('#f6d5d0', '#dcd3ee', '#d6ead0', '#fbe3c4', '#cfe0f3', '#e6e6e6')
LINE = '#333333'
GREY = '#777777'  # stage separators and their output sizes
DOTS = (2, 2.5)  # on, off: the dotted arcs where dimensions increase


@dataclasses.dataclass(frozen=True)
class Rect:
  x: float
  y: float
  w: float
  h: float
  fill: str = 'white'


@dataclasses.dataclass(frozen=True)
class Path:
  """Commands ('M', (x, y)), ('L', (x, y)) and ('C', (x1, y1), (x2, y2), (x, y)), as in SVG."""

  commands: tuple
  dashed: bool = False
  width: float = 1.2
  stroke: str = LINE


@dataclasses.dataclass(frozen=True)
class Polygon:
  points: tuple
  fill: str = LINE


@dataclasses.dataclass(frozen=True)
class Label:
  x: float
  y: float  # the vertical centre of the text
  text: str
  size: float = FONT
  anchor: str = 'middle'  # 'start' | 'middle' | 'end', as SVG's text-anchor
  bold: bool = False
  fill: str = '#000000'


@dataclasses.dataclass(frozen=True)
class Item:
  """One thing a reader points at: classes ('layer conv', 'shortcut increase'), tooltip, shapes."""

  classes: tuple
  shapes: tuple
  title: str = ''


@dataclasses.dataclass(frozen=True)
class Layout:
  width: float
  height: float
  items: tuple


@dataclasses.dataclass
class _Unit:
  """A drawn row group: one layer outside the blocks, or a block drawn `repeat` times over."""

  layers: list
  block: Optional[object] = None
  shortcut: list = dataclasses.field(default_factory=list)
  repeat: int = 1
  last_path: str = ''

  def signature(self):
    b = self.block
    return (
      b.stage,
      b.residual,
      b.increase,
      b.projection,
      tuple((layer.label, layer.shape) for layer in self.layers + self.shortcut),
    )


def _units(network):
  blocks = {block.path: block for block in network.blocks}
  units = []
  for layer in network.layers:
    if layer.block is None:
      units.append(_Unit([layer]))
      continue
    if not units or units[-1].block is None or units[-1].block.path != layer.block:
      units.append(_Unit([], blocks[layer.block], last_path=layer.block))
    (units[-1].shortcut if layer.branch == 'shortcut' else units[-1].layers).append(layer)
  return units


def _collapse(units):
  out = []
  for unit in units:
    previous = out[-1] if out else None
    if (
      unit.block is not None
      and previous is not None
      and previous.block is not None
      and previous.signature() == unit.signature()
    ):
      previous.repeat += 1
      previous.last_path = unit.block.path
    else:
      out.append(unit)
  return out


def weighted_layers(network):
  """Convs and fc layers on the main path: the depth the paper names a network by."""
  return sum(layer.branch == 'main' and layer.kind in ('conv', 'dense') for layer in network.layers)


def _size(shape):
  return f'{shape[0]}x{shape[1]}' if len(shape) == 3 else '1x1'


def _shape(shape):
  return 'x'.join(map(str, shape))


def _text_width(text, size):
  return 0.6 * size * len(text)


def _arrowhead(tail, tip, length=6.0, half=3.5):
  dx, dy = tip[0] - tail[0], tip[1] - tail[1]
  norm = math.hypot(dx, dy) or 1.0
  ux, uy = dx / norm, dy / norm
  base = (tip[0] - length * ux, tip[1] - length * uy)
  return Polygon(
    (
      (tip[0], tip[1]),
      (base[0] - half * uy, base[1] + half * ux),
      (base[0] + half * uy, base[1] - half * ux),
    )
  )


def _title(layer, unit):
  path = layer.path
  if unit.repeat > 1:
    path = f'{path}  (each of {unit.repeat} blocks, {unit.block.path} to {unit.last_path})'
  return (
    f'{path}\n{layer.label} -> {_shape(layer.shape)}\n'
    f'params: {layer.params:,}\nMACs: {layer.macs:,}'
  )


def _classes(layer):
  if layer.kind == 'conv':
    return ('layer', 'conv')
  if layer.kind == 'dense':
    return ('layer', 'fc')
  return ('pool',)


def _fill(layer, unit):
  if layer.kind in ('max_pool', 'avg_pool'):
    return 'white'
  if unit.block is not None:
    return STAGE_FILLS[unit.block.stage % len(STAGE_FILLS)]
  return STAGE_FILLS[0] if layer.kind == 'conv' else STAGE_FILLS[-1]


def _shortcut(unit, x_center, x_right, top, bottom):
  """A residual block's arc: out of the flow line above it, round its right side, back in below."""
  block = unit.block
  bulge = x_right + 0.75 * DEPTH
  classes = (
    ('shortcut',)
    + (('increase',) if block.increase else ())
    + (('projection',) if block.projection else ())
  )
  commands = (
    ('M', (x_center, top)),
    ('L', (x_right, top)),
    ('C', (x_right + DEPTH, top), (x_right + DEPTH, bottom), (x_right, bottom)),
    ('L', (x_center, bottom)),
  )
  arrow = _arrowhead((x_right, bottom), (x_center, bottom))
  shapes = [Path(commands, dashed=block.increase), arrow]
  if block.projection:
    what = ', '.join(layer.label for layer in unit.shortcut)
    shapes.append(Label(bulge + 5, (top + bottom) / 2, what, SMALL, 'start'))
    params = sum(layer.params for layer in unit.shortcut)
    macs = sum(layer.macs for layer in unit.shortcut)
    title = f'{block.path}/shortcut: {what}\nparams: {params:,}\nMACs: {macs:,}'
  elif block.increase:
    title = f'{block.path}/shortcut: identity, subsampled and zero-padded to {_shape(block.shape)}'
  else:
    title = f'{block.path}/shortcut: identity'
  return Item(classes, tuple(shapes), title)


def layout(network, collapse: Optional[bool] = None, title: Optional[str] = None) -> Layout:
  """Fig. 3's column for `network` (a summary.Network); collapse=None collapses deep networks."""
  units = _units(network)
  if collapse is None:
    collapse = weighted_layers(network) > COLLAPSE_ABOVE
  if collapse:
    units = _collapse(units)
  repeats = any(unit.repeat > 1 for unit in units)
  x_left = LEFT + (BRACKET if repeats else 0)
  x_center = x_left + BOX_W / 2
  x_right = x_left + BOX_W
  caption = Label(x_center, TOP / 2, title or network.name, FONT + 1, bold=True)
  items = [Item(('caption',), (caption,))]

  y = TOP
  image = network.input_shape
  image_box = (Rect(x_left, y, BOX_W, BOX_H), Label(x_center, y + BOX_H / 2, 'image'))
  items.append(Item(('input',), image_box, f'input {_shape(image)}'))
  previous_bottom = y + BOX_H
  y = previous_bottom + GAP
  group = None  # the output size of the boxes drawn last
  separators = []  # (y, output size) where a stage of that size begins
  boxes = []  # (unit, top, bottom) of each unit's drawn boxes
  for unit in units:
    unit_top = None
    for layer in unit.layers:
      size = _size(layer.shape)
      if size != group:
        y += SEP
        line_y = y - (GAP + SEP) / 2
        separators.append((line_y, size))
        group = size
      flow = Path((('M', (x_center, previous_bottom)), ('L', (x_center, y))))
      items.append(Item(('flow',), (flow, _arrowhead((x_center, previous_bottom), (x_center, y)))))
      box = (
        Rect(x_left, y, BOX_W, BOX_H, _fill(layer, unit)),
        Label(x_center, y + BOX_H / 2, layer.label),
      )
      items.append(Item(_classes(layer), box, _title(layer, unit)))
      unit_top = y if unit_top is None else unit_top
      previous_bottom = y + BOX_H
      y = previous_bottom + GAP
    boxes.append((unit, unit_top, previous_bottom))
  bottom = previous_bottom

  for unit, top, unit_bottom in boxes:
    if unit.block is not None and unit.block.residual:
      items.append(_shortcut(unit, x_center, x_right, top - GAP / 2, unit_bottom + GAP / 2))
    if unit.repeat > 1:
      x = x_left - 8
      bracket = Path(
        (
          ('M', (x, top)),
          ('L', (x - 6, top)),
          ('L', (x - 6, unit_bottom)),
          ('L', (x, unit_bottom)),
        ),
        width=1.0,
      )
      mark = Label(x - 10, (top + unit_bottom) / 2, f'x {unit.repeat}', FONT, 'end', bold=True)
      what = f'{unit.block.path} to {unit.last_path}: {unit.repeat} identical blocks'
      items.append(Item(('repeat',), (bracket, mark), what))

  side = [
    shape
    for item in items
    if 'projection' in item.classes
    for shape in item.shapes
    if isinstance(shape, Label)
  ]
  right = x_right + 0.75 * DEPTH + 10
  if side:
    right = max(label.x + _text_width(label.text, label.size) for label in side) + 8
  ends = [line_y for line_y, _ in separators[1:]] + [bottom + GAP / 2]
  for (line_y, size), end in zip(separators, ends):
    items.append(
      Item(
        ('separator',),
        (
          Path(
            (('M', (4, line_y)), ('L', (right - 4, line_y))), dashed=True, width=0.6, stroke=GREY
          ),
          Label(6, (line_y + end) / 2, size, SMALL, 'start', fill=GREY),
        ),
      )
    )
  return Layout(right, bottom + GAP, tuple(items))


def _shifted(shape, dx):
  if isinstance(shape, (Rect, Label)):
    return dataclasses.replace(shape, x=shape.x + dx)
  if isinstance(shape, Polygon):
    return dataclasses.replace(shape, points=tuple((x + dx, y) for x, y in shape.points))
  commands = tuple((c[0],) + tuple((x + dx, y) for x, y in c[1:]) for c in shape.commands)
  return dataclasses.replace(shape, commands=commands)


def hstack(layouts, gap: float = 16) -> Layout:
  """Columns side by side (the paper's Fig. 3 shows plain-34 beside ResNet-34)."""
  items = []
  x = 0.0  # where the next column starts
  for part in layouts:
    items += [
      dataclasses.replace(item, shapes=tuple(_shifted(s, x) for s in item.shapes))
      for item in part.items
    ]
    x += part.width + gap
  return Layout(x - gap, max(part.height for part in layouts), tuple(items))


def _svg_shape(shape):
  if isinstance(shape, Rect):
    return (
      f'<rect x="{shape.x:.1f}" y="{shape.y:.1f}" width="{shape.w:.1f}" '
      f'height="{shape.h:.1f}" rx="3" fill="{shape.fill}" stroke="{LINE}" stroke-width="1"/>'
    )
  if isinstance(shape, Polygon):
    points = ' '.join(f'{x:.1f},{y:.1f}' for x, y in shape.points)
    return f'<polygon points="{points}" fill="{shape.fill}"/>'
  if isinstance(shape, Label):
    weight = ' font-weight="bold"' if shape.bold else ''
    return (
      f'<text x="{shape.x:.1f}" y="{shape.y:.1f}" font-size="{shape.size}" '
      f'text-anchor="{shape.anchor}" dominant-baseline="central" fill="{shape.fill}"{weight}>'
      f'{saxutils.escape(shape.text)}</text>'
    )
  data = ' '.join(c[0] + ' '.join(f'{x:.1f},{y:.1f}' for x, y in c[1:]) for c in shape.commands)
  dash = f' stroke-dasharray="{DOTS[0]},{DOTS[1]}"' if shape.dashed else ''
  return (
    f'<path d="{data}" fill="none" stroke="{shape.stroke}" stroke-width="{shape.width}"{dash}/>'
  )


def to_svg(drawing: Layout) -> str:
  """The layout as a standalone SVG document; a `<title>` child is the tooltip of its item."""
  lines = [
    f'<svg xmlns="http://www.w3.org/2000/svg" width="{drawing.width:.0f}" '
    f'height="{drawing.height:.0f}" viewBox="0 0 {drawing.width:.0f} {drawing.height:.0f}" '
    'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
    '<rect width="100%" height="100%" fill="white"/>',
  ]
  for item in drawing.items:
    title = f'<title>{saxutils.escape(item.title)}</title>' if item.title else ''
    shapes = ''.join(_svg_shape(shape) for shape in item.shapes)
    lines.append(f'<g class="{" ".join(item.classes)}">{title}{shapes}</g>')
  lines.append('</svg>')
  return '\n'.join(lines) + '\n'


def write(network, path, collapse: Optional[bool] = None, title: Optional[str] = None):
  """Draw `network` into the SVG file `path`."""
  with open(path, 'w', encoding='utf-8') as f:
    f.write(to_svg(layout(network, collapse, title)))
