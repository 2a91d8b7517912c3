"""Run safety (issue 11's findings, one test or more each): one writer per workdir, readers that touch nothing, a
failed save that ends the run in one line, no writing through links out of the workdir, checksums, an empty
--workdir, and one-line errors for bad input. Lock and reader tests run real concurrent processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import reliability_helpers as rh
from diffjax.errors import ConfigError
from diffjax.train import metrics
from diffjax.train import workdir as workdir_lib

pytestmark = pytest.mark.slow  # end-to-end runs: the quick subset (pytest -m "not slow") leaves them out


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return rh.make_corpus(tmp_path_factory.mktemp('safety'))


def start(workdir, run_flags) -> subprocess.Popen:
  return subprocess.Popen(rh.command(workdir, run_flags), cwd=rh.REPO, env=rh.env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen | None = None, timeout: float = 180):
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, 'timed out'
    assert process is None or process.poll() is None, process.communicate()
    time.sleep(0.05)


def finish(process: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
  stdout, stderr = process.communicate(timeout=timeout)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def cli(module: str, *args, cwd=rh.REPO) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', f'diffjax.{module}', *args], cwd=cwd, env=rh.env(),
                        capture_output=True, text=True, timeout=240)


def one_error_line(result) -> str:
  """The one `error:` line a failed command ends with (data preparation may print progress bars before it)."""
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr and 'Exception ignored' not in result.stderr, result.stderr
  lines = rh.nonempty_lines(result.stderr)
  assert [line for line in lines if line.startswith('error: ')] == lines[-1:], result.stderr
  return lines[-1]


def logged_steps(workdir) -> list[int]:
  return [r['step'] for r in rh.records(workdir) if 'loss' in r]


# -- 1 and 2: one writer, readers that touch nothing ----------------------------------------------------------------


STEPS = 500  # long enough for a reader and a late writer to start while the run trains


def test_second_writer_is_refused_and_readers_touch_nothing(tmp_path, corpus):
  """Two trains started together: one trains, the other refuses in one line naming it. A reader running meanwhile
  removes none of the writer's unfinished saves and reads a completed step."""
  workdir = tmp_path / 'run'
  run_flags = rh.flags(corpus, STEPS, checkpoint__every_steps=10)
  first, second = start(workdir, run_flags), start(workdir, run_flags)
  # Exactly one of them ends at once; the other trains.
  wait_for(lambda: first.poll() is not None or second.poll() is not None, timeout=120)
  loser, winner = (first, second) if first.poll() is not None else (second, first)
  line = one_error_line(finish(loser))
  holder = json.loads((workdir / 'lock').read_text())
  assert holder['pid'] == winner.pid
  assert line == (f'error: --workdir: {workdir} is in use by another training run (pid {winner.pid} on '
                  f'{socket.gethostname()}, since {holder["since"]}); wait for it to end, or use another --workdir')

  wait_for(lambda: rh.steps(workdir), winner)
  # A marker of an unfinished save: a writer's start-up would remove it, a reader must not.
  marker = workdir / 'checkpoints' / f'1000000{rh.harness.TMP_MARKER}'
  marker.mkdir()
  late = start(workdir, run_flags)  # a writer started later is refused too
  reader = cli('sample', f'--workdir={workdir}', '--tokens=2')
  assert reader.returncode == 0, reader.stderr
  assert marker.is_dir()
  assert not os.path.exists(workdir / 'checkpoints_corrupt')
  assert 'is in use by another training run' in one_error_line(finish(late))
  assert winner.poll() is None  # all of this happened while it trained

  result = finish(winner)
  assert result.returncode == 0, result.stderr
  assert logged_steps(workdir) == list(range(1, STEPS + 1))  # every step trained and logged once
  assert not (workdir / 'lock').exists()


