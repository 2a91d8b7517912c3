"""Prepares a config's training data ahead of time: `python -m diffjax.prepare --config=configs/seed.py [...]`.

Tokenizes the corpus once and writes its packed sequences where every later run with the same corpus, tokenizer
and sequence length finds them (`diffjax.train` does the same on its own when they are missing).
"""

import json

from absl import app, flags
from ml_collections import config_flags

from diffjax import cli
from diffjax.data import pipeline
from diffjax.errors import ConfigError

CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/seed.py.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Optional: a run\'s workdir, to share its SentencePiece model.')


@cli.report_errors
def main(argv):
  del argv
  if CONFIG.value is None:
    raise ConfigError('--config is required, e.g. --config=configs/seed.py')
  config = cli.config_value(CONFIG)
  prepared = pipeline.build_input(config.data, seq_len=config.train.seq_len, batch_size=1, seed=config.seed,
                                  workdir=WORKDIR.value)
  meta = prepared.meta
  print(json.dumps({'folder': prepared.folder, 'tokenizer': meta['tokenizer'],
                    **{f'{split}_sequences': info['rows'] for split, info in meta['splits'].items()},
                    **{f'{split}_tokens': info['tokens'] for split, info in meta['splits'].items()}}))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
