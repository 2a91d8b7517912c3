"""Whole models to and from Hugging Face DiffLlama / Llama: names, shapes, exact round trips, identical logits."""

import jax
import numpy as np
import pytest

from conftest import assert_close, jit, random_params, tiny_config
from diffjax import hf
from diffjax.errors import ConfigError
from diffjax.model import Transformer

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')

TOKENS = np.random.default_rng(0).integers(0, 23, (2, 16))

# A 1-layer model of width 32, 4 baseline heads of 8, 2 kv heads, FFN 48, vocabulary 23, as PyTorch lays it out.
HF_SHAPES = {
    'model.embed_tokens.weight': (23, 32),
    'model.norm.weight': (32,),
    'lm_head.weight': (23, 32),
    'model.layers.0.self_attn.q_proj.weight': (32, 32),
    'model.layers.0.self_attn.k_proj.weight': (16, 32),
    'model.layers.0.self_attn.v_proj.weight': (16, 32),
    'model.layers.0.self_attn.o_proj.weight': (32, 32),
    'model.layers.0.mlp.gate_proj.weight': (48, 32),
    'model.layers.0.mlp.up_proj.weight': (48, 32),
    'model.layers.0.mlp.down_proj.weight': (32, 48),
    'model.layers.0.input_layernorm.weight': (32,),
    'model.layers.0.post_attention_layernorm.weight': (32,),
}
DIFF_LAMBDAS = {f'model.layers.0.self_attn.lambda_{n}': (8,) for n in ('q1', 'k1', 'q2', 'k2')}


def _model(**overrides):
  cfg = tiny_config(**{'subln_scale': False, **overrides})
  return cfg, random_params(Transformer(cfg), TOKENS, seed=cfg.n_layers + cfg.kv_heads)


def _settings(cfg):
  """The ModelConfig fields a Hugging Face config does not carry, to import `cfg` back as it was."""
  return {k: getattr(cfg, k) for k in hf.IMPORT_SETTINGS}


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('variant,extra', [('diff_v1', DIFF_LAMBDAS), ('baseline', {})])
def test_names_shapes_and_config_are_hugging_faces(variant, extra):
  cfg, params = _model(variant=variant, n_layers=1, n_heads=4, n_kv_heads=2, norm_eps=1e-6, rope_theta=500.0)
  config, state_dict = hf.to_hf(cfg, params)
  assert {k: v.shape for k, v in state_dict.items()} == {**HF_SHAPES, **extra}
  assert all(v.dtype == np.float32 for v in state_dict.values())
  assert config == {
      'model_type': {'diff_v1': 'diffllama', 'baseline': 'llama'}[variant],
      'architectures': [{'diff_v1': 'DiffLlamaForCausalLM', 'baseline': 'LlamaForCausalLM'}[variant]],
      'vocab_size': 23, 'hidden_size': 32, 'intermediate_size': 48, 'num_hidden_layers': 1,
      'num_attention_heads': 4, 'num_key_value_heads': 2, 'head_dim': 8, 'hidden_act': 'silu',
      'max_position_embeddings': 64, 'rms_norm_eps': 1e-6, 'rope_theta': 500.0, 'tie_word_embeddings': False,
      'attention_bias': False, 'mlp_bias': False, 'attention_dropout': 0.0}


@pytest.mark.parametrize('variant', ['diff_v1', 'baseline'])
@pytest.mark.parametrize('pairing', ['half', 'interleaved'])
@pytest.mark.parametrize('heads,kv_heads,tied', [(4, None, False), (8, 4, True), (8, 2, False)])
def test_round_trips_are_exact(variant, pairing, heads, kv_heads, tied):
  cfg, params = _model(variant=variant, rope_pairing=pairing, n_heads=heads, n_kv_heads=kv_heads,
                       tie_embeddings=tied)
  config, state_dict = hf.to_hf(cfg, params)
  back_cfg, back = hf.from_hf(config, state_dict, **_settings(cfg))
  assert back_cfg == cfg
  _assert_identical(back, params)
  _assert_identical(hf.to_hf(back_cfg, back)[1], state_dict)


def test_import_defaults_to_hugging_faces_pairing_and_norm():
  cfg, params = _model(rope_pairing='half')
  back_cfg, back = hf.from_hf(*hf.to_hf(cfg, params))
  assert (back_cfg.rope_pairing, back_cfg.subln_scale) == ('half', False)
  _assert_identical(back, params)


