"""The training loop keeps the host at most one step ahead of the device.

With several steps queued, a GPU run whose step fits ran out of memory after its first step; with one step queued,
the same run trained at the step's speed with the peak of one step.
"""

import time

from diffjax.train import loop as trainer
from diffjax.train import metrics as metrics_lib
from helpers_training import load_config, run_overrides, write_corpus

STEPS = 8


def test_each_step_is_dispatched_only_after_the_one_two_before_has_run(tmp_path, monkeypatch):
  corpus = write_corpus(tmp_path / 'corpus', num_docs=4, chars_per_doc=20_000)
  # Logging every 5 steps: the log's reads alone would let the host run four steps ahead.
  config = load_config(run_overrides(corpus, tmp_path / 'data', train__steps=STEPS, checkpoint__every_steps=STEPS,
                                     log__eval_every_steps=STEPS, log__every_steps=5))
  (tmp_path / 'run').mkdir()
  run = trainer.Run(config, str(tmp_path / 'run'))
  # Every step's metrics are kept, in order: an id() of a freed object can be handed to a later one.
  dispatched_metrics, waited, dispatched_after = [], set(), {}
  real_step, real_wait = run.train_fn, trainer.wait_for_step

  def train_fn(state, batch):
    dispatched_after[len(dispatched_metrics) + 1] = set(waited)
    state, metrics = real_step(state, batch)
    dispatched_metrics.append(metrics)
    return state, metrics

  def wait_for_step(outputs):
    waited.add(next(i for i, metrics in enumerate(dispatched_metrics, 1) if metrics is outputs))
    real_wait(outputs)

  run.train_fn = train_fn
  monkeypatch.setattr(trainer, 'wait_for_step', wait_for_step)
  run.train()
  assert len(dispatched_metrics) == STEPS
  for step in range(3, STEPS + 1):
    assert step - 2 in dispatched_after[step], (step, sorted(dispatched_after[step]))


def test_the_first_record_reports_the_allocator_after_the_first_step(monkeypatch):
  class Device:
    def memory_stats(self):
      return {'bytes_in_use': 2**30, 'largest_free_block_bytes': 3 * 2**29, 'bytes_limit': 8 * 2**30, 'num_allocs': 7}

  assert trainer.memory_after_first_step() == {}  # CPUs report no allocator
  monkeypatch.setattr(trainer.jax, 'local_devices', lambda: [Device()])
  assert trainer.memory_after_first_step() == {'memory_in_use_gib': 1.0, 'largest_free_block_gib': 1.5,
                                               'memory_limit_gib': 8.0}


def test_speed_windows_leave_no_time_between_them(tmp_path, monkeypatch):
  """Each step takes at least `step_s` of the host's time and each record `log_s` to write: a run logging every
  step trains a step per step_s + log_s at best, and its reported speed must say so rather than leave the writing
  out."""
  step_s, log_s = 0.2, 0.4
  corpus = write_corpus(tmp_path / 'corpus', num_docs=4, chars_per_doc=20_000)
  config = load_config(run_overrides(corpus, tmp_path / 'data', train__steps=STEPS, checkpoint__every_steps=STEPS,
                                     log__eval_every_steps=STEPS, log__every_steps=1))
  (tmp_path / 'run').mkdir()
  run = trainer.Run(config, str(tmp_path / 'run'))
  real_step, real_write = run.train_fn, trainer.metrics_lib.MetricsWriter.write

  def train_fn(state, batch):
    time.sleep(step_s)
    return real_step(state, batch)

  def write(self, step, record):
    time.sleep(log_s)
    real_write(self, step, record)

  run.train_fn = train_fn
  monkeypatch.setattr(trainer.metrics_lib.MetricsWriter, 'write', write)
  run.train()
  tokens_per_step = config.train.global_batch_size * config.train.seq_len
  speeds = [r['tokens_per_s'] for r in metrics_lib.read_records(str(tmp_path / 'run')) if 'tokens_per_s' in r
            and r['step'] < STEPS]  # the last step's window ends before its own record and the evaluation
  assert len(speeds) == STEPS - 2
  assert all(tokens_per_step / speed > 0.9 * (step_s + log_s) for speed in speeds), speeds
