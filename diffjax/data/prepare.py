"""Preparation: one pass from a corpus to packed sequences on disk, which every later run reuses.

Preparation tokenizes every document of a corpus once, appends EOS, and cuts the concatenated token stream into
rows of seq_len + 1 tokens (the last row of a split is completed with PAD). The rows go into ArrayRecord shards:
    DATA_DIR/<corpus key>/<tokenizer key>-seq<seq_len>/{train,validation}-NNNNN.array_record, meta.json
meta.json is written last, once the corpus's undecodable bytes have passed their check, and the folder appears by
one rename, so a folder that exists is complete; every later run, and every host of a multi-host run, reuses it.
Document boundaries are the EOS tokens inside a row.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil

import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from diffjax.data import corpus as corpus_lib
from diffjax.data import tokenizers
from diffjax.errors import ConfigError

META_FILE = 'meta.json'
_ROWS_PER_SHARD = 16_384
# Documents are tokenized this many at a time (SentencePiece spreads a batch over all cores).
_DOCUMENTS_PER_CHUNK = 64


def data_root(data_cfg) -> str:
  return os.path.abspath(os.path.expanduser(
      data_cfg.data_dir or os.environ.get('DIFFJAX_DATA_DIR') or os.path.join('~', '.cache', 'diffjax')))


def tokenizer_key(tokenizer: tokenizers.Tokenizer) -> str:
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    return 'bytes'
  return f'sp{tokenizer.vocab_size}_{hashlib.sha256(tokenizer.model_proto).hexdigest()[:12]}'


def prepared_folder(data_cfg, corpus: corpus_lib.Corpus, tokenizer, seq_len: int) -> str:
  return os.path.join(data_root(data_cfg), corpus.key, f'{tokenizer_key(tokenizer)}-seq{seq_len}')


def prepare(corpus: corpus_lib.Corpus, tokenizer: tokenizers.Tokenizer, seq_len: int, folder: str) -> None:
  """Writes the packed rows of both splits into `folder` unless it exists.

  Processes on one machine that ask for the same folder at once take turns through a lock file: the first
  prepares, the others then find the folder complete.
  """
  if not os.path.exists(os.path.join(folder, META_FILE)):
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with _preparation_lock(folder + '.lock'):
      if not os.path.exists(os.path.join(folder, META_FILE)):
        _write_prepared(corpus, tokenizer, seq_len, folder)


def _write_prepared(corpus, tokenizer, seq_len, folder):
  partial = f'{folder}.partial-{os.getpid()}'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    meta = {'corpus': corpus.identity, 'tokenizer': tokenizer_key(tokenizer), 'vocab_size': tokenizer.vocab_size,
            'eos_id': tokenizer.eos_id, 'pad_id': tokenizer.pad_id, 'seq_len': seq_len,
            'dtype': np.dtype(dtype).name, 'splits': {}}
    for split, texts in corpus.splits.items():
      meta['splits'][split] = _write_split(texts, tokenizer, seq_len + 1, dtype, partial, split)
      if meta['splits'][split]['tokens'] < seq_len + 1:
        raise ConfigError(f'data.{corpus.config_key}: the {split} split of {corpus.identity} has '
                          f'{meta["splits"][split]["tokens"]} tokens, fewer than one sequence of seq_len+1 = '
                          f'{seq_len + 1}; lower seq_len or use a larger corpus')
    corpus.decoding.check()  # the corpus has been read in full
    with open(os.path.join(partial, META_FILE), 'w') as f:
      json.dump(meta, f, indent=1)
    os.replace(partial, folder)
  finally:
    shutil.rmtree(partial, ignore_errors=True)  # gone already after the rename; a failed preparation leaves nothing


def _write_split(texts, tokenizer, row_len: int, dtype, folder: str, split: str) -> dict:
  """Packs the documents' tokens (each followed by EOS) into rows of `row_len`; returns counts and shard names."""
  shards, writer, rows, tokens = [], None, 0, 0
  carry = np.zeros(0, np.int64)

  def write(block):
    nonlocal writer, rows
    for row in block:
      if rows % _ROWS_PER_SHARD == 0:
        if writer:
          writer.close()
        shards.append(f'{split}-{len(shards):05d}.array_record')
        # group_size:1 makes every row its own chunk, so reading one row by index decodes only that row.
        writer = array_record_module.ArrayRecordWriter(os.path.join(folder, shards[-1]), 'group_size:1')
      writer.write(row.astype(dtype).tobytes())
      rows += 1

  eos = np.array([tokenizer.eos_id], np.int64)
  # The bar shows on a terminal only: in a log file (or before a one-line error) it would be noise.
  with tqdm(total=len(texts), unit='doc', desc=f'preparing {split}', leave=False, dynamic_ncols=True,
            disable=None) as bar:
    for start in range(0, len(texts), _DOCUMENTS_PER_CHUNK):
      chunk = [texts[i] for i in range(start, min(start + _DOCUMENTS_PER_CHUNK, len(texts)))]
      stream = np.concatenate([carry] + [part for ids in tokenizer.encode_batch(chunk) for part in (ids, eos)])
      tokens += len(stream) - len(carry)
      full = len(stream) // row_len * row_len
      write(stream[:full].reshape(-1, row_len))
      carry = stream[full:]
      bar.update(len(chunk))
  if len(carry):
    write(np.concatenate([carry, np.full(row_len - len(carry), tokenizer.pad_id)])[None])
  if writer:
    writer.close()
  return {'rows': rows, 'tokens': tokens, 'shards': shards}


def read_meta(folder: str) -> dict:
  try:
    with open(os.path.join(folder, META_FILE)) as f:
      return json.load(f)
  except FileNotFoundError:  # only a process that did not prepare gets here: the first host prepared elsewhere
    raise ConfigError(f'data.data_dir: no prepared data at {folder}; in a multi-host run data.data_dir must be a '
                      'folder that every host shares') from None


@contextlib.contextmanager
def _preparation_lock(path: str):
  """An exclusive `flock` on a file beside the folder; the kernel releases it when its holder dies."""
  with open(path, 'a+') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      tqdm.write(f'waiting for another process to finish preparing {path[:-len(".lock")]}')
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      # Unlinked while held (unless a holder before us already did): a waiter then locks the old file and finds the
      # folder complete, and a newcomer locks a new file and finds the same.
      with contextlib.suppress(FileNotFoundError):
        if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
          os.remove(path)
