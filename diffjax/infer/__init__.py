"""Using a trained run: opening it read-only (load), generation with a KV cache (generate), scoring text (score),
attention maps (attention_maps), multi-needle retrieval (needles), and Hugging Face and reference interop (hf,
interop).

Imports `diffjax.run`, `diffjax.model`, `diffjax.data` and `diffjax.errors`, never `diffjax.train` or a command, so
reading a run builds no trainer.
"""
