"""The attention layers against the float64 reference, the paper's invariants and the mistakes people make."""

import functools

from absl.testing import parameterized
import chex
import flax.linen as nn
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (assert_close, jit, lambda_of, random_input, random_params, relative_error, set_lambda,
                      tiny_config, to_float64)
from diffjax.errors import ConfigError
from diffjax.model import attention, layers
from diffjax.model import kernels as pallas_attention
from diffjax.model.attention import ATTENTION_BY_VARIANT, DiffAttentionV1
import reference

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')

VARIANTS = ('diff_v1', 'diff_v2', 'baseline')
SHEET_LAMBDA_INIT = (0.200000, 0.355509, 0.470713, 0.556058, 0.619283, 0.666122, 0.700821, 0.726526)


@functools.lru_cache(maxsize=None)
def _layer(cfg, layer):
  """The module and its jitted apply, cached so that tests sharing a config share one compilation."""
  module = ATTENTION_BY_VARIANT[cfg.variant](cfg, layer)
  return module, jit(lambda params, x, positions=None: module.apply({'params': params}, x, positions))


def _params_with_lambda_away_from_one(module, x, layer, seed):
  # λ near 1 makes A1 V - λ A2 V nearly cancel, and the RMSNorm after it would magnify float32 rounding.
  params = random_params(module, x, seed=seed)
  if 'lambda_q1' in params and abs(lambda_of(params, layer) - 1.0) < 0.2:
    params = set_lambda(params, 0.5, layer, seed)
  return params


def _reference_output(cfg, layer, params, x, positions=None):
  p, x = to_float64(params), to_float64(x)
  kwargs = dict(theta=cfg.rope_theta, pairing=cfg.rope_pairing, positions=positions)
  if cfg.variant == 'diff_v1':
    # n_heads counts the baseline's heads: DIFF V1 has half as many differential heads and kv groups.
    return reference.diff_v1_attention(p, x, num_heads=cfg.n_heads // 2, num_kv_heads=cfg.kv_heads // 2,
                                       layer=layer, head_norm=cfg.diff_head_norm,
                                       schedule=cfg.lambda_init_schedule, **kwargs)
  if cfg.variant == 'diff_v2':
    return reference.diff_v2_attention(p, x, num_heads=cfg.n_heads, num_kv_heads=cfg.kv_heads, **kwargs)
  return reference.baseline_attention(p, x, num_heads=cfg.n_heads, num_kv_heads=cfg.kv_heads, **kwargs)


def _check_against_reference(variant, n_heads, n_kv_heads, head_dim, seq, batch, layer, pairing, theta, seed):
  cfg = tiny_config(variant=variant, d_model=n_heads * head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                    rope_pairing=pairing, rope_theta=theta)
  module, apply = _layer(cfg, layer)
  x = random_input((batch, seq, cfg.d_model), seed)
  params = _params_with_lambda_away_from_one(module, x, layer, seed)
  assert_close(apply(params, x), _reference_output(cfg, layer, params, x))


# --- The layers compute the paper's function. ---------------------------------------------------------------


@pytest.mark.parametrize('variant,n_heads,n_kv_heads,pairing', [
    # Each variant with and without GQA, and with each RoPE pairing; DIFF V1's GQA case has two kv groups of
    # two differential heads each, so a wrong group or sub-head pairing shows.
    ('diff_v1', 4, 4, 'half'), ('diff_v1', 8, 4, 'interleaved'),
    ('diff_v2', 4, 4, 'interleaved'), ('diff_v2', 4, 2, 'half'),
    ('baseline', 4, 4, 'half'), ('baseline', 4, 2, 'interleaved'),
])
def test_layer_matches_float64_reference(variant, n_heads, n_kv_heads, pairing):
  _check_against_reference(variant, n_heads, n_kv_heads, head_dim=4, seq=7, batch=2, layer=3, pairing=pairing,
                           theta=10000.0, seed=1)


@st.composite
def _layer_setups(draw):
  variant = draw(st.sampled_from(VARIANTS))
  # DIFF V1 pairs kv heads too, so its baseline-count kv heads come in twos.
  kv_unit = 2 if variant == 'diff_v1' else 1
  n_kv_heads = kv_unit * draw(st.integers(1, 2))
  return dict(variant=variant, n_heads=n_kv_heads * draw(st.integers(1, 3)), n_kv_heads=n_kv_heads,
              head_dim=draw(st.sampled_from((2, 4, 8))), seq=draw(st.integers(1, 9)), batch=draw(st.integers(1, 2)),
              layer=draw(st.integers(0, 7)), pairing=draw(st.sampled_from(('interleaved', 'half'))),
              theta=draw(st.sampled_from((10000.0, 100.0))), seed=draw(st.integers(0, 2**16)))


