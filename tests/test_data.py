"""Tests of the input pipeline: corpora, tokenizers, preparation into packed rows, the shuffled and resumable
training stream, evaluation batches, multi-host preparation, and errors."""

import contextlib
import gzip
import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffjax.data import corpus as corpus_lib
from diffjax.data import pipeline as data
from diffjax.data import prepare
from diffjax.data import tokenizers
from diffjax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
_WORDS = ('the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'café', 'naïve', 'über', 'smile 😀',
          'def', 'return', 'x', '=', '1', '\n', '\n    ')
_CORPUS_EN = [pathlib.Path('/work/shared/data/corpus_en'), REPO / '..' / 'shared' / 'data' / 'corpus_en']
TRAIN, VALIDATION = corpus_lib.TRAIN, corpus_lib.VALIDATION


def _document(rng: random.Random, min_words: int = 3, max_words: int = 60) -> str:
  return ' '.join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words)))


def _write_corpus(folder: pathlib.Path, num_docs: int = 30, seed: int = 0) -> dict[str, str]:
  """Writes `num_docs` .txt documents (every third gzipped) and returns {file name: text}."""
  rng = random.Random(seed)
  folder.mkdir(parents=True, exist_ok=True)
  documents = {}
  for i in range(num_docs):
    text = _document(rng)
    if i % 3 == 0:
      name = f'doc{i:03d}.txt.gz'
      with gzip.open(folder / name, 'wt', encoding='utf-8') as f:
        f.write(text)
    else:
      name = f'doc{i:03d}.txt'
      (folder / name).write_text(text, encoding='utf-8')
    documents[name] = text
  return documents


def _write_prose(folder: pathlib.Path, num_docs: int = 20, seed: int = 1) -> pathlib.Path:
  """Longer documents: enough text to train a SentencePiece model of 300 pieces."""
  rng = random.Random(seed)
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(num_docs):
    (folder / f'{i:02d}.txt').write_text('\n'.join(_document(rng, 50, 200) for _ in range(10)))
  return folder


def _config(tmp_path: pathlib.Path, **overrides):
  cfg = data.default_data_config()
  cfg.data_dir = str(tmp_path / 'data')
  cfg.read_threads = 2
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _local_config(tmp_path, **overrides):
  return _config(tmp_path, source='local', text_glob=str(tmp_path / 'corpus'), **overrides)


def _local_pipeline(tmp_path, *, seq_len=16, batch_size=4, seed=0, shard=(0, 1), workdir=None, **overrides):
  return data.build_input(_local_config(tmp_path, **overrides), seq_len=seq_len, batch_size=batch_size, seed=seed,
                          workdir=workdir, shard=shard)


def _rows(pipeline, split) -> np.ndarray:
  """All packed rows of a split, in stored order, as one (rows, seq_len + 1) array."""
  rows = pipeline.rows(split)
  return np.stack([rows[i] for i in range(len(rows))])


def _batch_rows(batch) -> np.ndarray:
  """The packed rows a batch was cut from: the inputs and the last target of each row."""
  return np.concatenate([batch['inputs'], batch['targets'][:, -1:]], axis=1)


def _as_multiset(rows) -> list[tuple[int, ...]]:
  return sorted(tuple(int(t) for t in row) for row in rows)


def _expected_rows(texts, tokenizer, row_len: int) -> np.ndarray:
  """Every document's tokens followed by EOS, in order, cut into rows; the last row completed with PAD."""
  stream = [token for text in texts for token in tokenizer.encode(text) + [tokenizer.eos_id]]
  stream += [tokenizer.pad_id] * (-len(stream) % row_len)
  return np.array(stream, np.int32).reshape(-1, row_len)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys() == {'inputs', 'targets', 'mask', 'segment_ids'}
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@contextlib.contextmanager
def _iterator(pipeline, **kwargs):
  iterator = pipeline.train_iterator(**kwargs)
  try:
    yield iterator
  finally:
    iterator.close()


class _EncodeCounter:
  """Counts the documents tokenized by any tokenizer's encode_batch in this process."""

  def __init__(self, monkeypatch):
    self.calls = self.documents = 0
    for cls in (tokenizers.ByteTokenizer, tokenizers.SentencePieceTokenizer):
      monkeypatch.setattr(cls, 'encode_batch', self._wrap(cls.encode_batch))

  def _wrap(self, original):
    def encode_batch(tokenizer, texts):
      self.calls += 1
      self.documents += len(texts)
      return original(tokenizer, texts)
    return encode_batch


def _divisor_near(n: int, candidates) -> int:
  return next(b for b in candidates if n % b == 0)


# Corpora.


def test_local_corpus_splits_whole_documents_by_a_hash_of_the_name(tmp_path):
  documents = _write_corpus(tmp_path / 'corpus')
  corpus = corpus_lib.open_corpus(_local_config(tmp_path, validation_fraction=0.3))
  names = sorted(documents)
  held_out = corpus_lib.validation_documents(names, 0.3)
  assert 0 < len(held_out) < len(names)
  assert list(corpus.splits[TRAIN]) == [documents[name] for name in names if name not in held_out]
  assert list(corpus.splits[VALIDATION]) == [documents[name] for name in names if name in held_out]
  # The same names give the same split on every call; a new file never moves another document.
  assert corpus_lib.validation_documents(list(reversed(names)), 0.3) == held_out
  assert corpus_lib.validation_documents(names + ['new.txt'], 0.3) - {'new.txt'} == held_out
  # About the requested share, by name alone.
  many = [f'book{i}.txt' for i in range(2000)]
  assert 0.25 < len(corpus_lib.validation_documents(many, 0.3)) / len(many) < 0.35


def test_every_split_gets_a_document_whatever_the_fraction():
  names = ['a.txt', 'b.txt', 'c.txt']
  assert len(corpus_lib.validation_documents(names, 1e-9)) == 1
  assert len(corpus_lib.validation_documents(names, 1 - 1e-9)) == 2


