"""Trains a model: `python -m diffjax.train --config=configs/tiny.py --workdir=DIR [--config.KEY=VALUE ...]`.

Running the same command again resumes from the newest checkpoint in DIR.
"""

import os

import jax
from absl import app, flags
from ml_collections import config_flags

from diffjax import cli, metrics, trainer, validate
from diffjax.errors import ConfigError

CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/tiny.py.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
MULTIHOST = flags.DEFINE_bool('multihost', False, 'One process per host of a TPU pod slice or GPU cluster: join '
                              'the others (JAX finds them on TPU VMs and under SLURM).')


@cli.report_errors
def main(argv):
  del argv
  if CONFIG.value is None or not WORKDIR.value:  # an empty --workdir would mean the current directory
    raise ConfigError('--config and --workdir are required, e.g. --config=configs/tiny.py --workdir=/tmp/run')
  config, workdir = cli.config_value(CONFIG), os.path.abspath(WORKDIR.value)
  if MULTIHOST.value:
    jax.distributed.initialize()
  validate.check_config(config, workdir)
  run = trainer.Run(config, workdir)
  summary = run.train()
  if summary['preempted']:  # the grace period after SIGTERM is short: no sample, no plots
    return
  text = run.sample(config.log.sample_prompt, config.log.sample_tokens, config.log.sample_temperature)
  curves = metrics.plot_curves(workdir)
  trainer.say(f'\nsample after step {summary["step"]}:\n{text}\n')
  trainer.say(f'checkpoints: {run.checkpoints.directory}\nmetrics: {os.path.join(workdir, "metrics.jsonl")}'
              + (f'\ncurves: {curves}' if curves else ''))


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
