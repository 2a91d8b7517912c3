"""launch/compare.py's protocol: the variants see identical batches and start from identical weights outside
attention; and the command trains, tabulates and plots them."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np

from diffjax import data, defaults
from diffjax import model as model_lib
from helpers_training import REPO, load_config, run_overrides, write_corpus

sys.path.insert(0, str(REPO / 'launch'))
import compare  # noqa: E402

VARIANTS = ('diff_v1', 'baseline', 'diff_v2')


def run_config(variant: str, seed: int, overrides: dict):
  """The config one of compare's runs trains with, read back from the flags of its command."""
  flags = compare.train_command('configs/tiny.py', '/tmp/unused', variant, seed,
                                [f'{key}={value}' for key, value in overrides.items()])
  values = dict(flag[len('--config.'):].split('=', 1) for flag in flags if flag.startswith('--config.'))
  config = load_config({})
  for dotted, value in values.items():
    *parents, key = dotted.split('.')
    section = config
    for parent in parents:
      section = section[parent]
    current = section[key]
    section[key] = (value == 'True' if isinstance(current, bool) else value if current is None
                    else type(current)(value))
  return config


def test_variants_of_one_seed_see_identical_batches(tmp_path):
  overrides = run_overrides(write_corpus(tmp_path / 'corpus'), tmp_path / 'data')
  streams = []
  for variant in VARIANTS:
    config = run_config(variant, 3, overrides)
    assert config.model.variant == variant and config.seed == 3
    pipeline = data.build_input(config.data, seq_len=config.train.seq_len, batch_size=config.train.global_batch_size,
                                seed=config.seed, workdir=None)
    iterator = pipeline.train_iterator()
    streams.append([next(iterator)['inputs'] for _ in range(3)])
    iterator.close()
  for stream in streams[1:]:
    for got, expected in zip(stream, streams[0]):
      np.testing.assert_array_equal(got, expected)
  other_seed = run_config('diff_v1', 4, overrides)
  pipeline = data.build_input(other_seed.data, seq_len=other_seed.train.seq_len,
                              batch_size=other_seed.train.global_batch_size, seed=other_seed.seed, workdir=None)
  assert not np.array_equal(next(pipeline.train_iterator())['inputs'], streams[0][0])  # the seed does matter


def test_variants_of_one_seed_share_every_initial_weight_outside_attention():
  weights = {}
  for variant in VARIANTS:
    cfg = defaults.model_config(run_config(variant, 0, {}), 258)
    params = nn.meta.unbox(model_lib.Transformer(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32)))['params']
    weights[variant] = {jax.tree_util.keystr(path): np.asarray(leaf)
                        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  # Flax draws each parameter from a key derived from its path, so every parameter the variants have in common
  # (same path, same shape) starts equal: everything outside attention, and here the attention projections too.
  outside = {path for path in weights['diff_v1'] if "['attn']" not in path}
  assert len(outside) > 10
  for variant in VARIANTS[1:]:
    common = {path for path in weights['diff_v1'] if path in weights[variant]
              and weights[variant][path].shape == weights['diff_v1'][path].shape}
    assert outside <= common
    for path in common:
      np.testing.assert_array_equal(weights[variant][path], weights['diff_v1'][path], err_msg=path)
  assert "['block_0']['attn']['lambda_q1']" not in weights['baseline']


def test_the_command_trains_tabulates_and_plots(tmp_path):
  overrides = run_overrides(write_corpus(tmp_path / 'corpus'), tmp_path / 'data', train__steps=6,
                            train__warmup_steps=1, checkpoint__every_steps=6, log__eval_every_steps=6)
  command = [sys.executable, str(REPO / 'launch' / 'compare.py'), f'--config={REPO / "configs" / "tiny.py"}',
             '--variants=diff_v1,baseline', '--seeds=0', f'--root={tmp_path / "runs"}', '--parallel=2', '--window=3',
             *(f'--set={key}={value}' for key, value in overrides.items())]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**compare.os.environ,
                                                                                     'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  report = json.loads((tmp_path / 'runs' / 'compare.json').read_text())
  assert set(report['runs']) == {'diff_v1_seed0', 'baseline_seed0'}
  for run in report['runs'].values():
    assert np.isfinite(run['eval_loss']) and run['eval_step'] == 6 and set(run['train_loss']) == {'3', '6'}
  assert 'diff_v1 below baseline by' in result.stdout
  assert (tmp_path / 'runs' / 'compare.png').stat().st_size > 0
