"""launch/bench_decode.py on a CPU: a row per setting as it is measured, the table, and JSON; Hugging Face beside."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

from helpers_training import cli_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_bench(tmp_path, *extra) -> tuple[str, list[dict]]:
  out = tmp_path / 'decode.json'
  command = [sys.executable, 'launch/bench_decode.py', '--config=configs/tiny.py', '--prompt_len=8', '--tokens=6',
             '--batches=1,3', '--repeats=1', f'--out={out}', *extra]
  result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(out.read_text())['results']


@pytest.mark.slow
def test_every_variant_and_batch_is_timed_and_printed(tmp_path):
  stdout, rows = run_bench(tmp_path, '--variants=diff_v1,baseline')
  assert [(r['engine'], r['variant'], r['batch']) for r in rows] == [
      ('diffjax', 'diff_v1', 1), ('diffjax', 'diff_v1', 3), ('diffjax', 'baseline', 1), ('diffjax', 'baseline', 3)]
  assert all(r['decode_tokens_per_s'] > 0 and r['prefill_s'] > 0 for r in rows)
  # Each row is printed once as it is measured and once more in the final table.
  assert sum(line.startswith('diffjax  diff_v1') for line in stdout.splitlines()) == 4


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('torch') is None or importlib.util.find_spec('transformers') is None,
                    reason='needs torch and transformers')
def test_hugging_face_rows_beside_diff_v1_and_the_baseline_only(tmp_path):
  _, rows = run_bench(tmp_path, '--variants=diff_v1,diff_v2', '--batches=2', '--hf')
  assert [(r['engine'], r['variant']) for r in rows] == [('diffjax', 'diff_v1'), ('hf', 'diff_v1'),
                                                         ('diffjax', 'diff_v2')]
  assert all(r['decode_tokens_per_s'] > 0 for r in rows)
