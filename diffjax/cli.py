"""What the command-line entry points share: one-line errors and loading a finished run's config."""

import json
import os
import sys
import traceback

import ml_collections
from absl import flags, logging

from diffjax.errors import ConfigError

DEBUG = flags.DEFINE_bool('debug', False, 'Show full tracebacks instead of one-line errors.')


def report_errors(main):
  """Wraps an absl main: a ConfigError (or a stop for non-finite values) becomes one line on stderr, exit 1."""
  from diffjax.trainer import NonFiniteError  # the trainer imports this module's flags indirectly

  def wrapped(argv):
    if not DEBUG.value:
      logging.set_verbosity(logging.WARNING)  # Orbax and TFDS narrate every file at INFO
    try:
      return main(argv)
    except (ConfigError, NonFiniteError) as error:
      if DEBUG.value:
        traceback.print_exc()
      print(f'error: {error}', file=sys.stderr, flush=True)
      sys.exit(1)
  return wrapped


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'--workdir: {workdir} holds no diffjax run (no config.json); give the workdir of a training run')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
