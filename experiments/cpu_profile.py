"""Where a training step's time goes on the CPU: our step (per XLA op) against the PyTorch twin (per aten op).

  python experiments/cpu_profile.py --grid=cifar20:128:float32 --steps=3

Ours: the real step (train.compile_steps, 1 device, as experiments/benchmark.py builds it) traced with
jax.profiler; XLA:CPU records one event per executed HLO thunk, and each is put in a category from the
compiled HLO: convolutions split into forward, input gradient (a transposed conv whose window is the kernel)
and filter gradient (a conv whose window is the activation, larger than its kernel-sized output), the layout
copies XLA inserts around them, BatchNorm (forward, backward), the optimizer and the rest. The twin: the
same with torch.profiler over aten ops (its convolution backward computes both gradients in one op).
Times are summed over the threads that ran the ops, per step; on a loaded host compare shares, not
absolute figures. Prints markdown tables.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from experiments import benchmark  # noqa: E402

CATEGORIES = (
  'conv forward',
  'conv input gradient',
  'conv filter gradient',
  'conv (both gradients)',
  'layout copies/transposes',  # ours: with the BN/ReLU/residual recompute XLA fuses into them
  'BN forward',
  'BN backward',
  'ReLU/residual/pool/loss',
  'optimizer',
  'other',
)


def parse_hlo(text):
  """{computation name: [instruction lines]} and the ENTRY computation's name."""
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    head = re.match(r'^(ENTRY )?%?([\w.\-]+) .*\{$', line)
    if head and not line.startswith(' '):
      current = head.group(2)
      computations[current] = []
      if head.group(1):
        entry = current
    elif current and line.startswith('  '):
      computations[current].append(line.strip())
  return computations, entry


def _called(line, computations, depth=0):
  """The instruction line and every line of the computations it calls (fusions, nested)."""
  lines = [line]
  if depth > 3:
    return lines
  for name in re.findall(r'(?:calls|to_apply)=%?([\w.\-]+)', line):
    for sub in computations.get(name, []):
      lines.extend(_called(sub, computations, depth + 1))
  return lines


def _dims(shape_text):
  return [int(d) for d in shape_text.split(',') if d]


def classify_conv(line):
  window = re.search(r'window=\{size=([\dx]+)', line)
  shape = re.search(r'= f\w*\[([\d,]+)\]', line)
  labels = re.search(r'dim_labels=\w+_\w+->(\w+)', line)
  if window and shape and labels:
    size = 1
    for d in window.group(1).split('x'):
      size *= int(d)
    out = _dims(shape.group(1))
    spatial = 1
    for i, c in enumerate(labels.group(1)):
      if c.isdigit():
        spatial *= out[i]
    if size > spatial:  # the window is the activation: a filter gradient
      return 'conv filter gradient'
  return 'conv input gradient' if 'transpose(' in line else 'conv forward'


def classify(line, computations):
  """A category of CATEGORIES for one top-level HLO instruction."""
  lines = _called(line, computations)
  convs = [x for x in lines if ' convolution(' in x]
  if convs:
    return classify_conv(convs[0])
  body = ' '.join(lines)
  names = re.findall(r'op_name="([^"]*)"', body)
  opcode = re.search(r'= \S+ ([\w\-]+)\(', line)
  opcode = opcode.group(1) if opcode else ''
  if opcode in ('copy', 'transpose') or re.match(r'(ROOT )?%?[\w.]*(transpose|copy)', line):
    return 'layout copies/transposes'
  if any(re.search(r'(^|/)(\w*bn\d?)/', n) for n in names):
    backward = any('transpose(' in n for n in names if re.search(r'bn\d?/', n))
    return 'BN backward' if backward else 'BN forward'
  if names and all('ResNet' not in n for n in names):
    return 'optimizer'
  if names:
    return 'ReLU/residual/pool/loss'
  return 'other'


def profile_jax(spec, steps, activations='auto'):
  runner = benchmark.jax_runner(spec, activations=activations)
  for _ in range(2):
    runner.step()
  runner.sync()
  text = runner.hlo()
  computations, entry = parse_hlo(text)
  categories = {}
  for line in computations[entry]:
    name = re.match(r'(?:ROOT )?%?([\w.\-]+) =', line)
    if name:
      categories[name.group(1)] = classify(line, computations)
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    for _ in range(steps):
      runner.step()
    runner.sync()
    jax.profiler.stop_trace()
    path = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
  totals = collections.Counter()
  ops = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get('hlo_op')
        if op is None or 'jit_step' not in str(stats.get('hlo_module', '')):
          continue
        seconds = event.duration_ns / 1e9 / steps
        totals[categories.get(op, 'other')] += seconds
        ops[op] += seconds
  return totals, ops, categories


