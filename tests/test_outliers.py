"""Outliers and quantization: moments, kurtosis and the round-to-nearest quantizer agree with float64 NumPy, the
logit quantizer reaches every layer's logits and nothing else, and the command measures trained runs end to end."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_training as ht
import reliability_helpers as rh
from conftest import random_params, tiny_config
from diffjax.infer import attention_maps, outliers
from diffjax.model.transformer import Transformer
from diffjax.train import loop as trainer


def heavy_tailed(shape, seed=0):
  """Mostly N(0, 1), with a few entries a hundred times larger: a kurtosis far from 3."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=shape)
  x.flat[rng.choice(x.size, 5, replace=False)] *= 100.0
  return x.astype(np.float32)


def numpy_reference(x):
  x = np.asarray(x, np.float64).ravel()
  centred = x - x.mean()
  return {'max_abs': np.abs(x).max(), 'kurtosis': np.mean(centred ** 4) / np.mean(centred ** 2) ** 2,
          'mean': x.mean(), 'std': x.std(), 'count': x.size}


def test_max_and_kurtosis_match_numpy_also_with_a_mask_and_merged_over_pieces():
  x = heavy_tailed((6, 50, 40))
  expected = numpy_reference(x)
  assert expected['kurtosis'] > 30
  got = outliers.describe(outliers.moments(jnp.asarray(x)))
  for key in expected:
    assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
  # Pieces merged in float64 give the whole; a mask leaves entries out.
  merged = outliers.describe(outliers.merge(outliers.merge(outliers.moments(x[:1]), outliers.moments(x[1:4])),
                                            outliers.moments(x[4:])))
  for key in expected:
    assert merged[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
  valid = np.random.default_rng(1).random(x.shape) < 0.3
  masked = outliers.describe(outliers.moments(jnp.asarray(x), jnp.asarray(valid)))
  for key, value in numpy_reference(x[valid]).items():
    assert masked[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_a_gaussian_has_kurtosis_three():
  x = np.random.default_rng(2).normal(size=400_000).astype(np.float32)
  assert outliers.describe(outliers.moments(jnp.asarray(x)))['kurtosis'] == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize('bits', [8, 6, 4])
def test_quantize_is_symmetric_per_channel_round_to_nearest(bits):
  w = np.random.default_rng(bits).normal(size=(48, 20)).astype(np.float32) * np.linspace(0.1, 3, 20)
  w[:, 3] = 0.0  # a dead channel stays zero
  levels = 2 ** (bits - 1) - 1
  scale = np.abs(np.float64(w)).max(0, keepdims=True) / levels
  expected = np.clip(np.round(np.float64(w) / np.where(scale > 0, scale, 1)), -levels, levels) * scale
  got = np.asarray(outliers.quantize(jnp.asarray(w), bits, axes=0))
  np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
  for column in range(20):
    assert len(np.unique(got[:, column])) <= 2 * levels + 1
  np.testing.assert_allclose(np.abs(got).max(0), np.abs(w).max(0), rtol=1e-6)  # the extremes are kept exactly


def test_quantize_takes_its_scale_from_the_valid_entries_only():
  x = jnp.array([[1.3, 2.0, 1000.0], [0.4, -3.0, 7.0]])
  valid = jnp.array([[True, True, False], [True, True, True]])
  got = outliers.quantize(x, 4, axes=-1, valid=valid)
  np.testing.assert_allclose(got[0, :2], np.round(np.array([1.3, 2.0]) / (2 / 7)) * (2 / 7), rtol=1e-6)
  np.testing.assert_allclose(got[1], [0.0, -3.0, 7.0], rtol=1e-6)


def test_weight_quantization_touches_projection_kernels_only():
  cfg = tiny_config(variant='diff_v1')
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = random_params(Transformer(cfg), tokens)
  quantized = outliers.quantize_weights(params, 4)
  for path, before in jax.tree_util.tree_leaves_with_path(params):
    after = quantized
    for key in path:
      after = after[key.key]
    if path[-1].key == 'kernel':
      assert not np.array_equal(after, before) and np.abs(np.asarray(after) - before).max() > 0
    else:
      np.testing.assert_array_equal(after, before)  # embeddings, norm scales, λ vectors


@pytest.mark.parametrize('variant', ['diff_v1', 'baseline'])
def test_logit_quantization_reaches_every_layer_and_only_the_logits(variant):
  cfg = tiny_config(variant=variant)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  params = random_params(Transformer(cfg), tokens)
  with nn.intercept_methods(outliers._logits_quantized_to(3)):
    _, layers = attention_maps.sown(cfg, params, tokens)
  for sown in layers:
    logits_BxNxTxS = np.asarray(sown['logits'])
    for row in logits_BxNxTxS.reshape(-1, 12 * 12):  # one scale per sequence and head: 7 levels at most
      assert len(np.unique(row[~np.isnan(row)])) <= 7
  batch = {'inputs': tokens, 'targets': tokens, 'mask': np.ones((2, 12), np.int32)}
  plain = outliers.eval_loss(cfg, params, [batch])
  assert outliers.eval_loss(cfg, params, [batch], logit_bits=16) == pytest.approx(plain, rel=1e-3)
  assert abs(outliers.eval_loss(cfg, params, [batch], logit_bits=2) - plain) > 1e-3


def test_first_windows_masks_the_rows_past_the_count():
  batches = [{'inputs': np.zeros((4, 3), np.int32), 'mask': np.ones((4, 3), np.int32)} for _ in range(2)]
  kept = outliers.first_windows(batches, 6)
  assert [b['mask'][:, 0].tolist() for b in kept] == [[1, 1, 1, 1], [1, 1, 0, 0]]
  assert kept[1]['mask'].dtype == np.int32


# -- the command ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Workdirs of a DIFF V1 run and a baseline run, trained 40 steps each on the same corpus."""
  root = tmp_path_factory.mktemp('outliers')
  corpus = ht.write_corpus(root / 'corpus', num_docs=4, chars_per_doc=10_000)
  workdirs = []
  for variant in ('diff_v1', 'baseline'):
    overrides = ht.run_overrides(corpus, root / 'data', model__variant=variant, checkpoint__every_steps=40,
                                 checkpoint__async_save=False, log__eval_every_steps=40, log__sample_tokens=0)
    workdir = root / variant
    workdir.mkdir()
    trainer.Run(ht.load_config(overrides), str(workdir)).train()
    workdirs.append(workdir)
  return workdirs


def cli(*args):
  return rh.run_command('outliers', *args, timeout=300)


@pytest.mark.slow
def test_the_command_writes_outliers_and_quantized_losses_per_run(runs, tmp_path):
  result, _ = cli(*(f'--workdir={w}' for w in runs), '--windows=6', '--batch_size=4', f'--out={tmp_path}')
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / 'outliers.json').read_text())
  assert (tmp_path / 'outliers.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert report['windows'] == 6 and report['bits'] == [8, 6, 4] and report['seq_len'] == 64
  assert [run['variant'] for run in report['runs']] == ['diff_v1', 'baseline']
  for run in report['runs']:
    assert run['step'] == 40 and run['scored_tokens'] == 6 * 64
    for quantity in ('attention_logits', 'hidden_states'):
      layers, overall = run[quantity]['layers'], run[quantity]['overall']
      assert len(layers) == 2 and set(overall) == {'max_abs', 'kurtosis', 'mean', 'std', 'count'}
      assert overall['max_abs'] == max(layer['max_abs'] for layer in layers) > 0
      assert all(layer['kurtosis'] > 1 for layer in layers)  # Pearson's kurtosis is at least 1
    # Causal logits: every scored query sees its own position and those before it, for each of 4 sub-heads.
    assert run['attention_logits']['layers'][0]['count'] == 6 * 4 * 64 * 65 // 2
    loss = run['loss']
    assert 0 < loss['unquantized'] < 6 and set(loss['weights']) == set(loss['attention_logits']) == {'8', '6', '4'}
    assert abs(loss['weights']['8'] - loss['unquantized']) < 1e-3, loss  # 8-bit weights leave the loss as it was
  # Trained for 40 steps the baseline barely notices 4-bit weights, so the contrast is held on DIFF's run.
  loss = report['runs'][0]['loss']
  change = {bits: abs(loss['weights'][bits] - loss['unquantized']) for bits in ('8', '4')}
  assert change['8'] < change['4'] / 10, loss
  assert 'max |logit|' in result.stdout and str(tmp_path / 'outliers.json') in result.stdout


@pytest.mark.slow
def test_bad_bits_and_a_missing_out_are_one_line(tmp_path):
  result, lines = cli(f'--workdir={tmp_path}', '--bits=8,one', f'--out={tmp_path}')
  assert result.returncode == 1 and lines == [
      "error: --bits: '8,one' is not a comma-separated list of bit widths from 2 to 16"], result.stderr
  result, lines = cli(f'--workdir={tmp_path}')
  assert result.returncode == 1 and lines == ['error: --out is required: a folder for outliers.json and outliers.png']
