"""The input pipeline: one pass from text to packed sequences on disk (`diffjax.data.prepare`), then batches read
by index.

Training reads rows by index: each epoch is a fresh permutation of all rows (Grain's MapDataset shuffle and
repeat), so a batch mixes the whole corpus even when documents are books. The stream's position is the number of
batches taken, so a resume is exact with no other state. Batches are read ahead by Grain's threads and put on the
devices ahead of the step by Grain's prefetch thread. A batch is a dict of arrays:
  inputs  int32   (batch_size, seq_len)  tokens 0..seq_len-1 of each row
  targets int32   (batch_size, seq_len)  tokens 1..seq_len, the next token after each input
  mask    float32 (batch_size, seq_len)  1 where the target is a real token, 0 on padding
  segment_ids int32 (batch_size, seq_len)  the document each input belongs to (model.document_mask uses them)
"""

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from etils import epath

from diffjax.data import corpus as corpus_lib
from diffjax.data import prepare, tokenizers
from diffjax.errors import ConfigError
from diffjax.keys import Key, check_section, config_section

SOURCES = ('stdlib', 'local', 'tfds', 'hf')
TOKENIZERS = ('byte', 'sentencepiece')
# Saved in the workdir so a resumed run (and sampling) tokenizes exactly as before.
TOKENIZER_FILE = 'tokenizer.model'
Batch = dict[str, np.ndarray]
# What a batch holds (the module docstring): name -> dtype, each (batch_size, seq_len).
BATCH_DTYPES = {'inputs': np.int32, 'targets': np.int32, 'mask': np.float32, 'segment_ids': np.int32}
# Validation batches are drawn the same way in every run, whatever its seed, so runs compare.
_EVAL_SEED = 0


# The `data.*` keys of the run config. `identity=False`: where and how fast the same rows are read.
DATA_KEYS = {
    'source': Key('stdlib', "stdlib (Python's own sources, no download), local (your text files), tfds or hf "
                  '(local Parquet or Arrow files of a Hugging Face dataset)', choices=SOURCES),
    'tfds_name': Key(None, "source tfds: the dataset, e.g. 'lm1b', 'c4/en:3.1.0'", kind=str, optional=True),
    'text_key': Key('text', "source tfds: the feature that holds a document's text"),
    'train_split': Key('train', "source tfds: the training split ('stdlib' and 'local' split by document)"),
    'eval_split': Key('validation', "source tfds: the validation split (lm1b has 'test' instead)"),
    'text_glob': Key(None, 'source local: a folder, file or glob of .txt / .txt.gz files, one document each',
                     kind=str, optional=True),
    'hf_files': Key(None, 'source hf: a folder, file or glob of .parquet / .arrow files', kind=str, optional=True),
    'hf_text_field': Key('text', "source hf: the column that holds a document's text, one document per row"),
    'validation_fraction': Key(0.05, 'stdlib, local and hf: the share of documents held out for validation',
                               above=0, below=1),
    # A stray damaged byte stays far below one in a thousand, and text in another encoding (Latin-1 prose: 1-5% of
    # its bytes) or binary data (tens of %) far above.
    'max_undecodable_fraction': Key(0.001, 'local: a file with a larger share of bytes that are not UTF-8 is refused '
                                    '(1: never)', at_least=0, at_most=1, identity=False),
    'data_dir': Key(None, 'where prepared sequences (and TFDS datasets) live; unset: $DIFFJAX_DATA_DIR, else '
                    '~/.cache/diffjax', kind=str, optional=True, identity=False),
    'tokenizer': Key('byte', 'byte (UTF-8 bytes) or sentencepiece (trained on the training split, kept in the '
                     'workdir)', choices=TOKENIZERS),
    'sp_vocab_size': Key(8000, 'SentencePiece vocabulary size', at_least=1),
    'sp_train_chars': Key(20_000_000, 'at most this many characters of training text train the SentencePiece model',
                          at_least=1),
    'read_threads': Key(8, 'threads reading rows ahead of the step', at_least=1, identity=False),
    'prefetch_batches': Key(2, 'batches put on the devices ahead of the step', at_least=1, identity=False),
}


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section of the training config."""
  return config_section(DATA_KEYS)


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for what is wrong without reading any data (names, paths, ranges)."""
  check_section('data', DATA_KEYS, data_cfg)
  if data_cfg.source == 'local':
    if not data_cfg.text_glob:
      raise ConfigError("data.text_glob: unset; with data.source='local' point it at a folder, file or glob of .txt "
                        'or .txt.gz files')
    corpus_lib.check_text_glob(data_cfg.text_glob)
  if data_cfg.source == 'hf':
    if not data_cfg.hf_files:
      raise ConfigError("data.hf_files: unset; with data.source='hf' point it at a folder, file or glob of .parquet "
                        'or .arrow files')
    corpus_lib.check_hf_files(data_cfg.hf_files)  # datasets is installed and the files' folder exists
  if data_cfg.source == 'tfds' and not data_cfg.tfds_name:
    raise ConfigError("data.tfds_name: unset; with data.source='tfds' name a TFDS dataset, e.g. 'lm1b'")
  if data_cfg.tokenizer == 'sentencepiece' and data_cfg.sp_vocab_size < tokenizers.SP_MIN_VOCAB_SIZE:
    raise ConfigError(f'data.sp_vocab_size: {data_cfg.sp_vocab_size} is too small; the byte-fallback model needs at '
                      f'least {tokenizers.SP_MIN_VOCAB_SIZE} (use e.g. 8000)')


