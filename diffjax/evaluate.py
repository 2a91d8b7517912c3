"""Scores a run's newest checkpoint, printing one JSON line with nats per token and bits per byte.

  python -m diffjax.evaluate --workdir=DIR --text_glob='notes/*.txt'   # any text files
  python -m diffjax.evaluate --workdir=DIR [--batches=N]               # the run's validation split

Text files are tokenized with the run's tokenizer, each followed by EOS, and the whole stream, after one leading
EOS (a document start, as in training), is cut into rows of the run's seq_len + 1 tokens that overlap by one: every
token of every file, and each file's EOS, is predicted exactly once. Bits per byte divide the summed nats by ln 2
and by the files' UTF-8 bytes. The validation split is scored on the rows training evaluates (log.eval_batches
batches of train.global_batch_size rows), whose bytes are those of the scored tokens' text.
"""

import json

from absl import app, flags

from diffjax import cli
from diffjax.infer import load, score

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
TEXT_GLOB = flags.DEFINE_string('text_glob', None, 'A folder, file or glob of .txt / .txt.gz files to score; '
                                'unset: the run\'s validation split.')
BATCHES = flags.DEFINE_integer('batches', 0, 'Validation: batches of train.global_batch_size rows to score (0: the '
                               'run\'s log.eval_batches).', lower_bound=0)
BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Rows of seq_len tokens per evaluation step.', lower_bound=1)


@cli.report_errors
def main(argv):
  del argv
  cfg, params, tokenizer, step = load.open_run(WORKDIR.value)
  config = load.run_config(WORKDIR.value)
  texts = None if TEXT_GLOB.value is None else score.read_texts(TEXT_GLOB.value)
  rows = (BATCHES.value or config.log.eval_batches) * config.train.global_batch_size if texts is None else None
  totals = score.score(cfg, params, score.batches(config, WORKDIR.value, tokenizer, texts, BATCH_SIZE.value, rows),
                       tokenizer)
  if texts is not None:
    totals['bytes'] = sum(len(text.encode('utf-8')) for text in texts)
  print(json.dumps({'step': step, 'data': TEXT_GLOB.value or 'validation', **score.summary(totals)}))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
