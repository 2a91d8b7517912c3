"""launch/run_speed.py end to end on a CPU: the step alone, one training alone and two sharing the device, each
measured from its own metrics.jsonl over the chosen window."""

import json
import pathlib
import subprocess
import sys

import pytest

from helpers_training import TINY_MODEL, cli_env, write_corpus

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_alone_and_sharing_runs_are_measured_against_the_step(tmp_path):
  corpus = write_corpus(tmp_path / 'corpus', num_docs=4, chars_per_doc=20_000)
  overrides = {**TINY_MODEL, 'data.source': 'local', 'data.text_glob': str(corpus),
               'data.data_dir': str(tmp_path / 'data'), 'train.seq_len': 64, 'train.global_batch_size': 8,
               'train.warmup_steps': 2}
  root = tmp_path / 'speed'
  command = [sys.executable, 'launch/run_speed.py', '--config=configs/tiny.py', f'--root={root}', '--steps=16',
             '--from_step=4', '--trend_steps=4', '--log_every=2', '--sharing=2', '--bench_steps=3',
             *(f'--config.{key}={value}' for key, value in overrides.items())]
  result = subprocess.run(command, cwd=REPO, env=cli_env(compilation_cache=tmp_path / 'cache'), capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((root / 'run_speed.json').read_text())
  assert report['step_tokens_per_s'] > 0 and report['window'] == [4, 16]
  # The step alone was timed on the runs' own corpus and tokenizer, not on random tokens.
  bench = json.loads((root / 'bench_train.json').read_text())[0]
  assert bench['data'].startswith('corpus (4 files,') and bench['data'].endswith('bytes, seq 64'), bench['data']
  assert bench['vocab_size'] == 384
  assert [r['run'] for r in report['runs']] == ['alone', '2 sharing #0', '2 sharing #1']
  for row in report['runs']:
    assert row['records'] == 7  # steps 4, 6, ..., 16
    assert row['median_tokens_per_s'] > 0 and row['median_data_wait_ms'] >= 0 and row['trend'] is not None
    assert row['of_step_speed'] == pytest.approx(row['median_tokens_per_s'] / report['step_tokens_per_s'])
  assert 'train step alone (bench_train):' in result.stdout and result.stdout.rstrip().splitlines()[-1].startswith(
      '2 sharing #1')
