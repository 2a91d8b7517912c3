"""A damaged config.json or tokenizer.model is one line that names the file and says what to do, in every reader
(evaluate, sample, attention_maps, needles: all through load.open_run) and in training; it is never taken
for a changed config, and SentencePiece's own C++ log lines never reach the terminal."""

import io
import json
import os
import shutil
import subprocess

import jax
import pytest
import sentencepiece as spm

import helpers_training as ht
import reliability_helpers as rh
from diffjax.data import pipeline as data
from diffjax.errors import ConfigError
from diffjax.infer import load
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step

pytestmark = pytest.mark.slow  # end-to-end runs: the quick subset (pytest -m "not slow") leaves them out

SP_VOCAB = 400


def _tokenizer_bytes(model: bytes) -> dict[str, bytes]:
  return {'torn': model[:len(model) // 2], 'cut_at_the_end': model[:-16], 'empty': b'',
          'garbage': b'not a model\n' * 40}


CONFIG_DAMAGE = {'torn': lambda text: text[:len(text) // 2], 'binary': lambda text: bytes(range(128, 256)) * 4,
                 'empty': lambda text: b''}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, overrides) of a SentencePiece run with one saved step of fresh parameters; no data prepared."""
  root = tmp_path_factory.mktemp('damaged')
  overrides = ht.run_overrides(ht.write_corpus(root / 'corpus', num_docs=4, chars_per_doc=8_000), root / 'data',
                               data__tokenizer='sentencepiece', data__sp_vocab_size=SP_VOCAB)
  config = ht.load_config(overrides)
  workdir = root / 'run'
  # The run's own tokenizer, trained as training would, which also caches it in data.data_dir.
  tokenizer = data.build_input(config.data, seq_len=64, batch_size=8, seed=0, workdir=str(workdir)).tokenizer
  cfg = defaults.model_config(config, tokenizer.vocab_size)
  checkpoints = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'), keep=3, async_save=False)
  checkpoints.save(1, train_step.new_state(cfg, optim.make_optimizer(config.train), jax.random.key(0)), {},
                   config.to_dict())
  checkpoints.close()
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  return workdir, overrides


def _copy(run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run[0], workdir)
  return workdir


def _one_line(error_info) -> str:
  message = str(error_info.value)
  assert '\n' not in message and '\r' not in message, message
  return message


def test_the_intact_run_opens(run, tmp_path):
  _, _, tokenizer, step = load.open_run(str(_copy(run, tmp_path)))
  assert step == 1 and tokenizer.vocab_size == SP_VOCAB


@pytest.mark.parametrize('damage', sorted(CONFIG_DAMAGE))
def test_a_damaged_config_json_is_named_with_where_a_copy_is(run, tmp_path, damage):
  workdir = _copy(run, tmp_path)
  path = workdir / 'config.json'
  path.write_bytes(CONFIG_DAMAGE[damage](path.read_bytes()))
  with pytest.raises(ConfigError) as info:
    load.open_run(str(workdir))
  message = _one_line(info)
  assert message.startswith(f'--workdir: {path} is damaged (')
  assert message.endswith('restore it from a copy (every checkpoint keeps one, in checkpoints/STEP/config/metadata)')
  # The copy that message points at is there, and is the run's config.
  assert json.loads((workdir / 'checkpoints' / '1' / 'config' / 'metadata').read_text()) == json.loads(
      (run[0] / 'config.json').read_text())


@pytest.mark.parametrize('damage', ['torn', 'cut_at_the_end', 'empty', 'garbage'])
def test_a_damaged_tokenizer_is_named_and_sentencepiece_stays_quiet(run, tmp_path, damage, capfd):
  workdir = _copy(run, tmp_path)
  path = workdir / data.TOKENIZER_FILE
  path.write_bytes(_tokenizer_bytes(path.read_bytes())[damage])
  capfd.readouterr()
  with pytest.raises(ConfigError) as info:
    load.open_run(str(workdir))
  message = _one_line(info)
  assert message.startswith(f'--workdir: {path} is damaged (') and 'restore it from a copy' in message
  assert capfd.readouterr().err == ''  # SentencePiece logs from C++, straight to the file descriptor


def test_a_model_of_another_kind_is_not_taken(run, tmp_path):
  """A whole SentencePiece model, but without the identity normalizer diffjax relies on, is refused too."""
  lines = [line for i in range(4) for line in ht.english_like_text(8_000, seed=i).split('\n') if line]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=SP_VOCAB,
                                 minloglevel=2)  # SentencePiece's defaults, as another program would train it
  workdir = _copy(run, tmp_path)
  (workdir / data.TOKENIZER_FILE).write_bytes(model.getvalue())
  with pytest.raises(ConfigError, match=r"is damaged \(cut short or not a model diffjax trains: normalizer "
                                        r"'nmt_nfkc', not 'identity'"):
    load.open_run(str(workdir))


# -- training: the workdir's tokenizer and the corpus's cached one --------------------------------------------

def _build_input(run, workdir):
  return data.build_input(ht.load_config(run[1]).data, seq_len=64, batch_size=8, seed=0,
                          workdir=str(workdir) if workdir else None)


@pytest.mark.parametrize('damage', ['torn', 'empty'])
def test_training_refuses_a_damaged_workdir_tokenizer_and_blames_no_config(run, tmp_path, damage, capfd):
  workdir = _copy(run, tmp_path)
  path = workdir / data.TOKENIZER_FILE
  model = path.read_bytes()
  path.write_bytes(_tokenizer_bytes(model)[damage])
  capfd.readouterr()
  with pytest.raises(ConfigError) as info:
    _build_input(run, workdir)
  message = _one_line(info)
  assert message.startswith(f'--workdir: {path} is damaged (') and 'pieces but the config asks' not in message
  assert 'restore it from a copy, or delete it to take ' in message
  assert capfd.readouterr().err == ''
  # The remedy works: without the damaged file the run takes the corpus's cached model, the one it trained with.
  path.unlink()
  assert _build_input(run, workdir).tokenizer.model_proto == model == path.read_bytes()


def test_training_refuses_a_damaged_cached_tokenizer_and_says_a_new_one_is_trained_without_it(run, tmp_path):
  [cached] = [os.path.join(folder, name) for folder, _, names in os.walk(run[1]['data.data_dir'])
              for name in names if name.startswith('sentencepiece_')]
  original = open(cached, 'rb').read()
  try:
    with open(cached, 'wb') as f:
      f.write(original[:100])
    with pytest.raises(ConfigError) as info:
      _build_input(run, None)
    message = _one_line(info)
    assert message.startswith(f'data.data_dir: {cached} is damaged (')
    assert 'delete it to have a new one trained' in message
  finally:
    with open(cached, 'wb') as f:
      f.write(original)


# -- the command-line entry points ------------------------------------------------------------------------------

def _cli(module, *args):
  return rh.run_command(module, *args)


@pytest.mark.parametrize('module, damaged, damage', [
    ('evaluate', 'config.json', 'torn'), ('sample', 'config.json', 'binary'),
    ('sample', data.TOKENIZER_FILE, 'garbage'), ('evaluate', data.TOKENIZER_FILE, 'torn'),
    ('attention_maps', data.TOKENIZER_FILE, 'empty'), ('needles', 'config.json', 'empty'),
])
def test_every_reader_prints_one_line(run, tmp_path, module, damaged, damage):
  workdir = _copy(run, tmp_path)
  path = workdir / damaged
  model = path.read_bytes()
  path.write_bytes(CONFIG_DAMAGE[damage](model) if damaged == 'config.json' else _tokenizer_bytes(model)[damage])
  extra = {'needles': [f'--text_glob={run[1]["data.text_glob"]}', f'--out={tmp_path / "out"}']}.get(module, [])
  result, lines = _cli(module, f'--workdir={workdir}', *extra)
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert lines[0].startswith(f'error: --workdir: {path} is damaged (')


@pytest.mark.slow
def test_train_prints_one_line_for_a_damaged_tokenizer(run, tmp_path):
  workdir = _copy(run, tmp_path)
  (workdir / data.TOKENIZER_FILE).write_bytes(b'')
  result = subprocess.run(ht.cli_command(workdir, run[1]), cwd=rh.REPO, env=rh.env(), capture_output=True,
                          text=True, timeout=240)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert lines[0].startswith(f'error: --workdir: {workdir / data.TOKENIZER_FILE} is damaged (it is empty); ')
