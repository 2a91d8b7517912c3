"""Tests of the data pipeline: TFDS text builders, tokenizers, packing, resumable Grain iterators, errors."""

import gzip
import json
import os
import pathlib
import random
import shutil

from absl import flags
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffjax import data
from diffjax import text_builder
from diffjax import tokenizers
from diffjax.errors import ConfigError

_WORDS = ('the', 'quick', 'brown', 'fox', 'jumps', 'over', 'lazy', 'dog', 'café', 'naïve', 'über', 'smile 😀',
          'def', 'return', 'x', '=', '1', '\n', '\n    ')
_CORPUS_EN = [pathlib.Path('/work/shared/data/corpus_en'),
              pathlib.Path(__file__).resolve().parents[1] / '..' / 'shared' / 'data' / 'corpus_en']


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


def _config(tmp_path: pathlib.Path, **overrides):
  cfg = data.default_data_config()
  cfg.data_dir = str(tmp_path / 'tfds')
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _local_pipeline(tmp_path, *, seq_len=16, batch_size=4, seed=0, shard=(0, 1), **overrides):
  cfg = _config(tmp_path, source='local', text_glob=str(tmp_path / 'corpus'), **overrides)
  return data.build_input(cfg, seq_len=seq_len, batch_size=batch_size, seed=seed, workdir=None, shard=shard)


def _split_texts(tmp_path, split: str, data_dir=None) -> list[tuple[str, str]]:
  """(name, text) of each example of a prepared local corpus, in stored order."""
  builder = text_builder.local_text(str(tmp_path / 'corpus'), validation_fraction=0.05,
                                    data_dir=data_dir or str(tmp_path / 'tfds'))
  source = text_builder.prepare(builder).as_data_source(split)
  return [(source[i]['name'].decode(), source[i]['text'].decode()) for i in range(len(source))]


def _token_stream(batches) -> list[int]:
  """The packed token sequences of `batches`, concatenated, without padding."""
  stream = []
  for batch in batches:
    for inputs, targets, mask in zip(batch['inputs'], batch['targets'], batch['mask']):
      real_targets = int(mask.sum())
      if real_targets:
        stream.extend([int(inputs[0])] + [int(t) for t in targets[:real_targets]])
  return stream


def _documents_of(stream: list[int], tokenizer) -> list[str]:
  """The texts between EOS tokens; a trailing piece without EOS is dropped."""
  documents, current = [], []
  for token in stream:
    if token == tokenizer.eos_id:
      documents.append(tokenizer.decode(current))
      current = []
    else:
      current.append(token)
  return documents


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


# Builders.


def test_local_text_splits_by_document_deterministically(tmp_path):
  documents = _write_corpus(tmp_path / 'corpus')
  train = _split_texts(tmp_path, 'train', data_dir=str(tmp_path / 'first'))
  validation = _split_texts(tmp_path, 'validation', data_dir=str(tmp_path / 'first'))

  assert train and validation
  assert not {name for name, _ in train} & {name for name, _ in validation}
  assert sorted(name for name, _ in train + validation) == sorted(documents)
  for name, text in train + validation:
    assert text == documents[name]  # Whole documents, never pieces.
  assert _split_texts(tmp_path, 'train', data_dir=str(tmp_path / 'second')) == train
  assert _split_texts(tmp_path, 'validation', data_dir=str(tmp_path / 'second')) == validation


