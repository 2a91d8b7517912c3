"""Extending a finished run is explicit: a longer train.steps is refused in one line unless the run keeps its
schedule and holds the final learning rate (train.decay_steps), so the learning rate never jumps at a resume."""

import numpy as np
import pytest

from diffjax.errors import ConfigError
from diffjax.train import loop as trainer
from diffjax.train import optim
from helpers_training import load_config, read_metrics, run_overrides, train_config, write_corpus

STEPS, LONGER = 10, 14


def test_decay_steps_ends_the_decay_and_holds_the_final_rate():
  for decay in ('cosine', 'linear'):
    plain = optim.learning_rate_schedule(train_config(steps=300, warmup_steps=30, decay=decay))
    held = optim.learning_rate_schedule(train_config(steps=400, warmup_steps=30, decay=decay, decay_steps=300))
    np.testing.assert_allclose([held(s) for s in range(0, 301, 25)], [plain(s) for s in range(0, 301, 25)],
                               rtol=1e-6)
    end = 6e-4 * 0.1
    np.testing.assert_allclose([held(s) for s in (300, 350, 400)], [end] * 3, rtol=1e-5)


def run(tmp_path, corpus, **overrides):
  config = load_config(run_overrides(corpus, tmp_path / 'data', train__warmup_steps=2, train__decay='cosine',
                                     checkpoint__every_steps=STEPS, log__eval_every_steps=100, **overrides))
  (tmp_path / 'run').mkdir(exist_ok=True)
  return trainer.Run(config, str(tmp_path / 'run'))


@pytest.mark.slow
def test_a_longer_run_is_refused_unless_it_holds_the_final_rate(tmp_path):
  corpus = write_corpus(tmp_path / 'corpus', num_docs=4, chars_per_doc=20_000)
  run(tmp_path, corpus, train__steps=STEPS).train()
  with pytest.raises(ConfigError) as refusal:
    run(tmp_path, corpus, train__steps=LONGER)
  message = str(refusal.value)
  assert '\n' not in message and message.startswith('train.steps: this run decays its learning rate until step 10')
  assert f'--config.train.decay_steps={STEPS}' in message

  run(tmp_path, corpus, train__steps=LONGER, train__decay_steps=STEPS).train()
  rates = {r['step']: r['learning_rate'] for r in read_metrics(tmp_path / 'run') if 'learning_rate' in r}
  final = 3e-3 * 0.1  # configs/tiny.py's peak, times end_lr_ratio
  assert sorted(rates) == list(range(1, LONGER + 1))
  # Step s applies the schedule's rate at s - 1: the steps past the old end all train at the final rate.
  np.testing.assert_allclose([rates[s] for s in range(STEPS + 1, LONGER + 1)], final, rtol=1e-5)
  assert rates[STEPS] > final
  # ...and the run, resumed again with the same settings, is still the same run.
  run(tmp_path, corpus, train__steps=LONGER, train__decay_steps=STEPS)
