"""The input pipeline: documents from TFDS, tokenized, packed into fixed-length sequences and batched by Grain.

Each document is tokenized and followed by EOS; the token stream of consecutive documents is cut into
sequences of seq_len + 1 tokens, so a batch has no padding (except at the very end of the validation
split) and no token is lost or reordered. A batch is a dict of NumPy arrays:
  inputs  int32   (batch_size, seq_len)  tokens 0..seq_len-1 of each sequence
  targets int32   (batch_size, seq_len)  tokens 1..seq_len, the next token after each input
  mask    float32 (batch_size, seq_len)  1 where the target is a real token, 0 on padding
"""

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

from etils import epath
import grain
from grain.experimental import ConcatThenSplitIterDataset
from grain.experimental import LimitIterDataset
from grain.experimental import WindowShuffleIterDataset
import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow_datasets as tfds

from diffjax import text_builder
from diffjax import tokenizers
from diffjax.errors import ConfigError

SOURCES = ('stdlib', 'local', 'tfds')
TOKENIZERS = ('byte', 'sentencepiece')
# Saved in the workdir so a resumed run tokenizes exactly as before.
TOKENIZER_FILE = 'tokenizer.model'

Batch = dict[str, np.ndarray]
# Validation batches are drawn the same way in every run, whatever its seed, so runs compare.
_EVAL_SEED = 0

