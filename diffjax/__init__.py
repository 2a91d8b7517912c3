"""diffjax: the Differential Transformer in JAX/Flax."""

__version__ = "0.1.0"


def from_hf(path, **settings):
  """A Hugging Face DiffLlama or Llama directory -> (model, params): `model.apply({'params': params}, tokens_BxT)`
  gives its logits, computed in the checkpoint's dtype (float32 when config.json names none) unless
  `settings['dtype']` says otherwise. `model` is a `diffjax.model.transformer.Transformer` (its config is
  `model.cfg`); `settings` as in `diffjax.infer.hf.from_hf`."""
  from diffjax.infer import hf  # pylint: disable=import-outside-toplevel  (keeps `import diffjax` light)
  from diffjax.model import transformer  # pylint: disable=import-outside-toplevel
  cfg, params = hf.load_hf(path, **settings)
  return transformer.Transformer(cfg), params


def to_hf(model, params, path, tokenizer=None):
  """Writes `model` (a `diffjax.model.transformer.Transformer` or its ModelConfig) with `params` as a Hugging Face
  directory that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads; with the `tokenizer` the model was
  trained with (`diffjax.data.tokenizers`), also files `transformers.AutoTokenizer.from_pretrained(path)` loads and
  a generation_config.json that stops at its end-of-document token. Returns `path`."""
  from diffjax.infer import hf  # pylint: disable=import-outside-toplevel
  return hf.save_hf(getattr(model, 'cfg', model), params, path, tokenizer)


def run_to_hf(workdir, path):
  """`to_hf` for a training run's workdir: the newest readable checkpoint's parameters and the run's tokenizer."""
  from diffjax.infer import hf  # pylint: disable=import-outside-toplevel
  return hf.save_run(workdir, path)