def lock_in_subprocess(workdir, hold_s: float) -> subprocess.Popen:
  code = (f'import time; from diffjax.train import workdir; workdir.claim({str(workdir)!r}); '
          f'print("held", flush=True); time.sleep({hold_s})')
  process = subprocess.Popen([sys.executable, '-c', code], env=rh.env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  assert process.stdout.readline() == 'held\n', process.communicate()
  return process


def test_lock_of_a_killed_process_is_taken_over_with_one_warning(tmp_path, caplog):
  holder = lock_in_subprocess(tmp_path, 60)
  with pytest.raises(ConfigError, match=rf'^--workdir: {tmp_path} is in use by another training run \(pid '
                                        rf'{holder.pid} on '):
    workdir_lib.claim(str(tmp_path))
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert json.loads((tmp_path / 'lock').read_text())['pid'] == holder.pid  # left behind
  try:
    workdir_lib.claim(str(tmp_path))
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f'workdir {tmp_path} was locked by pid {holder.pid} on {socket.gethostname()} (since ')
    assert warning.endswith('which is no longer running; taking the lock over')
    assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()
  finally:
    workdir_lib.release()
  assert not (tmp_path / 'lock').exists()


def test_without_fcntl_locks_the_pid_decides(tmp_path, monkeypatch):
  """On NFS without its lock service, a holder on this host is alive exactly while its pid is."""
  monkeypatch.setattr(workdir_lib, '_try_lock', lambda f: None)
  holder = lock_in_subprocess(tmp_path, 60)
  with pytest.raises(ConfigError, match='is in use by another training run'):
    workdir_lib.claim(str(tmp_path))
  holder.kill()
  holder.wait()
  try:
    workdir_lib.claim(str(tmp_path))
  finally:
    workdir_lib.release()


def test_racing_writers_get_one_lock(tmp_path):
  code = ('import sys, time; from diffjax.train import workdir\n'
          'try:\n  workdir.claim(sys.argv[1]); print("held", flush=True); time.sleep(3)\n'
          'except ValueError as e:\n  print("refused", flush=True)')
  processes = [subprocess.Popen([sys.executable, '-c', code, str(tmp_path)], env=rh.env(), stdout=subprocess.PIPE,
                                text=True) for _ in range(4)]
  assert sorted(p.communicate(timeout=60)[0].strip() for p in processes) == ['held', 'refused', 'refused', 'refused']


# -- 3: a failed save ------------------------------------------------------------------------------------------------


# Runs the training command with a disk that fills up once the file FULL exists: from then on every folder that
# Orbax makes for a save fails with ENOSPC, in its background thread.
FULL_DISK = """
import errno, os, runpy, sys
full, makedirs = sys.argv.pop(1), os.makedirs
def failing_makedirs(path, *args, **kwargs):
  if os.path.exists(full) and '.orbax-checkpoint-tmp' in str(path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
  return makedirs(path, *args, **kwargs)
os.makedirs = failing_makedirs
sys.argv = sys.argv[:1] + sys.argv[3:]
runpy.run_module('diffjax.train', run_name='__main__')
"""


def test_failed_save_ends_the_run_in_one_line(tmp_path, corpus):
  """A save that fails in Orbax's background thread ends the run: one line naming the last good checkpoint, exit 1,
  no step trained past the next save, no hang."""
  workdir, full, every = tmp_path / 'run', tmp_path / 'full', 10
  command = rh.command(workdir, rh.flags(corpus, 200, checkpoint__every_steps=every))
  process = subprocess.Popen([command[0], '-c', FULL_DISK, str(full), *command[1:]], cwd=rh.REPO, env=rh.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: rh.steps(workdir), process)
  full.write_text('')
  result = finish(process, timeout=120)
  good = rh.steps(workdir)[-1]
  line = one_error_line(result)
  assert line.startswith(f'error: checkpoint: saving to {workdir}/checkpoints failed (OSError: [Errno 28] No space '
                         'left on device')
  assert line.endswith(f'last good checkpoint: step {good} in {workdir}/checkpoints. Fix the cause (disk space, '
                       'permissions) and run the same command to resume from it')
  assert good + every <= max(logged_steps(workdir)) < good + 2 * every  # none after the failed save's interval
  assert not (workdir / 'lock').exists()


# -- 3, 4 and 7: workdir entries of the wrong type or linked out of the workdir --------------------------------------


