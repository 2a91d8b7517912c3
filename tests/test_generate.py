"""KV-cache generation computes what the full forward pass computes, and samples as asked."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reliability_helpers as rh
from conftest import jit, random_params, tiny_config
from diffjax.errors import ConfigError
from diffjax.infer import generate
from diffjax.model import transformer as model_lib

VARIANTS = ('diff_v1', 'diff_v2', 'baseline')
T = 12


def forward(cfg, params, tokens_BxT):
  return np.asarray(jit(lambda p, x: model_lib.Transformer(cfg).apply({'params': p}, x))(params, tokens_BxT))


def model_and_params(**overrides):
  cfg = tiny_config(**overrides)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, T)), jnp.int32)
  return cfg, random_params(model_lib.Transformer(cfg), tokens), tokens


@pytest.mark.parametrize('variant, kv_heads', [(variant, 2) for variant in VARIANTS] + [('baseline', None)],
                         ids=['diff_v1-gqa', 'diff_v2-gqa', 'baseline-gqa', 'baseline-mha'])
def test_cache_reproduces_the_full_forward_at_every_position(variant, kv_heads):
  cfg, params, tokens_BxT = model_and_params(variant=variant, n_kv_heads=kv_heads)
  full_BxTxV = forward(cfg, params, tokens_BxT)
  # Right-padded prompts of 1 and 5 tokens (the padding is garbage that must never be seen), then one token at a
  # time: row 0 walks positions 0..7, row 1 positions 4..11.
  lengths_B = jnp.asarray([1, 5])
  prompts_BxP = tokens_BxT[:, :5].at[0, 1:].set(cfg.vocab_size - 1)
  logits_BxV, cache = generate.prefill(cfg, params, prompts_BxP, lengths_B, T)
  positions_B = lengths_B - 1
  for _ in range(7):
    np.testing.assert_allclose(logits_BxV, full_BxTxV[[0, 1], positions_B], rtol=1e-5, atol=1e-5)
    positions_B = positions_B + 1
    logits_BxV, cache = generate.decode_step(cfg, params, cache, tokens_BxT[jnp.arange(2), positions_B], positions_B)
  np.testing.assert_allclose(logits_BxV, full_BxTxV[[0, 1], positions_B], rtol=1e-5, atol=1e-5)


# -- generate: one model and one prompt shape, so all tests below share two compilations ---------------------------

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], [2, 7, 1, 8, 2, 8, 1]]
NEW = 4  # 12 + 4 = max_len 16


@pytest.fixture(scope='module')
def small():
  cfg, params, _ = model_and_params(variant='diff_v1', max_len=16)
  return cfg, params


def test_greedy_generation_is_the_argmax_of_the_full_forward(small):
  cfg, params = small
  result = generate.generate(cfg, params, PROMPTS, NEW, temperature=0.0)
  for prompt, new in zip(PROMPTS, result.tokens):
    assert len(new) == NEW
    sequence = prompt + new
    logits_TxV = forward(cfg, params, jnp.asarray([sequence]))[0]
    assert new == [int(np.argmax(logits_TxV[t])) for t in range(len(prompt) - 1, len(sequence) - 1)]
  assert result.decoded == 2 * (NEW - 1) and result.tokens_per_s > 0


def test_a_seed_gives_the_same_text_and_seeds_differ(small):
  cfg, params = small
  draw = lambda seed: generate.generate(cfg, params, PROMPTS, NEW, temperature=1.0, seed=seed).tokens
  assert draw(0) == draw(0)
  assert len({str(draw(seed)) for seed in range(4)}) > 1


def test_each_row_stops_at_eos(small):
  cfg, params = small
  greedy = generate.generate(cfg, params, PROMPTS, NEW, temperature=0.0).tokens
  eos = greedy[1][2]
  stopped = generate.generate(cfg, params, PROMPTS, NEW, temperature=0.0, eos_id=eos).tokens
  for row, new in zip(greedy, stopped):
    assert new == (row[:row.index(eos)] if eos in row else row)
  assert len(stopped[1]) <= 2


def test_generation_past_max_len_is_refused(small):
  cfg, params = small
  with pytest.raises(ConfigError, match=r"^generation: a prompt of 12 tokens and 5 new tokens exceed the model's "
                                        r'max_len of 16; ask for at most 4 new tokens'):
    generate.generate(cfg, params, PROMPTS, NEW + 1)
  assert generate.generate(cfg, params, PROMPTS, 0).tokens == [[], []]


@pytest.mark.parametrize('arguments, key', [
    ({'num_tokens': -1}, 'num_tokens'), ({'temperature': float('nan')}, 'temperature'),
    ({'temperature': -0.5}, 'temperature'), ({'top_k': -1}, 'top_k'), ({'top_p': 0.0}, 'top_p'),
    ({'top_p': 1.5}, 'top_p'), ({'top_p': float('nan')}, 'top_p')])
def test_bad_sampling_arguments_are_refused(small, arguments, key):
  cfg, params = small
  arguments = {'num_tokens': NEW, **arguments}
  with pytest.raises(ConfigError, match=f'^{key}: '):
    generate.generate(cfg, params, PROMPTS, arguments.pop('num_tokens'), **arguments)


def test_an_empty_prompt_is_refused(small):
  with pytest.raises(ConfigError, match='^prompts: '):
    generate.generate(*small, [[1], []], NEW)


# -- the sampling rule ------------------------------------------------------------------------------------------------

def draws(logits_V, n=4000, **rule):
  settings = {'temperature': 1.0, 'top_k': 0, 'top_p': 1.0, **rule}
  logits_BxV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (n, len(logits_V)))
  sample = jax.jit(generate.sample_logits)
  tokens = sample(logits_BxV, jax.random.key(0), *(jnp.asarray(settings[k]) for k in ('temperature', 'top_k', 'top_p')))
  return np.bincount(np.asarray(tokens), minlength=len(logits_V)) / n


PROBS = np.log([0.05, 0.5, 0.15, 0.3])


def test_top_k_keeps_the_k_most_likely_tokens():
  frequencies = draws(PROBS, top_k=2)
  assert frequencies[0] == frequencies[2] == 0
  np.testing.assert_allclose(frequencies[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p():
  np.testing.assert_allclose(draws(PROBS, top_p=0.7), [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.03)
  assert draws(PROBS, top_p=0.5)[1] == 1.0  # 0.5 alone reaches 0.5
  np.testing.assert_allclose(draws(PROBS, top_p=1.0), np.exp(PROBS), atol=0.03)
  np.testing.assert_allclose(draws(PROBS, top_k=3, top_p=0.9), [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], atol=0.03)


def test_temperature_zero_is_greedy_and_low_temperature_sharpens():
  assert draws(PROBS, temperature=0.0)[1] == 1.0
  assert draws(PROBS, temperature=0.25)[1] > 0.85


@pytest.mark.parametrize('flag', ['--temperature=nan', '--top_p=0.0', '--top_p=1.5', '--top_k=-1'])
def test_sample_flags_fail_in_one_line(tmp_path, flag):
  result = subprocess.run([sys.executable, '-m', 'diffjax.sample', f'--workdir={tmp_path}', flag], cwd=rh.REPO,
                          env=rh.env(), capture_output=True, text=True, timeout=120)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1, result.stderr
  assert lines[0].startswith(f'error: flag {flag}: ') and lines[0].endswith('; see --helpfull for the flags')
