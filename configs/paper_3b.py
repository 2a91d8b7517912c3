"""The paper's 3B model: 28 layers, width 3072, FFN 8192, 12 DIFF heads of d=128, sequence 4096, 4M-token batches,
lr 3.2e-4, warmup 1000, weight decay 0.1, AdamW betas (0.9, 0.95); 250,000 steps = 1T tokens. The batch runs in 128
microbatches of 8 sequences, which leaves room on an 8-chip TPU slice (32 fit there too: see the README's table of
memory per chip); on more devices lower train.microbatches."""

from diffjax.run.defaults import base_config, recipe_data


def get_config():
  c = base_config()
  recipe_data(c)
  # Layers unrolled, as in the scaling runs (diffjax.run.defaults.scaling_config says why).
  c.model.update(n_layers=28, d_model=3072, n_heads=24, d_ff=8192, max_len=4096, remat=True)
  c.train.update(seq_len=4096, global_batch_size=1024, microbatches=128, steps=250_000, learning_rate=3.2e-4,
                 warmup_steps=1000, weight_decay=0.1, b1=0.9, b2=0.95)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.every_steps = 1000
  c.log.eval_every_steps = 1000
  return c
