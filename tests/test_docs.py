"""Every ```bash block of README.md, docs/*.md and experiments/README.md against the real code.

A `python -m resnet_jax.TOOL` command may pass only flags that TOOL defines (asked from the tool itself, in
a process of its own, since each tool defines its flags when run); its `--config=PATH` must exist and
every `--config.a.b=value` must name a field of that config. A `python experiments/X.py` command may pass
only options that X's argparse parser accepts. Any other program must be one of EXTERNAL, so that no
command goes unchecked without saying why. Placeholder values (DIR, ROOT, ...) are fine.
"""

import ast
import concurrent.futures
import functools
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from resnet_jax import defaults

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [
  REPO / 'README.md',
  *sorted((REPO / 'docs').glob('*.md')),
  REPO / 'experiments' / 'README.md',
]

# Programs the blocks run that this test does not check, and why.
EXTERNAL = {
  'cd': 'the shell',
  'export': 'the shell',
  'pip': "pip's own options",
  'ruff': "ruff's own options",
  'tfds': "tensorflow-datasets' own command",
  'tensorboard': "TensorBoard's own command",
  'srun': "SLURM's launcher: the command it runs is checked",
  'gcloud': "Google Cloud's command: the command in its --command= is checked",
}
EXTERNAL_PYTHON_MODULES = {'venv', 'pytest', 'pip'}
# Variables a block may use without setting them: the shell's, and the device tool's output folder.
ENVIRONMENT = {'PWD', 'HOME', 'OUT'}

FROM_WORKDIR = 'config from the workdir'  # not a flag: the tool reads its --workdir's config.json

# Run in a fresh interpreter: each tool executed as __main__ until it hands its main to cli.run, which
# reports the flags defined by then; the tool's own flags are removed before the next tool defines its own.
_TOOL_FLAGS = """
import json, runpy, sys
from absl import flags
from resnet_jax.tools import cli

class Reported(Exception):
  pass

def report(main):
  raise Reported()

cli.run = report
result = {}
for tool in sys.argv[1:]:
  sys.argv = [tool]
  try:
    runpy.run_module('resnet_jax.' + tool, run_name='__main__', alter_sys=True)
  except Reported:
    result[tool] = {name: flags.FLAGS[name].boolean for name in flags.FLAGS}
    if cli.config_from_workdir:  # --config.<field> overrides apply to its --workdir's config
      result[tool][FROM_WORKDIR] = False
  cli.config_from_workdir = False
  for module, module_flags in list(flags.FLAGS.flags_by_module_dict().items()):
    if 'resnet_jax' in module:  # the tool's file or cli: not the libraries' own flags
      for flag in list(module_flags):
        if flag.name in flags.FLAGS:
          delattr(flags.FLAGS, flag.name)
print('FLAGS ' + json.dumps(result))
""".replace('FROM_WORKDIR', repr(FROM_WORKDIR))

# The same for the experiment scripts: each parser's option strings, at the moment it parses.
_SCRIPT_OPTIONS = """
import argparse, json, runpy, sys

class Reported(Exception):
  pass

def report(parser, *args, **kwargs):
  raise Reported(sorted(parser._option_string_actions))

argparse.ArgumentParser.parse_args = report
argparse.ArgumentParser.parse_known_args = report
result = {}
for script in sys.argv[1:]:
  sys.argv = [script]
  try:
    runpy.run_path(script, run_name='__main__')
  except Reported as options:
    result[script] = {option.lstrip('-'): False for option in options.args[0]}
print('OPTIONS ' + json.dumps(result))
"""


def bash_blocks(path):
  """(first line number, text) of each ```bash block."""
  blocks, lines, start = [], None, 0
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if lines is None and line.strip() == '```bash':
      lines, start = [], number + 1
    elif lines is not None and line.strip() == '```':
      blocks.append((start, '\n'.join(lines)))
      lines = None
    elif lines is not None:
      lines.append(line)
  assert lines is None, f'{path}: a ```bash block is not closed'
  return blocks