def test_corpus_key_changes_with_the_corpus(tmp_path):
  documents = _write_corpus(tmp_path / 'corpus')
  key = lambda **overrides: corpus_lib.open_corpus(_local_config(tmp_path, **overrides)).key
  first = key()
  assert first.startswith('corpus_') and key() == first
  other_fraction = key(validation_fraction=0.2)
  (tmp_path / 'corpus' / 'new.txt').write_text('one more document')
  grown = key()
  edited_name = next(name for name in documents if name.endswith('.txt'))
  (tmp_path / 'corpus' / edited_name).write_text('an edited document')
  edited = key()
  assert len({first, other_fraction, grown, edited}) == 4
  shutil.copytree(tmp_path / 'corpus', tmp_path / 'copy' / 'corpus')  # a copy (new times, new place) is the same
  assert corpus_lib.open_corpus(_config(tmp_path, source='local', text_glob=str(tmp_path / 'copy' / 'corpus'))).key \
      == edited


@pytest.mark.parametrize('pattern, selects', [
    ('corpus', lambda name: True),
    ('corpus/*.txt', lambda name: name.endswith('.txt')),
    ('corpus/**/*.txt.gz', lambda name: name.endswith('.txt.gz')),
    ('corpus/doc001.txt', lambda name: name == 'doc001.txt'),
    ('corpus/doc000.txt.gz', lambda name: name == 'doc000.txt.gz'),
])
def test_find_text_files_takes_folders_globs_files_txt_and_gz(tmp_path, pattern, selects):
  documents = _write_corpus(tmp_path / 'corpus')
  (tmp_path / 'corpus' / 'README.md').write_text('not a text document')
  expected = sorted(str(tmp_path / 'corpus' / name) for name in documents if selects(name))
  assert corpus_lib.find_text_files(str(tmp_path / pattern)) == expected


def test_find_text_files_searches_subfolders(tmp_path):
  (tmp_path / 'corpus' / 'deep' / 'er').mkdir(parents=True)
  (tmp_path / 'corpus' / 'top.txt').write_text('top')
  (tmp_path / 'corpus' / 'deep' / 'er' / 'low.txt.gz').write_bytes(gzip.compress(b'low'))
  assert corpus_lib.find_text_files(str(tmp_path / 'corpus')) == [
      str(tmp_path / 'corpus' / 'deep' / 'er' / 'low.txt.gz'), str(tmp_path / 'corpus' / 'top.txt')]


def test_local_corpus_reads_txt_and_gz_documents(tmp_path):
  documents = _write_corpus(tmp_path / 'corpus', num_docs=6)
  assert any(name.endswith('.gz') for name in documents) and any(name.endswith('.txt') for name in documents)
  corpus = corpus_lib.open_corpus(_local_config(tmp_path))
  assert sorted(list(corpus.splits[TRAIN]) + list(corpus.splits[VALIDATION])) == sorted(documents.values())


def test_local_corpus_strips_bom_and_crlf_and_skips_empty_files(tmp_path):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  with gzip.open(folder / 'a.txt.gz', 'wb') as f:
    f.write('\ufeffFirst line\r\nsecond line\r\n'.encode('utf-8'))
  (folder / 'b.txt').write_bytes('\ufeffOther\r\ntext'.encode('utf-8'))
  (folder / 'c.txt').write_bytes(b'\xef\xbb\xbf')
  (folder / 'd.txt').write_text('')
  corpus = corpus_lib.open_corpus(_local_config(tmp_path))
  assert sorted(list(corpus.splits[TRAIN]) + list(corpus.splits[VALIDATION])) == [
      'First line\nsecond line\n', 'Other\ntext']


def test_stdlib_default_prepares_and_yields_batches(tmp_path):
  cfg = _config(tmp_path)
  assert cfg.source == 'stdlib' and cfg.tokenizer == 'byte'
  pipeline = data.build_input(cfg, seq_len=64, batch_size=4, seed=0, workdir=None)
  with _iterator(pipeline) as iterator:
    batch = next(iterator)
  assert {key: (value.shape, value.dtype) for key, value in batch.items()} == {
      'inputs': ((4, 64), np.int32), 'targets': ((4, 64), np.int32), 'mask': ((4, 64), np.float32),
      'segment_ids': ((4, 64), np.int32)}
  np.testing.assert_array_equal(batch['segment_ids'], data.segment_ids(batch['inputs'], pipeline.tokenizer.eos_id))
  assert batch['inputs'].max() < pipeline.tokenizer.vocab_size
  assert 'def ' in pipeline.tokenizer.decode(_rows(pipeline, VALIDATION)[:200].ravel())
  assert len(pipeline.eval_batches(3)) == 3


# Preparation: packed rows on disk.


