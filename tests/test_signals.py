"""SIGTERM and Ctrl-C before training runs (imports, data preparation, compilation): the run ends within seconds,
in one line, with exit status 0 and its workdir lock released, and a later run starts as if nothing happened.
Once training runs, a signal saves the step (tests/test_preemption.py)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import reliability_helpers as rh

STOPPED = 'stopped on request ({}); there was nothing to save'
# Data preparation made slow enough to be caught in the act: each split's shards take a minute once written.
SLOW_PREPARATION = """
import runpy, sys, time
from diffjax.data import prepare
write_split = prepare._write_split
def slow_write_split(*args, **kwargs):
  result = write_split(*args, **kwargs)
  time.sleep(60)
  return result
prepare._write_split = slow_write_split
sys.argv = sys.argv[:1] + sys.argv[3:]  # drop `-m diffjax.train`
runpy.run_module('diffjax.train', run_name='__main__')
"""


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return rh.make_corpus(tmp_path_factory.mktemp('signals'))


def start(command, compile_cache: str) -> subprocess.Popen:
  return subprocess.Popen(command, cwd=rh.REPO, env=rh.env(compile_cache), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_until(condition, process: subprocess.Popen, timeout: float = 120):
  deadline = time.monotonic() + timeout
  while not condition():
    assert process.poll() is None, process.communicate()
    assert time.monotonic() < deadline, 'timed out'
    time.sleep(0.02)


def stop(process: subprocess.Popen, sig: signal.Signals) -> tuple[float, str, str]:
  """Seconds from the signal to the exit, stdout and stderr; the exit status must be 0."""
  sent = time.monotonic()
  process.send_signal(sig)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, (process.returncode, stdout, stderr)
  return time.monotonic() - sent, stdout, stderr


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_signal_while_importing_ends_in_one_line(tmp_path, corpus, sig):
  """Before: SIGTERM killed the process with status -15 and no word, SIGINT printed a 61-line traceback."""
  process = start(rh.command(tmp_path / 'run', rh.flags(corpus, rh.STEPS)), rh.COMPILE_CACHE)
  time.sleep(1.5)  # the imports alone take longer
  seconds, stdout, stderr = stop(process, sig)
  assert seconds < 5
  assert stdout == STOPPED.format(sig.name) + '\n' and stderr == ''
  assert not (tmp_path / 'run' / 'lock').exists()


@pytest.mark.slow
def test_sigterm_while_compiling_ends_at_once_and_saves_nothing(tmp_path, corpus):
  """Before: the run waited for the compilation to end (43 s in one probe), trained a step and saved it."""
  workdir = tmp_path / 'run'
  # A cache of its own, so that the step really compiles; config.json is written just before the first step.
  process = start(rh.command(workdir, rh.flags(corpus, rh.STEPS)), str(tmp_path / 'cache'))
  wait_until(lambda: (workdir / 'config.json').exists(), process)
  time.sleep(1)
  seconds, stdout, stderr = stop(process, signal.SIGTERM)
  assert seconds < 5
  assert stdout.splitlines()[-1] == STOPPED.format('SIGTERM'), stdout
  assert 'Traceback' not in stderr, stderr
  assert not (workdir / 'lock').exists()
  assert rh.steps(workdir) == [] and not rh.records(workdir)  # no step trained, none saved


@pytest.mark.slow
def test_ctrl_c_while_preparing_data_leaves_nothing_half_written(tmp_path):
  """An exit skips data preparation's clean-up: its FOLDER.partial-PID is removed on the way out, the lock is
  released, and the next run prepares the data and trains as usual."""
  corpus = rh.make_corpus(tmp_path)
  data_dir, workdir = pathlib.Path(corpus[1]), tmp_path / 'run'
  command = rh.command(workdir, rh.flags(corpus, 3, train__warmup_steps=1))
  process = start([command[0], '-c', SLOW_PREPARATION, *command[1:]], rh.COMPILE_CACHE)
  wait_until(lambda: list(data_dir.glob('*/*.partial-*/*.array_record')), process)
  seconds, stdout, stderr = stop(process, signal.SIGINT)
  assert seconds < 5
  assert stdout.splitlines()[-1] == STOPPED.format('SIGINT') and 'Traceback' not in stderr, (stdout, stderr)
  assert not list(data_dir.glob('*/*.partial-*'))
  assert not (workdir / 'lock').exists()

  result = rh.train(workdir, rh.flags(corpus, 3, train__warmup_steps=1))
  assert result.returncode == 0, result.stderr
  assert sorted(rh.losses(workdir)) == [1, 2, 3]
  assert [p.name for p in data_dir.glob('*/*') if p.is_dir()] == ['bytes-seq64']