def tokens(line):
  lex = shlex.shlex(line, posix=True, punctuation_chars=';&|')
  lex.whitespace_split = True
  lex.commenters = '#'
  return list(lex)


def simple_commands(line):
  """The token lists of a shell line, split at ;, &&, || and |."""
  commands, current = [], []
  for token in tokens(line):
    if token and set(token) <= set(';&|'):
      commands.append(current)
      current = []
    else:
      current.append(token)
  return [c for c in commands + [current] if c]


def expand(command, variables):
  """The command for each combination of the values of the variables it uses; a variable alone is split
  into words, as the shell does."""
  used = sorted({name for token in command for name in re.findall(r'\$\{?(\w+)', token)})
  variables = {**{name: [name] for name in ENVIRONMENT}, **variables}
  for name in used:
    assert name in variables, f'${name} is never set in the block'
  expansions = []
  for values in itertools.product(*(variables[name] for name in used)):
    binding = dict(zip(used, values))
    argv = []
    for token in command:
      alone = re.fullmatch(r'\$(\w+)|\$\{(\w+)\}', token)
      if alone:
        argv.extend(shlex.split(binding[alone[1] or alone[2]]))
      else:
        argv.append(
          re.sub(r'\$\{(\w+)\}|\$(\w+)', lambda m, binding=binding: binding[m[1] or m[2]], token)
        )
    expansions.append(argv)
  return expansions


def block_commands(block):
  """The argv of every command a bash block runs, continuation lines joined, loops and variables expanded."""
  found = []
  variables = {}
  loops = []
  for line in block.replace('\\\n', ' ').splitlines():
    for command in simple_commands(line):
      if command[0] == 'for':
        assert command[2] == 'in', f'cannot read the loop {line!r}'
        variables[command[1]] = command[3:]
        loops.append(command[1])
        continue
      if command[0] == 'done':
        variables.pop(loops.pop())
        continue
      if command[0] == 'do':
        command = command[1:]
      if not command:
        continue
      assignment = re.fullmatch(r'(\w+)=(.*)', command[0], re.S)
      if assignment and len(command) == 1:
        variables[assignment[1]] = [assignment[2]]
        continue
      found.extend(expand(command, variables))
  return found


def commands(path):
  """(where, argv) of every command the bash blocks of `path` run."""
  return [
    (f'{path.relative_to(REPO)}, the block at line {start}', argv)
    for start, block in bash_blocks(path)
    for argv in block_commands(block)
  ]


def all_commands():
  return [c for path in DOCS for c in commands(path)]


def program(argv):
  """The command with leading VAR=value assignments and a launcher (srun) taken off."""
  while argv and re.fullmatch(r'\w+=.*', argv[0]):
    argv = argv[1:]
  assert argv, 'a command of variable assignments only'
  if os.path.basename(argv[0]) == 'srun':
    python = next((i for i, a in enumerate(argv) if is_python(a)), None)
    if python is not None:
      return argv[python:]
  return argv


def is_python(word):
  return re.fullmatch(r'python3?(\.\d+)?', os.path.basename(word)) is not None


def tool_path(tool):
  """The file of module resnet_jax.<tool> ('tools.evaluate': resnet_jax/tools/evaluate.py)."""
  return REPO / 'resnet_jax' / f'{tool.replace(".", "/")}.py'


def tool_of(argv):
  if is_python(argv[0]) and argv[1:2] == ['-m'] and argv[2].startswith('resnet_jax.'):
    return argv[2][len('resnet_jax.') :]
  return None


def script_of(argv):
  if is_python(argv[0]) and len(argv) > 1 and argv[1].endswith('.py'):
    return argv[1]
  return None


def nested(argv):
  """The shell lines a command runs in turn (gcloud's --command=...)."""
  return [a.split('=', 1)[1] for a in argv if a.startswith('--command=')]


def _every_command():
  """Doc commands with the commands they nest, flattened."""
  out = []
  pending = list(all_commands())
  while pending:
    where, argv = pending.pop(0)
    argv = program(argv)
    out.append((where, argv))
    for line in nested(argv):
      pending.extend((where, inner) for inner in simple_commands(line))
  return out


