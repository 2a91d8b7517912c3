"""Scores a run's newest checkpoint on its validation split: `python -m diffjax.evaluate --workdir=DIR`."""

import json
import math

from absl import app, flags

from diffjax import cli, train_step, trainer
from diffjax.errors import ConfigError

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
BATCHES = flags.DEFINE_integer('batches', 0, 'Validation batches to score (0: the run\'s log.eval_batches).')


def restore_run(workdir: str):
  """(run, step, state) for the newest readable checkpoint of the training run in `workdir`."""
  config = cli.load_run_config(workdir)
  run = trainer.Run(config, workdir)
  restored = run.checkpoints.restore_latest(train_step.abstract_state(run.cfg, run.tx, run.mesh))
  if restored is None:
    raise ConfigError(f'--workdir: {workdir} has no checkpoint yet; train first or give another workdir')
  step, state, _ = restored
  return run, step, state


@cli.report_errors
def main(argv):
  del argv
  if WORKDIR.value is None:
    raise ConfigError('--workdir is required: the workdir of a training run')
  run, step, state = restore_run(WORKDIR.value)
  if BATCHES.value:
    run.config.log.eval_batches = BATCHES.value
  result = {'step': step, **run.evaluate(state['params'])}
  result['eval_bits_per_token'] = result['eval_loss'] / math.log(2)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