@hypothesis.settings(max_examples=6, deadline=None, derandomize=True, database=None)
@hypothesis.given(_layer_setups())
def test_layer_matches_float64_reference_over_shapes(setup):
  _check_against_reference(**setup)


def test_positions_argument_and_relative_position_invariance():
  # RoPE makes q·k depend on positions only through their difference, so shifting every position by the
  # same offset leaves the layer's output unchanged; the explicit positions must also reach the rotation.
  cfg = tiny_config(variant='diff_v1', n_heads=4, n_kv_heads=2)
  module, apply = _layer(cfg, 2)
  x = random_input((2, 6, cfg.d_model), seed=3)
  params = _params_with_lambda_away_from_one(module, x, 2, seed=3)
  positions = np.broadcast_to(np.arange(6), (2, 6))
  y_shifted = apply(params, x, positions + 11)
  assert_close(y_shifted, _reference_output(cfg, 2, params, x, positions=positions + 11))
  assert_close(y_shifted, apply(params, x, positions))


_apply_rope = jit(attention.apply_rope, static_argnums=(2, 3))


@pytest.mark.parametrize('pairing', ['interleaved', 'half'])
def test_rope_matches_reference(pairing):
  x = random_input((2, 5, 3, 8), seed=4)
  positions = np.array([[0, 1, 2, 3, 4], [7, 3, 9, 100, 2]])
  got = _apply_rope(x, positions, 10000.0, pairing)
  assert_close(got, reference.rope(to_float64(x), positions, 10000.0, pairing))


def test_rope_pairings_differ():
  # Loading the paper's interleaved weights with the half-split pairing must change the result.
  x, positions = random_input((1, 4, 1, 8), seed=5), np.arange(4)[None]
  interleaved, half = (_apply_rope(x, positions, 10000.0, p) for p in ('interleaved', 'half'))
  assert relative_error(interleaved, half) > 0.1


# --- λ and its re-parameterisation. ---------------------------------------------------------------------------


def test_lambda_init_matches_sheet():
  got = [round(attention.lambda_init_for(layer), 6) for layer in range(8)]
  np.testing.assert_allclose(got, SHEET_LAMBDA_INIT, rtol=0, atol=1e-12)


def test_lambda_init_schedule_takes_other_constants():
  assert attention.lambda_init_for(2, (0.9, 0.5, 0.1)) == pytest.approx(0.9 - 0.5 * np.exp(-0.2), abs=1e-15)
  # A drop of 0 is the paper's constant-λ_init ablation: the same value in every layer, traced or not.
  constant = [attention.lambda_init_for(layer, (0.5, 0.0, 0.3)) for layer in range(8)]
  assert constant == [0.5] * 8
  traced = jax.jit(lambda layers: attention.lambda_init_for(layers, (0.5, 0.0, 0.3)))(jnp.arange(8))
  np.testing.assert_array_equal(traced, np.full(8, 0.5, np.float32))


def test_reparameterised_lambda():
  params = random_params(DiffAttentionV1(tiny_config(), 0), random_input((1, 2, 32)), seed=6)
  for layer in (0, 5):
    lam = attention.reparameterised_lambda(params, layer)
    assert lam.dtype == jnp.float32 and lam.shape == ()
    np.testing.assert_allclose(lam, lambda_of(params, layer), rtol=1e-6)