def test_packed_rows_are_the_documents_each_followed_by_eos(tmp_path, monkeypatch):
  # Small chunks and shards, so rows cross chunk boundaries and the split spans several files.
  monkeypatch.setattr(prepare, '_DOCUMENTS_PER_CHUNK', 4)
  monkeypatch.setattr(prepare, '_ROWS_PER_SHARD', 10)
  documents = _write_corpus(tmp_path / 'corpus', num_docs=40)
  pipeline = _local_pipeline(tmp_path, seq_len=16, validation_fraction=0.2)
  tokenizer = pipeline.tokenizer
  names = sorted(documents)
  held_out = corpus_lib.validation_documents(names, 0.2)
  for split, texts in ((TRAIN, [documents[n] for n in names if n not in held_out]),
                       (VALIDATION, [documents[n] for n in names if n in held_out])):
    rows = _rows(pipeline, split)
    expected = _expected_rows(texts, tokenizer, 17)
    np.testing.assert_array_equal(rows, expected)
    info = pipeline.meta['splits'][split]
    assert info['rows'] == len(rows)
    assert info['tokens'] == sum(len(text.encode('utf-8')) + 1 for text in texts)
    assert len(info['shards']) == -(-len(rows) // 10) > 1
    assert rows[-1, -1] == tokenizer.pad_id  # the split's end is completed with PAD (17 ∤ tokens here) ...
    assert not (rows[:-1] == tokenizer.pad_id).any()  # ... and only its end.
  assert pipeline.meta['eos_id'] == tokenizer.eos_id and pipeline.meta['pad_id'] == tokenizer.pad_id
  assert pipeline.meta['seq_len'] == 16 and pipeline.meta['tokenizer'] == 'bytes'


def test_padding_of_the_last_row_is_masked_out_of_the_loss(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=20)
  pipeline = _local_pipeline(tmp_path, seq_len=16, batch_size=1)
  pad = pipeline.tokenizer.pad_id
  stored = _rows(pipeline, TRAIN)
  padded = stored[-1]
  num_pad = int((padded == pad).sum())
  assert num_pad > 0
  batches = pipeline.train_batches()
  batch = next(batches[i] for i in range(len(stored)) if (_batch_rows(batches[i]) == padded).all())
  np.testing.assert_array_equal(batch['mask'][0], (padded[1:] != pad).astype(np.float32))
  assert batch['mask'][0].sum() == 16 - num_pad
  assert (batch['targets'][0][batch['mask'][0] == 0] == pad).all()
  # Every other row trains on all of its targets.
  others = [batches[i] for i in range(len(stored)) if not (_batch_rows(batches[i]) == padded).all()]
  assert len(others) == len(stored) - 1 and all(b['mask'].all() for b in others)


def test_preparation_is_deterministic(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  first = _local_pipeline(tmp_path, data_dir=str(tmp_path / 'one'))
  second = _local_pipeline(tmp_path, data_dir=str(tmp_path / 'two'))
  assert first.folder != second.folder
  assert os.path.relpath(first.folder, tmp_path / 'one') == os.path.relpath(second.folder, tmp_path / 'two')
  assert first.meta == second.meta
  for split in (TRAIN, VALIDATION):
    np.testing.assert_array_equal(_rows(first, split), _rows(second, split))
    for shard in first.meta['splits'][split]['shards']:
      assert (pathlib.Path(first.folder) / shard).read_bytes() == (pathlib.Path(second.folder) / shard).read_bytes()


def test_preparation_is_reused_by_later_runs(tmp_path, monkeypatch):
  _write_corpus(tmp_path / 'corpus')
  counter = _EncodeCounter(monkeypatch)
  first = _local_pipeline(tmp_path, seq_len=16)
  assert counter.documents == 30  # every document of both splits, once
  folder = pathlib.Path(first.folder)
  assert folder.parent.parent == tmp_path / 'data' and folder.name == 'bytes-seq16'
  assert sorted(p.name for p in folder.parent.iterdir()) == ['bytes-seq16']  # no lock or partial folder left
  assert sorted(p.name for p in folder.iterdir()) == sorted(
      [prepare.META_FILE] + [name for split in first.meta['splits'].values() for name in split['shards']])
  mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

  second = _local_pipeline(tmp_path, seq_len=16, batch_size=2, seed=9)  # another run, other batches and seed
  assert counter.documents == 30
  assert second.folder == first.folder
  assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes

  shutil.copytree(tmp_path / 'corpus', tmp_path / 'copy' / 'corpus')  # a copy of the corpus reuses it too
  copied = data.build_input(_config(tmp_path, source='local', text_glob=str(tmp_path / 'copy' / 'corpus')),
                            seq_len=16, batch_size=4, seed=0, workdir=None)
  assert counter.documents == 30 and copied.folder == first.folder

  other_length = _local_pipeline(tmp_path, seq_len=24)  # another seq_len is another preparation ...
  assert counter.documents == 60 and other_length.folder != first.folder
  (tmp_path / 'corpus' / 'doc001.txt').write_text('an edited document')  # ... and so is an edited corpus
  edited = _local_pipeline(tmp_path, seq_len=16)
  assert counter.documents == 90 and pathlib.Path(edited.folder).parent != folder.parent


def test_prepare_command_prepares_what_a_run_then_reuses(tmp_path, monkeypatch):
  _write_corpus(tmp_path / 'corpus')
  flags = [f'--config.data.{key}={value}' for key, value in
           {'source': 'local', 'text_glob': tmp_path / 'corpus', 'data_dir': tmp_path / 'data'}.items()]
  result = subprocess.run([sys.executable, '-m', 'diffjax.prepare', f'--config={REPO / "configs" / "tiny.py"}',
                           '--config.train.seq_len=16', *flags], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  assert result.returncode == 0, result.stderr
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  counter = _EncodeCounter(monkeypatch)
  pipeline = _local_pipeline(tmp_path, seq_len=16)
  assert counter.calls == 0 and pipeline.folder == printed['folder']
  assert printed['train_sequences'] == pipeline.meta['splits'][TRAIN]['rows'] > 0
  assert printed['validation_tokens'] == pipeline.meta['splits'][VALIDATION]['tokens'] > 0


def test_a_failed_preparation_leaves_no_folder_and_is_redone(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, '_DOCUMENTS_PER_CHUNK', 4)
  _write_corpus(tmp_path / 'corpus')
  original = tokenizers.ByteTokenizer.encode_batch
  calls = []

  def failing(tokenizer, texts):
    calls.append(len(texts))
    if len(calls) == 3:
      raise OSError('disk full')
    return original(tokenizer, texts)

  monkeypatch.setattr(tokenizers.ByteTokenizer, 'encode_batch', failing)
  cfg = _local_config(tmp_path)
  with pytest.raises(OSError, match='disk full'):
    data.build_input(cfg, seq_len=16, batch_size=2, seed=0, workdir=None)
  corpus = corpus_lib.open_corpus(cfg)
  folder = prepare.prepared_folder(cfg, corpus, tokenizers.ByteTokenizer(), 16)
  assert not os.path.exists(folder) and not os.path.exists(folder + '.lock')

  pipeline = data.build_input(cfg, seq_len=16, batch_size=2, seed=0, workdir=None)
  assert pipeline.folder == folder
  np.testing.assert_array_equal(_rows(pipeline, TRAIN),
                                _expected_rows(list(corpus.splits[TRAIN]), pipeline.tokenizer, 17))


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  cfg = _local_config(tmp_path)
  folder = prepare.prepared_folder(cfg, corpus_lib.open_corpus(cfg), tokenizers.ByteTokenizer(), 16)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  os.makedirs(os.path.dirname(folder))
  pathlib.Path(folder + '.lock').write_text(f'{socket.gethostname()} {dead.pid}')
  pipeline = data.build_input(cfg, seq_len=16, batch_size=2, seed=0, workdir=None)
  assert pipeline.folder == folder and pipeline.meta['splits'][TRAIN]['rows'] > 0
  assert not os.path.exists(folder + '.lock')


# Training batches: a global shuffle per epoch, resumable by position.


def test_each_epoch_visits_every_training_row_once_in_a_new_order(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  num_rows = _local_pipeline(tmp_path, batch_size=1).meta['splits'][TRAIN]['rows']
  batch_size = _divisor_near(num_rows, (4, 5, 3, 6, 7, 2, 1))
  pipeline = _local_pipeline(tmp_path, batch_size=batch_size, seed=3)
  stored = _rows(pipeline, TRAIN)
  per_epoch = num_rows // batch_size
  batches = pipeline.train_batches()
  epochs = [np.concatenate([_batch_rows(batches[e * per_epoch + i]) for i in range(per_epoch)])
            for e in range(3)]
  for epoch in epochs:
    assert _as_multiset(epoch) == _as_multiset(stored)  # every row exactly once
  assert not np.array_equal(epochs[0], stored)  # shuffled ...
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])  # ... anew
  # Batches mix the whole corpus: the first batch's rows are not neighbours in the stored order.
  first_batch_positions = [next(i for i, row in enumerate(stored) if (row == r).all()) for r in epochs[0][:batch_size]]
  assert max(first_batch_positions) - min(first_batch_positions) > batch_size
  # The iterator yields the same stream.
  with _iterator(pipeline) as iterator:
    _assert_same_batches(_take(iterator, per_epoch + 2), [batches[i] for i in range(per_epoch + 2)])


def test_an_epoch_that_ends_inside_a_batch_continues_into_the_next(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  num_rows = _local_pipeline(tmp_path, batch_size=1).meta['splits'][TRAIN]['rows']
  batch_size = next(b for b in (5, 7, 3, 6, 4) if num_rows % b)
  pipeline = _local_pipeline(tmp_path, batch_size=batch_size)
  batches = pipeline.train_batches()
  flat = np.concatenate([_batch_rows(batches[i]) for i in range(2 * num_rows // batch_size + 1)])
  stored = _as_multiset(_rows(pipeline, TRAIN))
  assert _as_multiset(flat[:num_rows]) == stored and _as_multiset(flat[num_rows:2 * num_rows]) == stored


def test_reading_plan_counts_passes_over_the_training_rows_and_warns_past_useful_ones(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  num_rows = _local_pipeline(tmp_path, batch_size=1).meta['splits'][TRAIN]['rows']
  pipeline = _local_pipeline(tmp_path, batch_size=3, shard=(0, 2))  # 3 rows a process, 6 a step
  for steps in (1, num_rows // 6, 4 * num_rows // 6, 4 * num_rows // 6 + 1, 50 * num_rows):
    plan = pipeline.reading_plan(steps)
    passes = steps * 6 / num_rows
    assert plan.startswith(f'{steps} steps read {steps * 6:,} training sequences, {passes:.3g} passes over the '
                           f"split's {num_rows:,}"), plan
    # Past data.USEFUL_PASSES (4) the plan says what to change; the remedy names the corpus' own config key.
    assert ('use a larger corpus (data.text_glob) or fewer train.steps' in plan) == (passes > data.USEFUL_PASSES)


def test_train_stream_is_deterministic_for_a_seed(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  take = lambda seed: [_local_pipeline(tmp_path, seed=seed).train_batches()[i] for i in range(5)]
  _assert_same_batches(take(7), take(7))
  other = take(8)
  assert any((a['inputs'] != b['inputs']).any() for a, b in zip(take(7), other))


@pytest.mark.parametrize('exact_fit', [False, True])
def test_train_iterator_resumes_at_the_exact_position(tmp_path, exact_fit):
  if exact_fit:
    # Documents of 16 bytes plus EOS: every row is one whole document, none padded.
    folder = tmp_path / 'corpus'
    folder.mkdir()
    for i in range(40):
      (folder / f'd{i:02d}.txt').write_text(f'{i:02d}-abcdefghijklm')
  else:
    _write_corpus(tmp_path / 'corpus')
  pipeline = _local_pipeline(tmp_path, seq_len=16, batch_size=3, seed=3)
  per_epoch = -(-pipeline.meta['splits'][TRAIN]['rows'] // 3)
  assert per_epoch > 8
  uninterrupted = pipeline.train_batches()
  with _iterator(pipeline) as iterator:
    taken = 0
    # Mid-epoch, the last batch of an epoch, and across one and two epoch boundaries.
    for target in (0, 4, per_epoch - 1, per_epoch + 3, 2 * per_epoch + 2):
      assert target >= taken
      _take(iterator, target - taken)
      state = json.loads(json.dumps(iterator.get_state()))
      assert state == {'corpus': pipeline.identity, 'next_batch': target}
      expected = _take(iterator, 3)
      taken = target + 3
      _assert_same_batches(expected, [uninterrupted[target + i] for i in range(3)])
      fresh = _local_pipeline(tmp_path, seq_len=16, batch_size=3, seed=3)  # as in a new process
      with _iterator(fresh) as restarted:
        restarted.set_state(state)
        _assert_same_batches(_take(restarted, 3), expected)
        assert restarted.get_state()['next_batch'] == target + 3


def test_set_state_moves_a_running_iterator_back(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  pipeline = _local_pipeline(tmp_path)
  with _iterator(pipeline) as iterator:
    _take(iterator, 2)
    state = iterator.get_state()
    expected = _take(iterator, 5)
    iterator.set_state(state)
    _assert_same_batches(_take(iterator, 5), expected)


def test_train_iterator_puts_batches_through_to_device(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  pipeline = _local_pipeline(tmp_path)
  with _iterator(pipeline, to_device=lambda batch: {k: ('on device', v) for k, v in batch.items()}) as iterator:
    moved = next(iterator)
  assert all(tag == 'on device' for tag, _ in moved.values())
  _assert_same_batches([{k: v for k, (_, v) in moved.items()}], [pipeline.train_batches()[0]])


def test_train_iterator_raises_read_errors_at_next(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  pipeline = _local_pipeline(tmp_path)
  with _iterator(pipeline, to_device=lambda batch: 1 / 0) as iterator:
    with pytest.raises(ZeroDivisionError):
      next(iterator)


def test_train_iterator_resumes_on_a_copy_of_the_corpus(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  with _iterator(_local_pipeline(tmp_path, seed=5)) as iterator:
    _take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 3)
  shutil.copytree(tmp_path / 'corpus', tmp_path / 'elsewhere' / 'corpus')  # prepared again in another data_dir
  with _iterator(_local_pipeline(tmp_path / 'elsewhere', seed=5)) as moved:
    moved.set_state(state)
    _assert_same_batches(_take(moved, 3), expected)


def test_process_shards_read_disjoint_rows_that_make_up_the_split(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  stored = _rows(_local_pipeline(tmp_path), TRAIN)
  epochs, identities = [], set()
  for index in range(2):
    pipeline = _local_pipeline(tmp_path, batch_size=1, shard=(index, 2))
    shard_rows = (len(stored) - index + 1) // 2
    batches = pipeline.train_batches()
    epochs.append(np.concatenate([_batch_rows(batches[i]) for i in range(shard_rows)]))
    next_epoch = np.concatenate([_batch_rows(batches[shard_rows + i]) for i in range(shard_rows)])
    assert _as_multiset(next_epoch) == _as_multiset(epochs[-1])  # each shard keeps its own rows every epoch
    identities.add(pipeline.identity)
  # Together every stored row exactly once: the shards are disjoint (rows of equal text are counted, not merged).
  assert _as_multiset(np.concatenate(epochs)) == _as_multiset(stored)
  assert len(identities) == 1  # process 0 saves the position and every process restores it


# Evaluation batches.


def test_eval_batches_cover_the_validation_rows_once_the_same_for_every_seed(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  num_rows = _local_pipeline(tmp_path, validation_fraction=0.3).meta['splits'][VALIDATION]['rows']
  batch_size = next(b for b in (4, 5, 3, 6, 7) if num_rows % b and num_rows > 2 * b)
  pipelines = [_local_pipeline(tmp_path, batch_size=batch_size, seed=seed, validation_fraction=0.3)
               for seed in (1, 2)]
  batches = pipelines[0].eval_batches(10_000)
  _assert_same_batches(batches, pipelines[1].eval_batches(10_000))
  _assert_same_batches(pipelines[0].eval_batches(2), batches[:2])
  pad = pipelines[0].tokenizer.pad_id

  assert len(batches) == -(-num_rows // batch_size)
  for batch in batches:
    assert batch['inputs'].shape == batch['targets'].shape == batch['mask'].shape == (batch_size, 16)
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
    np.testing.assert_array_equal(batch['mask'], (batch['targets'] != pad).astype(np.float32))
  rows = np.concatenate([_batch_rows(batch) for batch in batches])
  stored = _rows(pipelines[0], VALIDATION)
  num_padding = len(batches) * batch_size - num_rows
  assert num_padding > 0 and (rows[num_rows:] == pad).all()  # the last batch completed with PAD rows ...
  assert batches[-1]['mask'][batch_size - num_padding:].sum() == 0  # ... that count for nothing
  assert _as_multiset(rows[:num_rows]) == _as_multiset(stored)  # every validation row once ...
  assert not np.array_equal(rows[:num_rows], stored)  # ... in a fixed shuffled order


# Multi-host and concurrent preparation, in real processes.

_HOST_SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np
    from diffjax.data import pipeline as data
    from diffjax.data import tokenizers

    args = json.loads(sys.argv[1])
    calls = {'encode_batch': 0, 'train': 0}
    for cls in (tokenizers.ByteTokenizer, tokenizers.SentencePieceTokenizer):
      def encode_batch(self, texts, _original=cls.encode_batch):
        calls['encode_batch'] += 1
        time.sleep(args['encode_delay'])
        return _original(self, texts)
      cls.encode_batch = encode_batch
    original_train = tokenizers.SentencePieceTokenizer.train.__func__
    def train(cls, texts, **kwargs):
      calls['train'] += 1
      return original_train(cls, texts, **kwargs)
    tokenizers.SentencePieceTokenizer.train = classmethod(train)

    barriers = []
    def barrier(name):
      """Waits until every process has reached `name`: one marker file per process."""
      folder = os.path.join(args['barrier_dir'], name.replace(' ', '_').replace(':', ''))
      os.makedirs(folder, exist_ok=True)
      open(os.path.join(folder, str(args['index'])), 'w').close()
      deadline = time.monotonic() + 120
      while len(os.listdir(folder)) < args['processes']:
        if time.monotonic() > deadline:
          raise TimeoutError(name)
        time.sleep(0.01)
      barriers.append(name)

    barrier('start')
    cfg = data.default_data_config()
    cfg.update(args['data'])
    pipeline = data.build_input(cfg, seq_len=16, batch_size=1, seed=0, workdir=None, shard=tuple(args['shard']),
                                barrier=barrier)
    train = pipeline.rows('train')
    shard_rows = len(train[args['shard'][0]::args['shard'][1]])
    batches = pipeline.train_batches()
    epoch = np.concatenate([np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1)
                            for b in (batches[i] for i in range(shard_rows))])
    all_rows = np.stack([train[i] for i in range(len(train))])
    eval_inputs = np.stack([b['inputs'] for b in pipeline.eval_batches(3)])
    np.savez(args['out'], epoch=epoch, all_rows=all_rows, eval_inputs=eval_inputs)
    with open(args['out'] + '.json', 'w') as f:
      json.dump({'calls': calls, 'folder': pipeline.folder, 'barriers': barriers[1:]}, f)
''')


def _run_processes(tmp_path, shards, data_cfg, encode_delay):
  """Runs one process per shard at once; returns, per process, its counts, arrays and printed output."""
  script = tmp_path / 'host.py'
  script.write_text(_HOST_SCRIPT)
  env = {**os.environ, 'PYTHONPATH': f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}', 'JAX_PLATFORMS': 'cpu'}
  processes = []
  for index, shard in enumerate(shards):
    args = {'index': index, 'processes': len(shards), 'shard': shard, 'data': data_cfg,
            'barrier_dir': str(tmp_path / 'barriers'), 'out': str(tmp_path / f'out{index}.npz'),
            'encode_delay': encode_delay}
    processes.append(subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  results = []
  for index, process in enumerate(processes):
    output, _ = process.communicate(timeout=180)
    assert process.returncode == 0, output
    with open(tmp_path / f'out{index}.npz.json') as f:
      result = json.load(f)
    result.update(np.load(tmp_path / f'out{index}.npz'), output=output)
    results.append(result)
  return results


def test_multi_host_preparation_happens_once_and_hosts_read_the_same_rows(tmp_path):
  _write_prose(tmp_path / 'corpus')
  data_cfg = {'source': 'local', 'text_glob': str(tmp_path / 'corpus'), 'data_dir': str(tmp_path / 'shared'),
              'tokenizer': 'sentencepiece', 'sp_vocab_size': 300, 'read_threads': 1}
  # The chief is slowed down, so the other host would fail to find the data if it did not wait at the barrier.
  chief, other = _run_processes(tmp_path, [(0, 2), (1, 2)], data_cfg, encode_delay=0.3)
  assert chief['calls']['train'] == 1 and chief['calls']['encode_batch'] > 0  # the chief alone trains and writes
  assert other['calls'] == {'encode_batch': 0, 'train': 0}
  assert other['barriers'] == chief['barriers'] == ['diffjax: tokenizer ready', 'diffjax: data prepared']
  assert chief['folder'] == other['folder'] and os.path.basename(chief['folder']).startswith('sp300_')
  np.testing.assert_array_equal(chief['all_rows'], other['all_rows'])
  np.testing.assert_array_equal(chief['eval_inputs'], other['eval_inputs'])
  # Each host trains on its own rows; together they are the split, each row once per epoch.
  assert len(chief['epoch']) + len(other['epoch']) == len(chief['all_rows'])
  assert _as_multiset(np.concatenate([chief['epoch'], other['epoch']])) == _as_multiset(chief['all_rows'])


def test_concurrent_processes_on_one_machine_prepare_once(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  data_cfg = {'source': 'local', 'text_glob': str(tmp_path / 'corpus'), 'data_dir': str(tmp_path / 'shared'),
              'read_threads': 1}
  # Both are chiefs of their own runs; slow tokenization keeps the first one's lock held while the other arrives.
  results = _run_processes(tmp_path, [(0, 1), (0, 1)], data_cfg, encode_delay=0.5)
  calls = sorted(result['calls']['encode_batch'] for result in results)
  assert calls[0] == 0 and calls[1] == 2  # one chunk of documents per split, tokenized by one process only
  assert any('waiting for another process' in result['output'] for result in results), [r['output'] for r in results]
  assert results[0]['folder'] == results[1]['folder']
  np.testing.assert_array_equal(results[0]['all_rows'], results[1]['all_rows'])
  np.testing.assert_array_equal(results[0]['epoch'], results[1]['epoch'])
  assert sorted(os.listdir(os.path.dirname(results[0]['folder']))) == ['bytes-seq16']


# Tokenizers.


def test_byte_tokenizer_round_trips_any_text():
  tokenizer = tokenizers.ByteTokenizer()
  text = 'ASCII, café, 中文, emoji 😀👍🏽, tab\t, nul \x00 and newline\n'
  ids = tokenizer.encode(text)
  assert max(ids) < 256 and (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (258, 256, 257)
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids + [tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]) == text
  assert [list(row) for row in tokenizer.encode_batch([text, '', 'ok'])] == [ids, [], [111, 107]]


def test_byte_tokenizer_decodes_invalid_bytes():
  tokenizer = tokenizers.ByteTokenizer()
  broken = tokenizer.encode('😀')[:2] + [0xff, 0xfe] + tokenizer.encode('ok') + [256, 257, 9999, -1]
  assert tokenizer.decode(broken).endswith('ok')


def test_sentencepiece_tokenizer_trains_saves_and_reloads(tmp_path):
  rng = random.Random(0)
  texts = [_document(rng, 50, 200) for _ in range(200)]
  tokenizer = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=300)
  tokenizer.save(tmp_path / 'tokenizer.model')
  reloaded = tokenizers.SentencePieceTokenizer.load(tmp_path / 'tokenizer.model', key='test', remedy='none')

  sample = 'def f(x):\n    return x  # café 😀 中文\n\n  two  spaces'
  assert reloaded.encode(sample) == tokenizer.encode(sample)
  assert tokenizer.decode(tokenizer.encode(sample)) == sample
  assert tokenizer.vocab_size == 300
  assert tokenizer.decode(tokenizer.encode(sample) + [tokenizer.eos_id, tokenizer.pad_id, 10**6]) == sample
  assert [list(row) for row in tokenizer.encode_batch([sample, texts[0]])] == [
      tokenizer.encode(sample), tokenizer.encode(texts[0])]


def test_sentencepiece_pipeline_keeps_its_model_in_the_workdir_and_the_data_dir(tmp_path, monkeypatch):
  _write_prose(tmp_path / 'corpus')
  trainings = []
  original = tokenizers.SentencePieceTokenizer.train.__func__
  monkeypatch.setattr(tokenizers.SentencePieceTokenizer, 'train',
                      classmethod(lambda cls, texts, **kw: trainings.append(1) or original(cls, texts, **kw)))
  build = lambda workdir: _local_pipeline(tmp_path, seq_len=32, batch_size=2, workdir=str(workdir),
                                          tokenizer='sentencepiece', sp_vocab_size=300)
  first = build(tmp_path / 'workdir')
  model = tmp_path / 'workdir' / data.TOKENIZER_FILE
  saved = model.read_bytes()
  assert len(trainings) == 1 and first.tokenizer.vocab_size == 300
  assert _rows(first, TRAIN).max() < 300

  resumed = build(tmp_path / 'workdir')
  another_run = build(tmp_path / 'another_workdir')  # the corpus's cached model: same vocabulary, same rows
  assert len(trainings) == 1
  assert model.read_bytes() == saved == (tmp_path / 'another_workdir' / data.TOKENIZER_FILE).read_bytes()
  assert first.folder == resumed.folder == another_run.folder
  _assert_same_batches([first.train_batches()[i] for i in range(2)], [resumed.train_batches()[i] for i in range(2)])

  shutil.rmtree(tmp_path / 'data')  # a resumed run whose data dir is gone keeps its workdir's model
  rebuilt = build(tmp_path / 'workdir')
  assert len(trainings) == 1 and model.read_bytes() == saved
  np.testing.assert_array_equal(_rows(rebuilt, TRAIN), _rows(first, TRAIN))


# The shared English novels, when this checkout has them.


def test_corpus_en_subset(tmp_path):
  corpus = next((path for path in _CORPUS_EN if path.is_dir()), None)
  if corpus is None:
    pytest.skip('no corpus_en: neither /work/shared/data/corpus_en nor ../shared/data/corpus_en exists')
  cfg = _config(tmp_path, source='local', text_glob=str(corpus / 'Bu*.txt.gz'))
  pipeline = data.build_input(cfg, seq_len=128, batch_size=4, seed=0, workdir=None)
  evaluation = pipeline.eval_batches(5)
  assert len(evaluation) == 5
  text = pipeline.tokenizer.decode(np.concatenate([_rows(pipeline, TRAIN)[:400].ravel(),
                                                   *[b['inputs'].ravel() for b in evaluation]]))
  assert '\ufeff' not in text and '\r' not in text
  assert text.count(' the ') > 10


# TFDS datasets.


class DiffjaxTestUnreachable(tfds.core.GeneratorBasedBuilder):
  """A catalog-style dataset whose download always fails, as without network."""

  VERSION = tfds.core.Version('1.0.0')
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    raise ConnectionError('Failed to reach https://example.invalid/data.zip\nretries exhausted')

  def _generate_examples(self):
    yield from ()


class DiffjaxTestStories(tfds.core.GeneratorBasedBuilder):
  """A catalog-style dataset with 'train' and 'test' splits and the text under 'story'."""

  VERSION = tfds.core.Version('1.0.0')
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'story': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(0, 40), 'test': self._generate_examples(40, 50)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      yield i, {'story': _story(i)}


def _story(i: int) -> str:
  return f'story {i}: ' + _document(random.Random(i))


def test_tfds_catalog_dataset(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='diffjax_test_stories', text_key='story', eval_split='test')
  pipeline = data.build_input(cfg, seq_len=16, batch_size=2, seed=0, workdir=None)
  assert pipeline.train_batches()[0]['inputs'].shape == (2, 16)
  assert len(pipeline.eval_batches(2)) == 2
  tokenizer = pipeline.tokenizer
  for split, indices in ((TRAIN, range(0, 40)), (VALIDATION, range(40, 50))):
    tokens = _rows(pipeline, split).ravel()
    tokens = tokens[tokens != tokenizer.pad_id]
    assert tokens[-1] == tokenizer.eos_id
    documents = [tokenizer.decode(part) for part in np.split(tokens, np.flatnonzero(tokens == tokenizer.eos_id))[:-1]]
    assert sorted(documents) == sorted(_story(i) for i in indices)  # every story once, as str, then EOS
  assert pipeline.identity.startswith('diffjax_test_stories/1.0.0[train|test].story')


# Errors: one line that names the key to change and says how.


@contextlib.contextmanager
def _config_error(match):
  with pytest.raises(ConfigError, match=match) as info:
    yield info
  message = str(info.value)
  assert '\n' not in message and '\r' not in message, message


def test_error_unknown_source(tmp_path):
  with _config_error(r"^data\.source: unknown source 'hdfs'; use one of stdlib, local, tfds, hf$"):
    data.validate_data_config(_config(tmp_path, source='hdfs'))


def test_error_unknown_tokenizer(tmp_path):
  with _config_error(r"^data\.tokenizer: unknown tokenizer 'bpe'; use one of byte, sentencepiece$"):
    data.validate_data_config(_config(tmp_path, tokenizer='bpe'))


def test_error_local_without_text_glob(tmp_path):
  with _config_error(r"^data\.text_glob: unset; with data\.source='local' point it at"):
    data.build_input(_config(tmp_path, source='local'), seq_len=8, batch_size=1, seed=0, workdir=None)


def test_error_tfds_without_name(tmp_path):
  with _config_error(r"^data\.tfds_name: unset; with data\.source='tfds' name a TFDS dataset"):
    data.validate_data_config(_config(tmp_path, source='tfds'))


@pytest.mark.parametrize('pattern, match', [
    ('absent/*.txt', r'^data\.text_glob: the folder .*absent.* does not exist; point it at'),
    ('absent.txt', r"^data\.text_glob: '.*absent\.txt' does not exist; point it at"),
])
def test_error_missing_path(tmp_path, pattern, match):
  with _config_error(match):
    data.validate_data_config(_config(tmp_path, source='local', text_glob=str(tmp_path / pattern)))


def test_error_no_matching_files(tmp_path):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'notes.md').write_text('not a .txt file')
  with _config_error(r'^data\.text_glob: no \.txt or \.txt\.gz files match .*; point it at'):
    _local_pipeline(tmp_path)


def test_error_all_files_empty(tmp_path):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  (folder / 'a.txt').write_text('')
  (folder / 'b.txt').write_bytes(b'\xef\xbb\xbf')
  with gzip.open(folder / 'c.txt.gz', 'wb'):
    pass
  with _config_error(r'^data\.text_glob: every file matching .* is empty; point it at'):
    _local_pipeline(tmp_path)


def test_error_single_document(tmp_path):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'only.txt').write_text('one document cannot be split by document')
  with _config_error(r'^data\.text_glob: only one non-empty document .*point it at two or more files$'):
    _local_pipeline(tmp_path)


def test_error_corpus_smaller_than_one_sequence(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=4)
  with _config_error(r'^data\.text_glob: the (train|validation) split of corpus .* has \d+ tokens, fewer than one '
                     r'sequence of seq_len\+1 = 100001; lower seq_len or use a larger corpus$'):
    _local_pipeline(tmp_path, seq_len=100_000)
  assert not [p for p in (tmp_path / 'data').rglob('*') if p.is_dir() and 'seq100000' in p.name]
  assert not list((tmp_path / 'data').rglob('*.lock'))


def test_error_unknown_tfds_dataset(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='no_such_dataset_anywhere')
  with _config_error(r"^data\.tfds_name: no TFDS dataset 'no_such_dataset_anywhere' .*; use a name from the TFDS "
                     r"catalog such as 'lm1b', or data\.source='local'"):
    data.build_input(cfg, seq_len=8, batch_size=1, seed=0, workdir=None)


def test_error_tfds_dataset_not_prepared_and_not_downloadable(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='diffjax_test_unreachable')
  with _config_error(r"^data\.tfds_name: 'diffjax_test_unreachable' is not prepared in .* could not be "
                     r'downloaded and prepared \(ConnectionError: Failed to reach '
                     r'https://example\.invalid/data\.zip\); without TensorFlow, .*--config\.data\.source=local .*'
                     r'python -m diffjax\.prepare.*; or set data\.data_dir .*tfds build diffjax_test_unreachable'):
    data.build_input(cfg, seq_len=8, batch_size=1, seed=0, workdir=None)


def test_error_missing_tfds_split(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='diffjax_test_stories', text_key='story')
  with _config_error(r"^data\.eval_split: .* has no split 'validation'; use one of (train, test|test, train)$"):
    data.build_input(cfg, seq_len=8, batch_size=1, seed=0, workdir=None)


def test_error_text_key_not_a_feature(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='diffjax_test_stories', text_key='body', eval_split='test')
  with _config_error(r"^data\.text_key: 'body' is not a feature of diffjax_test_stories/1\.0\.0; use one of story$"):
    data.build_input(cfg, seq_len=8, batch_size=1, seed=0, workdir=None)


def test_error_sp_vocab_size_too_small_for_the_characters(tmp_path):
  rng = random.Random(0)
  folder = tmp_path / 'corpus'
  folder.mkdir()
  for i in range(4):
    # Three hundred distinct characters, each frequent: more than 300 pieces are required.
    (folder / f'{i}.txt').write_text(''.join(chr(0x4E00 + rng.randrange(300)) for _ in range(20_000)))
  with _config_error(r'^data\.sp_vocab_size: 300 is too small for the characters of this corpus; use at '
                     r'least \d+$'):
    _local_pipeline(tmp_path, tokenizer='sentencepiece', sp_vocab_size=300)


def test_error_sp_vocab_size_below_the_byte_fallback_minimum(tmp_path):
  with _config_error(rf'^data\.sp_vocab_size: 100 is too small; the byte-fallback model needs at least '
                     rf'{tokenizers.SP_MIN_VOCAB_SIZE} \(use e\.g\. 8000\)$'):
    data.validate_data_config(_config(tmp_path, tokenizer='sentencepiece', sp_vocab_size=100))


def test_error_sp_vocab_size_too_large(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=4)
  with _config_error(r'^data\.sp_vocab_size: 8000 is more pieces than the training text supports; use at '
                     r'most \d+'):
    _local_pipeline(tmp_path, tokenizer='sentencepiece', sp_vocab_size=8000)


def test_error_saved_tokenizer_has_another_vocab_size(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  rng = random.Random(0)
  workdir = tmp_path / 'workdir'
  tokenizers.SentencePieceTokenizer.train([_document(rng, 50, 200) for _ in range(200)],
                                          vocab_size=300).save(workdir / data.TOKENIZER_FILE)
  with _config_error(r'^data\.sp_vocab_size: .*tokenizer\.model has 300 pieces but the config asks for 400; keep '
                     r'the value this run was started with or use a new workdir$'):
    _local_pipeline(tmp_path, workdir=workdir, tokenizer='sentencepiece', sp_vocab_size=400)


@pytest.mark.parametrize('key, value', [
    ('validation_fraction', 0.0), ('validation_fraction', 1.0), ('sp_vocab_size', 0), ('sp_train_chars', -5),
    ('read_threads', 0), ('prefetch_batches', -1), ('text_key', ''), ('eval_split', None),
])
def test_error_out_of_range_values(tmp_path, key, value):
  with _config_error(rf'^data\.{key}: must be .*, got '):
    data.validate_data_config(_config(tmp_path, **{key: value}))


@pytest.mark.parametrize('key', ['seq_len', 'batch_size'])
def test_error_nonpositive_sizes(tmp_path, key):
  sizes = {'seq_len': 16, 'batch_size': 2, key: 0}
  with _config_error(rf'^{key}: must be a positive integer, got 0$'):
    data.build_input(_config(tmp_path), seed=0, workdir=None, **sizes)


def test_removed_keys_are_not_in_the_config():
  cfg = data.default_data_config()
  assert 'shuffle_window' not in cfg and 'num_workers' not in cfg
  assert cfg.read_threads > 0 and cfg.prefetch_batches > 0


def test_error_resuming_on_another_corpus(tmp_path):
  documents = _write_corpus(tmp_path / 'corpus')
  with _iterator(_local_pipeline(tmp_path)) as iterator:
    state = iterator.get_state()
  for name in list(documents)[:10]:
    (tmp_path / 'corpus' / name).unlink()
  with _config_error(r'^data: the saved input position is for .* but this config reads .*; restore the data config '
                     r'of that run or start a new workdir$'):
    with _iterator(_local_pipeline(tmp_path)) as iterator:
      iterator.set_state(state)


@pytest.mark.parametrize('change', [{'seq_len': 24}, {'shard': (1, 2)}])
def test_error_resuming_with_another_seq_len_or_shard(tmp_path, change):
  _write_corpus(tmp_path / 'corpus')
  with _iterator(_local_pipeline(tmp_path)) as iterator:
    state = iterator.get_state()
  with _config_error(r'^data: the saved input position is for .* but this config reads'):
    with _iterator(_local_pipeline(tmp_path, **change)) as iterator:
      iterator.set_state(state)


def test_error_resuming_a_position_of_the_old_pipeline(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  pipeline = _local_pipeline(tmp_path)
  with _config_error(r'^data: the checkpoint holds an input position of an older diffjax input pipeline; start a '
                     r'new workdir, or use checkpoint\.init_from'):
    with _iterator(pipeline) as iterator:
      iterator.set_state({'corpus': pipeline.identity, 'position': 3})


def test_error_more_processes_than_rows(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=6)
  with _config_error(r'^data\.text_glob: \d+ training sequences cannot be shared among 100000 processes; use a '
                     r'larger corpus or fewer hosts$'):
    _local_pipeline(tmp_path, shard=(0, 100_000))
