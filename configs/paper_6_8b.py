"""The paper's 6.8B scaling run (see diffjax.run.defaults.SCALING_RUNS); --config.model.variant=baseline for its
Transformer counterpart."""

from diffjax.run.defaults import scaling_config


def get_config():
  return scaling_config('6.8b')