# Documents may be whole books: Grain's default read-ahead of hundreds of documents would hold gigabytes of
# tokens, and reading in the main thread keeps the order trivially deterministic.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def default_data_config() -> ml_collections.ConfigDict:
  """The `data` section of the training config."""
  cfg = ml_collections.ConfigDict()
  cfg.source = 'stdlib'  # 'stdlib' (Python's own sources, no download) | 'local' | 'tfds'
  cfg.tfds_name = config_dict.placeholder(str)  # source 'tfds': 'lm1b', 'c4/en:3.1.0', 'wikipedia/20230601.en'
  cfg.text_key = 'text'  # the feature that holds a document's text
  cfg.train_split = 'train'  # source 'tfds'; 'stdlib' and 'local' have 'train' and 'validation'
  cfg.eval_split = 'validation'  # source 'tfds'; lm1b has 'test' instead
  cfg.text_glob = config_dict.placeholder(str)  # source 'local': a folder, file or glob of .txt / .txt.gz
  cfg.validation_fraction = 0.05  # 'stdlib' and 'local': the share of documents held out for validation
  cfg.data_dir = config_dict.placeholder(str)  # TFDS data_dir; None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  cfg.tokenizer = 'byte'  # 'byte' | 'sentencepiece' (trained on the train split, saved in the workdir)
  cfg.sp_vocab_size = 8000
  cfg.sp_train_chars = 20_000_000  # at most this many characters of training text for the SentencePiece trainer
  cfg.shuffle_window = 1024  # packed sequences shuffled together, so a batch mixes many documents; 1: off
  cfg.num_workers = 0  # Grain worker processes (they need absl flags parsed, as absl.app does); 0: read in-process
  return cfg


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for what is wrong without reading any data (names, paths, ranges)."""
  def need(ok, key, message):
    if not ok:
      raise ConfigError(f'data.{key}: {message}')

  need(data_cfg.source in SOURCES, 'source', f'unknown source {data_cfg.source!r}; use one of {", ".join(SOURCES)}')
  need(data_cfg.tokenizer in TOKENIZERS, 'tokenizer',
       f'unknown tokenizer {data_cfg.tokenizer!r}; use one of {", ".join(TOKENIZERS)}')
  if data_cfg.source == 'local':
    need(data_cfg.text_glob, 'text_glob',
         "unset; with data.source='local' point it at a folder, file or glob of .txt or .txt.gz files")
    text_builder.check_text_glob(data_cfg.text_glob)
  if data_cfg.source == 'tfds':
    need(data_cfg.tfds_name, 'tfds_name', "unset; with data.source='tfds' name a TFDS dataset, e.g. 'lm1b'")
  for key in ('text_key', 'train_split', 'eval_split'):
    need(isinstance(data_cfg[key], str) and data_cfg[key], key, f'must be a non-empty string, got {data_cfg[key]!r}')
  need(isinstance(data_cfg.validation_fraction, (int, float)) and 0 < data_cfg.validation_fraction < 1,
       'validation_fraction',
       f'must be between 0 and 1 (exclusive), got {data_cfg.validation_fraction}')
  for key in ('sp_vocab_size', 'sp_train_chars'):
    need(isinstance(data_cfg[key], int) and data_cfg[key] > 0, key,
         f'must be a positive integer, got {data_cfg[key]!r}')
  if data_cfg.tokenizer == 'sentencepiece':
    need(data_cfg.sp_vocab_size >= tokenizers.SP_MIN_VOCAB_SIZE, 'sp_vocab_size',
         f'{data_cfg.sp_vocab_size} is too small; the byte-fallback model needs at least '
         f'{tokenizers.SP_MIN_VOCAB_SIZE} (use e.g. 8000)')
  need(isinstance(data_cfg.shuffle_window, int) and data_cfg.shuffle_window > 0, 'shuffle_window',
       f'must be a positive number of sequences (1 turns shuffling off), got {data_cfg.shuffle_window!r}')
  need(isinstance(data_cfg.num_workers, int) and data_cfg.num_workers >= 0, 'num_workers',
       f'must be 0 (read in this process) or a positive number of processes, got {data_cfg.num_workers!r}')


def build_input(data_cfg: ml_collections.ConfigDict, *, seq_len: int, batch_size: int, seed: int,
                workdir: str | None, shard: tuple[int, int] = (0, 1)) -> 'InputPipeline':
  """Prepares the corpus if needed, makes (or reloads from `workdir`) the tokenizer, checks sizes.

  `shard = (index, count)`: this process trains on every count-th training document from `index` (one shard per
  host of a multi-host run); validation batches are the same for every shard.
  """
  validate_data_config(data_cfg)
  if not (isinstance(seq_len, int) and seq_len > 0):
    raise ConfigError(f'seq_len: must be a positive integer, got {seq_len!r}')
  if not (isinstance(batch_size, int) and batch_size > 0):
    raise ConfigError(f'batch_size: must be a positive integer, got {batch_size!r}')
  corpus = _open_corpus(data_cfg)
  tokenizer = _make_tokenizer(data_cfg, corpus, workdir)
  for split in (corpus.train_split, corpus.eval_split):
    _check_holds_one_sequence(corpus, split, tokenizer, seq_len)
  num_documents = len(corpus.sources[corpus.train_split])
  if shard[1] > num_documents:
    raise ConfigError(f'data.{corpus.config_key}: {num_documents} training documents cannot be shared among '
                      f'{shard[1]} processes; use a larger corpus or fewer hosts')
  return InputPipeline(corpus=corpus, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                       shuffle_window=data_cfg.shuffle_window, num_workers=data_cfg.num_workers, shard=shard)


class TrainIterator:
  """Endless training batches whose exact position can be saved and restored.

  `get_state()` is a JSON-serialisable dict; `set_state(state)` on an iterator of the same pipeline
  (in this process or a later one) makes it yield the very batches that followed `get_state()`.
  """

  def __init__(self, iterator: grain.DatasetIterator, corpus_id: str):
    self._iterator = iterator
    self._corpus_id = corpus_id

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    return {'corpus': self._corpus_id, 'grain': json.loads(json.dumps(self._iterator.get_state()))}

  def set_state(self, state: dict[str, Any]) -> None:
    if state['corpus'] != self._corpus_id:
      raise ConfigError(f'data: the saved input position is for {state["corpus"]!r} but this config reads '
                        f'{self._corpus_id!r}; restore the data config of that run or start a new workdir')
    self._iterator.set_state(_with_tuple_slices(state['grain']))

  def close(self) -> None:
    """Stops Grain's worker processes, if any, and frees their shared memory."""
    self._iterator.close()


