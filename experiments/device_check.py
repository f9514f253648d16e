"""One command for a session lent an accelerator: what the machine is, how fast our step runs against the
PyTorch twin, how long a big network takes to start, the full CIFAR ResNet-20 schedule (resumable), and
how fast the host decodes ImageNet-shaped input.

  python experiments/device_check.py --prepare .carry/device        # here: wheels and data, < 64 MiB
  python experiments/device_check.py --data=.carry/device --out=$OUT  # there (experiments/README.md)
  python experiments/device_check.py --dry-run --out=/tmp/check       # every stage, tiny, on the CPU

Stages (`--stages`, in this order): env (versions, devices, memory); bench (experiments/benchmark.py's grid:
ours against the twin eager and torch.compile'd, images/s and MFU); start (time to first step of
ResNet-50, ResNet-152 and CIFAR ResNet-1202, each in a fresh process); train (configs/cifar10_20.py's
whole schedule on the CIFAR JPEG copy through train.train_and_evaluate, float32, data on the device; a
run out of time saves a checkpoint and the same command resumes it); input (ImageNet-shaped decoding of
the 100 sample JPEGs, repeated: PIL in worker processes, and the project's tf.data pipeline when
TensorFlow is importable, which it is not on the device machine).

Each stage runs in its own process with its own time budget (`--budget STAGE=SECONDS`): a stage stops
before its budget where it can, is stopped at it where it cannot, and reports what it measured so far.
Everything goes to --out: device_check.json, device_check.md (the tables, ready to commit) and
device_check.log; the train stage adds its workdir as cifar10_20_workdir.tar.gz (`--train_resume` takes
it back on a fresh machine).
"""

import argparse
import datetime
import importlib.util
import io
import json
import os
import pathlib
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

STAGES = ('env', 'bench', 'start', 'train', 'input')
# Seconds per stage: together under the device machine's 10-minute command, with room for starting.
BUDGETS = {'env': 30, 'bench': 200, 'start': 150, 'train': 130, 'input': 30}
DRY_BUDGETS = {'env': 60, 'bench': 120, 'start': 120, 'train': 180, 'input': 60}
GRID = (
  'cifar20:128:float32,cifar20:128:bfloat16,cifar56:128:float32,cifar110:128:float32,'
  'imagenet50:256:bfloat16,imagenet50:256:float32'
)
START_MODELS = 'imagenet50,imagenet152,cifar1202'
CIFAR_TAR = 'cifar10-jpg.tar.gz'
IMAGENET_TAR = 'imagenet-sample-100.tar.gz'
WHEELS = (
  'ml_collections',
  'clu',
)  # pure Python; the device machine has the rest (absl, etils, flax...)
GRACE_S = 45  # after a budget: time to save a checkpoint before the stage is killed
PREPARE_LIMIT = 64 * 2**20


# ----------------------------------------------------------------------------------- shared helpers


def _write_json(path, value):
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2, default=str)
  os.replace(tmp, path)


class Report:
  """A stage's results, rewritten after every measurement so that a stage stopped at its budget keeps
  what it measured."""

  def __init__(self, path, stage):
    self.path, self.data = path, {'stage': stage, 'results': [], 'notes': [], 'markdown': ''}

  def add(self, row=None, note=None, markdown=None, **fields):
    if row is not None:
      self.data['results'].append(row)
    if note:
      self.data['notes'].append(note)
      print(note, flush=True)
    if markdown is not None:
      self.data['markdown'] = markdown
    self.data.update(fields)
    _write_json(self.path, self.data)


