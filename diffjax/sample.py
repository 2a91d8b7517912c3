"""Prints a continuation of a prompt from a run's newest checkpoint:
`python -m diffjax.sample --workdir=DIR --prompt='def main' --tokens=200`."""

from absl import app, flags

from diffjax import cli, inference

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
PROMPT = flags.DEFINE_string('prompt', 'def ', 'Text to continue.')
TOKENS = flags.DEFINE_integer('tokens', 200, 'Tokens to generate.', lower_bound=0)
TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.', lower_bound=0.0)


@cli.report_errors
def main(argv):
  del argv
  run, _, state = inference.restore_run(WORKDIR.value)
  run.state = state
  print(run.sample(PROMPT.value, TOKENS.value, TEMPERATURE.value))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
