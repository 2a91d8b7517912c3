"""Where training text comes from: local `.txt`/`.txt.gz` files, local Hugging Face `datasets` files (Parquet or
Arrow, a document per row), Python's standard library, or a TFDS dataset.

A corpus is two random-access sequences of document texts (train and validation) and a key that names it. The key
changes when the corpus does (files added, edited or re-split), so prepared data is never reused for another corpus.
Local files are split by document, by a hash of each file's name, so the split is stable as files come and go;
the rows of Hugging Face files likewise, by a hash of '<file name>:<row>'.
Bytes of a file that are not UTF-8 are read as U+FFFD and counted in the corpus's `DecodingTally`, which whoever
reads the corpus checks against data.max_undecodable_fraction.
"""

import dataclasses
import functools
import glob
import gzip
import hashlib
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from tqdm import tqdm

from diffjax.data import hf_files
from diffjax.errors import ConfigError, first_line

TRAIN, VALIDATION = 'train', 'validation'
_TEXT_SUFFIXES = ('.txt', '.txt.gz')
_UTF8_BOM = b'\xef\xbb\xbf'
# Tests and vendored packages would dominate the standard library's text.
_STDLIB_SKIPPED_FOLDERS = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'})


class DecodingTally:
  """The bytes of each file read that are not UTF-8 (each is read as U+FFFD), checked once a corpus has been read.

  A file with any is named in a warning; files with more than `max_fraction` of their bytes undecodable (text in
  another encoding, binary data) are named, worst first, in one error.
  """

  def __init__(self, config_key: str, max_fraction: float):
    self._config_key, self._max_fraction = config_key, max_fraction
    self._counts: dict[str, tuple[int, int]] = {}  # path -> (undecodable bytes, bytes)
    self._warned: set[str] = set()

  def add(self, path: str, undecodable: int, size: int) -> None:
    self._counts[path] = (undecodable, size)

  def check(self) -> None:
    """Raises ConfigError if a file read so far is over the limit; else warns once about each file with some."""
    share = lambda path: self._counts[path][0] / self._counts[path][1]
    worst = sorted(self._counts, key=share, reverse=True)
    over = [path for path in worst if share(path) > self._max_fraction]
    if over:
      raise ConfigError(
          f'data.{self._config_key}: {len(over)} file(s) are not UTF-8 text (more than data.max_undecodable_fraction'
          f'={self._max_fraction:g} of their bytes undecodable): {self._describe(over)}; convert them to UTF-8 '
          '(e.g. iconv -f latin1 -t utf-8), leave them out, or raise data.max_undecodable_fraction')
    new = [path for path in worst if path not in self._warned]
    if new:
      logging.warning('%d file(s) hold bytes that are not UTF-8, read as U+FFFD: %s', len(new), self._describe(new))
      self._warned.update(new)

  def _describe(self, paths: list[str], shown: int = 3) -> str:
    def one(path):
      bad, size = self._counts[path]
      return f'{path} ({bad:,} of {size:,} bytes, {bad / size:.1%})'
    return ', '.join(map(one, paths[:shown])) + (f' and {len(paths) - shown} more' if len(paths) > shown else '')


@dataclasses.dataclass(frozen=True)
class Corpus:
  key: str  # a folder name: the same documents and split give the same key, on any machine
  identity: str  # names the corpus in a saved input position
  config_key: str  # the config key that chose the corpus, for error messages
  splits: dict[str, Sequence[str]]  # TRAIN / VALIDATION -> document texts
  decoding: DecodingTally  # fed as files are read; whoever reads the corpus checks it


class _Texts(Sequence):
  """Document texts read when asked for: text i is `read(items()[i])`.

  `items` is called on first use only, so a split that takes work to find (a hash per row of Hugging Face files,
  seconds for millions) costs nothing to a run that finds its data prepared.
  """

  def __init__(self, items: Callable[[], Sequence], read: Callable[[Any], str]):
    self._items, self._read = functools.cache(items), read

  def __len__(self):
    return len(self._items())

  def __getitem__(self, index):
    return self._read(self._items()[index])


