"""The Weights & Biases writer, offline: every scalar of a record reaches the W&B run, and a resumed training
continues the same run."""

import glob

import pytest

from diffjax.train import metrics

wandb = pytest.importorskip('wandb')


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.setenv('WANDB_CONFIG_DIR', str(tmp_path / 'wandb_config'))


def test_scalars_and_per_layer_values_reach_wandb(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), print_fn=lambda line: None, wandb_project='diffjax-test',
                                 run_config={'model': {'variant': 'diff_v1'}})
  writer.write(10, {'loss': 2.5, 'lambda': [0.1, 0.4], 'tokens_per_s': 1000.0})
  writer.write(20, {'loss': 2.25, 'lambda': [0.2, 0.5], 'tokens_per_s': 1100.0})
  summary = dict(writer.wandb.summary)
  writer.close()
  assert summary['loss'] == 2.25 and summary['lambda/layer_1'] == 0.5 and summary['tokens_per_s'] == 1100.0
  assert glob.glob(str(tmp_path / 'wandb' / 'offline-run-*' / '*.wandb'))  # the run's file, for `wandb sync`


def test_a_resumed_training_continues_the_same_run(tmp_path):
  first = metrics.MetricsWriter(str(tmp_path), print_fn=lambda line: None, wandb_project='diffjax-test')
  first_id = first.wandb.id
  first.write(1, {'loss': 3.0})
  first.close()
  second = metrics.MetricsWriter(str(tmp_path), print_fn=lambda line: None, wandb_project='diffjax-test')
  assert second.wandb.id == first_id == (tmp_path / 'wandb_id').read_text()
  second.close()


def test_without_a_project_nothing_goes_to_wandb(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path), print_fn=lambda line: None)
  writer.write(1, {'loss': 3.0})
  writer.close()
  assert writer.wandb is None and not (tmp_path / 'wandb').exists()


@pytest.mark.slow
def test_a_training_run_logs_to_its_project(tmp_path):
  from diffjax.train import loop as trainer
  from helpers_training import load_config, run_overrides, write_corpus
  corpus = write_corpus(tmp_path / 'corpus', num_docs=4, chars_per_doc=20_000)
  config = load_config(run_overrides(corpus, tmp_path / 'data', train__steps=8, log__wandb_project='diffjax-test',
                                     checkpoint__every_steps=8, log__eval_every_steps=8))
  (tmp_path / 'run').mkdir()
  trainer.Run(config, str(tmp_path / 'run')).train()
  assert (tmp_path / 'run' / 'wandb_id').exists()
  assert glob.glob(str(tmp_path / 'run' / 'wandb' / 'offline-run-*' / '*.wandb'))