def torch_category(name, in_optimizer):
  if in_optimizer:
    return 'optimizer'
  lower = name.lower()
  if 'convolution_backward' in lower or 'conv2d_backward' in lower:
    return 'conv (both gradients)'
  if 'conv' in lower:
    return 'conv forward'
  if 'batch_norm' in lower and 'backward' in lower:
    return 'BN backward'
  if 'batch_norm' in lower:
    return 'BN forward'
  if re.search(r'relu|threshold|add|pool|mean|softmax|nll|cross_entropy|addmm|mm\b|linear', lower):
    return 'ReLU/residual/pool/loss'
  if re.search(r'copy|contiguous|clone|to_mkldnn|reorder', lower):
    return 'layout copies/transposes'
  return 'other'


def profile_torch(spec, steps):
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  import torch
  from torch.profiler import ProfilerActivity, profile

  runner = benchmark.torch_runner(spec, 'eager', torch.device('cpu'))
  for _ in range(2):
    runner.step()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      runner.step()
  events = prof.events()
  ranges = [
    (e.time_range.start, e.time_range.end) for e in events if e.name.startswith('Optimizer.step')
  ]
  totals = collections.Counter()
  ops = collections.Counter()
  for e in events:
    if e.name.startswith(('Optimizer.', 'ProfilerStep', '##')):
      continue
    start = e.time_range.start
    inside = any(a <= start < b for a, b in ranges)
    seconds = e.self_cpu_time_total / 1e6 / steps
    totals[torch_category(e.name, inside)] += seconds
    ops[e.name] += seconds
  return totals, ops, torch.__version__


def table(columns):
  """Markdown: one row per category, ms/step and share for each (name, totals) column."""
  header = '| category | ' + ' | '.join(f'{name} ms/step | share' for name, _ in columns) + ' |'
  lines = [header, '|---|' + '---:|---:|' * len(columns)]
  sums = [sum(t.values()) for _, t in columns]
  for category in CATEGORIES:
    if not any(t.get(category) for _, t in columns):
      continue
    cells = []
    for (_, t), total in zip(columns, sums):
      value = t.get(category, 0.0)
      cells.append(f'{1e3 * value:.1f} | {100 * value / total:.0f}%')
    lines.append(f'| {category} | ' + ' | '.join(cells) + ' |')
  lines.append(
    '| **total (summed over threads)** | '
    + ' | '.join(f'**{1e3 * s:.1f}** | 100%' for s in sums)
    + ' |'
  )
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--grid', default='cifar20:128:float32')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=12, help='also list the slowest ops')
  parser.add_argument('--no_torch', action='store_true')
  parser.add_argument(
    '--activations',
    default='fused,materialized',
    help='our model.activations, one column each (auto, fused, materialized)',
  )
  args = parser.parse_args(argv)
  for spec in benchmark.parse_grid(args.grid):
    columns = []
    for activations in args.activations.split(','):
      jax_totals, jax_ops, categories = profile_jax(spec, args.steps, activations)
      columns.append((f'ours, {activations}', jax_totals))
    torch_ops = None
    if not args.no_torch:
      torch_totals, torch_ops, _ = profile_torch(spec, args.steps)
      columns.append(('PyTorch eager', torch_totals))
    print(f'\n### {spec.name}, batch {spec.batch}, {spec.dtype}, {args.steps} profiled steps\n')
    print(table(columns))
    print(f'\nOurs ({args.activations.split(",")[-1]}), slowest HLO ops (ms/step):')
    for op, seconds in jax_ops.most_common(args.top):
      print(f'- {op} ({categories.get(op, "other")}): {1e3 * seconds:.1f}')
    if torch_ops:
      print('\nPyTorch, slowest aten ops (self ms/step): ')
      for op, seconds in torch_ops.most_common(args.top):
        print(f'- {op}: {1e3 * seconds:.1f}')


if __name__ == '__main__':
  main()