class InputPipeline:
  """Training batches (shuffled by document each epoch, endless) and evaluation batches (fixed order)."""

  def __init__(self, *, corpus: '_Corpus', tokenizer: tokenizers.Tokenizer, seq_len: int, batch_size: int,
               seed: int, shuffle_window: int, num_workers: int, shard: tuple[int, int] = (0, 1)):
    self.tokenizer = tokenizer
    self._shard = shard
    self._corpus = corpus
    self._seq_len = seq_len
    self._batch_size = batch_size
    self._seed = seed
    self._shuffle_window = shuffle_window
    self._num_workers = num_workers

  def train_iterator(self) -> TrainIterator:
    """A new iterator from the start of the training stream; `set_state` moves it elsewhere."""
    index, count = self._shard
    documents = (grain.MapDataset.source(self._corpus.sources[self._corpus.train_split])[index::count]
                 .shuffle(seed=_shuffle_seed(self._seed))
                 .repeat())
    batches = self._batches(documents, drop_remainder=True, seed=self._seed)
    if self._num_workers:
      batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    # Positions are document indices and token offsets: they stay valid wherever the same corpus is
    # prepared (paths and file times may differ), but not for another document count or tokenizer.
    num_documents = len(self._corpus.sources[self._corpus.train_split])
    corpus_id = (f'{self._corpus.stable_name}[{self._corpus.train_split}]: {num_documents} documents, '
                 f'{type(self.tokenizer).__name__} of {self.tokenizer.vocab_size} tokens')
    if count > 1:
      corpus_id += f', shard {index} of {count}'
    return TrainIterator(iter(batches), corpus_id=corpus_id)

  def eval_batches(self, num_batches: int) -> grain.IterDataset:
    """`num_batches` batches of the validation split (fewer if it ends), the same on every pass and every run.

    Documents and sequences are shuffled with a fixed seed, so a few batches sample many documents rather than
    the first one or two. The last batch is completed with padding rows of mask 0 to keep shapes fixed.
    """
    if num_batches < 1:
      raise ValueError(f'eval_batches needs a positive number of batches, got {num_batches}')
    documents = (grain.MapDataset.source(self._corpus.sources[self._corpus.eval_split])
                 .shuffle(seed=_shuffle_seed(_EVAL_SEED)))
    batches = self._batches(documents, drop_remainder=False, seed=_EVAL_SEED)
    pad = functools.partial(_pad_rows, batch_size=self._batch_size, pad_id=self.tokenizer.pad_id)
    return LimitIterDataset(batches, count=num_batches).map(pad)

  def _batches(self, documents: grain.MapDataset, *, drop_remainder: bool, seed: int) -> grain.IterDataset:
    tokens = documents.map(functools.partial(_tokenize, tokenizer=self.tokenizer, text_key=self._corpus.text_key))
    sequences = ConcatThenSplitIterDataset(tokens.to_iter_dataset(_READ_OPTIONS),
                                           length_struct={'tokens': self._seq_len + 1})
    if self._shuffle_window > 1:
      # Consecutive sequences come from the same document; without this a batch is often one document.
      sequences = WindowShuffleIterDataset(sequences, window_size=self._shuffle_window,
                                           seed=_shuffle_seed(seed) + 1)
    return (sequences.batch(self._batch_size, drop_remainder=drop_remainder)
            .map(functools.partial(_inputs_and_targets, pad_id=self.tokenizer.pad_id)))


@dataclasses.dataclass(frozen=True)
class _Corpus:
  """Random-access sources of a prepared TFDS dataset, and how to name it in errors."""

  name: str  # the dataset's name/config/version
  stable_name: str  # the same for the same corpus on another machine
  config_key: str  # the config key that chose the corpus
  sources: dict[str, Any]  # split -> ArrayRecord data source
  train_split: str
  eval_split: str
  text_key: str