def tokenizer_vocab_size(data_cfg) -> int:
  """The configured tokenizer's vocabulary size, known from the config alone, before any tokenizer is built."""
  return tokenizers.ByteTokenizer.vocab_size if data_cfg.tokenizer == 'byte' else data_cfg.sp_vocab_size


def build_input(data_cfg: ml_collections.ConfigDict, *, seq_len: int, batch_size: int, seed: int,
                workdir: str | None, shard: tuple[int, int] = (0, 1),
                barrier: Callable[[str], None] = lambda name: None) -> 'InputPipeline':
  """Opens the prepared sequences of the configured corpus, preparing them first if they are missing.

  `shard = (index, count)`: this process trains on every count-th row (one shard per host); validation batches
  are the same for every shard. Only the process with index 0 trains a tokenizer or prepares data; `barrier(name)`
  (a sync of all hosts in a multi-host run) makes the others wait for it, then they open what it wrote.
  """
  validate_data_config(data_cfg)
  if not (isinstance(seq_len, int) and seq_len > 0):
    raise ConfigError(f'seq_len: must be a positive integer, got {seq_len!r}')
  if not (isinstance(batch_size, int) and batch_size > 0):
    raise ConfigError(f'batch_size: must be a positive integer, got {batch_size!r}')
  corpus = corpus_lib.open_corpus(data_cfg)
  chief = shard[0] == 0
  if chief:
    tokenizer = _tokenizer(data_cfg, corpus, workdir, chief=True)
  barrier('diffjax: tokenizer ready')
  if not chief:
    tokenizer = _tokenizer(data_cfg, corpus, workdir, chief=False)
  folder = prepare.prepared_folder(data_cfg, corpus, tokenizer, seq_len)
  if chief:
    prepare.prepare(corpus, tokenizer, seq_len, folder)
  barrier('diffjax: data prepared')
  return InputPipeline(folder, corpus=corpus, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size,
                       seed=seed, shard=shard, read_threads=data_cfg.read_threads,
                       prefetch_batches=data_cfg.prefetch_batches)


# -- tokenizers ---------------------------------------------------------------------------------------------------

def _tokenizer(data_cfg, corpus: corpus_lib.Corpus, workdir: str | None, chief: bool) -> tokenizers.Tokenizer:
  """The byte tokenizer, or the run's SentencePiece model: the workdir's, else the corpus's cached one, else a new
  one the chief trains on the train split (and caches, so every run on this corpus shares its vocabulary and data).
  The chief also keeps a copy in the workdir."""
  if data_cfg.tokenizer == 'byte':
    return tokenizers.ByteTokenizer()
  name = f'sentencepiece_{data_cfg.sp_vocab_size}_{data_cfg.sp_train_chars}.model'
  cached = epath.Path(prepare.data_root(data_cfg)) / corpus.key / name
  kept = epath.Path(workdir) / TOKENIZER_FILE if workdir else None
  # A damaged model is refused, never trained anew: a run's checkpoints are of use with its own tokenizer only.
  candidates = [(cached, 'data.data_dir', 'delete it to have a new one trained, or restore it from a copy (a run\'s '
                 f'WORKDIR/{TOKENIZER_FILE} is one)')]
  if kept:
    candidates.insert(0, (kept, '--workdir', f'restore it from a copy, or delete it to take {cached} again (a resumed '
                          'run checks that it is the one it trained with)'))
  for path, key, remedy in candidates:
    if path.exists():
      tokenizer = tokenizers.SentencePieceTokenizer.load(path, key=key, remedy=remedy)
      if tokenizer.vocab_size != data_cfg.sp_vocab_size:
        raise ConfigError(f'data.sp_vocab_size: {path} has {tokenizer.vocab_size} pieces but the config asks for '
                          f'{data_cfg.sp_vocab_size}; keep the value this run was started with or use a new workdir')
      break
  else:  # no model saved yet
    if not chief:
      raise ConfigError(f'data.data_dir: no tokenizer at {cached}; in a multi-host run data.data_dir must be a '
                        'folder that every host shares')
    # Read before training (which holds every sentence in memory anyway), so that a binary file is refused before
    # its characters make the vocabulary fail or a vocabulary learned from them is kept.
    texts = list(_texts_up_to(corpus.splits[corpus_lib.TRAIN], data_cfg.sp_train_chars))
    corpus.decoding.check()
    tokenizer = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=data_cfg.sp_vocab_size)
    tokenizer.save(cached)
  if chief and kept and not kept.exists():
    tokenizer.save(kept)
  return tokenizer


