"""The config a run saved in WORKDIR/config.json, over today's defaults: `--config=configs/run.py:WORKDIR`.

For a new run of the same model, such as one from a model `diffjax import` wrote into WORKDIR:
`diffjax train --config=configs/run.py:WORKDIR --workdir=NEW --config.checkpoint.init_from=WORKDIR`, with
--config.KEY=VALUE for the data and the schedule of the new run.
"""

from diffjax.errors import ConfigError
from diffjax.infer import load


def get_config(workdir: str | None = None):
  if not workdir:
    raise ConfigError('configs/run.py: name the run whose config to take, as --config=configs/run.py:WORKDIR')
  return load.run_config(workdir)
