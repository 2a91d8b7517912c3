"""data.source='hf': local Parquet and Arrow files of Hugging Face datasets, a document per row, split, packed and
cached as local text files are; and the one-line errors for what is wrong with them, raised before any text is read.

The tests that read files need the optional `datasets` package (pip install 'diffjax[hf-data]') and skip without it.
"""

import contextlib
import pathlib
import random
import shutil
import sys

import numpy as np
import pytest

from diffjax.data import corpus as corpus_lib
from diffjax.data import hf_files
from diffjax.data import pipeline as data
from diffjax.errors import ConfigError

TRAIN, VALIDATION = corpus_lib.TRAIN, corpus_lib.VALIDATION
_WORDS = ('the', 'quick', 'brown', 'fox', 'café', 'naïve', 'smile 😀', 'def', 'return', '\n', '\n    ')


@pytest.fixture
def hf():
  return pytest.importorskip('datasets')


def _documents(num_docs: int, seed: int = 0) -> list[str]:
  """Distinct documents of 3 to 40 words, some of them non-ASCII."""
  rng = random.Random(seed)
  return [f'{i} ' + ' '.join(rng.choice(_WORDS) for _ in range(rng.randint(3, 40))) for i in range(num_docs)]


def _write_parquet(path: pathlib.Path, texts: list[str], row_group_size: int = 5, **columns):
  """A Parquet file of small row groups, so that reading crosses row groups; with an int column beside the text."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table({'text': texts, 'id': list(range(len(texts))), **columns}), path,
                 row_group_size=row_group_size)


def _write_files(hf, folder: pathlib.Path, parts: list[list[str]], kind: str) -> list[str]:
  """Each part as one Parquet file, or as a `save_to_disk` folder of one Arrow shard; returns the files' names
  relative to `folder`, in the order the corpus reads them."""
  names = []
  for i, texts in enumerate(parts):
    if kind == 'parquet':
      _write_parquet(folder / f'part{i}.parquet', texts)
      names.append(f'part{i}.parquet')
    else:
      hf.Dataset.from_dict({'text': texts, 'id': list(range(len(texts)))}).save_to_disk(str(folder / f'part{i}'))
      [shard] = (folder / f'part{i}').glob('*.arrow')
      names.append(f'part{i}/{shard.name}')
  return names


def _config(tmp_path, hf_files_pattern, **overrides):
  cfg = data.default_data_config()
  cfg.update(source='hf', hf_files=str(hf_files_pattern), data_dir=str(tmp_path / 'data'), read_threads=1,
             **overrides)
  return cfg


def _pipeline(cfg, seq_len=16):
  return data.build_input(cfg, seq_len=seq_len, batch_size=2, seed=0, workdir=None)


def _rows(pipeline, split) -> np.ndarray:
  rows = pipeline.rows(split)
  return np.stack([rows[i] for i in range(len(rows))])


@contextlib.contextmanager
def _config_error(match):
  with pytest.raises(ConfigError, match=match) as info:
    yield info
  assert '\n' not in str(info.value), str(info.value)


# Reading, splitting and packing.


@pytest.mark.parametrize('kind', ['parquet', 'arrow'])
def test_rows_pack_as_the_same_documents_given_as_text_files(hf, tmp_path, monkeypatch, kind):
  monkeypatch.setattr(hf_files, '_ARROW_BLOCK_ROWS', 4)  # Arrow blocks as small as the Parquet row groups
  documents = _documents(60)
  names = _write_files(hf, tmp_path / 'hf', [documents[:25], documents[25:]], kind)
  row_names = [f'{name}:{row}' for name, size in zip(names, (25, 35)) for row in range(size)]
  held_out = corpus_lib.validation_documents(row_names, 0.2)
  assert 0 < len(held_out) < len(row_names)
  hf_pipeline = _pipeline(_config(tmp_path, tmp_path / 'hf', validation_fraction=0.2))

  # The same documents as text files in the same order, each named so that it falls on its row's side of the split
  # (local files are split by a hash of the name): the prepared rows must be the very same.
  (tmp_path / 'txt').mkdir()
  for i, (row_name, text) in enumerate(zip(row_names, documents)):
    salt = 0
    while bool(corpus_lib.validation_documents([f'{i:03d}-{salt}.txt'], 0.2)) != (row_name in held_out):
      salt += 1
    (tmp_path / 'txt' / f'{i:03d}-{salt}.txt').write_text(text, encoding='utf-8')
  local = _config(tmp_path, '', validation_fraction=0.2)
  local.update(source='local', text_glob=str(tmp_path / 'txt'))
  text_pipeline = _pipeline(local)

  assert hf_pipeline.folder != text_pipeline.folder
  for split in (TRAIN, VALIDATION):
    np.testing.assert_array_equal(_rows(hf_pipeline, split), _rows(text_pipeline, split))
    assert hf_pipeline.meta['splits'][split]['tokens'] == text_pipeline.meta['splits'][split]['tokens']
  assert hf_pipeline.meta['corpus'].startswith('hf (2 files, column text, ')


def test_rows_split_by_a_hash_of_file_name_and_row_the_same_way_every_time(hf, tmp_path):
  documents = _documents(80)
  _write_parquet(tmp_path / 'hf' / 'a.parquet', documents[:50])
  _write_parquet(tmp_path / 'hf' / 'b.parquet', documents[50:])
  cfg = _config(tmp_path, tmp_path / 'hf' / '*.parquet', validation_fraction=0.3)
  corpus = corpus_lib.open_corpus(cfg)
  row_names = [f'a.parquet:{row}' for row in range(50)] + [f'b.parquet:{row}' for row in range(30)]
  held_out = corpus_lib.validation_documents(row_names, 0.3)
  assert list(corpus.splits[TRAIN]) == [doc for name, doc in zip(row_names, documents) if name not in held_out]
  assert list(corpus.splits[VALIDATION]) == [doc for name, doc in zip(row_names, documents) if name in held_out]
  assert 0.15 < len(held_out) / len(row_names) < 0.45

  # A copy elsewhere (new paths and times) is the same corpus, split the same way.
  shutil.copytree(tmp_path / 'hf', tmp_path / 'copy' / 'hf')
  copy = corpus_lib.open_corpus(_config(tmp_path, tmp_path / 'copy' / 'hf'))
  assert copy.key == corpus_lib.open_corpus(_config(tmp_path, tmp_path / 'hf')).key
  assert corpus_lib.open_corpus(cfg).key == corpus.key
  # A new file is a new corpus, and moves no row of the others to the other split.
  new = _documents(20, seed=1)
  _write_parquet(tmp_path / 'hf' / 'c.parquet', new)
  grown = corpus_lib.open_corpus(cfg)
  assert grown.key != corpus.key
  assert [doc for doc in grown.splits[VALIDATION] if doc not in new] == list(corpus.splits[VALIDATION])


def test_a_save_to_disk_folder_reads_its_shards_in_order(hf, tmp_path, monkeypatch):
  monkeypatch.setattr(hf_files, '_ARROW_BLOCK_ROWS', 3)
  documents = _documents(40)
  hf.Dataset.from_dict({'text': documents}).save_to_disk(str(tmp_path / 'saved'), num_shards=3)
  assert len(list((tmp_path / 'saved').glob('*.arrow'))) == 3
  corpus = corpus_lib.open_corpus(_config(tmp_path, tmp_path / 'saved', validation_fraction=0.25))
  train, validation = list(corpus.splits[TRAIN]), list(corpus.splits[VALIDATION])
  assert sorted(train + validation) == sorted(documents)
  assert train == [doc for doc in documents if doc in train]  # the rows' order
  assert validation == [doc for doc in documents if doc in validation]


def test_null_and_empty_rows_are_empty_documents(hf, tmp_path):
  _write_parquet(tmp_path / 'hf' / 'a.parquet', ['first', None, '', 'last'])
  corpus = corpus_lib.open_corpus(_config(tmp_path, tmp_path / 'hf'))
  assert sorted(list(corpus.splits[TRAIN]) + list(corpus.splits[VALIDATION])) == ['', '', 'first', 'last']


def test_prepared_data_is_reused_without_reading_the_files_again(hf, tmp_path, monkeypatch):
  _write_parquet(tmp_path / 'hf' / 'a.parquet', _documents(40), summary=[f'summary {i}' for i in range(40)])
  _write_parquet(tmp_path / 'hf' / 'b.parquet', _documents(30, seed=1), summary=[f'summary {i}' for i in range(30)])
  cfg = _config(tmp_path, tmp_path / 'hf')
  first = _pipeline(cfg)
  rows = {split: _rows(first, split) for split in (TRAIN, VALIDATION)}

  def no_reading(*args):
    raise AssertionError('the prepared data should have been reused')
  with monkeypatch.context() as patch:
    patch.setattr(hf_files.TextColumn, 'block', no_reading)
    patch.setattr(corpus_lib, '_split_score', no_reading)
    second = _pipeline(cfg)
  assert second.folder == first.folder and second.meta == first.meta
  for split in (TRAIN, VALIDATION):
    np.testing.assert_array_equal(_rows(second, split), rows[split])

  # Another column or an edited file is another corpus.
  key = corpus_lib.open_corpus(cfg).key
  assert corpus_lib.open_corpus(_config(tmp_path, tmp_path / 'hf', hf_text_field='summary')).key != key
  _write_parquet(tmp_path / 'hf' / 'b.parquet', _documents(30, seed=2))
  assert corpus_lib.open_corpus(cfg).key != key


# Errors: one line each, naming the key to change, before any text is read.


def test_error_datasets_not_installed(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'datasets', None)  # what `import datasets` finds when it is not installed
  (tmp_path / 'hf').mkdir()
  with _config_error(r"^data\.source=hf needs the datasets package, which is not installed: "
                     r"pip install 'diffjax\[hf-data\]'$"):
    data.validate_data_config(_config(tmp_path, tmp_path / 'hf' / '*.parquet'))


def test_error_hf_files_unset(tmp_path):
  cfg = _config(tmp_path, '')
  cfg.hf_files = None
  with _config_error(r"^data\.hf_files: unset; with data\.source='hf' point it at a folder, file or glob of "
                     r"\.parquet or \.arrow files$"):
    data.validate_data_config(cfg)


def test_error_hf_files_in_a_missing_folder(hf, tmp_path):
  with _config_error(r"^data\.hf_files: the folder '.*no_such' of '.*no_such/\*\.parquet' does not exist; point it "
                     r"at a folder, file or glob of \.parquet or \.arrow files$"):
    data.validate_data_config(_config(tmp_path, tmp_path / 'no_such' / '*.parquet'))


def test_error_no_matching_files(hf, tmp_path):
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / 'notes.txt').write_text('not a dataset file')
  with _config_error(r"^data\.hf_files: no \.parquet or \.arrow files match '.*hf/\*\.parquet'; point it at a "
                     r"folder or glob of Parquet or Arrow files$"):
    _pipeline(_config(tmp_path, tmp_path / 'hf' / '*.parquet'))


def test_error_missing_column(hf, tmp_path):
  _write_parquet(tmp_path / 'hf' / 'a.parquet', _documents(10))
  with _config_error(r"^data\.hf_text_field: .*a\.parquet has no column 'txt' \(columns: text, id\); "
                     r"set data\.hf_text_field=text$"):
    _pipeline(_config(tmp_path, tmp_path / 'hf', hf_text_field='txt'))
  assert not (tmp_path / 'data').exists()  # refused before anything was prepared


def test_error_column_not_text(hf, tmp_path):
  hf.Dataset.from_dict({'body': _documents(10), 'id': list(range(10))}).save_to_disk(str(tmp_path / 'saved'))
  with _config_error(r"^data\.hf_text_field: column 'id' of .*\.arrow holds int64, not text; "
                     r"set data\.hf_text_field=body$"):
    _pipeline(_config(tmp_path, tmp_path / 'saved', hf_text_field='id'))


def test_error_no_text_column_at_all(hf, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / 'hf').mkdir()
  pq.write_table(pa.table({'id': [1, 2, 3]}), tmp_path / 'hf' / 'a.parquet')
  with _config_error(r"^data\.hf_text_field: .*a\.parquet has no column 'text' \(columns: id\); the file has no "
                     r"text column to train on$"):
    _pipeline(_config(tmp_path, tmp_path / 'hf'))


@pytest.mark.parametrize('name, kind', [('bad.parquet', 'a Parquet'), ('bad.arrow', r'an Arrow \(datasets\)')])
def test_error_file_that_cannot_be_read(hf, tmp_path, name, kind):
  (tmp_path / 'hf').mkdir()
  (tmp_path / 'hf' / name).write_bytes(b'not a dataset file ' * 20)
  with _config_error(rf"^data\.hf_files: .*{name} is not {kind} file that can be read \(.+\); remove it or narrow "
                     r"data\.hf_files$"):
    _pipeline(_config(tmp_path, tmp_path / 'hf'))


def test_error_dataset_dict_folder(hf, tmp_path):
  split = hf.Dataset.from_dict({'text': _documents(4)})
  hf.DatasetDict({'train': split, 'test': split}).save_to_disk(str(tmp_path / 'dd'))
  with _config_error(r"^data\.hf_files: '.*dd' is a DatasetDict folder \(splits: test, train\); point it at the "
                     r"folder of one split, e\.g\. .*dd/train$"):
    _pipeline(_config(tmp_path, tmp_path / 'dd'))


def test_error_fewer_than_two_rows(hf, tmp_path):
  _write_parquet(tmp_path / 'hf' / 'a.parquet', ['the only document'])
  with _config_error(r"^data\.hf_files: the files matching '.*hf' hold 1 row\(s\); rows go whole to train or "
                     r"validation, so point it at files with two or more$"):
    _pipeline(_config(tmp_path, tmp_path / 'hf'))


def test_error_hf_text_field_empty(tmp_path):
  (tmp_path / 'hf').mkdir()
  with _config_error(r"^data\.hf_text_field: must be a non-empty string, got ''$"):
    data.validate_data_config(_config(tmp_path, tmp_path / 'hf', hf_text_field=''))
