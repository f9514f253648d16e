"""Training-step throughput of this codebase against its PyTorch twin (experiments/torch_twin.py), same run.

  python experiments/benchmark.py --grid=cifar20:128:float32,imagenet50:32:float32 --steps=10 --window_s=60

A grid entry is MODEL:BATCH:DTYPE[:IMAGE_SIZE]: MODEL is cifar<6n+2> (option A, 32x32) or
imagenet<18|34|50|101|152> (option B, 224x224); DTYPE float32 or bfloat16 (ours: bf16 compute, f32 params;
PyTorch: bf16 autocast, GPU only). Ours runs the real training step (train.compile_steps) on a 1-device mesh
(`--all_devices`: every local device, the batch split over them); PyTorch runs eager and torch.compile'd,
plus channels_last on GPU, with the same SGD (momentum 0.9, weight decay 1e-4 on kernels only) and
cross-entropy. Synthetic data sits on the device before timing; compilation is in the untimed warm-up.
The frameworks take turns window by window (`--repeats` windows each, the median reported), so a change in
the load of a shared host falls on all of them alike.
Writes experiments/results/benchmarks.md (`--out`), replacing the section of the same device.
"""

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import re
import shlex
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


import flax
import jax
import numpy as np

from resnet_jax import complexity, defaults, models, optim, parallel, train

RESULTS = ROOT / 'experiments' / 'results' / 'benchmarks.md'
# Dense peak FLOP/s by device name (first matching substring wins) and our dtype, from the vendors' datasheets
# (NVIDIA H100/H200/A100 datasheets, without sparsity; Google Cloud TPU v4/v5e/v5p/v6e pages). 'float32' is
# the rate float32 convs run at by default: TF32 tensor cores on NVIDIA (XLA's default precision and cuDNN's
# allow_tf32 both use them; strict FP32 would be H100 SXM 67e12, A100 19.5e12), one bf16 pass on TPU.
PEAKS = (
  ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
  ('H100', {'bfloat16': 989e12, 'float32': 494e12}),  # SXM
  ('H200', {'bfloat16': 989e12, 'float32': 494e12}),  # SXM: the H100's compute
  ('A100', {'bfloat16': 312e12, 'float32': 156e12}),
  ('TPU v4', {'bfloat16': 275e12, 'float32': 275e12}),
  ('TPU v5 lite', {'bfloat16': 197e12, 'float32': 197e12}),  # v5e
  ('TPU v5', {'bfloat16': 459e12, 'float32': 459e12}),  # v5p
  ('TPU v6 lite', {'bfloat16': 918e12, 'float32': 918e12}),  # v6e
)
COLUMNS = (
  'framework',
  'mode',
  'model',
  'batch',
  'dtype',
  'params',
  'ms/step',
  'images/s',
  'TFLOP/s',
  'MFU',
  'timed steps',
)
HEADER = """# Training-step throughput: resnet_jax against its PyTorch twin

Written by `python experiments/benchmark.py` (never by hand). One section per device: a new run on the same
device replaces that device's section, a run on another device appends one. The twin
(`experiments/torch_twin.py`) is the same network: tests/test_benchmark.py checks equal parameter counts and
equal logits with our weights loaded.

ms/step: the median over timed windows of the mean step time (after an untimed warm-up that compiles),
synthetic data already on the device; timed steps: windows x steps per window. TFLOP/s: 6 x forward
multiply-adds per image (complexity.count: training is ~3x the forward pass, 2 FLOPs per multiply-add) x
images/s. MFU: that over the device's datasheet peak for the dtype (float32: TF32 tensor cores on NVIDIA,
which both frameworks use by default); n/a without a known peak (CPUs) unless `--peak_tflops` is given.
PyTorch on CPU runs with OMP_WAIT_POLICY=PASSIVE unless the environment sets it: OpenMP's spinning threads
made the twin's steps up to 15x slower on a host shared with other jobs.
"""


