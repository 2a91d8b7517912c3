"""The plotted attention maps are the ones the model applies: rebuilding each layer's output from them matches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, random_params, tiny_config
from diffjax import attention, attention_maps
from diffjax.model import Transformer

T = 12


def model_and_params(variant):
  cfg = tiny_config(variant=variant, n_layers=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)), jnp.int32)
  return cfg, random_params(Transformer(cfg), tokens), tokens


def captured(cfg, params, tokens, layer):
  """The input (after attn_norm) and output of one layer's attention, as the model computed them."""
  _, state = Transformer(cfg).apply({'params': params}, tokens, capture_intermediates=True)
  block = state['intermediates'][f'block_{layer}']
  return np.asarray(block['attn_norm']['__call__'][0]), np.asarray(block['attn']['__call__'][0])


def values(cfg, params, x_1xTxE, layer, width):
  v = x_1xTxE @ np.asarray(params[f'block_{layer}']['attn']['v_proj']['kernel'])
  return v.reshape(T, -1, width)


@pytest.mark.parametrize('layer', [0, 1])
def test_diff_v1_maps_rebuild_the_layer_output(layer, full_precision_matmuls):
  cfg, params, tokens = model_and_params('diff_v1')
  maps = attention_maps.layer_maps(cfg, params, tokens, layer)
  for key in ('a1', 'a2'):
    np.testing.assert_allclose(maps[key].sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps[key], k=1) == 0)  # causal
  x, out = captured(cfg, params, tokens, layer)
  p = params[f'block_{layer}']['attn']
  v_TxGx2D = values(cfg, params, x, layer, 2 * cfg.head_dim)
  heads, groups = maps['diff'].shape[0], v_TxGx2D.shape[1]
  mixed_TxHx2D = np.stack([maps['diff'][h] @ v_TxGx2D[:, h // (heads // groups)] for h in range(heads)], axis=1)
  normed = mixed_TxHx2D / np.sqrt(np.mean(mixed_TxHx2D ** 2, -1, keepdims=True) + cfg.norm_eps)
  normed = normed * np.asarray(p['subln']['scale']) * (1 - attention.lambda_init_for(layer))
  assert_close(normed.reshape(1, T, -1) @ np.asarray(p['out_proj']['kernel']), out, tol=1e-4)
  assert float(maps['lambda']) == pytest.approx(float(attention.reparameterised_lambda(p, layer)))


def test_baseline_maps_rebuild_the_layer_output(full_precision_matmuls):
  cfg, params, tokens = model_and_params('baseline')
  maps = attention_maps.layer_maps(cfg, params, tokens, 1)
  x, out = captured(cfg, params, tokens, 1)
  v_TxKxD = values(cfg, params, x, 1, cfg.head_dim)
  heads, kv = maps['a'].shape[0], v_TxKxD.shape[1]
  mixed = np.stack([maps['a'][n] @ v_TxKxD[:, n // (heads // kv)] for n in range(heads)], axis=1)
  assert_close(mixed.reshape(1, T, -1) @ np.asarray(params['block_1']['attn']['out_proj']['kernel']), out, tol=1e-4)


def test_plot_writes_a_png(tmp_path):
  cfg, params, tokens = model_and_params('diff_v1')
  maps = attention_maps.layer_maps(cfg, params, tokens, 0)
  path = tmp_path / 'maps.png'
  attention_maps.plot(maps, [str(i) for i in range(T)], 'test', str(path), head=1)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
