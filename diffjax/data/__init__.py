"""Text to batches: where text comes from (corpus), tokenizers (and their Hugging Face files) and the input pipeline
that packs the tokens once into shards and reads batches from them (pipeline).

Imports nothing of the package but `diffjax.errors`: the data knows no model, run, training or inference.
"""