@dataclasses.dataclass(frozen=True)
class Spec:
  family: str
  depth: int
  batch: int
  dtype: str
  image_size: int

  @property
  def name(self):
    return f'ResNet-{self.depth} ({self.image_size}x{self.image_size})'


def parse_grid(text):
  """'cifar20:128:float32,imagenet50:32:float32[:224]' -> [Spec]."""
  specs = []
  for entry in filter(None, (e.strip() for e in text.split(','))):
    fields = entry.split(':')
    match = re.fullmatch(r'(cifar|imagenet)(\d+)', fields[0])
    if (
      not match
      or len(fields) not in (3, 4)
      or not all(f.isdigit() for f in fields[1:2] + fields[3:])
    ):
      raise ValueError(
        f'bad grid entry {entry!r}: use MODEL:BATCH:DTYPE[:IMAGE_SIZE], e.g. cifar20:128:float32'
      )
    if fields[2] not in ('float32', 'bfloat16'):
      raise ValueError(f'bad dtype {fields[2]!r} in {entry!r}: use float32 or bfloat16')
    family = match.group(1)
    size = int(fields[3]) if len(fields) == 4 else (32 if family == 'cifar' else 224)
    specs.append(Spec(family, int(match.group(2)), int(fields[1]), fields[2], size))
  return specs


def parse_model_overrides(text):
  """'scan_blocks=True,conv_grads=xla' -> {'scan_blocks': True, 'conv_grads': 'xla'}."""
  overrides = {}
  for entry in filter(None, (e.strip() for e in text.split(','))):
    field, sep, value = entry.partition('=')
    if not sep or field not in defaults.get_config().model:
      raise ValueError(f'bad --model entry {entry!r}: use FIELD=VALUE with a config.model field')
    overrides[field] = {'True': True, 'False': False}.get(
      value, int(value) if value.isdigit() else value
    )
  return overrides


def make_config(spec):
  """The experiment config of `spec`: the paper's recipe with SGD in PyTorch's form (as the twin's)."""
  config = defaults.get_config() if spec.family == 'cifar' else defaults.get_imagenet_config()
  config.model.depth = spec.depth
  config.model.dtype = spec.dtype
  config.data.image_size = spec.image_size
  config.train.batch_size = spec.batch
  # same cost as 'caffe'; the update torch.optim.SGD makes
  config.optimizer.momentum_style = 'pytorch'
  config.optimizer.weight_decay_on = 'kernels'  # the twin's two parameter groups
  models.create(config.model)  # a bad depth fails here, before any timing
  return config


def peak_flops(device_name, dtype, override_tflops=None):
  if override_tflops:
    return override_tflops * 1e12
  for key, peaks in PEAKS:
    if key.lower() in device_name.lower():
      return peaks.get(dtype)
  return None


@dataclasses.dataclass
class Runner:
  """One framework's training step for one grid entry, ready to time."""

  framework: str
  mode: str
  spec: Spec
  params: int
  device_name: str
  step: Any  # () -> None: one training step, dispatched
  sync: Any  # () -> None: waits for the steps dispatched so far
  compiles_first: bool = False  # torch.compile: the first step compiles and may fail
  hlo: Any = None  # () -> str: the compiled step's HLO text (ours), for experiments/cpu_profile.py


class Skipped(Exception):
  """A configuration that does not run here; the message says why."""


def first_step(runner):
  """The first step, untimed: it compiles (a failing torch.compile becomes Skipped)."""
  try:
    runner.step()
    runner.sync()
  except Exception as e:  # inductor needs a working compiler toolchain
    if not runner.compiles_first:
      raise
    raise Skipped(
      f'torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}'
    ) from e


def warm_up(runner, warmup):
  """Runs `warmup` more untimed steps; returns the last one's seconds (None without any)."""
  last = None
  for _ in range(warmup):
    start = time.perf_counter()
    runner.step()
    runner.sync()
    last = time.perf_counter() - start
  return last