def test_local_text_config_name_changes_with_the_corpus(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  name = text_builder.local_text(str(tmp_path / 'corpus'), validation_fraction=0.05, data_dir=None).builder_config.name
  other_fraction = text_builder.local_text(str(tmp_path / 'corpus'), validation_fraction=0.2, data_dir=None)
  (tmp_path / 'corpus' / 'new.txt').write_text('one more document')
  grown = text_builder.local_text(str(tmp_path / 'corpus'), validation_fraction=0.05, data_dir=None)
  assert name.startswith('corpus_')
  assert len({name, other_fraction.builder_config.name, grown.builder_config.name}) == 3


@pytest.mark.parametrize('pattern, selects', [
    ('corpus', lambda name: True),
    ('corpus/*.txt', lambda name: name.endswith('.txt')),
    ('corpus/**/*.txt.gz', lambda name: name.endswith('.txt.gz')),
    ('corpus/doc001.txt', lambda name: name == 'doc001.txt'),
    ('corpus/doc000.txt.gz', lambda name: name == 'doc000.txt.gz'),
])
def test_local_text_finds_folders_globs_files_txt_and_gz(tmp_path, pattern, selects):
  documents = _write_corpus(tmp_path / 'corpus')
  (tmp_path / 'corpus' / 'README.md').write_text('not a text document')
  expected = sorted(str(tmp_path / 'corpus' / name) for name in documents if selects(name))
  assert text_builder.find_text_files(str(tmp_path / pattern)) == expected


def test_local_text_reads_txt_and_gz_documents(tmp_path):
  documents = _write_corpus(tmp_path / 'corpus', num_docs=6)
  assert any(name.endswith('.gz') for name in documents) and any(name.endswith('.txt') for name in documents)
  assert dict(_split_texts(tmp_path, 'train') + _split_texts(tmp_path, 'validation')) == documents


def test_local_text_strips_bom_and_crlf(tmp_path):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  with gzip.open(folder / 'a.txt.gz', 'wb') as f:
    f.write('\ufeffFirst line\r\nsecond line\r\n'.encode('utf-8'))
  (folder / 'b.txt').write_bytes('\ufeffOther\r\ntext'.encode('utf-8'))
  texts = dict(_split_texts(tmp_path, 'train') + _split_texts(tmp_path, 'validation'))
  assert texts == {'a.txt.gz': 'First line\nsecond line\n', 'b.txt': 'Other\ntext'}


def test_stdlib_default_prepares_and_yields_batches(tmp_path):
  cfg = _config(tmp_path)
  assert cfg.source == 'stdlib' and cfg.tokenizer == 'byte'
  pipeline = data.build_input(cfg, seq_len=64, batch_size=4, seed=0, workdir=None)
  batch = next(pipeline.train_iterator())
  assert {key: (value.shape, value.dtype) for key, value in batch.items()} == {
      'inputs': ((4, 64), np.int32), 'targets': ((4, 64), np.int32), 'mask': ((4, 64), np.float32)}
  assert batch['inputs'].max() < pipeline.tokenizer.vocab_size
  assert len(list(pipeline.eval_batches(3))) == 3


# Packing.


def test_eval_stream_is_the_validation_documents_joined_by_eos(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=60)
  pipeline = _local_pipeline(tmp_path, seq_len=16, batch_size=4, shuffle_window=1)
  tokenizer = pipeline.tokenizer
  validation = [text for _, text in _split_texts(tmp_path, 'validation')]

  batches = list(pipeline.eval_batches(10_000))
  documents = _documents_of(_token_stream(batches), tokenizer)
  assert sorted(documents) == sorted(validation)  # Whole documents, each once, in a fixed shuffled order.
  expected = [token for text in documents for token in tokenizer.encode(text) + [tokenizer.eos_id]]
  assert _token_stream(batches) == expected
  for batch in batches:
    assert batch['inputs'].shape == batch['targets'].shape == batch['mask'].shape == (4, 16)
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  last = batches[-1]
  assert last['mask'].sum() < last['mask'].size  # The split's end is padded ...
  assert (last['targets'][last['mask'] == 0] == tokenizer.pad_id).all()  # ... with PAD, masked out.
  _assert_same_batches(batches, list(pipeline.eval_batches(10_000)))


def test_train_stream_repeats_shuffled_whole_documents(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  pipeline = _local_pipeline(tmp_path, seq_len=16, batch_size=4, shuffle_window=1)
  train = sorted(text for _, text in _split_texts(tmp_path, 'train'))
  tokens_per_epoch = sum(len(pipeline.tokenizer.encode(text)) + 1 for text in train)

  batches = _take(pipeline.train_iterator(), 2 * tokens_per_epoch // (4 * 17) + 2)
  for batch in batches:
    assert batch['mask'].all()
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  documents = _documents_of(_token_stream(batches), pipeline.tokenizer)
  first_epoch, second_epoch = documents[:len(train)], documents[len(train):2 * len(train)]
  assert sorted(first_epoch) == train
  assert sorted(second_epoch) == train
  assert first_epoch != second_epoch


def test_window_shuffle_mixes_documents_within_batches(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  window, batch_size = 32, 4
  rows = lambda batches: [tuple(row) for batch in batches for row in batch['inputs']]
  packed = rows(_take(_local_pipeline(tmp_path, batch_size=batch_size, shuffle_window=1).train_iterator(),
                      window // batch_size))
  shuffled = rows(_take(_local_pipeline(tmp_path, batch_size=batch_size, shuffle_window=window).train_iterator(),
                        window // batch_size))
  assert sorted(shuffled) == sorted(packed)  # The same sequences of the first window ...
  assert shuffled != packed  # ... in another order, so consecutive pieces of one document get spread out.


def test_eval_batches_are_the_same_for_every_training_seed(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=60)
  _assert_same_batches(list(_local_pipeline(tmp_path, seed=1).eval_batches(3)),
                       list(_local_pipeline(tmp_path, seed=2).eval_batches(3)))


def test_train_stream_is_deterministic_for_a_seed(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  same = [_take(_local_pipeline(tmp_path, seed=7).train_iterator(), 5) for _ in range(2)]
  other = _take(_local_pipeline(tmp_path, seed=8).train_iterator(), 5)
  _assert_same_batches(same[0], same[1])
  assert any((a['inputs'] != b['inputs']).any() for a, b in zip(same[0], other))


@pytest.mark.parametrize('exact_fit', [False, True])
def test_train_iterator_resumes_at_the_exact_position(tmp_path, exact_fit):
  if exact_fit:
    # Documents of seq_len tokens plus EOS: every sequence ends on a document boundary.
    folder = tmp_path / 'corpus'
    folder.mkdir()
    for i in range(12):
      (folder / f'd{i:02d}.txt').write_text(f'{i:02d}-abcdefghijklm')
  else:
    _write_corpus(tmp_path / 'corpus')
  pipeline = _local_pipeline(tmp_path, seq_len=16, batch_size=3, seed=3)
  iterator = pipeline.train_iterator()
  for steps in (0, 1, 2, 5, 11, 30):  # 30 crosses epochs.
    _take(iterator, steps)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 4)
    restarted = _local_pipeline(tmp_path, seq_len=16, batch_size=3, seed=3).train_iterator()
    restarted.set_state(state)
    _assert_same_batches(_take(restarted, 4), expected)


def test_train_iterator_resumes_on_a_copy_of_the_corpus(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  iterator = _local_pipeline(tmp_path, seed=5).train_iterator()
  _take(iterator, 7)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 3)
  shutil.copytree(tmp_path / 'corpus', tmp_path / 'elsewhere' / 'corpus')
  moved = _local_pipeline(tmp_path / 'elsewhere', seed=5).train_iterator()
  moved.set_state(state)
  _assert_same_batches(_take(moved, 3), expected)


def test_multiprocess_workers_resume(tmp_path):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags, which absl.app parses.
  _write_corpus(tmp_path / 'corpus')
  pipeline = _local_pipeline(tmp_path, num_workers=1)
  iterator = pipeline.train_iterator()
  try:
    _take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))
    expected = _take(iterator, 2)
  finally:
    iterator.close()
  restarted = pipeline.train_iterator()
  try:
    restarted.set_state(state)
    _assert_same_batches(_take(restarted, 2), expected)
  finally:
    restarted.close()


# Tokenizers.


def test_byte_tokenizer_round_trips_any_text():
  tokenizer = tokenizers.ByteTokenizer()
  text = 'ASCII, café, 中文, emoji 😀👍🏽, tab\t, nul \x00 and newline\n'
  ids = tokenizer.encode(text)
  assert max(ids) < 256 and (tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id) == (258, 256, 257)
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(ids + [tokenizer.eos_id, tokenizer.pad_id, tokenizer.pad_id]) == text


def test_byte_tokenizer_decodes_invalid_bytes():
  tokenizer = tokenizers.ByteTokenizer()
  broken = tokenizer.encode('😀')[:2] + [0xff, 0xfe] + tokenizer.encode('ok') + [256, 257, 9999, -1]
  assert tokenizer.decode(broken).endswith('ok')


def test_sentencepiece_tokenizer_trains_saves_and_reloads(tmp_path):
  rng = random.Random(0)
  texts = [_document(rng, 50, 200) for _ in range(200)]
  tokenizer = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=300)
  tokenizer.save(tmp_path / 'tokenizer.model')
  reloaded = tokenizers.SentencePieceTokenizer.load(tmp_path / 'tokenizer.model')

  sample = 'def f(x):\n    return x  # café 😀 中文\n\n  two  spaces'
  assert reloaded.encode(sample) == tokenizer.encode(sample)
  assert tokenizer.decode(tokenizer.encode(sample)) == sample
  assert tokenizer.vocab_size == 300
  assert tokenizer.decode(tokenizer.encode(sample) + [tokenizer.eos_id, tokenizer.pad_id, 10**6]) == sample


def test_sentencepiece_pipeline_keeps_its_model_in_the_workdir(tmp_path):
  rng = random.Random(1)
  folder = tmp_path / 'corpus'
  folder.mkdir()
  for i in range(20):
    (folder / f'{i}.txt').write_text('\n'.join(_document(rng, 50, 200) for _ in range(10)))
  cfg = _config(tmp_path, source='local', text_glob=str(folder), tokenizer='sentencepiece', sp_vocab_size=300)
  workdir = tmp_path / 'workdir'
  first = data.build_input(cfg, seq_len=32, batch_size=2, seed=0, workdir=str(workdir))
  model = workdir / data.TOKENIZER_FILE
  saved = model.read_bytes()
  second = data.build_input(cfg, seq_len=32, batch_size=2, seed=0, workdir=str(workdir))
  assert model.read_bytes() == saved
  _assert_same_batches(_take(first.train_iterator(), 2), _take(second.train_iterator(), 2))
  assert next(first.train_iterator())['inputs'].max() < 300


# The shared English novels, when this checkout has them.


def test_corpus_en_subset(tmp_path):
  corpus = next((path for path in _CORPUS_EN if path.is_dir()), None)
  if corpus is None:
    pytest.skip('no corpus_en: neither /work/shared/data/corpus_en nor ../shared/data/corpus_en exists')
  cfg = _config(tmp_path, source='local', text_glob=str(corpus / 'B*.txt.gz'))
  pipeline = data.build_input(cfg, seq_len=128, batch_size=4, seed=0, workdir=None)
  train = _take(pipeline.train_iterator(), 20)
  evaluation = list(pipeline.eval_batches(5))
  assert len(evaluation) == 5
  text = pipeline.tokenizer.decode(_token_stream(train + evaluation))
  assert '\ufeff' not in text and '\r' not in text
  assert text.count(' the ') > 10


# Errors: one line naming the key to change.


def _raises_config_error(match):
  return pytest.raises(ConfigError, match=match)


def test_error_unknown_source(tmp_path):
  with _raises_config_error(r"^data\.source: unknown source 'hdfs'"):
    data.validate_data_config(_config(tmp_path, source='hdfs'))


def test_error_unknown_tokenizer(tmp_path):
  with _raises_config_error(r"^data\.tokenizer: unknown tokenizer 'bpe'"):
    data.validate_data_config(_config(tmp_path, tokenizer='bpe'))


def test_error_local_without_text_glob(tmp_path):
  with _raises_config_error(r'^data\.text_glob: unset'):
    data.build_input(_config(tmp_path, source='local'), seq_len=8, batch_size=1, seed=0, workdir=None)


def test_error_missing_folder(tmp_path):
  cfg = _config(tmp_path, source='local', text_glob=str(tmp_path / 'absent' / '*.txt'))
  with _raises_config_error(r'^data\.text_glob: the folder .*absent.* does not exist'):
    data.validate_data_config(cfg)


def test_error_no_matching_files(tmp_path):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'notes.md').write_text('not a .txt file')
  with _raises_config_error(r'^data\.text_glob: no \.txt or \.txt\.gz files match'):
    _local_pipeline(tmp_path)


def test_error_all_files_empty(tmp_path):
  folder = tmp_path / 'corpus'
  folder.mkdir()
  (folder / 'a.txt').write_text('')
  (folder / 'b.txt').write_bytes(b'\xef\xbb\xbf')
  with gzip.open(folder / 'c.txt.gz', 'wb'):
    pass
  with _raises_config_error(r'^data\.text_glob: every file matching .* is empty'):
    _local_pipeline(tmp_path)


def test_error_single_document(tmp_path):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'only.txt').write_text('one document cannot be split by document')
  with _raises_config_error(r'^data\.text_glob: only one non-empty document'):
    _local_pipeline(tmp_path)


def test_error_corpus_smaller_than_one_sequence(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=4)
  with _raises_config_error(r"^data\.text_glob: the '(train|validation)' split .* has \d+ tokens, fewer than one "
                            r'sequence of seq_len\+1 = 100001; lower seq_len'):
    _local_pipeline(tmp_path, seq_len=100_000)


def test_error_unknown_tfds_dataset(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='no_such_dataset_anywhere')
  with _raises_config_error(r"^data\.tfds_name: no TFDS dataset 'no_such_dataset_anywhere'"):
    data.build_input(cfg, seq_len=8, batch_size=1, seed=0, workdir=None)


class DiffjaxTestUnreachable(tfds.core.GeneratorBasedBuilder):
  """A catalog-style dataset whose download always fails, as without network."""

  VERSION = tfds.core.Version('1.0.0')
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    raise ConnectionError('Failed to reach https://example.invalid/data.zip')

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
      yield i, {'story': _document(random.Random(i))}


def test_error_tfds_dataset_not_prepared_and_not_downloadable(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='diffjax_test_unreachable')
  with _raises_config_error(r"^data\.tfds_name: 'diffjax_test_unreachable' is not prepared in .* could not be "
                            r'downloaded .*ConnectionError.*set data\.data_dir .*tfds build'):
    data.build_input(cfg, seq_len=8, batch_size=1, seed=0, workdir=None)


def test_tfds_catalog_dataset(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='diffjax_test_stories', text_key='story', eval_split='test')
  pipeline = data.build_input(cfg, seq_len=16, batch_size=2, seed=0, workdir=None)
  assert next(pipeline.train_iterator())['inputs'].shape == (2, 16)
  assert len(list(pipeline.eval_batches(2))) == 2


def test_error_missing_tfds_split(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='diffjax_test_stories', text_key='story')
  with _raises_config_error(r"^data\.eval_split: .* has no split 'validation'; use one of train, test"):
    data.build_input(cfg, seq_len=8, batch_size=1, seed=0, workdir=None)


def test_error_text_key_not_a_feature(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  with _raises_config_error(r"^data\.text_key: 'body' is not a feature of local_text/.*; use one of"):
    _local_pipeline(tmp_path, text_key='body')


def test_error_sp_vocab_size_too_small(tmp_path):
  rng = random.Random(0)
  folder = tmp_path / 'corpus'
  folder.mkdir()
  for i in range(4):
    # Three hundred distinct characters, each frequent: more than 300 pieces are required.
    (folder / f'{i}.txt').write_text(''.join(chr(0x4E00 + rng.randrange(300)) for _ in range(20_000)))
  with _raises_config_error(r'^data\.sp_vocab_size: 300 is too small for the characters of this corpus; use at '
                            r'least \d+'):
    _local_pipeline(tmp_path, tokenizer='sentencepiece', sp_vocab_size=300)


def test_error_sp_vocab_size_too_large(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=4)
  with _raises_config_error(r'^data\.sp_vocab_size: 8000 is more pieces than the training text supports; use at '
                            r'most \d+'):
    _local_pipeline(tmp_path, tokenizer='sentencepiece', sp_vocab_size=8000)


def test_error_saved_tokenizer_has_another_vocab_size(tmp_path):
  _write_corpus(tmp_path / 'corpus')
  rng = random.Random(0)
  workdir = tmp_path / 'workdir'
  tokenizers.SentencePieceTokenizer.train([_document(rng, 50, 200) for _ in range(200)],
                                          vocab_size=300).save(workdir / data.TOKENIZER_FILE)
  with _raises_config_error(r'^data\.sp_vocab_size: .*tokenizer\.model has 300 pieces but the config asks for 400'):
    data.build_input(_config(tmp_path, source='local', text_glob=str(tmp_path / 'corpus'), tokenizer='sentencepiece',
                             sp_vocab_size=400), seq_len=8, batch_size=1, seed=0, workdir=str(workdir))


@pytest.mark.parametrize('key, value', [
    ('validation_fraction', 0.0), ('validation_fraction', 1.0), ('sp_vocab_size', 0), ('sp_train_chars', -5),
    ('num_workers', -1),
])
def test_error_nonpositive_values(tmp_path, key, value):
  with _raises_config_error(rf'^data\.{key}: must be'):
    data.validate_data_config(_config(tmp_path, **{key: value}))


def test_error_resuming_on_another_corpus(tmp_path):
  documents = _write_corpus(tmp_path / 'corpus')
  state = _local_pipeline(tmp_path).train_iterator().get_state()
  for name in list(documents)[:10]:
    (tmp_path / 'corpus' / name).unlink()
  with _raises_config_error(r'^data: the saved input position is for .* but this config reads'):
    _local_pipeline(tmp_path).train_iterator().set_state(state)


def test_errors_are_one_line(tmp_path):
  cfg = _config(tmp_path, source='tfds', tfds_name='no_such_dataset_anywhere')
  with pytest.raises(ConfigError) as error:
    data.build_input(cfg, seq_len=8, batch_size=1, seed=0, workdir=None)
  assert '\n' not in str(error.value)
  assert os.linesep not in str(error.value)


def test_process_shards_split_the_training_documents(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=40)
  train = sorted(text for _, text in _split_texts(tmp_path, 'train'))
  seen = []
  for index in range(2):
    pipeline = _local_pipeline(tmp_path, shuffle_window=1, shard=(index, 2))
    tokens_per_epoch = sum(len(pipeline.tokenizer.encode(text)) + 1 for text in train)
    stream = _token_stream(_take(pipeline.train_iterator(), tokens_per_epoch // (4 * 17) + 2))
    seen.append(set(_documents_of(stream, pipeline.tokenizer)[:-1]))  # the last document may be cut short
  assert not seen[0] & seen[1]  # disjoint shards ...
  assert len(seen[0] | seen[1]) >= len(train) - 2  # ... that together cover the split
  assert seen[0] | seen[1] <= set(train)


def test_more_processes_than_documents_is_an_error(tmp_path):
  _write_corpus(tmp_path / 'corpus', num_docs=6)
  with pytest.raises(ConfigError, match='cannot be shared among 9 processes'):
    _local_pipeline(tmp_path, shard=(0, 9))
