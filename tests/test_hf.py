"""Whole models to and from Hugging Face DiffLlama / Llama: names, shapes, exact round trips, identical logits."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import diffjax
from conftest import assert_close, jit, random_params, tiny_config
from diffjax.errors import ConfigError
from diffjax.infer import hf
from diffjax.model.transformer import Transformer

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


def test_a_learned_subln_scale_folds_into_o_proj():
  cfg = tiny_config(subln_scale=True)
  params = random_params(Transformer(cfg), TOKENS)  # subln scales U(0.5, 1.5), not ones
  config, state_dict = hf.to_hf(cfg, params)
  kernel_ExC, scale = params['block_1']['attn']['out_proj']['kernel'], params['block_1']['attn']['subln']['scale']
  np.testing.assert_array_equal(state_dict['model.layers.1.self_attn.o_proj.weight'].T,
                                kernel_ExC * np.tile(scale, cfg.n_heads // 2)[:, None])
  back_cfg, back = hf.from_hf(config, state_dict, **_settings(cfg))  # scales of ones, out_proj folded
  assert back_cfg == cfg and np.all(back['block_0']['attn']['subln']['scale'] == 1.0)
  apply = jit(Transformer(cfg).apply)
  assert_close(apply({'params': back}, TOKENS), apply({'params': params}, TOKENS))


def test_diff_v2_is_refused():
  cfg, params = _model(variant='diff_v2')
  with pytest.raises(ConfigError, match=r"^model\.variant: 'diff_v2' has no Hugging Face class"):
    hf.to_hf(cfg, params)


@pytest.mark.parametrize('ablation,message', [
    ({'diff_head_norm': False}, r'^model\.diff_head_norm: False has no Hugging Face class'),
    ({'lambda_init': 0.5, 'lambda_init_drop': 0.0}, r'^model\.lambda_init: the λ_init schedule \(0\.5, 0\.0, 0\.3\) '
                                                    r'has no Hugging Face class')])
def test_diff_v1_ablations_are_refused(ablation, message):
  cfg, params = _model(**ablation)
  with pytest.raises(ConfigError, match=message):
    hf.to_hf(cfg, params)
  hf.to_hf(*_model(variant='baseline', **ablation))  # the baseline has neither, so the keys do not matter there


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


@pytest.mark.parametrize('declared,expected', [({}, 'float32'), ({'torch_dtype': 'bfloat16'}, 'bfloat16'),
                                               ({'dtype': 'float16', 'torch_dtype': 'float32'}, 'float16'),
                                               ({'torch_dtype': 'torch.float32'}, 'float32')])
def test_imports_compute_in_the_checkpoints_dtype(declared, expected):
  cfg, params = _model(dtype='bfloat16')  # not what the checkpoint says: the import must not keep diffjax's default
  config, state_dict = hf.to_hf(cfg, params)
  assert hf.from_hf({**config, **declared}, state_dict)[0].dtype == expected
  assert hf.from_hf({**config, **declared}, state_dict, dtype='bfloat16')[0].dtype == 'bfloat16'  # a setting wins
  with pytest.raises(ConfigError, match=r"^config\.torch_dtype: 'float64' is no diffjax compute dtype; pass dtype="):
    hf.from_hf({**config, 'torch_dtype': 'float64'}, state_dict)


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


def test_an_exported_learned_subln_scale_gives_the_same_logits():
  pytest.importorskip('transformers')
  cfg = tiny_config(subln_scale=True, n_layers=3, n_heads=8, n_kv_heads=4, norm_eps=1e-6)
  params = random_params(Transformer(cfg), TOKENS, seed=3)
  assert not np.all(params['block_0']['attn']['subln']['scale'] == 1.0)
  expected = jit(Transformer(cfg).apply)({'params': params}, TOKENS)
  assert_close(_hf_logits(hf.hf_model(cfg, params)), expected)


# Directories: config.json and model.safetensors (or pytorch_model.bin), as save_pretrained writes them.

@pytest.mark.parametrize('variant,tied', [('diff_v1', False), ('baseline', True)])
def test_a_directory_round_trip_is_exact(tmp_path, variant, tied):
  pytest.importorskip('safetensors')
  cfg, params = _model(variant=variant, tie_embeddings=tied, rope_pairing='half')
  assert diffjax.to_hf(Transformer(cfg), params, tmp_path / 'hf') == str(tmp_path / 'hf')
  assert sorted(p.name for p in (tmp_path / 'hf').iterdir()) == ['config.json', 'model.safetensors']
  config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert config == {**hf.hf_config(cfg), 'torch_dtype': 'float32'}
  model, back = diffjax.from_hf(tmp_path / 'hf', attention_impl='xla')  # float32, as config.json says
  assert isinstance(model, Transformer) and model.cfg == cfg
  _assert_identical(back, params)
  assert_close(jit(model.apply)({'params': back}, TOKENS), jit(Transformer(cfg).apply)({'params': params}, TOKENS))


@pytest.mark.parametrize('variant,tied,subln', [('diff_v1', False, True), ('diff_v1', True, False),
                                                ('baseline', False, False)])
def test_from_pretrained_gives_the_same_logits(tmp_path, variant, tied, subln):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg, params = _model(variant=variant, tie_embeddings=tied, subln_scale=subln, n_layers=2, n_heads=8,
                       n_kv_heads=4, norm_eps=1e-6)
  diffjax.to_hf(cfg, params, tmp_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation='eager')
  assert model.dtype == torch.float32
  assert type(model).__name__ == hf.hf_config(cfg)['architectures'][0]
  assert_close(_hf_logits(model), jit(Transformer(cfg).apply)({'params': params}, TOKENS))


def test_a_pytorch_model_bin_directory_loads(tmp_path):
  torch = pytest.importorskip('torch')
  cfg, params = _model()
  config, state_dict = hf.to_hf(cfg, params)
  (tmp_path / 'config.json').write_text(json.dumps(config))
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / 'pytorch_model.bin')
  back_cfg, back = hf.load_hf(tmp_path, **_settings(cfg))
  assert back_cfg == cfg
  _assert_identical(back, params)


def test_bad_directories_are_one_line_config_errors(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match=r'^\S*missing: no such directory$'):
    diffjax.from_hf(tmp_path / 'missing')
  with pytest.raises(ConfigError, match=r'^\S*: no config\.json in the directory$'):
    diffjax.from_hf(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(hf.hf_config(_model()[0])))
  with pytest.raises(ConfigError, match=r'^\S*: no model\.safetensors, model\.safetensors\.index\.json or '
                                        r'pytorch_model\.bin in the directory$'):
    diffjax.from_hf(tmp_path)
  (tmp_path / 'model.safetensors').write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'safetensors.numpy', None)  # as if safetensors were not installed
  with pytest.raises(ConfigError, match=r'^\S*: reading model\.safetensors needs the safetensors package'):
    diffjax.from_hf(tmp_path)
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ConfigError, match=r'^\S*: writing a Hugging Face directory needs safetensors or torch'):
    diffjax.to_hf(*_model(), tmp_path / 'out')


def test_importing_diffjax_imports_neither_jax_nor_the_converter():
  code = 'import sys, diffjax; print(sorted(m for m in ("jax", "flax", "diffjax.infer.hf") if m in sys.modules))'
  assert subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        check=True).stdout.strip() == '[]'
