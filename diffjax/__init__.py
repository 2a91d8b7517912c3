"""diffjax: the Differential Transformer in JAX/Flax."""

__version__ = "0.1.0"


def from_hf(path, **settings):
  """A Hugging Face DiffLlama or Llama directory -> (model, params): `model.apply({'params': params}, tokens_BxT)`
  gives its logits. `model` is a `diffjax.model.Transformer` (its config is `model.cfg`); `settings` as in
  `diffjax.hf.from_hf`."""
  from diffjax import hf, model  # pylint: disable=import-outside-toplevel  (keeps `import diffjax` light)
  cfg, params = hf.load_hf(path, **settings)
  return model.Transformer(cfg), params


def to_hf(model, params, path):
  """Writes `model` (a `diffjax.model.Transformer` or its ModelConfig) with `params` as a Hugging Face directory
  that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads; returns `path`."""
  from diffjax import hf  # pylint: disable=import-outside-toplevel
  return hf.save_hf(getattr(model, 'cfg', model), params, path)