def _md_table(columns, rows):
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '|'.join('---' for _ in columns) + '|']
  lines += ['| ' + ' | '.join(str(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def _importable(name):
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):  # a module set to None in sys.modules counts as absent
    return False


def _load_config(path):
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_config(model):
  """'imagenet50' or 'cifar1202' -> the config of configs/ for it, else the defaults at that depth."""
  from resnet_jax import defaults

  family, depth = ('cifar', model[5:]) if model.startswith('cifar') else ('imagenet', model[8:])
  if not depth.isdigit() or not model.startswith(('cifar', 'imagenet')):
    raise ValueError(f'bad model {model!r}: use cifar<6n+2> or imagenet<18|34|50|101|152>')
  name = f'cifar10_{depth}.py' if family == 'cifar' else f'imagenet_resnet{depth}.py'
  if (ROOT / 'configs' / name).exists():
    return _load_config(ROOT / 'configs' / name)
  config = defaults.get_config() if family == 'cifar' else defaults.get_imagenet_config()
  config.model.depth = int(depth)
  return config


# ----------------------------------------------------------------------------------- stage: env


def stage_env(args, report):
  """Versions, devices and memory; nvidia-smi's view where there is one."""
  import jax

  info = {
    'python': platform.python_version(),
    'host': platform.node(),
    'cpu_cores': len(os.sched_getaffinity(0)),
    'load_average_1min': os.getloadavg()[0],
    'jax': jax.__version__,
    'jaxlib': getattr(jax.lib, '__version__', None) or _version('jaxlib'),
    'backend': jax.default_backend(),
    'devices': [f'{d.platform}:{d.device_kind}' for d in jax.devices()],
    'importable': {
      m: _importable(m)
      for m in ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections', 'torch')
    },
  }
  for name in ('flax', 'optax', 'orbax-checkpoint', 'numpy', 'torch', 'clu', 'ml_collections'):
    info[f'version_{name}'] = _version(name)
  with open('/proc/meminfo') as f:
    info['host_memory_gib'] = int(f.readline().split()[1]) / 2**20
  stats = jax.devices()[0].memory_stats() or {}
  info['device_memory_limit_gib'] = stats.get('bytes_limit', 0) / 2**30 or None
  if shutil.which('nvidia-smi'):
    query = 'name,driver_version,memory.total,clocks.max.sm'
    out = subprocess.run(
      ['nvidia-smi', f'--query-gpu={query}', '--format=csv,noheader'],
      capture_output=True,
      text=True,
      timeout=30,
    )
    info['nvidia_smi'] = out.stdout.strip()
    head = subprocess.run(['nvidia-smi'], capture_output=True, text=True, timeout=30).stdout
    info['cuda_version'] = next(
      (
        line.split('CUDA Version:')[1].split()[0]
        for line in head.splitlines()
        if 'CUDA Version' in line
      ),
      None,
    )
  if info['importable']['torch']:
    import torch

    info['torch_cuda'] = torch.version.cuda
    info['torch_device'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'
  rows = [(k, v) for k, v in info.items()]
  report.add(markdown=_md_table(('field', 'value'), rows), env=info)


def _version(dist):
  import importlib.metadata

  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


# ----------------------------------------------------------------------------------- stage: bench


def stage_bench(args, report, deadline):
  """experiments/benchmark.py's grid, entry by entry, until the budget is spent."""
  from experiments import benchmark
  from resnet_jax import complexity

  specs = benchmark.parse_grid(args.grid)
  modes = [m.strip() for m in args.torch_modes.split(';') if m.strip()]
  torch_device = None
  if modes and _importable('torch'):
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    import torch

    torch_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  elif modes:
    report.add(note='PyTorch is not importable: ours only.')
  rows = []
  for spec in specs:
    left = deadline - time.time()
    label = f'{spec.name} batch {spec.batch} {spec.dtype}'
    if left < args.bench_min_s:
      report.add(note=f'out of time: {label} not measured ({left:.0f} s left).')
      continue
    _, _, macs = complexity.count(benchmark.make_config(spec))
    runners = [benchmark.jax_runner(spec)]
    for mode in modes if torch_device is not None else []:
      try:
        runners.append(benchmark.torch_runner(spec, mode, torch_device))
      except benchmark.Skipped as e:
        report.add(note=f'skipped PyTorch {mode}, {label}: {e}')
    ready = []
    for runner in runners:
      try:
        start = time.perf_counter()
        benchmark.first_step(runner)
        ready.append(runner)
        report.add(
          note=f'{runner.framework} {runner.mode}, {label}: first step (compiles) {time.perf_counter() - start:.1f} s'
        )
      except benchmark.Skipped as e:
        report.add(note=f'skipped PyTorch {runner.mode}, {label}: {e}')
    timings = benchmark.measure(
      ready, args.bench_steps, args.bench_warmup, args.bench_repeats, args.bench_window_s
    )
    for i, timing in timings.items():
      row = benchmark.make_row(ready[i], macs, timing)
      rows.append(row)
      print(
        f'{row["framework"]} {row["mode"]}, {label}: {row["images_per_s"]:.1f} images/s', flush=True
      )
    report.add(markdown='\n'.join(benchmark.table(rows)), results=rows)
    del runners, ready  # frees the device memory of this entry before the next


# ----------------------------------------------------------------------------------- stage: start


def start_one(model, batch, image_size, init):
  """Seconds from process start to the end of the first training step of `model` (in this process)."""
  launched = float(os.environ['DEVICE_CHECK_LAUNCHED'])
  import jax
  import jax.numpy as jnp
  import numpy as np

  from resnet_jax import models, optim, parallel, train

  imported = time.time()
  config = model_config(model)
  if batch:
    config.train.batch_size = batch
  if image_size:
    config.data.image_size = image_size
  mesh = parallel.make_mesh(jax.devices()[:1])
  net = models.create(config.model, bn_axis_name=parallel.AXIS)
  tx = optim.create(config.optimizer)
  key = jax.random.key(config.seed)
  size = config.data.image_size
  if init == 'eager':  # the previous path: model.init op by op
    variables = net.init(key, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    state = train.create_train_state(config, net, tx, key, variables)
  else:
    state = train.create_train_state(config, net, tx, key)
  state = jax.block_until_ready(jax.device_put(state, parallel.replicated(mesh)))
  initialised = time.time()
  train_fn, _ = train.compile_steps(config, net, tx, mesh)
  rng = np.random.default_rng(0)
  batch_arrays = jax.device_put(
    {
      'image': rng.standard_normal((config.train.batch_size, size, size, 3), np.float32),
      'label': rng.integers(0, config.model.num_classes, config.train.batch_size).astype(np.int32),
    },
    parallel.data_sharded(mesh),
  )
  state, metrics = train_fn(state, batch_arrays)
  jax.block_until_ready(metrics)
  first = time.time()
  state, metrics = train_fn(state, batch_arrays)
  jax.block_until_ready(metrics)
  second = time.time()
  return {
    'model': model,
    'init': init,
    'batch': config.train.batch_size,
    'image_size': size,
    'dtype': config.model.dtype,
    'device': jax.devices()[0].device_kind,
    'imports_s': imported - launched,
    'init_s': initialised - imported,
    'compile_and_first_step_s': first - initialised,
    'time_to_first_step_s': first - launched,
    'second_step_s': second - first,
    'loss_finite': bool(np.isfinite(float(metrics.compute()['loss']))),
  }


def stage_start(args, report, deadline):
  """start_one for each model and init, each in a fresh process (cold caches, imports counted)."""
  rows = []
  for entry in filter(None, args.start_models.split(',')):
    fields = entry.split(':')
    model_config(fields[0])  # a bad name fails here
    for init in args.start_init.split(','):
      left = deadline - time.time()
      if left < 5:
        report.add(note=f'out of time: {entry} ({init} init) not measured.')
        continue
      command = [sys.executable, __file__, '--_start_one', entry, '--_init', init]
      env = {**os.environ, 'DEVICE_CHECK_LAUNCHED': repr(time.time())}
      try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=left, env=env)
      except subprocess.TimeoutExpired:
        report.add(
          note=f'out of time: {entry} ({init} init) did not reach its first step in {left:.0f} s.'
        )
        continue
      if out.returncode:
        report.add(note=f'{entry} ({init} init) failed: {out.stderr.strip().splitlines()[-1:]}')
        continue
      row = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append(row)
      print(json.dumps(row), flush=True)
      table = [
        (
          r['model'],
          r['init'],
          r['batch'],
          r['image_size'],
          r['dtype'],
          f'{r["imports_s"]:.1f}',
          f'{r["init_s"]:.1f}',
          f'{r["compile_and_first_step_s"]:.1f}',
          f'{r["time_to_first_step_s"]:.1f}',
          f'{r["second_step_s"]:.2f}',
        )
        for r in rows
      ]
      columns = (
        'model',
        'init',
        'batch',
        'size',
        'dtype',
        'imports s',
        'init s',
        'compile + 1st step s',
        'time to first step s',
        '2nd step s',
      )
      report.add(markdown=_md_table(columns, table), results=rows)


# ----------------------------------------------------------------------------------- stage: train


def stage_train(args, report, deadline):
  """configs/cifar10_20.py's schedule through train.train_and_evaluate, stopped by SIGTERM at the budget
  (the loop's preemption path: a checkpoint, then Preempted), resumed by the same command."""
  import jax

  from resnet_jax import train
  from resnet_jax.workdir import Workdir

  config = _load_config(ROOT / 'configs' / 'cifar10_20.py')
  config.data.update(
    source='image_folder',
    image_folder=os.path.abspath(args.cifar),
    on_device=True,
    cache_dir=os.path.abspath(os.path.join(args.train_workdir, os.pardir, 'cache')),
  )
  config.model.dtype = 'float32'
  config.train.steps_per_dispatch = args.steps_per_dispatch
  if args.dry_run:
    config.model.depth = 8
    config.train.update(
      batch_size=8,
      eval_batch_size=16,
      num_steps=4,
      log_every_steps=2,
      eval_every_steps=2,
      checkpoint_every_steps=2,
      bn_stats_images=16,
    )
    config.optimizer.boundaries = (2, 3)
  workdir = os.path.abspath(args.train_workdir)
  if args.train_resume and not os.path.isdir(Workdir(workdir).checkpoints):
    os.makedirs(os.path.dirname(workdir), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(workdir)) as tmp:
      with tarfile.open(args.train_resume) as f:
        f.extractall(tmp, filter='data')
      (top,) = os.listdir(tmp)  # the archive holds one workdir
      shutil.rmtree(workdir, ignore_errors=True)
      os.replace(os.path.join(tmp, top), workdir)
    report.add(note=f'unpacked {args.train_resume} into {workdir}')
  signal.signal(signal.SIGTERM, _out_of_time)  # until the training loop's own handler takes over
  stop_at = deadline - args.train_save_s
  timer = threading.Timer(max(stop_at - time.time(), 0), os.kill, (os.getpid(), signal.SIGTERM))
  timer.daemon = True
  timer.start()
  status, results = 'finished', None
  start = time.time()
  try:
    results = train.train_and_evaluate(config, workdir)
  except train.Preempted as e:
    status = f'stopped at its budget: {e}'
  except OutOfTime:
    status = 'stopped at its budget outside the training loop (before it began, or in its final evaluation)'
  finally:
    timer.cancel()
  rows = _metrics(workdir)
  segments = (
    json.load(open(Workdir(workdir).segments)) if os.path.exists(Workdir(workdir).segments) else []
  )
  summary = {
    'train_status': status,
    'workdir': workdir,
    'device': jax.devices()[0].device_kind,
    'num_steps': config.train.num_steps,
    'step_reached': segments[-1]['end_step'] if segments else 0,
    'segments': segments,
    'this_command_s': time.time() - start,
    'results': results,
    'steps_per_dispatch': config.train.steps_per_dispatch,
  }
  train_rows = [r for r in rows if r['split'] == 'train']
  if train_rows:
    summary['last_images_per_sec'] = train_rows[-1].get('images_per_sec')
  table = [
    (
      r['step'],
      r['split'],
      f'{100 * r["error"]:.2f}%',
      f'{r["loss"]:.4f}',
      _rate(r),
    )
    for r in rows
    if r['split'] != 'train' or r['step'] % (config.train.eval_every_steps) == 0
  ]
  lines = [
    f'- status: {status}; step {summary["step_reached"]} of {config.train.num_steps}; this command '
    f'{summary["this_command_s"]:.0f} s; segments: '
    + ', '.join(f'{s["start_step"]}-{s["end_step"]} in {s["wall_time_s"]:.0f} s' for s in segments),
  ]
  if results:
    lines.append(
      f'- test error {100 * results["test_error"]:.2f}% (moving-average BN), '
      f'{100 * results["test_error_exact_bn"]:.2f}% with exact BN statistics over '
      f'{results["exact_bn_images"]} images; {results["wall_time_s"]:.0f} s over all segments'
    )
  markdown = (
    '\n'.join(lines) + '\n\n' + _md_table(('step', 'split', 'error', 'loss', 'images/s'), table)
  )
  report.add(markdown=markdown, **summary)
  if args.out:
    tar = os.path.join(args.out, 'cifar10_20_workdir.tar.gz')
    with tarfile.open(tar, 'w:gz') as f:
      f.add(workdir, arcname=os.path.basename(workdir))
    if os.path.getsize(tar) > 16 * 2**20:  # more than the device tool brings back
      os.remove(tar)
      report.add(note='the workdir tarball is over 16 MiB: not kept in --out.')


def _rate(row):
  return f'{row["images_per_sec"]:.0f}' if 'images_per_sec' in row else ''


class OutOfTime(Exception):
  """The stage's budget ended where no checkpoint could be saved."""


def _out_of_time(signum, frame):
  del signum, frame
  raise OutOfTime()


def _metrics(workdir):
  """metrics.jsonl's rows, the last of each (step, split)."""
  from resnet_jax.workdir import Workdir

  path = Workdir(workdir).metrics
  rows = {}
  if os.path.exists(path):
    for line in open(path):
      if line.strip():
        row = json.loads(line)
        rows[row['step'], row['split']] = row
  return [rows[k] for k in sorted(rows)]


# ----------------------------------------------------------------------------------- stage: input


def _pil_worker_init(images):
  signal.signal(signal.SIGTERM, signal.SIG_DFL)  # Pool.terminate's signal ends a worker quietly
  global _IMAGES
  _IMAGES = images


def _pil_train_crop(task):
  """The paper's training crop in PIL: shorter side S in [256, 480], a random 224 square, flipped at
  random, float32. Only the scale JPEG's DCT allows is decoded (Image.draft), as decode_and_crop does."""
  import numpy as np
  from PIL import Image

  index, seed = task
  rng = np.random.default_rng(seed)
  crop = 224
  with Image.open(io.BytesIO(_IMAGES[index])) as image:
    w, h = image.size
    short = min(w, h)
    side = int(np.clip(round(crop * short / rng.integers(256, 481)), 1, short))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    factor = max(1, side // crop)  # the decoder may shrink by up to this and keep >= crop pixels
    image.draft('RGB', (max(1, w // factor), max(1, h // factor)))
    sx, sy = image.size[0] / w, image.size[1] / h
    box = (x * sx, y * sy, (x + side) * sx, (y + side) * sy)
    out = image.convert('RGB').resize((crop, crop), Image.BILINEAR, box=box)
  pixels = np.asarray(out, np.float32)
  return pixels[:, ::-1] if rng.random() < 0.5 else pixels


def _pil_one_crop(task):
  """1-crop evaluation in PIL: shorter side 256 (decoded at the smallest DCT scale above it), centre 224."""
  import numpy as np
  from PIL import Image

  index, _ = task
  with Image.open(io.BytesIO(_IMAGES[index])) as image:
    w, h = image.size
    scale = 256 / min(w, h)
    size = (round(w * scale), round(h * scale))
    image.draft('RGB', size)
    image = image.convert('RGB').resize(size, Image.BILINEAR)
    left, top = (size[0] - 224) // 2, (size[1] - 224) // 2
    return np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32)


def _pil_rate(images, fn, workers, n):
  import multiprocessing

  tasks = [(i % len(images), i) for i in range(n)]
  context = multiprocessing.get_context('fork')
  with context.Pool(workers, _pil_worker_init, (images,)) as pool:
    list(pool.imap(fn, tasks[: 2 * workers], chunksize=1))  # workers started and warm
    start = time.perf_counter()
    for _ in pool.imap(fn, tasks, chunksize=8):
      pass
    return n / (time.perf_counter() - start)


def stage_input(args, report, deadline):
  """ImageNet-shaped decoding throughput on the sample JPEGs, repeated."""
  with tempfile.TemporaryDirectory() as tmp:
    with tarfile.open(args.imagenet) as f:
      f.extractall(tmp, filter='data')
    paths = sorted(
      str(p) for p in pathlib.Path(tmp).rglob('*') if p.suffix.lower() in ('.jpeg', '.jpg')
    )
    if not paths:
      raise ValueError(f'{args.imagenet} holds no JPEG files; pass the ImageNet sample archive.')
    images = [pathlib.Path(p).read_bytes() for p in paths]
    cores = len(os.sched_getaffinity(0))
    rows = []
    cases = [('train crop (scale aug.)', _pil_train_crop), ('eval 1-crop', _pil_one_crop)]
    for workers in sorted({1, cores}):
      for name, fn in cases:
        if deadline - time.time() < 3:
          report.add(note=f'out of time: PIL {name} at {workers} workers not measured.')
          continue
        rate = _pil_rate(images, fn, workers, args.input_images)
        rows.append(('PIL + process pool', name, workers, f'{rate:.0f}', f'{rate / workers:.0f}'))
        report.add(markdown=_input_markdown(rows, len(images), args.input_images), results=rows)
    if not _importable('tensorflow'):
      report.add(
        note="TensorFlow is not importable: the project's tf.data pipeline is not measured."
      )
      return
    rows += _tfdata_rows(tmp, args, deadline, report, cores)
    report.add(markdown=_input_markdown(rows, len(images), args.input_images), results=rows)


def _tfdata_rows(tmp, args, deadline, report, cores):
  """The project's pipeline (resnet_jax.data.imagenet) on the same images, all cores."""
  import dataclasses

  import numpy as np

  from resnet_jax import data, defaults

  folder = next(
    p.parent.parent
    for p in sorted(pathlib.Path(tmp).rglob('*'))
    if p.suffix.lower() in ('.jpeg', '.jpg')
  )
  root, split = folder.parent, folder.name  # <root>/<split>/<class>/<image>
  config = defaults.get_imagenet_config()
  config.data.update(
    source='image_folder',
    image_folder=str(root),
    train_split=split,
    eval_split=split,
    cache_dir=tmp,
  )
  ds = data.load(config.data, 0)
  n = args.input_images

  def repeat(s):
    index = np.arange(n) % s.size
    return dataclasses.replace(s, size=n, paths=[s.paths[i] for i in index], labels=s.labels[index])

  ds.train, ds.eval = repeat(ds.train), repeat(ds.eval)
  batch = max(1, min(32, n // 4))
  cases = {
    'train crop (scale aug.)': lambda: ds.train_batches(0, batch, 0),
    'eval 1-crop': lambda: ds.eval_batches(batch),
  }
  rows = []
  for name, make in cases.items():
    if deadline - time.time() < 5:
      report.add(note=f'out of time: tf.data {name} not measured.')
      continue
    batches = iter(make())
    next(batches)  # tf.data's start-up
    start, count = time.perf_counter(), 0
    for b in batches:
      count += len(b['label'])
      if count >= n - batch:
        break
    rate = count / (time.perf_counter() - start)
    rows.append(
      ('tf.data (resnet_jax.data.imagenet)', name, cores, f'{rate:.0f}', f'{rate / cores:.0f}')
    )
  return rows


def _input_markdown(rows, distinct, n):
  return (
    f'{distinct} sample JPEGs repeated to {n} per case; 224x224 float32 crops delivered to the '
    "consumer. On a machine without TensorFlow only the PIL rows exist: they measure the host's JPEG "
    "decoding and resizing in worker processes, not the project's tf.data pipeline.\n\n"
    + _md_table(('path', 'preprocessing', 'workers', 'images/s', 'images/s per worker'), rows)
  )


# ----------------------------------------------------------------------------------- the parent


def run_stage(stage, args, budget, work):
  """Runs one stage in a child process within `budget` seconds; returns its report with the status."""
  path = os.path.join(work, f'{stage}.json')
  log = os.path.join(work, f'{stage}.log')
  command = [
    sys.executable,
    __file__,
    '--_stage',
    stage,
    '--_report',
    path,
    '--_deadline',
    repr(time.time() + budget),
  ]
  command += args.passthrough
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # JAX and PyTorch share the device
  start = time.time()
  with open(log, 'w') as f:
    child = subprocess.Popen(
      command, stdout=f, stderr=subprocess.STDOUT, env=env
    )  # in this command's process group: whatever stops the command stops the stage too
    try:
      rc = child.wait(timeout=budget + (GRACE_S if stage == 'train' else 5))
      status = 'ok' if rc == 0 else f'failed (exit {rc})'
      if rc == 0 and _ran_out(path):
        status = 'out of time: stopped itself before its budget, partial'
    except subprocess.TimeoutExpired:
      child.terminate()  # the stage's handler stops what it started (OutOfTime)
      try:
        child.wait(timeout=10)
      except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
      status = 'out of time: stopped at its budget'
  try:
    with open(path) as f:
      result = json.load(f)
  except (OSError, ValueError):
    result = {'stage': stage, 'results': [], 'notes': [], 'markdown': ''}
  with open(log) as f:
    tail = f.read()[-4000:]
  if status.startswith('failed'):
    result['notes'].append('last lines of its log:\n' + '\n'.join(tail.splitlines()[-8:]))
  result.update(status=status, budget_s=budget, seconds=time.time() - start)
  print(f'[{stage}] {status} in {result["seconds"]:.0f} s of {budget} s', flush=True)
  return result, tail


def _ran_out(path):
  try:
    with open(path) as f:
      return any(n.startswith('out of time') for n in json.load(f)['notes'])
  except (OSError, ValueError, KeyError):
    return False


def markdown(reports, command):
  lines = [
    '# Device check',
    '',
    f'- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}',
    f'- command: `{command}`',
    '',
    _md_table(
      ('stage', 'status', 'seconds', 'budget s'),
      [(r['stage'], r['status'], f'{r["seconds"]:.0f}', r['budget_s']) for r in reports],
    ),
  ]
  for r in reports:
    lines += ['', f'## {r["stage"]}', '']
    if r['markdown']:
      lines.append(r['markdown'])
    lines += [f'- {n}' for n in r['notes']]
  return '\n'.join(lines) + '\n'


def prepare(folder, shared_data):
  """The wheels the device machine lacks, this project as a wheel, and the two data archives."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  pip = [sys.executable, '-m', 'pip']
  for name in WHEELS:
    version = _version(name)
    spec = f'{name}=={version}' if version else name
    subprocess.run(
      pip + ['download', '--no-deps', '--only-binary=:all:', '-d', str(folder), spec], check=True
    )
  with tempfile.TemporaryDirectory() as tmp:  # the build's own files stay out of the checkout
    shutil.copytree(
      ROOT,
      tmp,
      dirs_exist_ok=True,
      ignore=shutil.ignore_patterns(
        '.git', '.carry', 'runs', '.venv', 'venv', '*.egg-info', 'build', '__pycache__'
      ),
    )
    subprocess.run(
      pip + ['wheel', '--no-deps', '--no-build-isolation', '-w', str(folder), tmp],
      check=True,
      capture_output=True,
    )
  for name in (CIFAR_TAR, IMAGENET_TAR):
    source = pathlib.Path(shared_data) / name
    if not source.exists():
      raise SystemExit(
        f'{source} does not exist; pass --shared_data=FOLDER holding {CIFAR_TAR} and {IMAGENET_TAR}.'
      )
    shutil.copy2(source, folder / name)
  files = sorted(p for p in folder.iterdir() if p.is_file())
  total = sum(p.stat().st_size for p in files)
  for p in files:
    print(f'{p.stat().st_size / 2**20:8.2f} MiB  {p.name}')
  print(f'{total / 2**20:8.2f} MiB  in all, in {folder}')
  if total > PREPARE_LIMIT:
    raise SystemExit(
      f'{folder} holds {total / 2**20:.1f} MiB, over the 64 MiB that travels; remove what the check does not need.'
    )
  return files


def parse_budgets(text, base):
  budgets = dict(base)
  for entry in filter(None, text.split(',')):
    stage, sep, seconds = entry.partition('=')
    if not sep or stage not in STAGES:
      raise ValueError(
        f'bad --budget entry {entry!r}: use STAGE=SECONDS with a stage among {",".join(STAGES)}'
      )
    budgets[stage] = float(seconds)
  return budgets


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--stages', default=','.join(STAGES), help=f'among {",".join(STAGES)}')
  parser.add_argument(
    '--budget',
    default='',
    help='STAGE=SECONDS[,...]; defaults ' + ', '.join(f'{k} {v}' for k, v in BUDGETS.items()),
  )
  parser.add_argument('--out', help='the folder for device_check.json, .md and .log')
  parser.add_argument('--data', help=f'the prepared folder holding {CIFAR_TAR} and {IMAGENET_TAR}')
  parser.add_argument('--cifar', help='the CIFAR-10 JPEG archive or folder (default: in --data)')
  parser.add_argument('--imagenet', help='the ImageNet sample archive (default: in --data)')
  parser.add_argument(
    '--dry-run', dest='dry_run', action='store_true', help='every stage, tiny, on the CPU'
  )
  parser.add_argument(
    '--prepare', metavar='DIR', help='write the wheels and data the device lacks to DIR and stop'
  )
  parser.add_argument(
    '--shared_data',
    default=str(ROOT.parent / 'shared' / 'data'),
    help='where --prepare finds the archives',
  )
  parser.add_argument(
    '--grid', default=GRID, help="experiments/benchmark.py's MODEL:BATCH:DTYPE[:SIZE] entries"
  )
  parser.add_argument(
    '--torch_modes', default='eager;compile', help='";"-separated twin modes; "" for ours only'
  )
  parser.add_argument('--bench_steps', type=int, default=20)
  parser.add_argument('--bench_warmup', type=int, default=2)
  parser.add_argument('--bench_repeats', type=int, default=3)
  parser.add_argument('--bench_window_s', type=float, default=2.0)
  parser.add_argument(
    '--bench_min_s', type=float, default=20.0, help='an entry needs this much budget left'
  )
  parser.add_argument('--start_models', default=START_MODELS, help='MODEL[:BATCH[:IMAGE_SIZE]],...')
  parser.add_argument(
    '--start_init', default='jit', help='jit (today) and/or eager (the previous init)'
  )
  parser.add_argument('--train_workdir', default=str(ROOT / 'runs' / 'device_check' / 'cifar10_20'))
  parser.add_argument(
    '--train_resume', help="a previous check's cifar10_20_workdir.tar.gz, if the workdir is gone"
  )
  parser.add_argument('--steps_per_dispatch', type=int, default=100)
  parser.add_argument(
    '--train_save_s', type=float, default=20.0, help='stop this long before the budget'
  )
  parser.add_argument('--input_images', type=int, default=1000)
  parser.add_argument('--_stage', help=argparse.SUPPRESS)
  parser.add_argument('--_report', help=argparse.SUPPRESS)
  parser.add_argument('--_deadline', type=float, help=argparse.SUPPRESS)
  parser.add_argument('--_start_one', help=argparse.SUPPRESS)
  parser.add_argument('--_init', default='jit', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.prepare:
    prepare(args.prepare, args.shared_data)
    print(
      f'on the device machine: see experiments/README.md, "Device check" (carry {args.prepare}).'
    )
    return
  if args.dry_run:
    _dry_run_sizes(args, argv)
  if args._start_one:
    fields = args._start_one.split(':') + ['', '']
    print(json.dumps(start_one(fields[0], int(fields[1] or 0), int(fields[2] or 0), args._init)))
    return
  if args._stage:
    _child(args)
    return
  stages = [s.strip() for s in args.stages.split(',') if s.strip()]
  try:
    budgets = parse_budgets(args.budget, DRY_BUDGETS if args.dry_run else BUDGETS)
    if set(stages) - set(STAGES):
      raise ValueError(f'--stages takes stages among {",".join(STAGES)}, got {args.stages!r}')
    if not args.out:
      raise ValueError('--out is required: the folder for the results')
    for name in ('cifar', 'imagenet'):
      needed = {'cifar': 'train', 'imagenet': 'input'}[name]
      if getattr(args, name) is None and args.data:
        setattr(args, name, os.path.join(args.data, CIFAR_TAR if name == 'cifar' else IMAGENET_TAR))
      if needed in stages and not (getattr(args, name) and os.path.exists(getattr(args, name))):
        raise ValueError(
          f'the {needed} stage needs --{name} (or --data holding it); {getattr(args, name)} does not exist'
        )
  except ValueError as e:
    parser.error(str(e))
  os.makedirs(args.out, exist_ok=True)
  args.out = os.path.abspath(args.out)
  args.passthrough = _without(
    argv, ('--stages', '--budget', '--out', '--cifar', '--imagenet', '--data')
  )
  args.passthrough += [f'--cifar={os.path.abspath(args.cifar)}'] if args.cifar else []
  args.passthrough += [f'--imagenet={os.path.abspath(args.imagenet)}'] if args.imagenet else []
  args.passthrough += [f'--out={args.out}']
  command = 'python experiments/device_check.py ' + ' '.join(shlex.quote(a) for a in argv)
  reports, logs = [], []
  with tempfile.TemporaryDirectory() as work:
    for stage in [s for s in STAGES if s in stages]:
      report, tail = run_stage(stage, args, budgets[stage], work)
      reports.append(report)
      logs.append(f'===== {stage}: {report["status"]}\n{tail}')
      _write_json(
        os.path.join(args.out, 'device_check.json'), {'command': command, 'stages': reports}
      )
      pathlib.Path(args.out, 'device_check.md').write_text(markdown(reports, command))
      pathlib.Path(args.out, 'device_check.log').write_text('\n'.join(logs))
  print(markdown(reports, command))
  return reports


def _without(argv, flags):
  """`argv` without `flags` and their values (given as --flag=value or --flag value)."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg.split('=')[0] in flags:
      skip = '=' not in arg
    else:
      out.append(arg)
  return out


def _dry_run_sizes(args, argv):
  """Tiny sizes for a CPU check of every stage, unless the command line set them."""
  given = {a.split('=')[0] for a in argv}
  tiny = {
    '--grid': 'cifar8:4:float32',
    '--torch_modes': 'eager',
    '--bench_steps': 1,
    '--bench_warmup': 0,
    '--bench_repeats': 1,
    '--bench_window_s': 0.0,
    '--bench_min_s': 1.0,
    '--start_models': 'cifar8:4',
    '--steps_per_dispatch': 2,
    '--train_save_s': 5.0,
    '--input_images': 16,
  }
  for flag, value in tiny.items():
    if flag not in given:
      setattr(args, flag[2:], value)
  if '--train_workdir' not in given and args.out:
    args.train_workdir = os.path.join(os.path.abspath(args.out), 'dry_run_workdir')


def _child(args):
  """One stage in this process, its report written as it goes."""
  report = Report(args._report, args._stage)
  # SIGTERM at the budget raises, so that a measuring process this stage started is killed with it
  # (subprocess.run kills its child on an exception); the training loop installs its own handler.
  signal.signal(signal.SIGTERM, _out_of_time)
  deadline = args._deadline
  stage = args._stage
  if stage == 'env':
    stage_env(args, report)
  else:
    {'bench': stage_bench, 'start': stage_start, 'train': stage_train, 'input': stage_input}[stage](
      args, report, deadline
    )


if __name__ == '__main__':
  main()