LOAD = []  # the host's 1-minute load average at the start of every timed window


def time_window(runner, steps):
  LOAD.append(os.getloadavg()[0])
  start = time.perf_counter()
  for _ in range(steps):
    runner.step()
  runner.sync()
  return (time.perf_counter() - start) / steps


def measure(runners, steps, warmup, repeats, window_s=0.0):
  """{runner index: (median, per window) seconds per step, steps per window}, after each runner's first_step
  and `warmup` more steps.

  The runners take turns window by window, so a change in the host's load falls on all of them alike. With
  `window_s`, a window takes fewer than `steps` steps (at least one) where the last warm-up step says
  `steps` would take longer: a ResNet-50 step takes about a minute on a small CPU.
  """
  counts = {}
  for i, runner in enumerate(runners):
    last = warm_up(runner, warmup)
    counts[i] = max(1, min(steps, round(window_s / last))) if window_s and last else steps
  windows = {i: [] for i in counts}
  for _ in range(repeats):
    for i in counts:
      windows[i].append(time_window(runners[i], counts[i]))
  return {i: (statistics.median(w), w, counts[i]) for i, w in windows.items()}


def make_row(runner, macs, timing, override_tflops=None):
  seconds, windows, steps = timing
  spec = runner.spec
  images_per_s = spec.batch / seconds
  flops_per_image = 6 * macs
  peak = peak_flops(runner.device_name, spec.dtype, override_tflops)
  return {
    'framework': runner.framework,
    'mode': runner.mode,
    'model': spec.name,
    'batch': spec.batch,
    'dtype': spec.dtype,
    'params': runner.params,
    'ms_per_step': 1e3 * seconds,
    'images_per_s': images_per_s,
    'train_flops_per_image': flops_per_image,
    'flops_per_s': flops_per_image * images_per_s,
    'mfu': flops_per_image * images_per_s / peak if peak else None,
    'peak_flops': peak,
    'window_ms': [1e3 * w for w in windows],
    'timed': f'{len(windows)} x {steps}',
    'device': runner.device_name,
  }


def jax_device_name(devices):
  kind = devices[0].device_kind
  return cpu_name() if devices[0].platform == 'cpu' else kind


def cpu_name():
  try:
    with open('/proc/cpuinfo') as f:
      names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
  except OSError:
    names = []
  return f'CPU: {names[0] if names else platform.processor() or platform.machine()}'


def jax_runner(spec, all_devices=False, activations='auto', model_overrides=None):
  """Our real training step (train.compile_steps) on one local device, or on all of them."""
  config = make_config(spec)
  config.model.activations = activations
  config.model.update(model_overrides or {})
  devices = jax.local_devices() if all_devices else jax.local_devices()[:1]
  if spec.batch % len(devices):
    raise ValueError(f'batch {spec.batch} does not split over {len(devices)} devices')
  mesh = parallel.make_mesh(devices)
  model = models.create(config.model, bn_axis_name=parallel.AXIS)
  tx = optim.create(config.optimizer)
  state = jax.device_put(
    train.create_train_state(config, model, tx, jax.random.key(0)), parallel.replicated(mesh)
  )
  train_fn, _ = train.compile_steps(config, model, tx, mesh)
  rng = np.random.default_rng(0)
  batch = jax.device_put(
    {
      'image': rng.standard_normal((spec.batch, spec.image_size, spec.image_size, 3), np.float32),
      'label': rng.integers(0, config.model.num_classes, spec.batch).astype(np.int32),
    },
    parallel.data_sharded(mesh),
  )
  holder = [state]

  def step():
    holder[0], _ = train_fn(holder[0], batch)

  _, params, _ = complexity.count(config)
  return Runner(
    'JAX (ours)',
    f'jit, {len(devices)} device{"s" if len(devices) > 1 else ""}'
    + ''.join(f', {k}={v}' for k, v in (model_overrides or {}).items()),
    spec,
    params,
    jax_device_name(devices),
    step,
    lambda: jax.block_until_ready(holder[0]),
    hlo=lambda: train_fn.lower(holder[0], batch).compile().as_text(),
  )


