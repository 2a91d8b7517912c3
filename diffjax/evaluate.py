"""Scores a run's newest checkpoint, printing one JSON line with nats per token and bits per byte.

  python -m diffjax.evaluate --workdir=DIR --text_glob='notes/*.txt'   # any text files
  python -m diffjax.evaluate --workdir=DIR [--batches=N]               # the run's validation split

Text files are tokenized with the run's tokenizer, each followed by EOS, and the whole stream, after one leading
EOS (a document start, as in training), is cut into rows of the run's seq_len + 1 tokens that overlap by one: every
token of every file, and each file's EOS, is predicted exactly once. Bits per byte divide the summed nats by ln 2
and by the files' UTF-8 bytes. The validation split is scored on the rows training evaluates (log.eval_batches
batches of train.global_batch_size rows), whose bytes are those of the scored tokens' text.
"""

import functools
import json
import math
import os

import jax
import numpy as np
from absl import app, flags

from diffjax import cli, corpus as corpus_lib, data as data_lib, inference, tokenizers, train_step
from diffjax.config import ModelConfig
from diffjax.errors import ConfigError

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
TEXT_GLOB = flags.DEFINE_string('text_glob', None, 'A folder, file or glob of .txt / .txt.gz files to score; '
                                'unset: the run\'s validation split.')
BATCHES = flags.DEFINE_integer('batches', 0, 'Validation: batches of train.global_batch_size rows to score (0: the '
                               'run\'s log.eval_batches).', lower_bound=0)
BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Rows of seq_len tokens per evaluation step.', lower_bound=1)

_score = jax.jit(train_step.eval_step, static_argnums=0)


def score(cfg: ModelConfig, params, batches, tokenizer: tokenizers.Tokenizer) -> dict:
  """Summed nats, scored tokens and their UTF-8 bytes over batches of {inputs, targets, mask}."""
  nats = tokens = num_bytes = 0.0
  for batch in batches:
    out = _score(cfg, params, batch)
    nats, tokens = nats + float(out['loss_sum']), tokens + float(out['tokens'])
    num_bytes += scored_bytes(tokenizer, batch['targets'], batch['mask'])
  return {'nats': nats, 'tokens': int(tokens), 'bytes': int(num_bytes)}


def scored_bytes(tokenizer: tokenizers.Tokenizer, targets_BxT: np.ndarray, mask_BxT: np.ndarray) -> int:
  if isinstance(tokenizer, tokenizers.ByteTokenizer):  # exact even where a row cuts a multi-byte character
    return int(np.sum((targets_BxT < 256) & (mask_BxT > 0)))
  return sum(len(tokenizer.decode(row[keep > 0]).encode('utf-8')) for row, keep in zip(targets_BxT, mask_BxT))


def text_batches(tokenizer: tokenizers.Tokenizer, texts: list[str], seq_len: int, batch_size: int):
  """Batches of rows of seq_len + 1 tokens overlapping by one, over EOS + each text + EOS; padding has mask 0."""
  eos = np.array([tokenizer.eos_id], np.int64)
  stream = np.concatenate([eos] + [part for ids in tokenizer.encode_batch(texts) for part in (ids, eos)])
  rows = []
  for start in range(0, len(stream) - 1, seq_len):
    row = stream[start:start + seq_len + 1]
    rows.append(np.concatenate([row, np.full(seq_len + 1 - len(row), tokenizer.pad_id)]))
  rows += [np.full(seq_len + 1, tokenizer.pad_id)] * (-len(rows) % batch_size)
  for start in range(0, len(rows), batch_size):
    block = np.stack(rows[start:start + batch_size]).astype(np.int32)
    targets = block[:, 1:]
    yield {'inputs': block[:, :-1], 'targets': targets, 'mask': (targets != tokenizer.pad_id).astype(np.float32)}


def read_texts(text_glob: str) -> list[str]:
  try:
    texts = [corpus_lib.read_document(path) for path in corpus_lib.find_text_files(text_glob)]
  except ConfigError as error:  # the corpus module names its own config key
    raise ConfigError(str(error).replace('data.text_glob:', '--text_glob:', 1)) from None
  if not any(texts):
    raise ConfigError(f'--text_glob: every file matching {text_glob!r} is empty; point it at text files with content')
  return texts


def summary(totals: dict) -> dict:
  nats_per_token = totals['nats'] / max(totals['tokens'], 1)
  return {'tokens': totals['tokens'], 'bytes': totals['bytes'], 'nats_per_token': nats_per_token,
          'perplexity': math.exp(min(nats_per_token, 700.0)),
          'bits_per_byte': totals['nats'] / math.log(2) / max(totals['bytes'], 1)}


@cli.report_errors
def main(argv):
  del argv
  cfg, params, tokenizer, step = inference.open_run(WORKDIR.value)
  config = inference.run_config(WORKDIR.value)
  seq_len = config.train.seq_len
  if TEXT_GLOB.value is not None:
    texts = read_texts(TEXT_GLOB.value)
    totals = score(cfg, params, text_batches(tokenizer, texts, seq_len, BATCH_SIZE.value), tokenizer)
    totals['bytes'] = sum(len(text.encode('utf-8')) for text in texts)
    data = TEXT_GLOB.value
  else:
    rows = (BATCHES.value or config.log.eval_batches) * config.train.global_batch_size
    pipeline = data_lib.build_input(config.data, seq_len=seq_len, batch_size=BATCH_SIZE.value, seed=config.seed,
                                    workdir=os.path.abspath(WORKDIR.value))
    totals = score(cfg, params, pipeline.eval_batches(-(-rows // BATCH_SIZE.value)), tokenizer)
    data = 'validation'
  print(json.dumps({'step': step, 'data': data, **summary(totals)}))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
