"""Scores a run's newest checkpoint on its validation split: `python -m diffjax.evaluate --workdir=DIR`."""

import json
import math

from absl import app, flags

from diffjax import cli, inference

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
BATCHES = flags.DEFINE_integer('batches', 0, 'Validation batches to score (0: the run\'s log.eval_batches).',
                               lower_bound=0)


@cli.report_errors
def main(argv):
  del argv
  run, step, state = inference.restore_run(WORKDIR.value)
  if BATCHES.value:
    run.config.log.eval_batches = BATCHES.value
  result = {'step': step, **run.evaluate(state['params'])}
  result['eval_bits_per_token'] = result['eval_loss'] / math.log(2)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