def test_v1_parameter_shapes_follow_the_head_split():
  # n_heads counts the baseline's heads: the λ vectors have the sub-head width d = E / n_heads and the norm
  # covers one value head of 2d, whatever n_kv_heads is. Halving the heads twice would double both.
  cfg = tiny_config(d_model=64, n_heads=8, n_kv_heads=4)
  params = random_params(DiffAttentionV1(cfg, 0), random_input((1, 2, 64)))
  d = 64 // 8
  chex.assert_trees_all_equal_shapes_and_dtypes(
      {n: params[n] for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')},
      {n: np.zeros(d, np.float32) for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')})
  assert params['subln']['scale'].shape == (2 * d,)
  assert params['q_proj']['kernel'].shape == (64, 64)
  assert params['k_proj']['kernel'].shape == params['v_proj']['kernel'].shape == (64, 32)
  assert params['out_proj']['kernel'].shape == (64, 64)


def test_v1_initialisation():
  # λ vectors from N(0, 0.1), per-head norm scale ones; so λ starts near λ_init.
  cfg = tiny_config(d_model=256, n_heads=4, n_kv_heads=4)
  module = DiffAttentionV1(cfg, 3)
  params = nn.meta.unbox(jit(module.init)(jax.random.key(0), jnp.zeros((1, 2, 256))))['params']
  vectors = np.concatenate([params[n] for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')])
  assert vectors.shape == (4 * 64,)
  assert abs(vectors.mean()) < 0.03 and 0.08 < vectors.std() < 0.12
  np.testing.assert_array_equal(params['subln']['scale'], np.ones(128, np.float32))
  assert abs(lambda_of(params, 3) - attention.lambda_init_for(3)) < 0.3


# --- The paper's DIFF V1 ablations. -----------------------------------------------------------------------------


@pytest.mark.parametrize('n_kv_heads,ablation', [
    (4, dict(diff_head_norm=False)),
    (2, dict(diff_head_norm=False, lambda_init_drop=0.0)),
    (4, dict(lambda_init=0.5, lambda_init_drop=0.0)),  # the paper's "λ_init = 0.5" row
    (2, dict(lambda_init=0.9, lambda_init_drop=0.6, lambda_init_rate=0.1)),
])
def test_ablations_match_float64_reference(n_kv_heads, ablation):
  cfg = tiny_config(n_heads=4, n_kv_heads=n_kv_heads, **ablation)
  module, apply = _layer(cfg, 3)
  x = random_input((2, 7, cfg.d_model), seed=20)
  params = random_params(module, x, seed=20)
  assert ('subln' in params) == cfg.diff_head_norm
  got = apply(params, x)
  assert_close(got, _reference_output(cfg, 3, params, x))
  # Each switch changes the function: the paper's layer with the same weights computes something else.
  paper_cfg = tiny_config(n_heads=4, n_kv_heads=n_kv_heads)
  paper_params = {'subln': {'scale': np.ones(2 * cfg.head_dim, np.float32)}, **params}
  assert relative_error(got, _reference_output(paper_cfg, 3, paper_params, x)) > 0.05


def test_without_head_norm_the_heads_meet_w_o_unscaled():
  # (A1 - λ A2) V straight into W_o: no norm, and no (1 - λ_init), which is that norm's fixed scale.
  cfg = tiny_config(d_model=32, n_heads=8, n_kv_heads=4, diff_head_norm=False)
  layer = 2
  module, apply = _layer(cfg, layer)
  x = random_input((2, 7, 32), seed=21)
  params = set_lambda(random_params(module, x, seed=21), 0.6, layer, seed=21)
  p, x64 = to_float64(params), to_float64(x)
  positions = np.broadcast_to(np.arange(7), (2, 7))
  q = reference.rope((x64 @ p['q_proj']['kernel']).reshape(2, 7, 8, 4), positions, 10000.0, 'interleaved')
  k = reference.rope((x64 @ p['k_proj']['kernel']).reshape(2, 7, 4, 4), positions, 10000.0, 'interleaved')
  v = (x64 @ p['v_proj']['kernel']).reshape(2, 7, 2, 8)
  out = (reference.softmax_attention(q[:, :, 0::2], k[:, :, 0::2], v)
         - 0.6 * reference.softmax_attention(q[:, :, 1::2], k[:, :, 1::2], v))
  assert_close(apply(params, x), out.reshape(2, 7, 32) @ p['out_proj']['kernel'])


def test_constant_lambda_init_scales_every_layer_alike():
  # With λ = λ_init (zero λ vectors give exp(0) - exp(0) = 0) and the same weights, a constant schedule makes the
  # layer the same function at every depth; the paper's schedule does not.
  x = random_input((2, 6, 32), seed=22)
  outputs = {}
  for name, overrides in (('constant', dict(lambda_init_drop=0.0)), ('paper', {})):
    cfg = tiny_config(**overrides)
    params = random_params(DiffAttentionV1(cfg, 0), x, seed=22)
    params.update({n: np.zeros_like(params[n]) for n in attention.LAMBDA_VECTORS})
    outputs[name] = [np.asarray(_layer(cfg, layer)[1](params, x)) for layer in (0, 5)]
  np.testing.assert_array_equal(*outputs['constant'])
  assert relative_error(*outputs['paper']) > 0.1


# --- Invariants of differential attention. --------------------------------------------------------------------


_diff_v1_attention_xla = jit(functools.partial(attention.diff_v1_attention, impl='xla'))


def _tie_sub_heads(params, head_dim):
  """DIFF V1 params whose q2 and k2 sub-heads copy q1 and k1 (kernel columns of sub-head 2h+1 = those of 2h)."""
  params = dict(params)
  for name in ('q_proj', 'k_proj'):
    kernel = params[name]['kernel']
    pairs = kernel.reshape(kernel.shape[0], -1, 2, head_dim).copy()
    pairs[:, :, 1] = pairs[:, :, 0]
    params[name] = {'kernel': pairs.reshape(kernel.shape)}
  return params


def test_identical_maps_and_unit_lambda_cancel_exactly_before_the_norm():
  q = jnp.repeat(random_input((2, 6, 3, 8), seed=7), 2, axis=2)  # (q1, q2) pairs equal
  k = jnp.repeat(random_input((2, 6, 3, 8), seed=8), 2, axis=2)
  v = random_input((2, 6, 3, 16), seed=9)
  out = _diff_v1_attention_xla(q, k, v, 1.0)
  chex.assert_shape(out, (2, 6, 3, 16))
  np.testing.assert_array_equal(out, np.zeros_like(out))
  # RMSNorm of zero is zero (eps keeps it finite), so the layer output vanishes too.
  normed = layers.RMSNorm().apply({'params': {'scale': np.ones(16, np.float32)}}, out)
  np.testing.assert_array_equal(normed, np.zeros_like(normed))


def test_identical_maps_and_unit_lambda_silence_the_layer():
  cfg = tiny_config(d_model=32, n_heads=8, n_kv_heads=4)  # head width 4, GQA
  module, apply = _layer(cfg, 1)
  x = random_input((2, 7, 32), seed=10)
  tied = _tie_sub_heads(random_params(module, x, seed=10), cfg.head_dim)
  y_unit = apply(set_lambda(tied, 1.0, 1), x)
  y_half = apply(set_lambda(tied, 0.5, 1), x)
  # λ is 1 only up to float32 rounding (~1e-7), and the norm's eps keeps that residue small.
  assert np.max(np.abs(y_unit)) < 1e-3 * np.max(np.abs(y_half))
  assert_close(y_half, _reference_output(cfg, 1, set_lambda(tied, 0.5, 1), x))


def test_zero_lambda_is_one_softmax_attention():
  # With λ = 0 the layer is norm(A1 V) (1 - λ_init) W_o: one causal softmax attention of the q1/k1 sub-heads
  # over the 2d-wide values.
  cfg = tiny_config(d_model=32, n_heads=8, n_kv_heads=4)
  layer = 4
  module, apply = _layer(cfg, layer)
  x = random_input((2, 7, 32), seed=11)
  params = set_lambda(random_params(module, x, seed=11), 0.0, layer)
  p, x64 = to_float64(params), to_float64(x)
  positions = np.broadcast_to(np.arange(7), (2, 7))
  q = reference.rope((x64 @ p['q_proj']['kernel']).reshape(2, 7, 8, 4), positions, 10000.0, 'interleaved')
  k = reference.rope((x64 @ p['k_proj']['kernel']).reshape(2, 7, 4, 4), positions, 10000.0, 'interleaved')
  v = (x64 @ p['v_proj']['kernel']).reshape(2, 7, 2, 8)
  a1v = reference.softmax_attention(q[:, :, 0::2], k[:, :, 0::2], v)
  out = reference.rms_norm(a1v, p['subln']['scale']) * (1 - reference.lambda_init(layer))
  assert_close(apply(params, x), out.reshape(2, 7, 32) @ p['out_proj']['kernel'])


# --- Each mistake in the facts sheet is shown absent: diffjax matches the right formula, not the wrong one. ---


@pytest.fixture
def mistake_setup(full_precision_matmuls):  # pylint: disable=unused-argument
  # 4 differential heads over 2 kv groups (n_rep = 2) at depth 2: every mistake changes the output here.
  cfg = tiny_config(d_model=32, n_heads=8, n_kv_heads=4)
  layer = 2
  module, apply = _layer(cfg, layer)
  x = random_input((2, 8, 32), seed=13)
  params = set_lambda(random_params(module, x, seed=13), 0.6, layer, seed=13)
  right = reference.diff_v1_attention(to_float64(params), to_float64(x), num_heads=4, num_kv_heads=2, layer=layer)
  return dict(params=params, x=x, layer=layer, got=np.asarray(apply(params, x)), right=right)


def test_mistake_setup_matches_reference(mistake_setup):
  assert_close(mistake_setup['got'], mistake_setup['right'])


@pytest.mark.parametrize('mistake', reference.MISTAKES)
def test_v1_does_not_make_mistake(mistake_setup, mistake):
  s = mistake_setup
  wrong = reference.diff_v1_attention(to_float64(s['params']), to_float64(s['x']), num_heads=4, num_kv_heads=2,
                                      layer=s['layer'], mistake=mistake)
  assert relative_error(s['right'], wrong) > 0.05, 'the wrong formula must differ clearly for this test to mean much'
  assert relative_error(s['got'], s['right']) < 1e-5
  assert relative_error(s['got'], wrong) > 0.05


def test_v2_pairs_adjacent_query_heads():
  cfg = tiny_config(variant='diff_v2', n_heads=4, n_kv_heads=2)
  module, apply = _layer(cfg, 0)
  x = random_input((2, 8, cfg.d_model), seed=14)
  params = random_params(module, x, seed=14)
  p, x64 = to_float64(params), to_float64(x)
  right = reference.diff_v2_attention(p, x64, num_heads=4, num_kv_heads=2)
  wrong = reference.diff_v2_attention(p, x64, num_heads=4, num_kv_heads=2, mistake='halves_paired')
  got = apply(params, x)
  assert relative_error(got, right) < 1e-5
  assert relative_error(got, wrong) > 0.05


def test_diff_v1_attention_gqa_grouping():
  # Kernel-level check of the flash semantics: q1/q2 of head h read k1/k2 and V of kv group h // n_rep.
  q = random_input((1, 5, 8, 4), seed=15)  # 4 differential heads
  k = random_input((1, 5, 4, 4), seed=16)  # 2 kv groups
  v = random_input((1, 5, 2, 8), seed=17)
  lam = 0.3
  got = _diff_v1_attention_xla(q, k, v, lam)
  q64, k64, v64 = to_float64((q, k, v))
  for h in range(4):
    g = h // 2
    a1 = reference.attention_map(q64[:, :, 2 * h], k64[:, :, 2 * g], 0.5)
    a2 = reference.attention_map(q64[:, :, 2 * h + 1], k64[:, :, 2 * g + 1], 0.5)
    assert_close(got[:, :, h], (a1 - lam * a2) @ v64[:, :, g])


# --- Shapes, dtypes and finiteness, with and without jit. -----------------------------------------------------


class AttentionShapeTest(chex.TestCase):
  # float32 here; the model's test covers the default bfloat16 end to end.

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*VARIANTS)
  def test_shape_dtype_and_finite(self, variant):
    cfg = tiny_config(variant=variant)
    module = ATTENTION_BY_VARIANT[variant](cfg, 1)
    x = random_input((2, 8, cfg.d_model), seed=18)
    params = random_params(module, x, seed=18)
    y = self.variant(lambda p, x: module.apply({'params': p}, x))(params, x)
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, cfg.compute_dtype)
    chex.assert_tree_all_finite(y)


# --- Kernel selection. --------------------------------------------------------------------------------------


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='checks the error raised where there is no GPU')
def test_cudnn_without_gpu_is_a_config_error():
  with pytest.raises(ConfigError, match=r"^model\.attention_impl: 'cudnn' cannot run here \(there is no GPU\)"):
    attention.resolve_impl(tiny_config(attention_impl='cudnn', dtype='bfloat16'))
  cfg = tiny_config(attention_impl='cudnn', dtype='bfloat16')
  module = DiffAttentionV1(cfg, 0)
  x = random_input((1, 4, cfg.d_model))
  with pytest.raises(ConfigError, match='attention_impl'):
    module.apply({'params': random_params(module, x)}, x)


@pytest.mark.skipif(jax.default_backend() == 'gpu' and attention.tokamax_installed(),
                    reason='checks the error raised where tokamax cannot run')
def test_tokamax_where_it_cannot_run_is_a_config_error(monkeypatch):
  with pytest.raises(ConfigError, match=r"^model\.attention_impl: 'tokamax' needs an NVIDIA GPU and the tokamax "
                                        r"package \(pip install 'diffjax\[tokamax\]'"):
    attention.resolve_impl(tiny_config(attention_impl='tokamax', dtype='bfloat16'))


@pytest.mark.skipif(not attention.tokamax_installed(), reason="tokamax is not installed (pip install "
                                                             "'diffjax[tokamax]', Python 3.12+)")
@pytest.mark.parametrize('variant', ['diff_v1', 'baseline'])
@pytest.mark.parametrize('segments', [False, True])
def test_tokamax_path_matches_xla(variant, segments, monkeypatch):
  # tokamax's own XLA implementation stands in for its GPU kernel, which test_cudnn_gpu.py checks on a GPU: what is
  # checked here is the path around it (DIFF V1's maps against the 2d-wide values, the GQA layout, the document
  # mask and the scale), forward and backward.
  monkeypatch.setattr(attention, 'TOKAMAX_KERNEL', 'xla')
  b, t, heads, groups, d = 2, 128, 4, 2, 16
  q = jnp.asarray(random_input((b, t, 2 * heads if variant == 'diff_v1' else heads, d), seed=1))
  k = jnp.asarray(random_input((b, t, 2 * groups if variant == 'diff_v1' else groups, d), seed=2))
  v = jnp.asarray(random_input((b, t, groups, 2 * d if variant == 'diff_v1' else d), seed=3))
  segment_ids = jnp.asarray(np.cumsum(np.random.default_rng(4).random((b, t)) < 0.05, axis=1)) if segments else None

  def loss(impl, q, k, v):
    if variant == 'diff_v1':
      out = attention.diff_v1_attention(q, k, v, 0.37, impl, segment_ids_BxT=segment_ids)
    else:
      out = attention.softmax_attention(q, k, v, impl, segment_ids_BxT=segment_ids)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

  (value, grads), (want, want_grads) = (jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2))(q, k, v)
                                        for impl in ('tokamax', 'xla'))
  np.testing.assert_allclose(value, want, rtol=1e-5)
  for got, expected in zip(grads, want_grads):
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _kernel_stand_in(q_BxTxNxD, k_BxSxKxD, v_BxSxKxW, segment_ids_BxT):
  """cuDNN's function on the einsum path, in q's dtype: causal GQA attention, any value width (test_cudnn_gpu.py
  runs the kernels themselves on a GPU)."""
  b, t, n, d = q_BxTxNxD.shape
  kv = k_BxSxKxD.shape[2]
  out = attention._einsum_attention('btkrd,bskd->bkrts', 'bkrts,bskw->btkrw',
                                    q_BxTxNxD.reshape(b, t, kv, n // kv, d), k_BxSxKxD, v_BxSxKxW, None,
                                    segment_ids_BxT, None, lambda probs: {})
  return out.reshape(b, t, n, -1).astype(q_BxTxNxD.dtype)


def _run_cudnn_form(monkeypatch, form):
  monkeypatch.setattr(attention, '_wide_value_attention', _kernel_stand_in)
  monkeypatch.setattr(attention, '_cudnn_attention', _kernel_stand_in)
  monkeypatch.setattr(attention, 'resolve_impl', lambda *args, **kwargs: form)


@pytest.mark.parametrize('form', ['cudnn_wide', 'cudnn_split'])
def test_v1_layer_in_each_cudnn_form_matches_xla(form, monkeypatch):
  # The path around the kernel in each form (which heads meet which keys and which half of V, and where the split
  # form's two outputs are taken apart into the maps), forward and backward, with GQA and documents.
  cfg = tiny_config(variant='diff_v1')
  module, x = DiffAttentionV1(cfg, 1), jnp.asarray(random_input((2, 24, cfg.d_model), seed=1))
  segment_ids = jnp.asarray(np.repeat([[0] * 10 + [1] * 14], 2, axis=0))
  params = random_params(module, x, seed=2)
  probe = random_input((2, 24, cfg.d_model), seed=3)
  loss = lambda params: jnp.sum(module.apply({'params': params}, x, segment_ids_BxT=segment_ids) * probe)
  want, want_grads = jax.value_and_grad(loss)(params)
  _run_cudnn_form(monkeypatch, form)
  got, grads = jax.value_and_grad(loss)(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('form', ['cudnn_wide', 'cudnn_split'])
def test_v1_backward_pass_keeps_the_maps_outputs_not_float32_copies(form, monkeypatch):
  # A bfloat16 stand-in for cuDNN, in both of DIFF V1's forms. The head outputs (A1 V - λ A2 V, the per-head norm,
  # the (1 - λ_init) factor) are recomputed in the backward pass, so it keeps the maps' bf16 outputs and no float32
  # tensor of their shape: each such copy cost a write and a read of twice their bytes (0.9% of the seed step on
  # an H100, docs/performance.md).
  _run_cudnn_form(monkeypatch, form)
  cfg = tiny_config(variant='diff_v1', dtype='bfloat16')
  module, x = DiffAttentionV1(cfg, 1), jnp.asarray(random_input((2, 24, cfg.d_model), seed=1), jnp.bfloat16)
  params = random_params(module, x, seed=2)
  heads_shape = (2, 24, cfg.n_heads // 2, 2 * cfg.head_dim)  # (B, T, H, 2D): each map's output, the head outputs
  # The function jax.vjp returns is a pytree whose leaves are what the backward pass keeps.
  _, backward = jax.vjp(lambda params: module.apply({'params': params}, x), params)
  kept = [leaf.dtype for leaf in jax.tree.leaves(backward) if leaf.shape == heads_shape]
  assert kept.count(jnp.bfloat16) >= 2 and jnp.float32 not in kept, kept


def test_cudnn_needs_half_precision_everywhere():
  with pytest.raises(ConfigError, match=r'^model\.attention_impl: .*(no GPU|bfloat16)'):
    attention.resolve_impl(tiny_config(attention_impl='cudnn', dtype='float32'))


def test_resolve_impl_explicit_and_auto():
  assert attention.resolve_impl(tiny_config(attention_impl='xla', dtype='bfloat16')) == 'xla'
  expected_auto = 'cudnn' if jax.default_backend() == 'gpu' else 'xla'
  assert attention.resolve_impl(tiny_config(attention_impl='auto', dtype='bfloat16')) == expected_auto
  assert attention.resolve_impl(tiny_config(attention_impl='auto', dtype='float32')) == 'xla'
  # Decoding against a KV cache takes the einsum path whatever was chosen.
  assert attention.resolve_impl(tiny_config(attention_impl='auto', dtype='bfloat16'), cached=True) == 'xla'


@pytest.mark.parametrize('variant', ['baseline', 'diff_v2'])
def test_pallas_is_refused_for_variants_without_a_kernel(variant, monkeypatch):
  monkeypatch.setenv(pallas_attention.INTERPRET_ENV, '1')  # so that only the variant can be the reason
  refusal = rf"^model\.attention_impl: 'pallas' has a kernel for diff_v1 only, not {variant}"
  with pytest.raises(ConfigError, match=refusal):
    attention.resolve_impl(tiny_config(attention_impl='pallas', variant=variant, d_model=64))
  assert attention.resolve_impl(tiny_config(attention_impl='pallas', variant='diff_v1', d_model=64)) == 'pallas'


def test_cudnn_runs_diff_v1_wide_where_it_was_measured_faster(monkeypatch):
  """Wide at D = 64 at every length, at D = 128 up to T = 4096 (in the 1.4B model, docs/performance.md), split
  elsewhere and wherever cuDNN cannot take values wider than keys."""
  forms = lambda: {(d, t): attention.cudnn_diff_v1_form(d, t) for d in (64, 128, 256) for t in (2048, 4096, 8192)}
  monkeypatch.setattr(attention, 'cudnn_takes_wide_values', lambda: True)
  wide = {(64, 2048), (64, 4096), (64, 8192), (128, 2048), (128, 4096)}
  assert forms() == {shape: 'wide' if shape in wide else 'split' for shape in forms()}
  monkeypatch.setattr(attention, 'cudnn_takes_wide_values', lambda: False)
  assert set(forms().values()) == {'split'}


def test_the_run_names_its_attention_path():
  assert attention.describe_impl(tiny_config(attention_impl='xla'), seq_len=64) == 'xla'
  if jax.default_backend() != 'gpu':  # no cuDNN here to take wide values: DIFF V1's cuDNN form is the split one
    assert not attention.cudnn_takes_wide_values() and attention.cudnn_diff_v1_form(64, 2048) == 'split'