def open_corpus(data_cfg: ml_collections.ConfigDict) -> Corpus:
  if data_cfg.source == 'tfds':
    return _tfds_corpus(data_cfg)
  if data_cfg.source == 'hf':
    return _hf_corpus(data_cfg)
  if data_cfg.source == 'local':
    files = [path for path in find_text_files(data_cfg.text_glob) if not _is_empty(path)]
    if not files:
      raise ConfigError(f'data.text_glob: every file matching {data_cfg.text_glob!r} is empty; point it at text '
                        'files with content')
    if len(files) < 2:
      raise ConfigError(f'data.text_glob: only one non-empty document matches {data_cfg.text_glob!r}; documents '
                        'go whole to train or validation, so point it at two or more files')
    root = os.path.commonpath([os.path.dirname(path) for path in files])
    prefix, config_key = _folder_slug(root, 'text'), 'text_glob'
  else:
    root = sysconfig.get_paths()['stdlib']
    files = [path for path in stdlib_source_files(root) if os.path.getsize(path) > 0]
    prefix, config_key = f'python{sys.version_info.major}{sys.version_info.minor}', 'source'
  names = [os.path.relpath(path, root) for path in files]
  validation = validation_documents(names, data_cfg.validation_fraction)
  decoding = DecodingTally(config_key, data_cfg.max_undecodable_fraction)
  read = functools.partial(read_document, decoding=decoding)
  train_paths = [path for path, name in zip(files, names) if name not in validation]
  validation_paths = [path for path, name in zip(files, names) if name in validation]
  splits = {TRAIN: _Texts(lambda: train_paths, read), VALIDATION: _Texts(lambda: validation_paths, read)}
  digest = _files_digest([f'validation_fraction={data_cfg.validation_fraction!r}'], names, files)
  return Corpus(key=f'{prefix}_{digest}', identity=f'{prefix} ({len(files)} files, {digest})',
                config_key=config_key, splits=splits, decoding=decoding)


def _hf_corpus(data_cfg) -> Corpus:
  files = find_hf_files(data_cfg.hf_files)
  columns = [hf_files.TextColumn(path, data_cfg.hf_text_field) for path in files]  # schemas and row counts only
  root = os.path.commonpath([os.path.dirname(path) for path in files])
  names = [os.path.relpath(path, root) for path in files]
  rows = hf_files.Rows(columns)
  if rows.num_rows < 2:
    raise ConfigError(f'data.hf_files: the files matching {data_cfg.hf_files!r} hold {rows.num_rows} row(s); rows go '
                      'whole to train or validation, so point it at files with two or more')

  @functools.cache
  def held_out() -> np.ndarray:
    scores = []
    with tqdm(total=rows.num_rows, unit='row', desc='splitting rows', leave=False, dynamic_ncols=True,
              disable=None) as bar:
      for name, column in zip(names, columns):
        scores.append(np.fromiter((_split_score(f'{name}:{row}') for row in range(column.num_rows)), float,
                                  column.num_rows))
        bar.update(column.num_rows)
    return held_out_mask(np.concatenate(scores), data_cfg.validation_fraction)

  read = lambda row: rows.text(int(row))
  splits = {TRAIN: _Texts(lambda: np.flatnonzero(~held_out()), read),
            VALIDATION: _Texts(lambda: np.flatnonzero(held_out()), read)}
  prefix = _folder_slug(root, 'hf')
  # A Parquet file's end is its footer, which describes every row group.
  digest = _files_digest([f'validation_fraction={data_cfg.validation_fraction!r}',
                          f'hf_text_field={data_cfg.hf_text_field}'], names, files)
  # Arrow strings are UTF-8 by construction, so nothing feeds the tally.
  identity = f'{prefix} ({len(files)} files, column {data_cfg.hf_text_field}, {digest})'
  return Corpus(key=f'{prefix}_{digest}', identity=identity, config_key='hf_files', splits=splits,
                decoding=DecodingTally('hf_files', data_cfg.max_undecodable_fraction))


