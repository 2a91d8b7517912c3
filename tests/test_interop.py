"""Weights of the reference PyTorch MultiheadDiffAttn loaded into DiffAttentionV1."""

import math
import pathlib
import re

import jax
import numpy as np
import pytest

from conftest import assert_close, jit, param_shapes, random_input, random_params, tiny_config, to_float64
from diffjax.errors import ConfigError
from diffjax.infer import interop
from diffjax.model.attention import DiffAttentionV1
from diffjax.model.config import ModelConfig
import reference

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')


def _reference_state_dict(e, num_heads, num_kv_heads, seed=0):
  """float32 weights shaped like MultiheadDiffAttn(embed_dim=e, num_heads=H, num_kv_heads=H_kv)'s state_dict.

  PyTorch's Linear stores (out, in). The values are random throughout (λ vectors and norm scale included), so
  a swapped or mis-transposed tensor cannot go unnoticed.
  """
  rng = np.random.default_rng(seed)
  d = e // num_heads // 2
  kv_width = e // (num_heads // num_kv_heads)
  linear = lambda out, gain=1.0: rng.normal(size=(out, e)) * gain / math.sqrt(e)
  state_dict = {'q_proj.weight': linear(e, 1.5), 'k_proj.weight': linear(kv_width, 1.5),
                'v_proj.weight': linear(kv_width), 'out_proj.weight': linear(e),
                'subln.weight': rng.uniform(0.5, 1.5, size=2 * d)}
  state_dict.update({n: rng.normal(size=d) * 0.1 for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')})
  return {k: v.astype(np.float32) for k, v in state_dict.items()}


def test_readme_usage_reproduces_the_reference_module():
  e, h, h_kv, depth = 32, 2, 1, 3  # two differential heads sharing one kv group
  state_dict = _reference_state_dict(e, h, h_kv, seed=1)
  x_BxTxE = random_input((2, 8, e), seed=1)

  # The README's snippet, verbatim apart from the names bound above.
  layer = DiffAttentionV1(ModelConfig(d_model=e, n_heads=2 * h, n_kv_heads=2 * h_kv, dtype='float32',
                                      attention_impl='xla', rope_theta=10000., rope_pairing='interleaved'),
                          layer=depth)
  params = interop.from_reference(state_dict)
  y = layer.apply({'params': params}, x_BxTxE)

  expected = reference.diff_v1_from_state_dict(state_dict, to_float64(x_BxTxE), num_heads=h, num_kv_heads=h_kv,
                                               depth=depth)
  assert_close(y, expected)


def test_readme_interop_example_runs_and_matches_the_reference():
  # The README promises that its example works as written: run its code block and check what it computed.
  readme = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
  blocks = [b for b in re.findall(r'```python\n(.*?)```', readme.read_text(), re.S) if 'from_reference(' in b]
  assert len(blocks) == 1, 'README.md should hold one interop example'
  namespace = {}
  exec(blocks[0], namespace)  # pylint: disable=exec-used
  expected = reference.diff_v1_from_state_dict(namespace['state_dict'], to_float64(namespace['x']),
                                               num_heads=namespace['num_heads'],
                                               num_kv_heads=namespace['num_kv_heads'], depth=namespace['depth'])
  assert_close(namespace['y'], expected)


@pytest.mark.parametrize('num_heads,num_kv_heads,depth', [(4, 2, 0), (4, 4, 6)])
def test_converted_weights_give_the_reference_output(num_heads, num_kv_heads, depth):
  state_dict = _reference_state_dict(32, num_heads, num_kv_heads, seed=depth)
  cfg = tiny_config(d_model=32, n_heads=2 * num_heads, n_kv_heads=2 * num_kv_heads)
  layer = DiffAttentionV1(cfg, depth)
  x = random_input((2, 8, 32), seed=2)
  y = jit(layer.apply)({'params': interop.from_reference(state_dict)}, x)
  expected = reference.diff_v1_from_state_dict(state_dict, to_float64(x), num_heads=num_heads,
                                               num_kv_heads=num_kv_heads, depth=depth)
  assert_close(y, expected)


def test_from_reference_gives_the_layers_parameter_tree():
  cfg = tiny_config(d_model=32, n_heads=8, n_kv_heads=4)
  shapes = param_shapes(DiffAttentionV1(cfg, 0), random_input((1, 2, 32)))
  params = interop.from_reference(_reference_state_dict(32, 4, 2))
  assert jax.tree.structure(params) == jax.tree.structure(shapes)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)):
    assert got.shape == want.shape and got.dtype == np.float32


def _assert_trees_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype == np.float32
    np.testing.assert_array_equal(x, y)


def test_round_trip_from_flax_is_exact():
  cfg = tiny_config(d_model=32, n_heads=8, n_kv_heads=4)
  params = random_params(DiffAttentionV1(cfg, 0), random_input((1, 2, 32)), seed=2)
  state_dict = interop.to_reference(params)
  assert set(state_dict) == set(interop.REFERENCE_KEYS)
  _assert_trees_identical(interop.from_reference(state_dict), params)


def test_round_trip_from_reference_is_exact():
  state_dict = _reference_state_dict(32, 4, 2, seed=3)
  _assert_trees_identical(interop.to_reference(interop.from_reference(state_dict)), state_dict)


def test_missing_reference_key_is_a_config_error():
  state_dict = _reference_state_dict(32, 4, 2)
  del state_dict['lambda_k2']
  with pytest.raises(ConfigError, match=r'^state_dict: missing lambda_k2; expected the keys of MultiheadDiffAttn'):
    interop.from_reference(state_dict)