def _open_corpus(data_cfg: ml_collections.ConfigDict) -> _Corpus:
  """Builds (or finds already built) the configured dataset and opens its two splits."""
  data_dir = os.path.expanduser(data_cfg.data_dir) if data_cfg.data_dir else None
  if data_cfg.source == 'tfds':
    builder = _prepared_tfds_builder(data_cfg.tfds_name, data_dir)
    config_key, train_split, eval_split = 'tfds_name', data_cfg.train_split, data_cfg.eval_split
  else:
    if data_cfg.source == 'local':
      builder = text_builder.local_text(data_cfg.text_glob, validation_fraction=data_cfg.validation_fraction,
                                        data_dir=data_dir)
      config_key = 'text_glob'
    else:
      builder = text_builder.python_stdlib(validation_fraction=data_cfg.validation_fraction, data_dir=data_dir)
      config_key = 'source'
    text_builder.prepare(builder)
    train_split, eval_split = text_builder.TRAIN_SPLIT, text_builder.VALIDATION_SPLIT
  features = list(builder.info.features.keys())
  if data_cfg.text_key not in features:
    raise ConfigError(f'data.text_key: {data_cfg.text_key!r} is not a feature of {builder.info.full_name}; '
                      f'use one of {", ".join(features)}')
  sources = {train_split: _data_source(builder, train_split, 'train_split'),
             eval_split: _data_source(builder, eval_split, 'eval_split')}
  # Local corpora are named by a hash of file paths and times, which differ from machine to machine.
  stable_name = builder.info.full_name if data_cfg.source == 'tfds' else builder.name
  return _Corpus(name=builder.info.full_name, stable_name=stable_name, config_key=config_key, sources=sources,
                 train_split=train_split, eval_split=eval_split, text_key=data_cfg.text_key)


def _prepared_tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for unknown names, configs and versions.
    raise ConfigError(f'data.tfds_name: no TFDS dataset {name!r} ({_first_line(e)}); use a name from the TFDS '
                      "catalog such as 'lm1b' or 'c4/en:3.1.0'") from e
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(file_format=text_builder.FILE_FORMAT)
    except Exception as e:  # Network, manual-download and missing-dependency failures all end here.
      raise ConfigError(f'data.tfds_name: {name!r} is not prepared in {builder.data_dir_root} and could not be '
                        f'downloaded and prepared ({type(e).__name__}: {_first_line(e)}); set data.data_dir to a '
                        f'folder that holds it, or run `tfds build {name} --file_format={text_builder.FILE_FORMAT} '
                        f'--data_dir=DIR` where it can download') from e
  return builder


def _data_source(builder: tfds.core.DatasetBuilder, split: str, split_key: str) -> Any:
  if split not in builder.info.splits:
    raise ConfigError(f'data.{split_key}: {builder.info.full_name} has no split {split!r}; use one of '
                      f'{", ".join(builder.info.splits)}')
  try:
    return builder.as_data_source(split)
  except (NotImplementedError, ValueError) as e:
    raise ConfigError(f'data.tfds_name: {builder.info.full_name} in {builder.data_dir} has no random-access '
                      f'files ({_first_line(e)}); rebuild it with `tfds build {builder.name} '
                      f'--file_format={text_builder.FILE_FORMAT}`') from e


