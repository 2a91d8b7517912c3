"""The training loop keeps the host at most one step ahead of the device, and in step with it where two steps'
temporaries would not fit.

A step's temporaries return to the allocator only once the step has run, so a host that queued several steps would
need their temporaries at once (on a GPU, an out-of-memory error a few steps into a run whose step fits).
"""

import pytest

from diffjax.train import loop as trainer
from helpers_training import load_config, run_overrides, write_corpus

STEPS = 8


def test_a_second_step_is_queued_only_where_its_temporaries_fit():
  gib = 2**30
  assert trainer.steps_ahead(None) == 1  # CPUs report no memory stats
  assert trainer.steps_ahead({'bytes_in_use': gib}) == 1
  assert trainer.steps_ahead({'peak_bytes_in_use': 24 * gib, 'bytes_limit': 60 * gib}) == 1
  assert trainer.steps_ahead({'peak_bytes_in_use': 24 * gib, 'bytes_limit': 48 * gib}) == 1
  # Two runs sharing an 80 GB card at 45% each, with a 23 GiB step: the case that ran out of memory at step 2.
  assert trainer.steps_ahead({'peak_bytes_in_use': 24 * gib, 'bytes_limit': 36 * gib}) == 0


@pytest.mark.parametrize('ahead', [1, 0])
def test_each_step_is_dispatched_only_after_the_one_ahead_steps_before_has_run(tmp_path, monkeypatch, ahead):
  corpus = write_corpus(tmp_path / 'corpus', num_docs=4, chars_per_doc=20_000)
  # Logging every 5 steps: the log's reads alone would let the host run four steps ahead.
  config = load_config(run_overrides(corpus, tmp_path / 'data', train__steps=STEPS, checkpoint__every_steps=STEPS,
                                     log__eval_every_steps=STEPS, log__every_steps=5))
  (tmp_path / 'run').mkdir()
  run = trainer.Run(config, str(tmp_path / 'run'))
  step_of, waited, dispatched_after = {}, set(), {}
  real_step, real_wait = run.train_fn, trainer.wait_for_step

  def train_fn(state, batch):
    step = len(step_of) + 1
    dispatched_after[step] = set(waited)
    state, metrics = real_step(state, batch)
    step_of[id(metrics)] = step
    return state, metrics

  def wait_for_step(outputs):
    waited.add(step_of[id(outputs)])
    real_wait(outputs)

  run.train_fn = train_fn
  monkeypatch.setattr(trainer, 'wait_for_step', wait_for_step)
  monkeypatch.setattr(trainer, 'steps_ahead', lambda memory: ahead)
  run.train()
  assert len(step_of) == STEPS
  for step in range(3, STEPS + 1):
    assert step - 1 - ahead in dispatched_after[step], (step, sorted(dispatched_after[step]))
    if ahead:  # and not held back further than that
      assert step - 1 not in dispatched_after[step], (step, sorted(dispatched_after[step]))
