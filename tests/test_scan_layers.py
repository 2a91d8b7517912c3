"""Scan over layers: the scanned model computes the unscanned one's function, trains the same, and opens unscanned."""

import dataclasses
import subprocess

import flax.linen as nn
import jax
import numpy as np
import pytest

from diffjax.infer import load
from diffjax.model import transformer as model_lib
from diffjax.train import optim
from diffjax.train import step as train_step
from helpers_training import (cli_command, cli_env, random_params, read_metrics, run_overrides, sharded_state,
                              single_device_mesh, tiny_model, train_config, write_corpus)

VARIANTS = ('diff_v1', 'diff_v2', 'baseline')


def scanned(cfg):
  return dataclasses.replace(cfg, scan_layers=True)


@pytest.mark.slow
@pytest.mark.parametrize('variant', VARIANTS)
def test_scanned_model_computes_the_unscanned_function(variant):
  cfg = tiny_model(variant=variant, n_layers=3, n_kv_heads=2)
  params = random_params(cfg)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16), dtype=np.int32)
  stacked = model_lib.stack_layers(scanned(cfg), params)
  np.testing.assert_allclose(model_lib.Transformer(scanned(cfg)).apply({'params': stacked}, tokens),
                             model_lib.Transformer(cfg).apply({'params': params}, tokens), rtol=1e-5, atol=1e-5)
  # The layouts convert both ways without loss, and the scanned initialiser makes the stacked layout.
  jax.tree.map(np.testing.assert_array_equal, model_lib.unstack_layers(scanned(cfg), stacked), params)
  expected = jax.tree.map(lambda x: x.shape, stacked)
  assert jax.tree.map(lambda x: x.shape, nn.meta.unbox(model_lib.abstract_params(scanned(cfg))['params'])) == expected


def test_scanned_lambdas_are_each_layers_own():
  cfg = tiny_model(n_layers=3)
  params = random_params(cfg)
  np.testing.assert_allclose(model_lib.lambdas(scanned(cfg), model_lib.stack_layers(scanned(cfg), params)),
                             model_lib.lambdas(cfg, params), rtol=1e-6)


def test_scanned_parameters_carry_a_replicated_layers_axis():
  specs = nn.get_partition_spec(model_lib.abstract_params(scanned(tiny_model()))['params'])
  assert specs['layers']['block']['attn']['q_proj']['kernel'] == jax.sharding.PartitionSpec('layers', 'embed', 'heads')
  assert 'block_0' not in specs


@pytest.mark.slow
def test_scanned_train_step_equals_the_unscanned_one():
  cfg, train_cfg = tiny_model(n_layers=3), train_config(learning_rate=1e-2, warmup_steps=1, steps=10)
  tx, schedule, mesh = optim.make_optimizer(train_cfg), optim.learning_rate_schedule(train_cfg), single_device_mesh()
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, cfg.vocab_size, (4, 17), dtype=np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((4, 16), np.float32)}
  params = random_params(cfg)
  results = {}
  for model_cfg, model_params in ((cfg, params), (scanned(cfg), model_lib.stack_layers(scanned(cfg), params))):
    train, _ = train_step.compile_steps(model_cfg, tx, schedule, train_cfg, mesh)
    state = sharded_state(model_cfg, tx, mesh, model_params)
    for _ in range(2):
      state, metrics = train(state, batch)
    results[model_cfg.scan_layers] = jax.device_get(metrics)
  # The second step's loss, gradient norm and λ depend on the first update of every layer's parameters. (Adam
  # turns rounding differences in near-zero gradients into full-size steps, so the weights are not compared.)
  for key in ('loss', 'grad_norm', 'lambda'):
    np.testing.assert_allclose(results[True][key], results[False][key], rtol=1e-5)


@pytest.mark.slow
def test_a_scanned_run_trains_and_opens_unscanned(tmp_path):
  overrides = run_overrides(write_corpus(tmp_path / 'corpus'), tmp_path / 'data', **{
      'model.scan_layers': True, 'train.steps': 4, 'train.warmup_steps': 1, 'checkpoint.every_steps': 4,
      'log.eval_every_steps': 4})
  workdir = tmp_path / 'run'
  result = subprocess.run(cli_command(workdir, overrides), env=cli_env(), capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert any(len(record.get('lambda', [])) == 2 for record in read_metrics(workdir))  # one λ per layer, scanned
  cfg, params, _, step = load.open_run(str(workdir))
  assert step == 4 and not cfg.scan_layers and 'block_1' in params and 'layers' not in params
  tokens = np.arange(8, dtype=np.int32)[None] % cfg.vocab_size
  assert np.isfinite(model_lib.Transformer(cfg).apply({'params': params}, tokens)).all()