def _ask(code, names, marker):
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu'}
  done = subprocess.run(
    [sys.executable, '-c', code, *names],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  line = next((x for x in done.stdout.splitlines() if x.startswith(marker + ' ')), None)
  assert line, f'no {marker.lower()} reported (exit code {done.returncode}): {done.stderr[-2000:]}'
  return json.loads(line[len(marker) + 1 :])


def _uses_argparse(script):
  tree = ast.parse((REPO / script).read_text())
  return any(
    isinstance(node, ast.Attribute) and node.attr == 'ArgumentParser' for node in ast.walk(tree)
  )


@functools.cache
def interfaces():
  """{('tool', name) or ('script', path): {flag: whether boolean}}, from two processes run side by side."""
  everything = _every_command()
  tools = sorted({tool_of(a) for _, a in everything if tool_of(a)})
  tools = [t for t in tools if tool_path(t).is_file()]
  scripts = sorted({script_of(a) for _, a in everything if script_of(a)})
  scripts = [s for s in scripts if (REPO / s).is_file()]
  parsed = [s for s in scripts if _uses_argparse(s)]  # the others would run, not parse
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    tool_flags = pool.submit(_ask, _TOOL_FLAGS, tools, 'FLAGS')
    script_options = pool.submit(_ask, _SCRIPT_OPTIONS, parsed, 'OPTIONS') if parsed else None
    result = {('tool', t): flags for t, flags in tool_flags.result().items()}
    if script_options:
      result.update({('script', s): o for s, o in script_options.result().items()})
  for tool in tools:
    assert ('tool', tool) in result, f'resnet_jax.{tool} never calls cli.run: its flags are unknown'
  for script in scripts:  # a script without a parser takes no options
    if script in parsed:
      assert ('script', script) in result, f'{script} never parses its arguments'
    result.setdefault(('script', script), {})
  return result


@functools.cache
def config_of(path):
  return defaults.load_file(str(REPO / path))


def problems(argv):
  """What is wrong with one command, as sentences ([] when nothing)."""
  tool = tool_of(argv)
  script = script_of(argv)
  if tool:
    if not tool_path(tool).is_file():
      return [f'there is no {tool_path(tool).relative_to(REPO)}']
    accepted = interfaces()[('tool', tool)]
    arguments = argv[3:]
  elif script:
    if not (REPO / script).is_file():
      return [f'there is no {script}']
    accepted = interfaces()[('script', script)]
    arguments = argv[2:]
  elif is_python(argv[0]) and argv[1:2] == ['-m'] and argv[2] in EXTERNAL_PYTHON_MODULES:
    return []
  elif os.path.basename(argv[0]) in EXTERNAL:
    return []
  else:
    return [f'{argv[0]} is neither checked here nor in EXTERNAL']
  found = []
  config_path = next((a.split('=', 1)[1] for a in arguments if a.startswith('--config=')), None)
  for argument in arguments:
    if not argument.startswith('--'):
      continue
    name, _, value = argument[2:].partition('=')
    if tool and name.startswith('config.'):
      if 'config' not in accepted:
        found.append(f'{tool} takes no --config, so no {argument}')
      elif config_path is None and not (
        FROM_WORKDIR in accepted and any(a.startswith('--workdir') for a in arguments)
      ):
        found.append(f"{argument} without a --config=PATH (or a run's --workdir) to override")
      elif config_path is None or (REPO / config_path).is_file():
        # Without --config, a tool overrides the workdir's config.json, read on today's defaults.
        node = defaults.get_config() if config_path is None else config_of(config_path)
        where = config_path or "a workdir's config"
        for part in name.split('.')[1:]:
          if not hasattr(node, 'keys') or part not in node:
            found.append(f'{argument}: {name[len("config.") :]} is not a field of {where}')
            break
          node = node[part]
      continue
    boolean_negation = name.startswith('no') and accepted.get(name[2:], False)
    if name not in accepted and not boolean_negation:
      what = f'resnet_jax.{tool}' if tool else script
      found.append(f'{what} has no flag --{name}')
    if name == 'config' and tool and not (REPO / value).is_file():
      found.append(f'the config file {value} does not exist')
  return found


def test_every_doc_command_matches_the_code():
  checked = _every_command()
  tools = [a for _, a in checked if tool_of(a)]
  scripts = [a for _, a in checked if script_of(a)]
  assert tools and scripts, (
    'no resnet_jax or experiments commands found: is the block parser broken?'
  )
  wrong = [
    f'{where}: {" ".join(argv)}\n    {issue}' for where, argv in checked for issue in problems(argv)
  ]
  assert not wrong, '\n'.join(wrong)


def test_the_readme_keeps_the_two_set_up_commands():
  text = (REPO / 'README.md').read_text()
  assert (
    '.venv/bin/python -m resnet_jax.main --config=configs/cifar10_20.py '
    '--workdir=runs/cifar10_20' in text
  )
  after_marker = text.split('<!-- test-command -->', 1)[1].lstrip('\n')
  assert after_marker.startswith('```bash\n'), '.ci/run reads the block right after the marker'


@pytest.mark.parametrize(
  'argv, issue',
  [
    (
      ['python', '-m', 'resnet_jax.main', '--config=configs/cifar10_20.py', '--wrkdir=D'],
      '--wrkdir',
    ),
    (
      [
        'python',
        '-m',
        'resnet_jax.main',
        '--config=configs/cifar10_20.py',
        '--config.train.steps=1',
      ],
      'train.steps',
    ),
    (['python', '-m', 'resnet_jax.main', '--config=configs/nothing.py'], 'nothing.py'),
    (['python', 'experiments/plot_curves.py', '--workdir=D'], '--workdir'),
    (['curl', 'x'], 'curl'),
  ],
)
def test_a_wrong_command_is_caught(argv, issue):
  found = problems(argv)
  assert found and issue in found[0], found


def test_loops_and_variables_expand():
  block = 'A="--x=1 --y=2"\nfor d in 20 56; do\n  python -m resnet_jax.main $A --c=c_$d.py \\\n --w=${d}_s\ndone'
  assert block_commands(block) == [
    ['python', '-m', 'resnet_jax.main', '--x=1', '--y=2', '--c=c_20.py', '--w=20_s'],
    ['python', '-m', 'resnet_jax.main', '--x=1', '--y=2', '--c=c_56.py', '--w=56_s'],
  ]


def _anchor(heading):
  """GitHub's anchor of a markdown heading."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def test_every_relative_link_points_at_a_file_and_heading():
  wrong = []
  for path in DOCS:
    for target in re.findall(r'\]\(([^)\s]+)\)|src="([^"]+)"', path.read_text()):
      target = target[0] or target[1]
      if re.match(r'\w+://', target):
        continue
      file, _, anchor = target.partition('#')
      linked = (path.parent / file).resolve() if file else path
      if not linked.exists():
        wrong.append(f'{path.relative_to(REPO)}: {target} does not exist')
      elif anchor and linked.suffix == '.md':
        headings = re.findall(r'^#+ (.*)$', linked.read_text(), re.M)
        if anchor not in {_anchor(h) for h in headings}:
          wrong.append(
            f'{path.relative_to(REPO)}: {target} names no heading of {file or path.name}'
          )
  assert not wrong, '\n'.join(wrong)


def test_every_test_the_docs_name_exists():
  """The reliability lines cite tests by name: a renamed or removed test must not leave them behind.

  Test names here are sentences (five words or more); the docs' shorter test_* words are results fields
  such as test_error_exact_bn."""
  defined = set()
  for path in (REPO / 'tests').glob('test_*.py'):
    defined |= set(re.findall(r'^def (test_\w+)', path.read_text(), re.M))
  named = {
    (path.name, name)
    for path in DOCS
    for name in re.findall(r'\b(test_\w+)\b', path.read_text())
    if name.count('_') >= 5
  }
  assert named, 'the docs name no test'
  assert sorted(n for n in named if n[1] not in defined) == []