def _tfds_corpus(data_cfg) -> Corpus:
  import tensorflow_datasets as tfds  # only this source needs it, and it is slow to import
  name = data_cfg.tfds_name
  try:
    builder = tfds.builder(name, data_dir=data_cfg.data_dir)
  except Exception as e:  # TFDS raises several types for unknown names, configs and versions.
    raise ConfigError(f'data.tfds_name: no TFDS dataset {name!r} ({first_line(e)}); use a name from the TFDS '
                      "catalog such as 'lm1b', or data.source='local' for text files") from e
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(file_format='array_record')
    except Exception as e:  # Network, manual-download and missing-dependency failures all end here.
      raise ConfigError(f'data.tfds_name: {name!r} is not prepared in {builder.data_dir_root} and could not be '
                        f'downloaded and prepared ({type(e).__name__}: {first_line(e)}); without TensorFlow, export '
                        "the corpus's documents as .txt or .txt.gz files and train on them with "
                        "--config.data.source=local --config.data.text_glob='DIR/*.txt.gz', tokenized once by "
                        '`python -m diffjax.prepare` with the same flags (README, "Recipe data"); '
                        'or set data.data_dir to a folder where TFDS has built it (`tfds build '
                        f'{name} --file_format=array_record --data_dir=DIR`, which needs TensorFlow)') from e

  def texts(source) -> _Texts:
    # TFDS returns Text features as UTF-8 bytes.
    text = lambda value: value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value)
    return _Texts(lambda: source, lambda example: text(example[data_cfg.text_key]))

  features = list(builder.info.features.keys())
  if data_cfg.text_key not in features:
    raise ConfigError(f'data.text_key: {data_cfg.text_key!r} is not a feature of {builder.info.full_name}; '
                      f'use one of {", ".join(features)}')
  splits = {}
  for split, key, requested in ((TRAIN, 'train_split', data_cfg.train_split),
                                (VALIDATION, 'eval_split', data_cfg.eval_split)):
    if requested not in builder.info.splits:
      raise ConfigError(f'data.{key}: {builder.info.full_name} has no split {requested!r}; use one of '
                        f'{", ".join(builder.info.splits)}')
    try:
      splits[split] = texts(builder.as_data_source(requested))
    except (NotImplementedError, ValueError) as e:
      raise ConfigError(f'data.tfds_name: {builder.info.full_name} in {builder.data_dir} has no random-access '
                        f'files ({first_line(e)}); rebuild it with `tfds build {builder.name} '
                        '--file_format=array_record`') from e
  identity = f'{builder.info.full_name}[{data_cfg.train_split}|{data_cfg.eval_split}].{data_cfg.text_key}'
  slug = re.sub(r'[^a-z0-9.]+', '_', builder.info.full_name.lower())
  # TFDS Text features are UTF-8 by construction, so nothing feeds the tally.
  return Corpus(key=f'{slug}_{_digest([identity])}', identity=identity, config_key='tfds_name', splits=splits,
                decoding=DecodingTally('tfds_name', data_cfg.max_undecodable_fraction))


def check_text_glob(text_glob: str) -> None:
  """Raises ConfigError if `text_glob`, or the folder a glob searches, does not exist; reads no files."""
  _check_pattern(text_glob, 'data.text_glob', _TEXT_SUFFIXES)


def find_text_files(text_glob: str, key: str = 'data.text_glob') -> list[str]:
  """Sorted `.txt` / `.txt.gz` files in a folder (recursively), a single file, or matching a glob; an error names
  `key`, the config key or flag that gave `text_glob`."""
  return _matching_files(text_glob, key, _TEXT_SUFFIXES, 'text files')


def check_hf_files(hf_files_pattern: str) -> None:
  """Raises ConfigError if `datasets` is not installed or `hf_files_pattern` names nothing; reads no files."""
  hf_files.check_installed()
  _check_pattern(hf_files_pattern, 'data.hf_files', hf_files.SUFFIXES)


def find_hf_files(hf_files_pattern: str) -> list[str]:
  """Sorted `.parquet` / `.arrow` files in a folder (recursively; a `save_to_disk` folder gives its shards in
  order), a single file, or matching a glob."""
  hf_files.check_installed()
  folder = os.path.expanduser(hf_files_pattern)
  if os.path.isfile(os.path.join(folder, 'dataset_dict.json')):
    splits = sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name)))
    example = os.path.join(hf_files_pattern, splits[0] if splits and 'train' not in splits else 'train')
    raise ConfigError(f'data.hf_files: {hf_files_pattern!r} is a DatasetDict folder (splits: {", ".join(splits)}); '
                      f'point it at the folder of one split, e.g. {example}')
  return _matching_files(hf_files_pattern, 'data.hf_files', hf_files.SUFFIXES, 'Parquet or Arrow files')


def _check_pattern(pattern: str, key: str, suffixes: tuple[str, ...]) -> None:
  files = f'a folder, file or glob of {" or ".join(suffixes)} files'
  path = os.path.expanduser(pattern)
  if _is_glob(path):
    parts = path.split(os.sep)
    fixed = parts[:next(i for i, part in enumerate(parts) if _is_glob(part))]
    folder = os.sep.join(fixed) or os.curdir
    if not os.path.isdir(folder):
      raise ConfigError(f'{key}: the folder {folder!r} of {pattern!r} does not exist; point it at {files}')
  elif not os.path.exists(path):
    raise ConfigError(f'{key}: {pattern!r} does not exist; point it at {files}')


