"""Training's numbers stay what they were: the tiny model's first steps on a fixed synthetic corpus, against losses
recorded from this code base.

Restructuring the package must not change what a run computes. The losses were recorded on an x86-64 CPU with JAX
0.10; XLA's CPU code may round differently in the last bits on other processors, so the check allows one part in a
million, far below any change of behaviour (a different initialisation, batch order or optimizer step moves these
losses in the second decimal or earlier).
"""

import numpy as np

from diffjax.train import loop as trainer
from helpers_training import load_config, read_metrics, run_overrides, write_corpus

GOLDEN_LOSSES = {1: 5.9953813552856445, 2: 5.998726844787598, 3: 5.772920608520508, 4: 5.565417766571045,
                 5: 5.435823440551758, 6: 5.216868877410889}  # step -> training loss


def test_the_tiny_model_trains_to_the_recorded_losses(tmp_path):
  corpus = write_corpus(tmp_path / 'corpus', num_docs=4, chars_per_doc=20_000)
  config = load_config(run_overrides(corpus, tmp_path / 'data', train__steps=6, checkpoint__every_steps=6,
                                     log__eval_every_steps=6))
  (tmp_path / 'run').mkdir()
  trainer.Run(config, str(tmp_path / 'run')).train()
  losses = {r['step']: r['loss'] for r in read_metrics(tmp_path / 'run') if 'loss' in r}
  assert sorted(losses) == sorted(GOLDEN_LOSSES), losses
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [GOLDEN_LOSSES[s] for s in sorted(losses)],
                             rtol=1e-6, atol=0)