@pytest.mark.parametrize('entry', ['checkpoints', 'metrics.jsonl', 'tensorboard', 'config.json', 'checkpoints/.deleting'])
def test_entry_of_the_wrong_type_is_refused(tmp_path, entry):
  is_folder = workdir_lib.ENTRIES[entry]
  if entry.startswith('checkpoints/'):
    (tmp_path / 'checkpoints').mkdir()
  path = tmp_path / entry
  path.mkdir(exist_ok=True) if not is_folder else path.write_text('')
  with pytest.raises(ConfigError) as error:
    workdir_lib.claim(str(tmp_path))
  kind, other = ('folder', 'file') if is_folder else ('file', 'folder')
  assert str(error.value) == (f'--workdir: {path} is a {other}, but a run keeps a {kind} there; move it away or '
                              'use a fresh --workdir')
  assert not (tmp_path / 'lock').exists()


@pytest.mark.parametrize('entry', ['checkpoints/.deleting', 'config.json', 'metrics.jsonl', 'tensorboard',
                                   'checkpoints'])
def test_link_out_of_the_workdir_is_refused(tmp_path, entry):
  outside, workdir = tmp_path / 'outside', tmp_path / 'run'
  (workdir / os.path.dirname(entry)).mkdir(parents=True, exist_ok=True)
  outside.mkdir()
  (outside / 'precious').write_text('keep me')
  target = outside if workdir_lib.ENTRIES[entry] else outside / 'precious'
  os.symlink(target, workdir / entry)
  with pytest.raises(ConfigError) as error:
    workdir_lib.claim(str(workdir))
  kind = 'folder' if workdir_lib.ENTRIES[entry] else 'file'
  assert str(error.value) == (f'--workdir: {workdir / entry} is a link to {target}, outside the workdir; diffjax '
                              f'never writes or deletes through such links, so replace it with a {kind} of its own')
  assert (outside / 'precious').read_text() == 'keep me'


def test_links_inside_the_workdir_are_fine(tmp_path):
  (tmp_path / 'elsewhere').mkdir()
  os.symlink(tmp_path / 'elsewhere', tmp_path / 'checkpoints')
  try:
    workdir_lib.claim(str(tmp_path))
  finally:
    workdir_lib.release()


def test_train_refuses_a_link_out_of_the_workdir_in_one_line(tmp_path, corpus):
  workdir, outside = tmp_path / 'run', tmp_path / 'outside'
  (workdir / 'checkpoints').mkdir(parents=True)
  outside.mkdir()
  (outside / 'keep').write_text('keep me')
  os.symlink(outside, workdir / 'checkpoints' / '.deleting')
  os.symlink(outside / 'config.json', workdir / 'config.json')
  result = rh.train(workdir, rh.flags(corpus, rh.STEPS))
  assert one_error_line(result).startswith(f'error: --workdir: {workdir}/config.json is a link to ')
  assert os.listdir(outside) == ['keep']


# -- 6 and 7: one line for bad input ---------------------------------------------------------------------------------


def test_empty_workdir_is_refused(tmp_path, corpus):
  result = subprocess.run(rh.command('', rh.flags(corpus, rh.STEPS)), cwd=tmp_path, env=rh.env(), capture_output=True,
                          text=True, timeout=120)
  assert one_error_line(result).startswith('error: --config and --workdir are required')
  assert os.listdir(tmp_path) == []
  assert one_error_line(cli('evaluate', '--workdir=', cwd=tmp_path)) == (
      'error: --workdir is required: the workdir of a training run')


@pytest.mark.parametrize('module, flag', [('sample', '--tokens=-1'), ('sample', '--temperature=-1'),
                                          ('evaluate', '--batches=-1'), ('attention_maps', '--head=-1')])
def test_negative_counts_are_refused(tmp_path, module, flag):
  line = one_error_line(cli(module, f'--workdir={tmp_path}', flag))
  assert line.startswith(f'error: flag {flag}: ') and line.endswith('; see --helpfull for the flags')


def test_torn_metrics_line_is_ended_and_skipped(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a run killed mid-append
  writer = metrics.MetricsWriter(str(tmp_path), print_fn=lambda line: None)
  writer.write(2, {'loss': 1.5})
  writer.close()
  assert path.read_text().splitlines()[1:] == ['{"step": 2, "lo', '{"step": 2, "loss": 1.5}']
  assert metrics.read_records(str(tmp_path)) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}]
  [warning] = [r.getMessage() for r in caplog.records]
  assert warning == f'{path}: skipped 1 unreadable line(s), cut short when a run was killed while writing'
  assert metrics.plot_curves(str(tmp_path)) == str(tmp_path / 'curves.png')