def _texts_up_to(texts, max_chars: int) -> Iterator[str]:
  """The texts, the last one cut so they add up to at most `max_chars` characters."""
  remaining = max_chars
  for text in texts:
    if remaining <= 0:
      return
    text = text[:remaining]
    remaining -= len(text)
    yield text


# -- reading ------------------------------------------------------------------------------------------------------

# Up to about 4 epochs, repeated tokens train a language model about as well as new ones; past that their worth
# falls fast (Muennighoff et al., "Scaling Data-Constrained Language Models", NeurIPS 2023).
USEFUL_PASSES = 4


class InputPipeline:
  """Training batches (a new permutation of all rows each epoch, endless) and evaluation batches (fixed)."""

  def __init__(self, folder: str, *, corpus: corpus_lib.Corpus, tokenizer: tokenizers.Tokenizer, seq_len: int,
               batch_size: int, seed: int, shard: tuple[int, int] = (0, 1), read_threads: int = 8,
               prefetch_batches: int = 2):
    self.folder, self.tokenizer, self._corpus_key = folder, tokenizer, corpus.config_key
    self.meta = prepare.read_meta(folder)
    self._seq_len, self._batch_size, self._seed = seq_len, batch_size, seed
    self._shard, self._read_threads, self._prefetch_batches = shard, read_threads, prefetch_batches
    count = shard[1]
    # Every process of a run saves the same position (process 0 writes it), so it names the shard count only.
    self.identity = f'{corpus.identity}, {self.meta["tokenizer"]}, seq {seq_len}' + (
        f', {count} shards' if count > 1 else '')
    if self.meta['splits'][corpus_lib.TRAIN]['rows'] < count:
      raise ConfigError(f'data.{corpus.config_key}: {self.meta["splits"][corpus_lib.TRAIN]["rows"]} training '
                        f'sequences cannot be shared among {count} processes; use a larger corpus or fewer hosts')

  def passes(self, steps: int) -> float:
    """How many times `steps` training steps, each of every process's batch, read the training split."""
    return steps * self._batch_size * self._shard[1] / self.meta['splits'][corpus_lib.TRAIN]['rows']

  def reading_plan(self, steps: int) -> str:
    """How much of the training split `steps` steps read, with a warning where they repeat it past its use."""
    passes, rows = self.passes(steps), self.meta['splits'][corpus_lib.TRAIN]['rows']
    plan = f'{steps} steps read {round(passes * rows):,} training sequences, {passes:.3g} passes over the split\'s ' \
           f'{rows:,}'
    if passes > USEFUL_PASSES:
      plan += (f'; past about {USEFUL_PASSES} passes repeated text trains less than new text and the validation '
               f'loss may rise: use a larger corpus (data.{self._corpus_key}) or fewer train.steps')
    return plan

  def rows(self, split: str) -> grain.MapDataset:
    """The packed rows of a split, (seq_len + 1,) int32 each, in stored order."""
    paths = [os.path.join(self.folder, name) for name in self.meta['splits'][split]['shards']]
    dtype = np.dtype(self.meta['dtype'])
    return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(
        lambda record: np.frombuffer(record, dtype).astype(np.int32))

  def train_batches(self) -> grain.MapDataset:
    """Batch k of the endless training stream, by index."""
    index, count = self._shard
    return (self.rows(corpus_lib.TRAIN)[index::count]
            .shuffle(seed=_shuffle_seed(self._seed))
            .repeat()  # a new permutation every epoch
            .batch(self._batch_size, drop_remainder=True, batch_fn=self._to_batch))

  def train_iterator(self, to_device: Callable[[Batch], Any] = lambda batch: batch) -> 'TrainIterator':
    """A new iterator from the start of the training stream; `set_state` moves it elsewhere.

    `to_device` runs in the prefetch thread, so the step never waits for a host-to-device copy.
    """
    return TrainIterator(self, to_device)

  def eval_batches(self, num_batches: int) -> list[Batch]:
    """Up to `num_batches` batches of validation rows, the same in every run; the last completed with mask-0 rows.

    Rows are taken in a fixed shuffled order, so a few batches sample many documents rather than the first one.
    """
    rows = self.rows(corpus_lib.VALIDATION).shuffle(seed=_shuffle_seed(_EVAL_SEED))
    batches = rows[:num_batches * self._batch_size].batch(self._batch_size, batch_fn=self._to_batch)
    return [batches[i] for i in range(len(batches))]

  def _to_batch(self, rows) -> Batch:
    # Only the last evaluation batch can be short (training drops it): PAD rows, which the mask leaves out, fill it.
    padding = [np.full(self._seq_len + 1, self.tokenizer.pad_id, np.int32)] * (self._batch_size - len(rows))
    return batch_of_rows(np.stack([*rows, *padding]), self.tokenizer)


