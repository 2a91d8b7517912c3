"""Text to batches: where text comes from (corpus, and hf_files for Hugging Face datasets' Parquet and Arrow files),
tokenizers and their Hugging Face files (tokenizers, hf_tokenizer), the one pass that packs a corpus's tokens into
shards on disk (prepare), and the input pipeline that reads batches from them (pipeline).

Imports nothing of the package but `diffjax.errors`: the data knows no model, run, training or inference.
"""