TORCH_MODES = ('eager', 'compile', 'eager, channels_last', 'compile, channels_last')


def torch_modes(device):
  modes = ['eager', 'compile']
  return modes + [f'{m}, channels_last' for m in modes] if device.type == 'cuda' else modes


def torch_device_name(device):
  import torch

  return torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()


def torch_runner(spec, mode, device=None):
  """The twin's training step: SGD as ours (decay on conv/fc weights only), cross-entropy, train-mode BN."""
  import torch
  import torch.nn.functional as F

  from experiments import torch_twin

  device = device or torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if mode not in TORCH_MODES:
    raise ValueError(f'unknown PyTorch mode {mode!r}')
  amp = spec.dtype == 'bfloat16'
  if amp and device.type != 'cuda':
    raise Skipped('bf16 autocast is benchmarked on GPU only')
  config = make_config(spec)
  torch.manual_seed(0)
  net = torch_twin.build(config.model).to(device).train()
  memory_format = torch.channels_last if 'channels_last' in mode else torch.contiguous_format
  net = net.to(memory_format=memory_format)
  opt_config = config.optimizer
  groups = [
    {
      'params': [p for p in net.parameters() if p.ndim > 1],
      'weight_decay': opt_config.weight_decay,
    },
    {'params': [p for p in net.parameters() if p.ndim <= 1], 'weight_decay': 0.0},
  ]
  opt = torch.optim.SGD(groups, lr=opt_config.learning_rate, momentum=opt_config.momentum)
  compiled = mode.startswith('compile')
  forward = torch.compile(net) if compiled else net
  x = torch.randn(spec.batch, 3, spec.image_size, spec.image_size, device=device).contiguous(
    memory_format=memory_format
  )
  y = torch.randint(0, config.model.num_classes, (spec.batch,), device=device)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
      loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt.step()

  sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
  return Runner(
    'PyTorch (twin)',
    mode,
    spec,
    torch_twin.num_params(net),
    torch_device_name(device),
    step,
    sync,
    compiles_first=compiled,
  )


def bench(runner, steps, warmup, repeats=1, window_s=0.0, override_tflops=None):
  """One runner's row (main times several in turns)."""
  first_step(runner)
  (timing,) = measure([runner], steps, warmup, repeats, window_s).values()
  return make_row(runner, complexity.count(make_config(runner.spec))[2], timing, override_tflops)


def _mfu(row):
  return 'n/a' if row['mfu'] is None else f'{100 * row["mfu"]:.1f}%'


def table(rows):
  align = ('---', '---', '---', '---:', '---', '---:', '---:', '---:', '---:', '---:', '---:')
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '|'.join(align) + '|']
  for r in rows:
    lines.append(
      f'| {r["framework"]} | {r["mode"]} | {r["model"]} | {r["batch"]} | {r["dtype"]} | '
      f'{r["params"]:,} | {r["ms_per_step"]:.1f} | {r["images_per_s"]:.1f} | '
      f'{r["flops_per_s"] / 1e12:.3g} | {_mfu(r)} | {r["timed"]} |'
    )
  return lines


def versions():
  out = {'jax': jax.__version__, 'flax': flax.__version__, 'numpy': np.__version__}
  try:
    import torch

    out['torch'] = torch.__version__
  except ImportError:
    out['torch'] = 'not installed'
  out['python'] = platform.python_version()
  return out


