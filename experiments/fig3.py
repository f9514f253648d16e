"""The paper's Fig. 3 (middle and right columns): plain-34 beside ResNet-34 with option A shortcuts.

Both columns come from the networks themselves (complexity.walk -> diagram.layout); the PNG is the same
layout object drawn by matplotlib, so the SVG and the PNG cannot differ.

  python experiments/fig3.py   # writes experiments/results/fig3.svg and fig3.png
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt
from matplotlib import patches
from matplotlib import path as mpath

from resnet_jax import complexity, defaults, diagram

COLUMNS = (('imagenet_plain34', '34-layer plain'), ('imagenet_resnet34a', '34-layer residual'))
ANCHORS = {'start': 'left', 'middle': 'center', 'end': 'right'}
CODES = {'M': mpath.Path.MOVETO, 'L': mpath.Path.LINETO, 'C': mpath.Path.CURVE4}


def figure(layout, scale=2.0):
  """A matplotlib figure of a diagram.Layout: one layout pixel is one point, y grows downwards."""
  fig = plt.figure(figsize=(layout.width / 72, layout.height / 72), dpi=72 * scale)
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_xlim(0, layout.width)
  ax.set_ylim(layout.height, 0)
  ax.axis('off')
  for item in layout.items:
    for shape in item.shapes:
      draw(ax, shape)
  return fig


def draw(ax, shape):
  if isinstance(shape, diagram.Rect):
    box = patches.FancyBboxPatch(
      (shape.x, shape.y),
      shape.w,
      shape.h,
      'round,pad=0,rounding_size=3',
      facecolor=shape.fill,
      edgecolor=diagram.LINE,
      linewidth=1,
    )
    ax.add_patch(box)
  elif isinstance(shape, diagram.Polygon):
    ax.add_patch(patches.Polygon(shape.points, closed=True, facecolor=shape.fill, edgecolor='none'))
  elif isinstance(shape, diagram.Label):
    ax.text(
      shape.x,
      shape.y,
      shape.text,
      fontsize=shape.size,
      ha=ANCHORS[shape.anchor],
      va='center_baseline',
      color=shape.fill,
      fontweight='bold' if shape.bold else 'normal',
      family='DejaVu Sans',
    )
  else:
    vertices, codes = [], []
    for command in shape.commands:
      vertices += command[1:]
      codes += [CODES[command[0]]] * (len(command) - 1)
    style = (0, diagram.DOTS) if shape.dashed else '-'
    ax.add_patch(
      patches.PathPatch(
        mpath.Path(vertices, codes),
        facecolor='none',
        edgecolor=shape.stroke,
        linewidth=shape.width,
        linestyle=style,
      )
    )


def main():
  columns = []
  for name, title in COLUMNS:
    config = defaults.load_file(ROOT / 'configs' / f'{name}.py')
    columns.append(diagram.layout(complexity.walk(config), collapse=False, title=title))
  layout = diagram.hstack(columns, gap=24)
  out = ROOT / 'experiments' / 'results'
  out.mkdir(parents=True, exist_ok=True)
  (out / 'fig3.svg').write_text(diagram.to_svg(layout))
  fig = figure(layout)
  fig.savefig(out / 'fig3.png', facecolor='white')
  print(f'wrote {out / "fig3.svg"} and {out / "fig3.png"}')


if __name__ == '__main__':
  main()
