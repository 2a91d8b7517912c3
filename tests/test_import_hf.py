"""`diffjax import`: a Hugging Face directory becomes a run. A run exported and imported back computes the same
logits; sample, evaluate and training start from the imported run; bad input is one line, and nothing is written."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers_training as ht
from conftest import assert_close
from diffjax.data import hf_tokenizer, tokenizers
from diffjax.errors import ConfigError
from diffjax.infer import hf, load
from diffjax.model.transformer import Transformer
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')

TOKENS_BxT = np.random.default_rng(0).integers(0, tokenizers.ByteTokenizer.vocab_size, (2, 48))


def make_run(root, variant: str):
  """The workdir of a tiny byte-level run (GQA) whose step 5 holds random parameters, laid out as the trainer saves
  it: config.json and an Orbax checkpoint of the whole train state. No data is prepared."""
  workdir = root / 'run'
  workdir.mkdir(parents=True)
  config = ht.load_config(ht.run_overrides(root / 'corpus', root / 'data', model__variant=variant,
                                           model__n_kv_heads=2))
  cfg, tx = defaults.model_config(config, tokenizers.ByteTokenizer.vocab_size), optim.make_optimizer(config.train)
  state = train_step.new_state(cfg, tx, jax.random.key(0))
  state['params'] = jax.tree.map(jax.numpy.asarray, ht.random_params(cfg))  # λ and norm scales away from their init
  checkpoints = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'), keep=1, async_save=False)
  checkpoints.save(5, state, {}, config.to_dict())
  checkpoints.close()
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  return workdir


@pytest.fixture(scope='module', params=['diff_v1', 'baseline'])
def imported(request, tmp_path_factory):
  """(original workdir, export directory, imported workdir)."""
  root = tmp_path_factory.mktemp(request.param)
  workdir = make_run(root, request.param)
  hf.save_run(workdir, root / 'hf')
  assert hf.import_run(root / 'hf', root / 'imported') == str(root / 'imported')
  return workdir, root / 'hf', root / 'imported'


# The commands read runs of either variant alike: their tests run on one.
ONE_VARIANT = pytest.mark.parametrize('imported', ['diff_v1'], indirect=True)


def logits(workdir):
  cfg, params, _, _ = load.open_run(str(workdir))
  return Transformer(cfg).apply({'params': params}, TOKENS_BxT)


def diffjax(*arguments, data_dir=None) -> subprocess.CompletedProcess:
  env = {**ht.cli_env(), **({'DIFFJAX_DATA_DIR': str(data_dir)} if data_dir else {})}
  return subprocess.run([sys.executable, '-m', 'diffjax.commands', *arguments], cwd=ht.REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_a_run_exported_and_imported_computes_the_same_logits(imported):
  original, _, workdir = imported
  cfg, _, tokenizer, step = load.open_run(str(workdir))
  before, _, _, _ = load.open_run(str(original))
  assert step == 0 and isinstance(tokenizer, tokenizers.ByteTokenizer)
  assert (cfg.variant, cfg.vocab_size, cfg.kv_heads, cfg.dtype) == (before.variant, 384, 2, 'float32')
  assert_close(logits(workdir), logits(original), tol=1e-5)


def test_the_imported_config_is_the_trainers_with_the_models_keys(imported):
  _, _, workdir = imported
  saved = json.loads((workdir / 'config.json').read_text())
  assert sorted(defaults.flatten(saved)) == sorted(defaults.KEYS)
  assert saved['data']['tokenizer'] == 'byte' and saved['train']['seq_len'] == 64  # at most the model's max_len
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json']
  assert checkpoint_lib.holds_parameters_only(str(workdir / 'checkpoints' / '0' / 'state'))


@pytest.mark.slow
@ONE_VARIANT
def test_sample_and_evaluate_work_on_the_imported_run(imported, tmp_path):
  _, _, workdir = imported
  result = diffjax('sample', f'--workdir={workdir}', '--prompt=The ', '--tokens=8', '--temperature=0')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('The ')
  (tmp_path / 'notes.txt').write_text(ht.english_like_text(500, seed=3))
  for flag in (f'--text_glob={tmp_path / "notes.txt"}', '--batches=1'):  # text files, then the validation split
    result = diffjax('evaluate', f'--workdir={workdir}', flag, data_dir=tmp_path / 'data')
    assert result.returncode == 0, result.stderr[-2000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores['step'] == 0 and np.isfinite(scores['nats_per_token'])


@pytest.mark.slow  # prepares the default corpus and compiles the train step: about 30 s on 2 CPUs
@ONE_VARIANT
def test_training_starts_from_the_imported_parameters(imported, tmp_path):
  _, _, workdir = imported
  config = [f'--config={ht.REPO / "configs" / "run.py"}:{workdir}', '--config.train.steps=2',
            '--config.train.warmup_steps=1', '--config.train.global_batch_size=2', '--config.log.progress_bar=False',
            '--config.log.sample_tokens=0', '--config.log.eval_batches=1']
  result = diffjax('train', *config, f'--workdir={workdir}', data_dir=tmp_path / 'data')
  assert result.returncode == 1 and result.stdout == ''
  assert result.stderr.strip().splitlines() == [
      f'error: --workdir: {workdir} holds parameters alone (step 0, as diffjax import writes them), not a run to '
      f'resume; train from them in a new --workdir with --config.checkpoint.init_from={workdir}']
  result = diffjax('train', *config, f'--workdir={tmp_path / "new"}', f'--config.checkpoint.init_from={workdir}',
                   data_dir=tmp_path / 'data')
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'parameters from {workdir}' in result.stdout
  assert sorted(os.listdir(tmp_path / 'new' / 'checkpoints')) == ['2']


@pytest.mark.slow
def test_the_command_imports_a_directory_transformers_wrote(tmp_path):
  cfg = ht.tiny_model(variant='baseline', vocab_size=300, max_len=64, rope_pairing='half')
  params = ht.random_params(cfg)
  model = hf.hf_model(cfg, params)
  model.save_pretrained(tmp_path / 'hf')
  with torch.no_grad():
    expected = model(torch.from_numpy(TOKENS_BxT)).logits.numpy()
  # No tokenizer files: the command says what to pass, and writes nothing.
  result = diffjax('import', f'--hf_dir={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}')
  assert result.returncode == 1 and result.stdout == ''
  assert result.stderr.strip().splitlines() == [
      f'error: --tokenizer: {tmp_path / "hf"} holds no tokenizer diffjax can use (the byte-level tokenizer.json or '
      'SentencePiece tokenizer.model that diffjax export writes); pass the one the model was trained with: '
      '--tokenizer=byte or --tokenizer=PATH of its SentencePiece .model file']
  assert sorted(os.listdir(tmp_path)) == ['hf']
  result = diffjax('import', f'--hf_dir={tmp_path / "hf"}', f'--workdir={tmp_path / "run"}', '--tokenizer=byte')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == str(tmp_path / 'run') and sorted(os.listdir(tmp_path)) == ['hf', 'run']
  assert_close(logits(tmp_path / 'run'), expected, tol=1e-5)


def test_a_sentencepiece_run_imports_with_its_own_model(tmp_path):
  texts = [ht.english_like_text(20_000, seed=i) for i in range(2)]
  vocabulary = tokenizers.SentencePieceTokenizer.train(texts, vocab_size=320)
  cfg = ht.tiny_model(vocab_size=384, max_len=64, subln_scale=False, rope_pairing='half')
  hf.save_hf(cfg, ht.random_params(cfg), tmp_path / 'hf', vocabulary)
  hf.import_run(tmp_path / 'hf', tmp_path / 'run')
  _, _, tokenizer, _ = load.open_run(str(tmp_path / 'run'))
  assert isinstance(tokenizer, tokenizers.SentencePieceTokenizer)
  assert tokenizer.model_proto == vocabulary.model_proto
  config = load.run_config(str(tmp_path / 'run'))
  assert (config.data.tokenizer, config.data.sp_vocab_size) == ('sentencepiece', 320)


def test_only_diffjaxs_own_byte_tokenizer_json_reads_as_bytes(tmp_path):
  hf_tokenizer.save_tokenizer(tokenizers.ByteTokenizer(), str(tmp_path), 64)
  assert isinstance(hf_tokenizer.read_tokenizer(str(tmp_path)), tokenizers.ByteTokenizer)
  saved = json.loads((tmp_path / 'tokenizer.json').read_text())
  saved['model']['merges'] = [['a', 'b']]  # encodes 'ab' as one token: not bytes any more
  (tmp_path / 'tokenizer.json').write_text(json.dumps(saved))
  assert hf_tokenizer.read_tokenizer(str(tmp_path)) is None


@pytest.mark.slow
@ONE_VARIANT
def test_bad_input_is_one_line_and_writes_nothing(imported, tmp_path):
  original, hf_dir, workdir = imported
  (tmp_path / 'gpt2').mkdir()
  (tmp_path / 'gpt2' / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'a.txt').write_text('a')
  cases = [
      ([], '--hf_dir and --workdir are required, e.g. --hf_dir=runs/tiny_hf --workdir=runs/tiny_imported'),
      ([f'--hf_dir={tmp_path / "missing"}', f'--workdir={tmp_path / "new"}'],
       f'--hf_dir: {tmp_path / "missing"} is no directory; give the folder that save_pretrained or diffjax export '
       'wrote'),
      ([f'--hf_dir={tmp_path / "gpt2"}', f'--workdir={tmp_path / "new"}'],
       "config.model_type: 'gpt2' is not supported; use diffllama or llama"),
      ([f'--hf_dir={hf_dir}', f'--workdir={original}'],
       f'--workdir: {original} already holds a run; give a new folder for the imported one'),
      ([f'--hf_dir={hf_dir}', f'--workdir={tmp_path / "notes"}'],
       f'--workdir: {tmp_path / "notes"} is not an empty folder; give a new folder for the imported run'),
      ([f'--hf_dir={hf_dir}', f'--workdir={tmp_path / "new"}', f'--tokenizer={tmp_path / "notes" / "a.txt"}'],
       f'--tokenizer: {tmp_path / "notes" / "a.txt"} is damaged (it is not a SentencePiece model); give byte or '
       'the SentencePiece model the model was trained with (a run keeps it as WORKDIR/tokenizer.model)'),
  ]
  before = sorted(os.listdir(tmp_path)), sorted(os.listdir(original)), sorted(os.listdir(workdir))
  for arguments, message in cases:
    result = diffjax('import', *arguments)
    assert result.returncode == 1 and result.stdout == '', arguments
    assert result.stderr.strip().splitlines() == [f'error: {message}'], arguments
  assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(original)), sorted(os.listdir(workdir))) == before


@ONE_VARIANT
def test_an_import_that_fails_while_writing_leaves_nothing(imported, tmp_path, monkeypatch):
  _, hf_dir, _ = imported

  def failing_save(*args, **kwargs):
    raise OSError('No space left on device')

  monkeypatch.setattr(checkpoint_lib.Checkpointer, 'save', failing_save)
  with pytest.raises(OSError, match='No space left'):
    hf.import_run(hf_dir, tmp_path / 'run')
  assert os.listdir(tmp_path) == []
