"""A finished run opens without the trainer (parameters only, read-only), and evaluate and sample work on it."""

import json
import logging
import math
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

import helpers_training as ht
import reliability_helpers as rh
from diffjax.data import tokenizers
from diffjax.errors import ConfigError
from diffjax.infer import load, score
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step

STEPS = (1, 2)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, {step: params}) of a run with two saved steps of different random parameters; no data prepared."""
  workdir = tmp_path_factory.mktemp('run')
  config = ht.load_config(ht.run_overrides(workdir / 'corpus', workdir / 'data'))
  cfg, tx = defaults.model_config(config, tokenizers.ByteTokenizer.vocab_size), optim.make_optimizer(config.train)
  checkpoints = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'), keep=3, async_save=False)
  saved = {}
  for step in STEPS:
    state = train_step.new_state(cfg, tx, jax.random.key(step))
    checkpoints.save(step, state, {}, config.to_dict())
    saved[step] = jax.device_get(state['params'])
  checkpoints.close()
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  return workdir, saved


def test_open_run_gives_config_unboxed_params_tokenizer_and_step(run):
  workdir, saved = run
  cfg, params, tokenizer, step = load.open_run(str(workdir))
  assert step == STEPS[-1] and isinstance(tokenizer, tokenizers.ByteTokenizer)
  assert (cfg.d_model, cfg.n_layers, cfg.max_len, cfg.vocab_size) == (64, 2, 64, 384)
  assert not any(isinstance(leaf, nn.Partitioned) for leaf in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  jax.tree.map(np.testing.assert_array_equal, params, saved[step])


def test_an_unreadable_newest_step_falls_back_and_moves_nothing(run, tmp_path, caplog):
  workdir = tmp_path / 'run'
  shutil.copytree(run[0], workdir)
  for root, _, names in os.walk(workdir / 'checkpoints' / str(STEPS[-1]) / 'state'):
    for name in names:
      os.truncate(os.path.join(root, name), 10)
  before = sorted(os.listdir(workdir / 'checkpoints'))
  with caplog.at_level(logging.WARNING):
    _, params, _, step = load.open_run(str(workdir))
  assert step == STEPS[0]
  jax.tree.map(np.testing.assert_array_equal, params, run[1][STEPS[0]])
  [warning] = [r.getMessage() for r in caplog.records if r.getMessage().startswith('checkpoint step')]
  assert warning.startswith(f'checkpoint step {STEPS[-1]} in ') and warning.endswith(f'using step {STEPS[0]} instead')
  assert sorted(os.listdir(workdir / 'checkpoints')) == before


def test_what_cannot_be_opened_is_one_line(run, tmp_path):
  with pytest.raises(ConfigError, match='^--workdir is required'):
    load.open_run('')
  with pytest.raises(ConfigError, match=r'holds no diffjax run \(no config.json\)'):
    load.open_run(str(tmp_path))
  shutil.copy(run[0] / 'config.json', tmp_path / 'config.json')
  with pytest.raises(ConfigError, match='has no checkpoint yet'):
    load.open_run(str(tmp_path))
  config = json.loads((run[0] / 'config.json').read_text())
  config['data']['tokenizer'] = 'sentencepiece'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConfigError, match='tokenizer.model is missing'):
    load.open_run(str(tmp_path))


def test_text_rows_predict_every_token_once():
  tokenizer, texts, seq_len = tokenizers.ByteTokenizer(), ['abcdefghij', 'xyz', 'hello world'], 8
  batches = list(score.text_batches(tokenizer, texts, seq_len, batch_size=2))
  stream = [tokenizer.eos_id] + [i for text in texts for i in tokenizer.encode(text) + [tokenizer.eos_id]]
  targets = np.concatenate([b['targets'][b['mask'] > 0] for b in batches])
  assert targets.tolist() == stream[1:]
  for batch in batches:
    assert batch['inputs'].shape == batch['targets'].shape == (2, seq_len)
    np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert score.scored_bytes(tokenizer, batches[0]['targets'], batches[0]['mask']) == 14  # 'abcdefghij', 'xyz'


def cli(module, *args):
  return rh.run_command(module, *args)


def test_evaluate_scores_any_text(run, tmp_path):
  texts = [ht.english_like_text(300, seed=i) for i in range(2)]
  for i, text in enumerate(texts):
    (tmp_path / f'doc{i}.txt').write_text(text)
  result, _ = cli('evaluate', f'--workdir={run[0]}', f'--text_glob={tmp_path}/*.txt', '--batch_size=4')
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  assert report['step'] == STEPS[-1] and report['data'] == f'{tmp_path}/*.txt'
  assert report['tokens'] == sum(len(text.encode()) + 1 for text in texts)  # each file's bytes and its EOS
  assert report['bytes'] == sum(len(text.encode()) for text in texts)
  assert report['bits_per_byte'] == pytest.approx(
      report['nats_per_token'] * report['tokens'] / math.log(2) / report['bytes'])
  # Freshly initialised logits are nearly uniform over the padded vocabulary of 384.
  assert report['nats_per_token'] == pytest.approx(math.log(384), abs=0.05)


def test_evaluate_refuses_a_glob_matching_nothing(run, tmp_path):
  result, lines = cli('evaluate', f'--workdir={run[0]}', f'--text_glob={tmp_path}/*.txt')
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert lines[0].startswith('error: --text_glob: no .txt or .txt.gz files match')


@pytest.mark.slow
def test_sample_prints_text_and_speed_and_refuses_more_than_max_len(run):
  result, lines = cli('sample', f'--workdir={run[0]}', '--prompt=The ', '--tokens=12', '--num_samples=2',
                      '--temperature=1.0', '--top_k=50', '--top_p=0.9', '--seed=3')
  assert result.returncode == 0, result.stderr
  assert result.stdout.count('The ') >= 2 and '-' * 40 in result.stdout
  assert lines[-1].startswith(f'step {STEPS[-1]}: prefill 4 x 2 tokens') and lines[-1].endswith(' tokens/s)')
  result, lines = cli('sample', f'--workdir={run[0]}', '--prompt=The ', '--tokens=61')
  assert result.returncode == 1 and lines == [
      "error: generation: a prompt of 4 tokens and 61 new tokens exceed the model's max_len of 64; ask for at most "
      '60 new tokens or shorten the prompt']


def test_attention_maps_never_write_through_a_link_out_of_the_workdir(run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run[0], workdir)
  (tmp_path / 'precious').write_text('keep me')
  os.symlink(tmp_path / 'precious', workdir / 'attention_layer1_head0.png')
  result, lines = cli('attention_maps', f'--workdir={workdir}', '--prompt=ab', '--layer=1', '--head=0')
  assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: --workdir: ')
  assert 'outside the workdir' in lines[0]
  assert (tmp_path / 'precious').read_text() == 'keep me'
