"""The plotted attention maps are the ones the model applies: rebuilding each layer's output from them matches, and
the logits the layers sow are the float64 reference's. Training sows nothing, and the kernels do not either. The
command refuses an index out of range and an output folder it cannot write to, in one line."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn
import helpers_training as ht
import reference
import reliability_helpers as rh
from conftest import assert_close, random_params, tiny_config
from diffjax.data import tokenizers
from diffjax.infer import attention_maps
from diffjax.model import attention
from diffjax.model import kernels
from diffjax.model import losses
from diffjax.model.transformer import Transformer
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step

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


@pytest.mark.parametrize('variant', ['diff_v1', 'baseline', 'diff_v2'])
def test_sown_logits_are_the_float64_reference_and_unseen_keys_are_nan(variant, full_precision_matmuls):
  cfg, params, tokens = model_and_params(variant)
  _, layers = attention_maps.sown(cfg, params, tokens)
  x, _ = captured(cfg, params, tokens, 1)
  p = params['block_1']['attn']
  d = cfg.head_dim
  project = lambda name: (np.float64(x) @ np.float64(p[name]['kernel'])).reshape(1, T, -1, d)
  rotate = lambda z: reference.rope(z, np.arange(T)[None], cfg.rope_theta, cfg.rope_pairing)
  q, k = rotate(project('q_proj')), rotate(project('k_proj'))
  n, kv = q.shape[2], k.shape[2]
  if variant == 'diff_v1':  # sub-head 2h + c meets key sub-head 2·(h // R) + c
    key_of = [2 * ((i // 2) // ((n // 2) // (kv // 2))) + i % 2 for i in range(n)]
  else:
    key_of = [i // (n // kv) for i in range(n)]
  expected = np.stack([q[0, :, i] @ k[0, :, key_of[i]].T for i in range(n)]) / np.sqrt(d)
  logits = np.asarray(layers[1]['logits'][0])
  future = ~np.tril(np.ones((T, T), bool))
  assert logits.shape == (n, T, T) and np.all(np.isnan(logits[:, future])) and not np.any(np.isnan(logits[:, ~future]))
  assert_close(np.where(future, 0.0, logits), np.where(future, 0.0, expected), tol=1e-5)
  maps = ('a1', 'a2') if variant == 'diff_v1' else ('probs',)
  for name, sub_heads in zip(maps, (slice(0, None, 2), slice(1, None, 2)) if variant == 'diff_v1' else (slice(None),)):
    assert_close(layers[1][name][0], reference.causal_softmax(expected[sub_heads]), tol=1e-5)
  np.testing.assert_array_equal(layers[1]['residual'], np.asarray(
      Transformer(cfg).apply({'params': params}, tokens, capture_intermediates=True)[1]['intermediates']['block_1'][
          '__call__'][0]))


@pytest.mark.slow
def test_training_and_state_creation_sow_nothing(monkeypatch):
  """The train step's loss and gradient, and `init`, leave 'intermediates' immutable, so no layer records."""
  cfg, params, tokens = model_and_params('diff_v1')
  stored = []
  sow = nn.Module.sow
  monkeypatch.setattr(nn.Module, 'sow', lambda self, col, name, value, **kw: stored.append(name) or sow(
      self, col, name, value, **kw))
  batch = {'inputs': tokens, 'targets': tokens, 'mask': jnp.ones_like(tokens)}
  jax.jit(jax.grad(lambda p: losses.token_losses(cfg, p, batch, 1e-4)[0]))(params)
  assert stored == [] and list(Transformer(cfg).init(jax.random.key(0), tokens)) == ['params']
  Transformer(cfg).apply({'params': params}, tokens, mutable=['intermediates'])
  assert {'logits', 'a1', 'a2', 'lambda', 'residual'} <= set(stored)


def test_the_pallas_kernel_shows_no_maps_and_computes_what_it_did(monkeypatch):
  monkeypatch.setenv(kernels.INTERPRET_ENV, '1')
  cfg = tiny_config(variant='diff_v1', d_model=64, n_heads=4, n_kv_heads=4, attention_impl='pallas')
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)), jnp.int32)
  params = random_params(Transformer(cfg), tokens)
  logits, state = Transformer(cfg).apply({'params': params}, tokens, mutable=['intermediates'])
  assert set(state['intermediates']['block_0']) == {'residual'}
  np.testing.assert_array_equal(logits, Transformer(cfg).apply({'params': params}, tokens))


def test_plot_writes_a_png(tmp_path):
  cfg, params, tokens = model_and_params('diff_v1')
  maps = attention_maps.layer_maps(cfg, params, tokens, 0)
  path = tmp_path / 'maps.png'
  attention_maps.plot(maps, [str(i) for i in range(T)], 'test', str(path), head=1)
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# -- the command ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """The workdir of a 2-layer DIFF V1 run with one saved step of fresh parameters; no data prepared."""
  workdir = tmp_path_factory.mktemp('run')
  config = ht.load_config(ht.run_overrides(workdir / 'corpus', workdir / 'data'))
  cfg = defaults.model_config(config, tokenizers.ByteTokenizer.vocab_size)
  checkpoints = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'), keep=1, async_save=False)
  checkpoints.save(1, train_step.new_state(cfg, optim.make_optimizer(config.train), jax.random.key(0)), {},
                   config.to_dict())
  checkpoints.close()
  (workdir / 'config.json').write_text(json.dumps(config.to_dict()))
  return workdir


def cli(workdir, *args):
  return rh.run_command('attention_maps', f'--workdir={workdir}', '--prompt=ab', *args)


@pytest.mark.parametrize('layer', [2, -3, 99])
def test_a_layer_out_of_range_is_refused_not_wrapped_around(run, layer):
  before = sorted(os.listdir(run))
  result, lines = cli(run, f'--layer={layer}')
  assert result.returncode == 1 and lines == [
      f'error: --layer: {layer} is out of range; this model has 2 layers: give 0 to 1, or -1 to -2 to count from '
      'the last'], result.stderr
  assert sorted(os.listdir(run)) == before


def test_out_puts_the_map_elsewhere_and_leaves_the_workdir_alone(run, tmp_path):
  before = sorted(os.listdir(run))
  result, _ = cli(run, '--layer=-2', f'--out={tmp_path / "maps"}')
  assert result.returncode == 0, result.stderr
  path = tmp_path / 'maps' / 'attention_layer0_head0.png'
  assert result.stdout.strip() == str(path) and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert sorted(os.listdir(run)) == before


def test_an_out_folder_that_cannot_be_made_is_one_line(run, tmp_path):
  (tmp_path / 'a_file').write_text('not a folder')
  result, lines = cli(run, f'--out={tmp_path / "a_file" / "maps"}')
  assert result.returncode == 1 and lines == [
      f'error: --out: cannot write {tmp_path / "a_file" / "maps"} (Not a directory); give a folder you can write '
      'to with --out=DIR'], result.stderr


def test_a_folder_in_the_way_of_the_map_in_the_workdir_is_one_line(run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run, workdir)
  (workdir / 'attention_layer1_head0.png').mkdir()
  result, lines = cli(workdir)
  assert result.returncode == 1 and lines == [
      f'error: --out: cannot write {workdir / "attention_layer1_head0.png"} (Is a directory); give a folder you '
      'can write to with --out=DIR'], result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_workdir_is_one_line_that_points_to_out(run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run, workdir)
  workdir.chmod(0o555)
  try:
    result, lines = cli(workdir)
  finally:
    workdir.chmod(0o755)
  assert result.returncode == 1 and lines == [
      f'error: --out: cannot write {workdir} (Permission denied); give a folder you can write to with --out=DIR']
