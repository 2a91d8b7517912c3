"""The small-scale recipe: 8 layers, width 512, FFN 1792, 8 heads (baseline count), 2M-token batches, 10,000 steps
(20B tokens), lr 6e-4 with 120 warmup steps, weight decay 0.1, bf16, clipping, sequence length 2048.

The 2M-token batch (1024 sequences) runs on one device through 64 microbatches of 16 sequences; on more devices
lower train.microbatches so that each device still holds 16 sequences.
"""

from diffjax.run.defaults import base_config, recipe_data


def get_config():
  c = base_config()
  recipe_data(c)
  c.model.update(d_model=512, n_layers=8, n_heads=8, d_ff=1792, max_len=2048, dtype='bfloat16')
  c.train.update(seq_len=2048, global_batch_size=1024, microbatches=64, steps=10_000, learning_rate=6e-4,
                 warmup_steps=120, weight_decay=0.1, grad_clip=1.0)
  c.checkpoint.every_steps = 500
  c.log.update(every_steps=10, eval_every_steps=500)
  return c