def _make_tokenizer(data_cfg: ml_collections.ConfigDict, corpus: _Corpus,
                    workdir: str | None) -> tokenizers.Tokenizer:
  if data_cfg.tokenizer == 'byte':
    return tokenizers.ByteTokenizer()
  path = epath.Path(workdir) / TOKENIZER_FILE if workdir else None
  if path is not None and path.exists():
    tokenizer = tokenizers.SentencePieceTokenizer.load(path)
    if tokenizer.vocab_size != data_cfg.sp_vocab_size:
      raise ConfigError(f'data.sp_vocab_size: {path} has {tokenizer.vocab_size} pieces but the config asks for '
                        f'{data_cfg.sp_vocab_size}; keep the value this run was started with or use a new workdir')
    return tokenizer
  texts = _texts_up_to(_split_texts(corpus, corpus.train_split), data_cfg.sp_train_chars)
  tokenizer = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=data_cfg.sp_vocab_size)
  if path is not None:
    tokenizer.save(path)
  return tokenizer


def _split_texts(corpus: _Corpus, split: str) -> Iterator[str]:
  source = corpus.sources[split]
  for index in range(len(source)):
    yield _text_of(source[index], corpus.text_key)


def _texts_up_to(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """The texts, the last one cut so they add up to at most `max_chars` characters."""
  remaining = max_chars
  for text in texts:
    if remaining <= 0:
      return
    text = text[:remaining]
    remaining -= len(text)
    yield text


def _check_holds_one_sequence(corpus: _Corpus, split: str, tokenizer: tokenizers.Tokenizer, seq_len: int) -> None:
  """Raises ConfigError if the split has fewer than seq_len + 1 tokens; reads only as far as needed."""
  needed = seq_len + 1
  count = 0
  for text in _split_texts(corpus, split):
    count += len(tokenizer.encode(text)) + 1
    if count >= needed:
      return
  raise ConfigError(f'data.{corpus.config_key}: the {split!r} split of {corpus.name} has {count} tokens, fewer than '
                    f'one sequence of seq_len+1 = {needed}; lower seq_len or use a larger corpus')


def _tokenize(example: dict[str, Any], *, tokenizer: tokenizers.Tokenizer, text_key: str) -> dict[str, np.ndarray]:
  ids = tokenizer.encode(_text_of(example, text_key))
  ids.append(tokenizer.eos_id)
  return {'tokens': np.asarray(ids, dtype=np.int32)}


def _text_of(example: dict[str, Any], text_key: str) -> str:
  value = example[text_key]
  # TFDS returns Text features as UTF-8 bytes.
  return value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value)


def _inputs_and_targets(packed: dict[str, np.ndarray], *, pad_id: int) -> Batch:
  # The packer fills the tail of the last sequence with zeros, a real token id; segment id 0 marks them.
  real = packed['tokens_segment_ids'] > 0
  tokens = np.where(real, packed['tokens'], pad_id).astype(np.int32)
  return {
      'inputs': np.ascontiguousarray(tokens[:, :-1]),
      'targets': np.ascontiguousarray(tokens[:, 1:]),
      'mask': real[:, 1:].astype(np.float32),
  }


def _pad_rows(batch: Batch, *, batch_size: int, pad_id: int) -> Batch:
  missing = batch_size - len(batch['mask'])
  if not missing:
    return batch
  fill = {'inputs': pad_id, 'targets': pad_id, 'mask': 0}
  return {key: np.concatenate([value, np.full((missing, value.shape[1]), fill[key], value.dtype)])
          for key, value in batch.items()}


def _shuffle_seed(seed: int) -> int:
  # Grain shuffles epoch e with seed + e; hashing keeps runs with neighbouring seeds from sharing epochs.
  return int.from_bytes(hashlib.sha256(f'shuffle:{seed}'.encode()).digest()[:4], 'little')


def _with_tuple_slices(state: Any) -> Any:
  """Grain's packer compares its (start, stop) slices to a tuple, but JSON turned them into lists."""
  if isinstance(state, dict):
    return {key: ({name: tuple(span) for name, span in value.items()} if key == 'remainder_slices'
                  else _with_tuple_slices(value))
            for key, value in state.items()}
  if isinstance(state, list):
    return [_with_tuple_slices(value) for value in state]
  return state


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return lines[0][:200] if lines else type(error).__name__
