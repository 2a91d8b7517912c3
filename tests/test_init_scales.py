"""launch/init_scales.py: branch sizes at initialisation, on a small model and a text file."""

import dataclasses
import importlib.util
import math
import pathlib
import sys

import numpy as np
import pytest

from conftest import tiny_config
from helpers_training import english_like_text

LAUNCH = pathlib.Path(__file__).parents[1] / 'launch'
sys.path.insert(0, str(LAUNCH))
_SPEC = importlib.util.spec_from_file_location('init_scales', LAUNCH / 'init_scales.py')
init_scales = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(init_scales)


@pytest.fixture(scope='module')
def tokens(tmp_path_factory):
  path = tmp_path_factory.mktemp('text') / 'book.txt'
  path.write_text(english_like_text(20_000, seed=1))
  return init_scales.text_batch(str(path), batch=2, seq_len=48)


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['diff_v1', 'baseline'])
def test_the_first_attention_output_scales_with_its_projection_init(tokens, variant):
  # Same seed, same input: the flat init draws W_o as the scaled one times sqrt(2L), and layer 0 sees the same
  # embeddings either way, so its attention output grows by exactly that factor.
  scaled_cfg = tiny_config(variant=variant, vocab_size=384, n_layers=3)
  scaled = init_scales.measure(scaled_cfg, tokens, seed=0)
  flat = init_scales.measure(dataclasses.replace(scaled_cfg, scale_residual_init=False), tokens, seed=0)
  assert flat['layers'][0]['attn_rms'] / scaled['layers'][0]['attn_rms'] == pytest.approx(math.sqrt(6), rel=1e-4)
  assert scaled['embedding_rms'] == pytest.approx(0.02, rel=0.1) and len(scaled['layers']) == 3
  assert -1 <= scaled['final_cosine_with_token_embedding'] <= 1


@pytest.mark.slow
def test_larger_embeddings_dominate_the_residual_stream(tokens):
  cfg = tiny_config(vocab_size=384)
  small, large = (init_scales.measure(dataclasses.replace(cfg, embed_init_std=std), tokens, seed=0)
                  for std in (0.02, 1.0))
  assert large['embedding_rms'] == pytest.approx(1.0, rel=0.1)
  assert large['final_cosine_with_token_embedding'] > max(0.9, small['final_cosine_with_token_embedding'])
  assert np.isfinite([layer['attn_rms'] for layer in small['layers']]).all()


def test_zero_residual_init_leaves_the_embeddings_alone(tokens):
  for variant in ('diff_v1', 'baseline'):
    zero = init_scales.measure(tiny_config(variant=variant, vocab_size=384, residual_init_gain=0.0), tokens, seed=0)
    assert all(layer['attn_rms'] == 0.0 and layer['ffn_rms'] == 0.0 for layer in zero['layers'])
    assert zero['final_cosine_with_token_embedding'] == pytest.approx(1.0, abs=1e-6)
