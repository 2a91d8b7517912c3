"""Non-finite losses and weights: 'stop' ends the run naming the step and the last good checkpoint, 'skip' skips and
counts; a non-finite train state is never saved."""

import re

import numpy as np
import pytest

import reliability_helpers as rh

pytestmark = pytest.mark.slow  # end-to-end runs: the quick subset (pytest -m "not slow") leaves them out

# With a peak learning rate of 1e30 reached at step 2 (warm-up starts at 0), step 2's update throws the weights so
# far that step 3's loss is not finite. A peak of 1e39 overflows float32: step 1's update is NaN although its
# loss and gradients are finite.
# The schedule is constant, so that a run resumed with more steps keeps its learning rate.
DIVERGING = {'train__learning_rate': 1e30, 'train__warmup_steps': 1, 'checkpoint__every_steps': 2,
             'train__decay': 'constant'}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return rh.make_corpus(tmp_path_factory.mktemp('nonfinite'))


def assert_one_error_line(result, pattern: str) -> re.Match:
  lines = rh.nonempty_lines(result.stderr)
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr
  errors = [line for line in lines if line.startswith('error: ')]
  assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
  match = re.fullmatch(pattern, errors[0])
  assert match, errors[0]
  return match


def assert_finite_checkpoints(workdir):
  reader = rh.reader()
  for step in rh.steps(workdir):
    reader.fingerprint(str(workdir / 'checkpoints'), step)  # raises on a non-finite array


def test_stop_names_the_step_and_the_last_good_checkpoint(tmp_path, corpus):
  result = rh.train(tmp_path, rh.flags(corpus, 8, **DIVERGING))
  assert_one_error_line(result, rf'error: non-finite loss or gradient at step 3; last good checkpoint: step 2 in '
                                rf'{tmp_path}/checkpoints\. Lower train\.learning_rate, or set '
                                r'train\.on_nonfinite=skip to skip such steps')
  assert rh.steps(tmp_path) == [2]  # nothing saved at or after the bad step
  assert_finite_checkpoints(tmp_path)
  assert max(rh.losses(tmp_path)) == 2  # the bad step is not logged as a normal one


def test_stop_never_saves_weights_that_overflowed(tmp_path, corpus):
  result = rh.train(tmp_path, rh.flags(corpus, 8, **{**DIVERGING, 'train__learning_rate': 1e39,
                                                     'checkpoint__every_steps': 1}))
  assert_one_error_line(result, r'error: the train state after step 1 holds non-finite values, so it was not saved; '
                                r'last good checkpoint: none\. Lower train\.learning_rate')
  assert rh.steps(tmp_path) == []


def test_skip_mode_skips_counts_and_finishes(tmp_path, corpus):
  result = rh.train(tmp_path, rh.flags(corpus, 8, **DIVERGING, train__on_nonfinite='skip'))
  assert result.returncode == 0, result.stderr
  records = [r for r in rh.records(tmp_path) if 'loss' in r]
  assert [r['step'] for r in records] == list(range(1, 9))
  bad = [r['step'] for r in records if not np.isfinite(r['loss'])]
  assert bad and bad[0] == 3
  assert records[-1]['skipped_steps'] == len(bad)
  assert [r['skipped_steps'] for r in records] == [sum(s <= r['step'] for s in bad) for r in records]
  assert rh.steps(tmp_path)[-1] == 8
  assert_finite_checkpoints(tmp_path)


def test_stop_mode_resume_ignores_steps_skipped_before(tmp_path, corpus):
  assert rh.train(tmp_path, rh.flags(corpus, 6, **DIVERGING, train__on_nonfinite='skip')).returncode == 0
  assert [r for r in rh.records(tmp_path) if 'loss' in r][-1]['skipped_steps'] > 0
  # Resumed in mode 'stop', the run stops at its own first bad step (the learning rate still diverges), not at
  # step 3, which the earlier run skipped.
  result = rh.train(tmp_path, rh.flags(corpus, 10, **DIVERGING))
  match = assert_one_error_line(result, r'error: non-finite loss or gradient at step (\d+); last good checkpoint: .*')
  assert int(match[1]) > 6
