"""launch/bench_train.py on a CPU with --hf: the Hugging Face twins of diff_v1 and the baseline train on the same
batches and microbatches beside the diffjax rows."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

from helpers_training import cli_env

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('torch') is None or importlib.util.find_spec('transformers') is None,
                    reason='needs torch and transformers')
def test_hugging_face_twins_are_timed_beside_diff_v1_and_the_baseline(tmp_path):
  out, vocab = tmp_path / 'bench.json', 300
  command = [sys.executable, 'launch/bench_train.py', '--config=configs/tiny.py', '--variants=diff_v1,diff_v2,baseline',
             '--steps=3', '--hf', f'--vocab={vocab}', f'--out={out}', '--config.train.global_batch_size=4',
             '--config.train.seq_len=32', '--config.model.max_len=32', '--config.train.microbatches=2',
             '--config.train.learning_rate=0.01']
  result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())
  assert [r['variant'] for r in rows] == ['diff_v1', 'diff_v2', 'baseline', 'diff_v1 (HF DiffLlama)',
                                          'baseline (HF Llama)']  # DIFF V2 has no Hugging Face class
  # configs/tiny.py: 4 layers, heads of width 32. DiffLlama has no scale in its sub-layer norm (2 x 32 per layer,
  # folded into out_proj on export); otherwise the models are the same.
  for ours, theirs, missing in ((rows[0], rows[3], 4 * 2 * 32), (rows[2], rows[4], 0)):
    assert (theirs['batch'], theirs['seq_len'], theirs['microbatches']) == (4, 32, 2)
    assert theirs['data'] == ours['data'] and theirs['vocab_size'] == ours['vocab_size'] >= vocab  # padded up
    assert ours['params'] - theirs['params'] == missing
    assert theirs['tokens_per_s'] > 0 and theirs['step_ms'] > 0
    assert theirs['final_loss'] < math.log(vocab) - 0.5  # six steps on the one batch of random tokens: it trains
  assert 'baseline (HF Llama)' in result.stdout.splitlines()[-1]


def test_a_peak_that_filled_the_memory_pool_is_pointed_out():
  # The baseline ran after DIFF V1 in the same process, so it shows DIFF V1's peak, which it did not reach itself.
  rows = [{'variant': 'diff_v1', 'peak_gib': 59.38, 'pool_gib': 59.38, 'peak_set_here': True},
          {'variant': 'baseline', 'peak_gib': 59.38, 'pool_gib': 59.38, 'peak_set_here': False},
          {'variant': 'diff_v2', 'peak_gib': 29.8, 'pool_gib': 59.38},
          {'variant': 'baseline (HF Llama)', 'peak_gib': 50.0}]  # PyTorch rows have no pool
  # In a process of its own: the script defines absl flags that other modules of the suite define too.
  script = f'import sys; sys.path.insert(0, "launch"); import bench_train; print(bench_train.pool_warnings({rows!r}))'
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == str(['diff_v1: its peak filled the memory pool (59.4 GiB), which may have slowed it; '
                                       'time it again with a larger XLA_CLIENT_MEM_FRACTION'])
