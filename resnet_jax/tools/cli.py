"""What every command-line entry point shares: flags, one-sentence failures, multi-process start-up.

Each tool defines its own flags with these helpers and runs `cli.run(main)`:

  cli.define_config_flag(required=False, from_workdir=True)
  cli.define_workdir_flag('...')
  cli.run(main)

A tool that reads a run takes the config of its --workdir when no --config is given, and
--config.<field>=<value> overrides apply to that config. Mistakes in the config file or its overrides end
in one line on stderr and exit code 2, never a traceback.
"""

import difflib
import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnet_jax.workdir import Workdir

FLAGS = flags.FLAGS
# The config file that loads a workdir's config.json: --config=WORKDIR_CONFIG:<workdir>.
WORKDIR_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'workdir_config.py')
config_from_workdir = False  # set by define_config_flag(from_workdir=True)


def fail(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def define_config_flag(required: bool, from_workdir: bool = False):
  """--config=FILE; with `from_workdir`, a tool reading --workdir defaults to that run's config."""
  global config_from_workdir
  config_from_workdir = from_workdir
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment config file (configs/*.py); any field can be '
    'overridden with --config.<field>=<value>.',
    lock_config=True,
  )
  if required:
    flags.mark_flag_as_required('config')


def define_workdir_flag(help_text: str):
  flags.DEFINE_string('workdir', None, help_text)
  flags.mark_flag_as_required('workdir')


def define_distributed_flags():
  flags.DEFINE_bool(
    'distributed',
    False,
    'Join a multi-process job: jax.distributed.initialize() detects '
    'TPU pods, SLURM and Open MPI, or uses the three flags below.',
  )
  flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for a job JAX cannot detect.'
  )
  flags.DEFINE_integer(
    'num_processes', None, 'Number of processes in the job (with --coordinator_address).'
  )
  flags.DEFINE_integer('process_id', None, "This process's index in [0, num_processes).")


def quiet_libraries():
  """Library INFO lines stay out of a tool's output: warnings only. orbax logs every save and restore;
  JAX logs each platform it probes and does not find ("Unable to initialize backend 'tpu'"), which says
  nothing about the devices it does use (main logs those).

  orbax's errors keep their first line but lose their tracebacks: a failed background write (a full disk)
  is logged by each of its threads, and the tool then reports it in one sentence.
  """

  def quiet(record):
    if 'orbax' in record.pathname:
      record.exc_info = None
      record.exc_text = None
    elif record.name.split('.')[0] not in ('jax', 'jaxlib'):
      return True
    return record.levelno >= logging.converter.STANDARD_WARNING

  logging.get_absl_handler().addFilter(quiet)


def config_or_workdir(workdir):
  """The --config file when given, else the config the workdir was trained with (with any
  --config.<field> overrides), reading the preprocessing statistics training saved there."""
  if FLAGS.config is None:
    fail(f'{workdir} holds no config.json: pass the --workdir of a training run, or --config.')
  return Workdir(workdir).with_saved_statistics(FLAGS.config)


def _flag_value(argv, name):
  """The value of --name=V or --name V in argv, else None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _with_workdir_config(argv):
  """argv with --config=<the workdir's config> first when a tool reading a run is given a --workdir
  that holds config.json but no --config: its --config.<field> overrides then apply to that config."""
  if not config_from_workdir or any(a == '--config' or a.startswith('--config=') for a in argv):
    return argv
  workdir = _flag_value(argv, 'workdir')
  if not workdir or not Workdir(workdir).has_config():
    if workdir and any(a.startswith('--config.') for a in argv):
      fail(f'{workdir} holds no config.json to override: pass the --workdir of a run, or --config.')
    return argv
  return [argv[0], f'--config={WORKDIR_CONFIG}:{workdir}', *argv[1:]]


def parse_flags(argv):
  """absl flag parsing, with config-file and override mistakes reported in one line."""
  argv = _with_workdir_config(argv)
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if path and not path.startswith(f'{WORKDIR_CONFIG}:') and not os.path.isfile(path):
    fail(
      f'the config file {path} does not exist: pass one of the files in configs/, e.g. '
      '--config=configs/cifar10_20.py.'
    )
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f'{e}.')
  except Exception as e:  # noqa: BLE001  # config_flags raises many kinds
    unknown = _unknown_override(path, argv)
    if unknown:
      name, closest = unknown
      hint = f'did you mean --{closest}? ' if closest else ''
      fail(
        f'--{name} is not a field of the config {_config_name(path)}: {hint}see the fields in '
        'resnet_jax/defaults.py.'
      )
    fail(
      f'cannot load the config {_config_name(path)}: {type(e).__name__}: {str(e).splitlines()[0]}'
    )


def _config_name(path):
  """The config file, or the workdir whose config.json it is."""
  if path and path.startswith(f'{WORKDIR_CONFIG}:'):
    return f'of {path.split(":", 1)[1]} (its config.json)'
  return path


def _unknown_override(path, argv):
  """(name, the closest existing field or None) of the first --config.a.b=... whose field does not
  exist in the config file, if any."""
  try:
    file, *args = path.split(':', 1)
    spec = importlib.util.spec_from_file_location('config_module', file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*args)
  except Exception:  # noqa: BLE001
    return None
  for arg in argv:
    if arg.startswith('--config.'):
      name = arg[len('--') :].split('=', 1)[0]
      node = config
      for part in name.split('.')[1:]:
        if not hasattr(node, 'keys') or part not in node:
          return name, _closest_field(config, name)
        node = node[part]
  return None


def _closest_field(config, name):
  """The field nearest to the mistyped `name` ('config.train.num_step'), or None: the wrong part is
  compared with its siblings only, so a shared prefix suggests nothing."""
  node, known = config, ['config']
  for part in name.split('.')[1:]:
    if not hasattr(node, 'keys'):
      return None
    if part not in node:
      match = difflib.get_close_matches(part, list(node.keys()), n=1, cutoff=0.7)
      return '.'.join([*known, match[0]]) if match else None
    node, known = node[part], [*known, part]
  return None


def initialize_distributed():
  """jax.distributed.initialize before any other JAX call, when the job has more than one process."""
  explicit = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if not FLAGS.distributed and all(v is None for v in explicit):
    return
  if any(v is None for v in explicit) and any(v is not None for v in explicit):
    fail(
      '--coordinator_address, --num_processes and --process_id go together: pass all three, or only '
      '--distributed on a TPU pod, under SLURM or Open MPI.'
    )
  import jax

  try:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except (RuntimeError, ValueError) as e:
    fail(
      f'cannot join the multi-process job ({str(e).splitlines()[0]}); check the coordinator address and '
      'that every process was started with the same --num_processes.'
    )


def no_arguments(argv, options: str):
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}: the options are {options}.')


def run(main):
  # TensorFlow (tf.data for ImageNet, TensorBoard events) logs INFO lines from C++ as it loads, in every
  # process that imports it (oneDNN, CPU instructions it was not built for): they concern its own kernels,
  # which never run the network. It reads this when it loads, always later (it is imported lazily), and
  # so do processes started from here; TF_CPP_MIN_LOG_LEVEL=0 shows them again.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

  def wrapped(argv):
    quiet_libraries()
    main(argv)

  app.run(wrapped, flags_parser=parse_flags)