def _matching_files(pattern: str, key: str, suffixes: tuple[str, ...], noun: str) -> list[str]:
  _check_pattern(pattern, key, suffixes)
  path = os.path.expanduser(pattern)
  if _is_glob(path):
    candidates = glob.glob(path, recursive=True)
  elif os.path.isdir(path):
    candidates = [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names]
  else:
    candidates = [path]
  files = sorted(os.path.abspath(path) for path in candidates if path.endswith(suffixes) and os.path.isfile(path))
  if not files:
    raise ConfigError(f'{key}: no {" or ".join(suffixes)} files match {pattern!r}; point it at a folder or '
                      f'glob of {noun}')
  return files


def stdlib_source_files(root: str) -> list[str]:
  """Sorted `.py` files under the standard library folder `root`, skipping tests and installed packages."""
  files = []
  for folder, subfolders, names in os.walk(root):
    subfolders[:] = [name for name in subfolders if name not in _STDLIB_SKIPPED_FOLDERS]
    files.extend(os.path.join(folder, name) for name in names if name.endswith('.py'))
  return sorted(files)


def read_document(path: str, decoding: DecodingTally | None = None) -> str:
  """The text of a file: gunzipped if `.gz`, UTF-8 without BOM, with LF line ends. Bytes that are not UTF-8 become
  U+FFFD, and `decoding` counts them."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  try:
    text = data.decode('utf-8-sig')
  except UnicodeDecodeError:
    text = data.decode('utf-8-sig', errors='replace')
    if decoding:
      # Ignoring drops exactly the undecodable bytes; the BOM is dropped as well, but is valid.
      valid = len(data.decode('utf-8-sig', errors='ignore').encode('utf-8')) + 3 * data.startswith(_UTF8_BOM)
      decoding.add(path, len(data) - valid, len(data))
  return text.replace('\r\n', '\n')


def validation_documents(names: list[str], validation_fraction: float) -> set[str]:
  """The names that go to validation, chosen by a hash of the name; with two or more documents each split gets one."""
  held_out = held_out_mask(np.array([_split_score(name) for name in names]), validation_fraction)
  return {name for name, chosen in zip(names, held_out) if chosen}


def held_out_mask(scores: np.ndarray, validation_fraction: float) -> np.ndarray:
  """Which documents go to validation, given each one's `_split_score`: those below the fraction, moved so that with
  two or more documents each split gets one."""
  chosen = scores < validation_fraction
  if len(scores) >= 2:
    if not chosen.any():
      chosen[np.argmin(scores)] = True
    elif chosen.all():
      chosen[np.argmax(scores)] = False
  return chosen


def _split_score(name: str) -> float:
  """A number in [0, 1) that depends on the name alone."""
  return int.from_bytes(hashlib.sha256(name.encode('utf-8')).digest()[:8], 'big') / 2**64


def _folder_slug(folder: str, fallback: str) -> str:
  # The folder's name keeps prepared corpora recognisable when listing the data directory.
  return re.sub(r'[^a-z0-9]+', '_', os.path.basename(folder).lower()).strip('_') or fallback


def _files_digest(settings: list[str], names: list[str], files: list[str]) -> str:
  """Of the settings, and of each file's name, size and a hash of its ends: a copy of the corpus keeps its key (and
  its prepared data), an edit changes it, and nothing needs reading in full."""
  return _digest([*settings, *(f'{name}\t{os.path.getsize(path)}\t{_ends_digest(path)}'
                               for name, path in zip(names, files))])


def _digest(parts: list[str]) -> str:
  return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:16]


def _ends_digest(path: str, span: int = 1 << 16) -> str:
  with open(path, 'rb') as f:
    head = f.read(span)
    f.seek(max(0, os.path.getsize(path) - span))
    return hashlib.sha256(head + f.read()).hexdigest()[:16]


def _is_glob(pattern: str) -> bool:
  return any(wildcard in pattern for wildcard in '*?[')


def _is_empty(path: str) -> bool:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    head = f.read(len(_UTF8_BOM) + 1)
  return head in (b'', _UTF8_BOM)
