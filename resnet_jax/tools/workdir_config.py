"""A workdir's config.json as a config file, so that --config.<field>=<value> overrides apply to it.

Tools that read a run load --config=<this file>:<workdir> when no --config is given (cli.parse_flags).
"""

from resnet_jax.workdir import Workdir


def get_config(workdir):
  return Workdir(workdir).config()
