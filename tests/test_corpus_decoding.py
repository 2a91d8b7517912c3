"""Bytes of a local corpus that are not UTF-8 are counted per file: a few are warned about, a file in another
encoding or a binary one is refused in one line (data.max_undecodable_fraction), before anything is kept."""

import gzip
import logging
import os

import pytest

import helpers_training as ht
from diffjax.data import corpus as corpus_lib
from diffjax.data import pipeline as data
from diffjax.data import prepare
from diffjax.errors import ConfigError

LATIN1 = ('Le café de Noël était très chaud, à côté du lycée. ' * 40).encode('latin-1')


def _config(tmp_path, **overrides):
  cfg = data.default_data_config()
  cfg.update(source='local', text_glob=str(tmp_path / 'corpus'), data_dir=str(tmp_path / 'data'), read_threads=1,
             **overrides)
  return cfg


def _corpus(tmp_path, **extra_files: bytes):
  folder = ht.write_corpus(tmp_path / 'corpus', num_docs=4, chars_per_doc=3_000)
  for name, content in extra_files.items():
    (folder / name).write_bytes(content)
  return folder


def _prepare(cfg, workdir=None):
  return data.build_input(cfg, seq_len=16, batch_size=2, seed=0, workdir=workdir)


def _prepared_folders(cfg):
  root = prepare.data_root(cfg)
  return [folder for folder, _, names in os.walk(root) if prepare.META_FILE in names]


def test_read_document_counts_exactly_the_undecodable_bytes(tmp_path):
  tally = corpus_lib.DecodingTally('text_glob', 0.5)
  good = '\ufeffgood text with a real \ufffd and é\r\n'.encode('utf-8')
  (tmp_path / 'good.txt').write_bytes(good)
  (tmp_path / 'bad.txt.gz').write_bytes(gzip.compress(b'\xef\xbb\xbfab\xff\xfe cd \xe9t\xc3'))
  assert corpus_lib.read_document(str(tmp_path / 'good.txt'), tally) == 'good text with a real \ufffd and é\n'
  assert corpus_lib.read_document(str(tmp_path / 'bad.txt.gz'), tally) == 'ab\ufffd\ufffd cd \ufffdt\ufffd'
  # U+FFFD written in the file is text, not damage; the BOM is valid too; \xff, \xfe, \xe9 and a cut \xc3 are not.
  assert tally._counts == {str(tmp_path / 'bad.txt.gz'): (4, 14)}


def test_a_file_in_another_encoding_is_refused_in_one_line_naming_it(tmp_path):
  _corpus(tmp_path, **{'latin1.txt': LATIN1, 'binary.txt': bytes(range(256)) * 8})
  cfg = _config(tmp_path)
  with pytest.raises(ConfigError) as info:
    _prepare(cfg)
  message = str(info.value)
  assert '\n' not in message and message.startswith('data.text_glob: 2 file(s) are not UTF-8 text (more than '
                                                    'data.max_undecodable_fraction=0.001 of their bytes undecodable)')
  binary, latin1 = message.index('binary.txt (1,024 of 2,048 bytes, 50.0%)'), message.index('latin1.txt (')
  assert binary < latin1  # worst first
  assert message.endswith('or raise data.max_undecodable_fraction')
  assert _prepared_folders(cfg) == []  # nothing half-trusted is left to reuse


def test_a_stray_byte_is_warned_about_and_the_corpus_prepared(tmp_path, caplog):
  text = ht.english_like_text(20_000, seed=9).encode('utf-8')
  _corpus(tmp_path, **{'stray.txt': text[:5_000] + b'\x92' + text[5_000:]})
  with caplog.at_level(logging.WARNING):
    _prepare(_config(tmp_path))
  [warning] = [r.getMessage() for r in caplog.records if 'not UTF-8' in r.getMessage()]
  assert warning.startswith('1 file(s) hold bytes that are not UTF-8, read as U+FFFD: ')
  assert warning.endswith(f'stray.txt (1 of {len(text) + 1:,} bytes, 0.0%)')


def test_a_fraction_of_one_takes_any_file_with_a_warning(tmp_path, caplog):
  _corpus(tmp_path, **{'latin1.txt': LATIN1})
  cfg = _config(tmp_path, max_undecodable_fraction=1.0)
  with caplog.at_level(logging.WARNING):
    _prepare(cfg)
  assert any('latin1.txt (' in r.getMessage() for r in caplog.records)
  assert len(_prepared_folders(cfg)) == 1


def test_a_binary_corpus_trains_no_sentencepiece_model_that_would_be_kept(tmp_path):
  _corpus(tmp_path, **{f'binary{i}.txt': os.urandom(20_000) for i in range(2)})
  cfg = _config(tmp_path, tokenizer='sentencepiece', sp_vocab_size=400)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with pytest.raises(ConfigError, match=r'^data\.text_glob: 2 file\(s\) are not UTF-8 text'):
    _prepare(cfg, workdir=str(workdir))
  assert not (workdir / data.TOKENIZER_FILE).exists()
  assert not [name for _, _, names in os.walk(tmp_path / 'data') for name in names if name.endswith('.model')]


@pytest.mark.parametrize('value', [-0.1, 1.5])
def test_the_fraction_must_be_between_0_and_1(tmp_path, value):
  _corpus(tmp_path)
  with pytest.raises(ConfigError, match=r'^data\.max_undecodable_fraction: must be a fraction between 0 and 1, '):
    data.validate_data_config(_config(tmp_path, max_undecodable_fraction=value))
