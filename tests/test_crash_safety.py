"""The SIGKILL crash-safety harness (launch/crash_harness.py), run in full: 10 kills of a real training run, a third
or more of them while an asynchronous checkpoint is being written."""

import json
import subprocess
import sys

import pytest

import reliability_helpers as rh


@pytest.mark.slow
def test_ten_sigkills_resume_exactly(tmp_path):
  result = subprocess.run([sys.executable, str(rh.REPO / 'launch' / 'crash_harness.py'), '--kills=10', '--seed=0',
                           f'--workdir={tmp_path}', f'--compile-cache={rh.COMPILE_CACHE}'],
                          cwd=rh.REPO, capture_output=True, text=True, timeout=900)
  print(result.stdout)  # the table of kill points, shown by pytest -s or on failure
  report = json.loads((tmp_path / 'crash_report.json').read_text())
  assert result.returncode == 0 and report['passed'], result.stdout + result.stderr[-3000:]
  assert report['kills'] >= 10
  assert report['kills_mid_save'] >= 3
  assert report['steps_logged_twice'] > 0  # steps between a checkpoint and a kill were compared after the resume
  assert all(report['checks'].values())