class TrainIterator:
  """Endless training batches, read ahead by Grain's threads and put on the devices by Grain's prefetch thread.

  `get_state()` is a JSON dict: the corpus and the number of batches taken. `set_state(state)` on an iterator of
  the same prepared data (in this process or a later one) makes it yield the very batches that followed.
  `wait_seconds` adds up the time `next()` spent waiting for data, which the step metrics report.
  """

  def __init__(self, pipeline: InputPipeline, to_device: Callable[[Batch], Any]):
    self._pipeline, self._to_device = pipeline, to_device
    self._batches = pipeline.train_batches()
    self.wait_seconds = 0.0
    self._iterator = None
    self._start(0)

  def _start(self, position: int):
    """Reads from batch `position` on: the stream is indexed by batch, so a position is all a resume needs."""
    self.close()
    self._position = position
    threads = self._pipeline._read_threads
    host_batches = self._batches[position:].to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
    # The copy to the devices runs in the prefetch thread, so the step never waits for it.
    self._iterator = iter(grain.experimental.ThreadPrefetchIterDataset(
        host_batches.map(self._to_device), prefetch_buffer_size=self._pipeline._prefetch_batches))

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self):
    start = time.perf_counter()
    batch = next(self._iterator)
    self.wait_seconds += time.perf_counter() - start
    self._position += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'corpus': self._pipeline.identity, 'next_batch': self._position}

  def set_state(self, state: dict[str, Any]) -> None:
    if 'next_batch' not in state:
      raise ConfigError('data: the checkpoint holds an input position of an older diffjax input pipeline; '
                        'start a new workdir, or use checkpoint.init_from to keep its parameters')
    if state['corpus'] != self._pipeline.identity:
      raise ConfigError(f'data: the saved input position is for {state["corpus"]!r} but this config reads '
                        f'{self._pipeline.identity!r}; restore the data config of that run or start a new workdir')
    self._start(int(state['next_batch']))

  def close(self) -> None:
    """Stops the prefetch thread."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


def batch_of_rows(rows_BxL: np.ndarray, tokenizer: tokenizers.Tokenizer) -> Batch:
  """The batch (module docstring) of rows of seq_len + 1 tokens that overlap their neighbours by one."""
  inputs, targets = np.ascontiguousarray(rows_BxL[:, :-1]), np.ascontiguousarray(rows_BxL[:, 1:])
  batch = {'inputs': inputs, 'targets': targets, 'mask': targets != tokenizer.pad_id,
           'segment_ids': segment_ids(inputs, tokenizer.eos_id)}
  return {key: value.astype(BATCH_DTYPES[key], copy=False) for key, value in batch.items()}


def segment_ids(inputs_BxT: np.ndarray, eos_id: int) -> np.ndarray:
  """Document index of each input token within its row: a new document starts at each EOS, which opens it (the
  EOS input predicts the document's first token, so it must not see the document before)."""
  return np.cumsum(inputs_BxT == eos_id, axis=1, dtype=np.int32)


def _shuffle_seed(seed: int) -> int:
  # Grain shuffles epoch e with a seed derived from this one; hashing keeps neighbouring seeds apart.
  return int.from_bytes(hashlib.sha256(f'shuffle:{seed}'.encode()).digest()[:4], 'little')
