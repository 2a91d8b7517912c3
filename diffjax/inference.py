"""Opening a training run's newest checkpoint for evaluation, sampling and inspection."""

from diffjax import cli, defaults, train_step, trainer
from diffjax.errors import ConfigError


def run_config(workdir: str):
  """The run's saved config over today's defaults, so keys added since it was written get their defaults (and
  keys removed since are dropped)."""
  config = defaults.base_config()
  known = defaults.flatten(config.to_dict())
  saved = defaults.flatten(cli.load_run_config(workdir).to_dict())
  config.update_from_flattened_dict({key: value for key, value in saved.items() if key in known})
  return config


def restore_run(workdir: str | None):
  """(run, step, state) for the newest readable checkpoint of the training run in `workdir`."""
  if not workdir:
    raise ConfigError('--workdir is required: the workdir of a training run')
  config = run_config(workdir)
  run = trainer.Run(config, workdir, read_only=True)  # a run may be training in it: touch nothing
  restored = run.checkpoints.restore_latest(train_step.abstract_state(run.cfg, run.tx, run.mesh))
  if restored is None:
    raise ConfigError(f'--workdir: {workdir} has no checkpoint yet; train first or give another workdir')
  step, state, _ = restored
  return run, step, state
