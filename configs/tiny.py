"""A small DIFF model that trains on a laptop CPU in minutes, on the Python standard library's source code."""

from diffjax.run.defaults import base_config


def get_config():
  c = base_config()
  c.model.update(d_model=128, n_layers=4, n_heads=4, d_ff=384, max_len=256, dtype='float32')
  c.train.update(seq_len=128, global_batch_size=16, steps=300, learning_rate=3e-3, warmup_steps=30)
  c.checkpoint.every_steps = 100
  c.log.update(every_steps=10, eval_every_steps=100, eval_batches=4)
  return c
