"""SIGTERM (preemption) mid-run: the last completed step is saved, the run exits 0, and resuming changes nothing."""

import os
import re
import signal
import subprocess
import time

import jax
import pytest

import reliability_helpers as rh
from diffjax.train import loop as trainer

pytestmark = pytest.mark.slow  # end-to-end runs: the quick subset (pytest -m "not slow") leaves them out

STEPS = rh.STEPS


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return rh.make_corpus(tmp_path_factory.mktemp('preemption'))


def wait_for_step(process: subprocess.Popen, workdir, step: int):
  deadline = time.monotonic() + 180
  while max(rh.losses(workdir), default=0) < step and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)


def test_sigterm_saves_the_last_step_exits_0_and_resumes_identically(tmp_path, corpus):
  # Checkpoints only at the end: the one the run has after SIGTERM is the preemption save.
  run_flags = rh.flags(corpus, STEPS, checkpoint__every_steps=1000)
  workdir, reference_dir = tmp_path / 'preempted', tmp_path / 'reference'
  reference = subprocess.Popen(rh.command(reference_dir, run_flags), cwd=rh.REPO, env=rh.env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  wait_for_step(reference, reference_dir, 1)  # by then the corpus is prepared, which two runs cannot do at once
  process = subprocess.Popen(rh.command(workdir, run_flags), cwd=rh.REPO, env=rh.env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  wait_for_step(process, workdir, 5)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)

  assert process.returncode == 0, stderr
  saved = re.search(r'^stopped at step (\d+) on request; checkpoint saved in (\S+)$', stdout, re.MULTILINE)
  assert saved, stdout
  step = int(saved[1])
  assert 5 <= step < STEPS
  assert saved[2] == f'{workdir}/checkpoints/{step}'
  assert 'sample after step' not in stdout  # a preempted run stops right after saving
  assert rh.steps(workdir) == [step]
  assert not [name for name in os.listdir(workdir / 'checkpoints') if 'orbax-checkpoint-tmp' in name]  # waited
  assert max(rh.losses(workdir)) == step  # the last completed step was logged, none after it
  rh.reader().fingerprint(str(workdir / 'checkpoints'), step)  # restores in full, all finite

  assert reference.wait(timeout=240) == 0
  resumed = rh.train(workdir, run_flags)
  assert resumed.returncode == 0, resumed.stderr
  assert f'resumed from step {step} in ' in resumed.stdout
  assert rh.losses(workdir) == rh.losses(reference_dir)
  assert len(rh.losses(workdir)) == STEPS


def test_multi_host_runs_leave_sigterm_to_jax_and_agree_on_the_step(monkeypatch):
  """With several hosts the step to save comes from JAX's preemption sync point, and SIGTERM stays JAX's."""
  asked = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(trainer.multihost_utils, 'reached_preemption_sync_point', lambda step: asked.append(step)
                      or step == 7)
  handler = signal.getsignal(signal.SIGTERM)
  watcher = trainer.PreemptionWatcher()
  try:
    assert signal.getsignal(signal.SIGTERM) is handler
    watcher.requested.set()  # a local request alone does not stop a multi-host run
    assert [watcher.should_stop(step) for step in (5, 6, 7)] == [False, False, True]
    assert asked == [5, 6, 7]
  finally:
    watcher.close()


def test_single_host_sigterm_and_ctrl_c_request_a_stop():
  watcher = trainer.PreemptionWatcher()
  try:
    assert not watcher.should_stop(1)
    signal.raise_signal(signal.SIGTERM)
    assert watcher.should_stop(2)
  finally:
    watcher.close()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