def section(device, rows, notes, command, load_before, load_after, load_during=()):
  """The markdown section of one run; its heading names the device, which `write` matches on."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  torch = sys.modules.get('torch')
  torch_threads = (
    f', PyTorch uses {torch.get_num_threads()} threads with OMP_WAIT_POLICY='
    f'{os.environ.get("OMP_WAIT_POLICY", "unset")}'
    if torch
    else ''
  )
  during = f'{min(load_during):.2f} to {max(load_during):.2f}' if load_during else 'n/a'
  peaks = sorted(
    {f'{r["dtype"]} {r["peak_flops"] / 1e12:g} TFLOP/s' for r in rows if r['peak_flops']}
  )
  lines = [
    f'## {device}',
    '',
    f'- date: {datetime.datetime.now().astimezone().isoformat(timespec="seconds")}',
    f'- device: {device}; JAX backend {jax.default_backend()}, '
    f'{jax.local_device_count()} local device(s)',
    f'- host: {os.cpu_count()} CPU cores ({cores} usable){torch_threads}; load average (1 min) '
    f'{load_before:.2f} before, {during} while timing, {load_after:.2f} after',
    '- versions: ' + ', '.join(f'{k} {v}' for k, v in versions().items()),
    f'- command: `{command}`',
    f'- peak used for MFU: {", ".join(peaks) if peaks else "none known (n/a)"}',
    '',
  ]
  lines += table(rows)
  if notes:
    lines += [''] + [f'- {n}' for n in notes]
  return '\n'.join(lines) + '\n'


def write(path, device, text):
  """Replaces the section headed `## {device}` in `path`, or appends it; the header stays on top."""
  path = pathlib.Path(path)
  old = path.read_text() if path.exists() else HEADER
  parts = re.split(r'(?m)^(?=## )', old)
  head, sections = parts[0], parts[1:]
  heading = f'## {device}\n'
  sections = [s if not s.startswith(heading) else None for s in sections]
  if None in sections:
    sections[sections.index(None)] = text
    sections = [s for s in sections if s is not None]
  else:
    sections.append(text)
  sections = [s.rstrip('\n') + '\n\n' for s in sections]
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(head.rstrip('\n') + '\n\n' + ''.join(sections).rstrip('\n') + '\n')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--grid',
    default='cifar20:128:float32,imagenet50:32:float32',
    help='MODEL:BATCH:DTYPE[:IMAGE_SIZE] entries, comma-separated',
  )
  parser.add_argument('--steps', type=int, default=10, help='timed steps per window')
  parser.add_argument(
    '--warmup', type=int, default=2, help='untimed steps after the first (compiling) one'
  )
  parser.add_argument(
    '--repeats', type=int, default=3, help='timed windows; the median is reported'
  )
  parser.add_argument(
    '--window_s',
    type=float,
    default=0.0,
    help='>0: fewer steps per window where --steps would take longer than this',
  )
  parser.add_argument('--frameworks', default='jax,torch', help='jax, torch or both')
  parser.add_argument(
    '--torch_modes',
    default='',
    help='";"-separated, among: '
    + '; '.join(TORCH_MODES)
    + ' (default: eager and compile, plus their channels_last forms on GPU)',
  )
  parser.add_argument(
    '--all_devices', action='store_true', help='ours on every local device, not one'
  )
  parser.add_argument(
    '--peak_tflops', type=float, help='peak TFLOP/s for MFU (default: the datasheet table)'
  )
  parser.add_argument(
    '--activations', default='auto', help='our model.activations: auto, fused or materialized'
  )
  parser.add_argument(
    '--model',
    default='',
    help='more config.model fields for ours, FIELD=VALUE[,...], e.g. scan_blocks=True,conv_grads=xla',
  )
  parser.add_argument('--out', default=str(RESULTS), help='the markdown file to update')
  args = parser.parse_args(argv)
  try:
    specs = parse_grid(args.grid)
    model_overrides = parse_model_overrides(args.model)
    for spec in specs:
      config = make_config(spec)
      config.model.update(model_overrides)
      models.create(config.model)  # a bad override fails here, before any timing
  except ValueError as e:
    parser.error(str(e))
  frameworks = {f.strip() for f in args.frameworks.split(',') if f.strip()}
  if not frameworks or frameworks - {'jax', 'torch'}:
    parser.error(f'--frameworks takes jax and/or torch, got {args.frameworks!r}')
  device = jax_device_name(jax.local_devices())
  torch_device = None
  if 'torch' in frameworks:
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # before torch loads OpenMP: see HEADER
    try:
      import torch
    except ImportError:
      parser.error("--frameworks=torch needs PyTorch: pip install -e '.[torch]'")
    torch_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    modes = [m.strip() for m in args.torch_modes.split(';') if m.strip()] or torch_modes(
      torch_device
    )
    if set(modes) - set(TORCH_MODES):
      parser.error(
        f'--torch_modes takes modes among {"; ".join(TORCH_MODES)}, got {args.torch_modes!r}'
      )
    print(
      f'PyTorch {torch.__version__} on {torch_device_name(torch_device)}, '
      f'{torch.get_num_threads()} threads'
    )
    if frameworks == {'torch'}:
      device = torch_device_name(torch_device)
    elif torch_device_name(torch_device) != device:
      print(f'warning: ours runs on {device}, the twin on {torch_device_name(torch_device)}')
  load_before = os.getloadavg()[0]
  LOAD.clear()
  print(f'{device}; load average (1 min) {load_before:.2f}')
  rows, notes = [], []
  for spec in specs:
    config = make_config(spec)
    _, ours_params, macs = complexity.count(config)
    counts = f'{spec.name}: {ours_params:,} params (ours)'
    if 'torch' in frameworks:
      from experiments import torch_twin

      twin_params = torch_twin.num_params(torch_twin.build(config.model))
      counts += f', {twin_params:,} (twin){"" if twin_params == ours_params else "  MISMATCH"}'
    print(f'{counts}; {macs / 1e9:.3f} G forward multiply-adds per image')
    runners = []
    if 'jax' in frameworks:
      runners.append(jax_runner(spec, args.all_devices, args.activations, model_overrides))
    for mode in modes if 'torch' in frameworks else []:
      try:
        runners.append(torch_runner(spec, mode, torch_device))
      except Skipped as e:
        print(f'skipped PyTorch {mode}, {spec.name}, batch {spec.batch}, {spec.dtype}: {e}')
        notes.append(f'skipped PyTorch {mode}, {spec.name}, batch {spec.batch}, {spec.dtype}: {e}')
    ready = []
    for runner in runners:  # compiles; a failing torch.compile drops out alone
      try:
        first_step(runner)
        ready.append(runner)
      except Skipped as e:
        print(f'skipped PyTorch {runner.mode}, {spec.name}: {e}')
        notes.append(
          f'skipped PyTorch {runner.mode}, {spec.name}, batch {spec.batch}, {spec.dtype}: {e}'
        )
    for i, timing in measure(ready, args.steps, args.warmup, args.repeats, args.window_s).items():
      row = make_row(ready[i], macs, timing, args.peak_tflops)
      rows.append(row)
      print(
        f'{row["framework"]} {row["mode"]}, {spec.name} batch {spec.batch} {spec.dtype}: '
        f'{row["ms_per_step"]:.1f} ms/step, {row["images_per_s"]:.1f} images/s, MFU {_mfu(row)} '
        f'({row["timed"]} steps, windows {", ".join(f"{w:.0f}" for w in row["window_ms"])} ms/step)',
        flush=True,
      )
  load_after = os.getloadavg()[0]
  command = 'python experiments/benchmark.py ' + ' '.join(shlex.quote(a) for a in argv)
  if args.all_devices:
    notes.append(
      f'ours split each batch over all {jax.local_device_count()} local devices (sync BN).'
    )
  text = section(device, rows, notes, command, load_before, load_after, LOAD)
  print('\n' + text)
  write(args.out, device, text)
  print(f'wrote {args.out}')
  return rows


if __name__ == '__main__':
  main()