def test_a_subln_scale_of_ones_exports_and_comes_back():
  cfg = tiny_config(subln_scale=True)
  params = random_params(Transformer(cfg), TOKENS)
  for layer in range(cfg.n_layers):
    params[f'block_{layer}']['attn']['subln']['scale'] = np.ones(16, np.float32)
  back_cfg, back = hf.from_hf(*hf.to_hf(cfg, params), **_settings(cfg))
  assert back_cfg == cfg
  _assert_identical(back, params)


def test_a_learned_subln_scale_is_refused():
  cfg = tiny_config(subln_scale=True)
  with pytest.raises(ConfigError, match=r'^model\.subln_scale: block_0 has a sub-layer norm scale other than ones'):
    hf.to_hf(cfg, random_params(Transformer(cfg), TOKENS))


def test_diff_v2_is_refused():
  cfg, params = _model(variant='diff_v2')
  with pytest.raises(ConfigError, match=r"^model\.variant: 'diff_v2' has no Hugging Face class"):
    hf.to_hf(cfg, params)


def test_bad_imports_are_config_errors():
  config, state_dict = hf.to_hf(*_model())
  with pytest.raises(ConfigError, match=r'^from_hf: n_layers comes from the Hugging Face config'):
    hf.from_hf(config, state_dict, n_layers=3)
  with pytest.raises(ConfigError, match=r'^state_dict: missing model\.layers\.1\.self_attn\.lambda_k2'):
    hf.from_hf(config, {k: v for k, v in state_dict.items() if k != 'model.layers.1.self_attn.lambda_k2'})
  with pytest.raises(ConfigError, match=r"^config\.hidden_act: 'gelu' has no diffjax equivalent"):
    hf.from_hf({**config, 'hidden_act': 'gelu'}, state_dict)
  with pytest.raises(ConfigError, match=r"^config\.model_type: 'mistral' is not supported"):
    hf.from_hf({**config, 'model_type': 'mistral'}, state_dict)
  with pytest.raises(ConfigError, match=r'^config\.tie_word_embeddings: True, but lm_head\.weight differs'):
    hf.from_hf({**config, 'tie_word_embeddings': True}, state_dict)


def test_a_tied_checkpoint_may_leave_out_lm_head():
  cfg, params = _model(tie_embeddings=True)
  config, state_dict = hf.to_hf(cfg, params)
  del state_dict['lm_head.weight']
  _assert_identical(hf.from_hf(config, state_dict, **_settings(cfg))[1], params)


# With PyTorch: the exported model computes the same logits.

def _hf_logits(model):
  torch = pytest.importorskip('torch')
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS)).logits.numpy()


@pytest.mark.parametrize('variant', ['diff_v1', 'baseline'])
@pytest.mark.parametrize('pairing', ['half', 'interleaved'])
@pytest.mark.parametrize('heads,kv_heads,tied', [(4, None, False), (8, 4, True), (8, 2, False)])
def test_exported_model_gives_the_same_logits(variant, pairing, heads, kv_heads, tied):
  pytest.importorskip('transformers')
  cfg, params = _model(variant=variant, rope_pairing=pairing, n_heads=heads, n_kv_heads=kv_heads,
                       tie_embeddings=tied, n_layers=3, norm_eps=1e-6)
  expected = jit(Transformer(cfg).apply)({'params': params}, TOKENS)
  assert_close(_hf_logits(hf.hf_model(cfg, params)), expected)


@pytest.mark.parametrize('architecture', ['DiffLlamaForCausalLM', 'LlamaForCausalLM'])
@pytest.mark.parametrize('pairing', ['half', 'interleaved'])
def test_imported_model_gives_the_same_logits(architecture, pairing):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model_class = getattr(transformers, architecture)
  model = model_class(model_class.config_class(
      vocab_size=23, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
      num_key_value_heads=4, max_position_embeddings=64, rope_theta=100.0, attn_implementation='eager'))
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():  # random values everywhere, norm weights and λ included, so no term keeps its init
    for name, weight in model.named_parameters():
      if weight.ndim == 2:
        weight.copy_(torch.randn(weight.shape, generator=generator) / weight.shape[1] ** 0.5)
      elif 'lambda' in name:
        weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
      else:
        weight.copy_(torch.rand(weight.shape, generator=generator) + 0.5)
  cfg, params = hf.from_hf_model(model, rope_pairing=pairing, dtype='float32', attention_impl='xla')
  assert cfg.rope_pairing == pairing and cfg.rope_theta == 100.0
  assert_close(jit(Transformer(cfg).apply)({'params': params}, TOKENS), _hf_logits(model))
