"""Scoring a model on text: summed nats over batches, reported per token and per UTF-8 byte.
`python -m diffjax.evaluate` (diffjax/evaluate.py) describes how text is cut into rows and scored.
"""

import itertools
import math
import os

import jax
import numpy as np

from diffjax.data import corpus as corpus_lib
from diffjax.data import pipeline as data_lib
from diffjax.data import tokenizers
from diffjax.errors import ConfigError
from diffjax.model import losses
from diffjax.model.config import ModelConfig


def read_texts(text_glob: str) -> list[str]:
  """The texts of the files `text_glob` matches; no match, or only empty files, is a one-line error."""
  texts = [corpus_lib.read_document(path) for path in corpus_lib.find_text_files(text_glob, '--text_glob')]
  if not any(texts):
    raise ConfigError(f'--text_glob: every file matching {text_glob!r} is empty; point it at text files with content')
  return texts


_score = jax.jit(losses.eval_step, static_argnums=0)


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
  rows = [stream[start:start + seq_len + 1] for start in range(0, len(stream) - 1, seq_len)]
  rows = [np.pad(row, (0, seq_len + 1 - len(row)), constant_values=tokenizer.pad_id) for row in rows]
  rows += [np.full(seq_len + 1, tokenizer.pad_id)] * (-len(rows) % batch_size)
  for start in range(0, len(rows), batch_size):
    yield data_lib.batch_of_rows(np.stack(rows[start:start + batch_size]).astype(np.int32), tokenizer)


def batches(config, workdir: str, tokenizer: tokenizers.Tokenizer, texts: list[str] | None, batch_size: int,
            rows: int | None = None):
  """Batches of `batch_size` rows of the run's seq_len tokens: of `texts` as `text_batches` cuts them, or, where
  `texts` is None, of the run's validation split (the rows training evaluates). With `rows`, only the batches that
  hold the first `rows` rows (always given for the validation split)."""
  seq_len, count = config.train.seq_len, None if rows is None else -(-rows // batch_size)
  if texts is not None:
    return itertools.islice(text_batches(tokenizer, texts, seq_len, batch_size), count)
  return data_lib.build_input(config.data, seq_len=seq_len, batch_size=batch_size, seed=config.seed,
                              workdir=os.path.abspath(workdir)).eval_batches(count)


def summary(totals: dict) -> dict:
  """The reported numbers of `score`'s sums: per token in nats (and as perplexity), per UTF-8 byte in bits."""
  nats_per_token = totals['nats'] / max(totals['tokens'], 1)
  return {'tokens': totals['tokens'], 'bytes': totals['bytes'], 'nats_per_token': nats_per_token,
          'perplexity': math.exp(min(nats_per_token, 700.0)),
          'bits_per_byte': totals['nats'] / math.log(2) / max(totals['bytes'], 1)}
