"""The cuDNN flash-attention path against the XLA path, forward and backward, at bfloat16 tolerances.

Needs an NVIDIA GPU; elsewhere every test here is skipped. The shapes are ones cuDNN's fused attention accepts:
head width 64 or 128 and sequence lengths that are multiples of 64.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_input, random_params, tiny_config
from diffjax.model import attention
from diffjax.model.attention import ATTENTION_BY_VARIANT
from diffjax.model.config import ModelConfig

pytestmark = pytest.mark.skipif(jax.default_backend() != 'gpu',
                                reason=f'the cuDNN path needs an NVIDIA GPU; the backend here is '
                                       f'{jax.default_backend()}')

# bfloat16 keeps 8 significant bits (unit roundoff 2^-8 ~ 0.4%), so two bf16 computations of one function that
# round in different places differ by about 1% of the result's norm. On an H200 (JAX 0.11.2) cuDNN differed from
# XLA by 0.3-0.7% forward and by at most 1.5% in the gradients below.
FORWARD_TOL = 2e-2
GRAD_TOL = 4e-2

LAMBDA_VECTOR_KEYS = tuple(f"['{n}']" for n in attention.LAMBDA_VECTORS)

CASES = [
    # variant, baseline-count heads, kv heads, head width, sequence length
    ('diff_v1', 8, 8, 64, 128),  # MHA: 4 differential heads
    ('diff_v1', 8, 4, 64, 128),  # GQA: 4 differential heads over 2 kv groups
    ('diff_v1', 8, 2, 128, 64),  # GQA: 4 differential heads over 1 kv group
    ('diff_v2', 4, 2, 64, 128),
    ('diff_v2', 4, 4, 128, 64),
    ('baseline', 8, 4, 64, 128),
]
CASE_IDS = [f'{v}-h{h}-kv{kv}-d{d}-t{t}' for v, h, kv, d, t in CASES]


def _rel(actual, expected):
  """||actual - expected|| / ||expected||, in float64."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@functools.lru_cache(maxsize=None)
def _functions(cfg):
  """Jitted forward and gradient (with respect to params and input) of one layer at depth 2."""
  module = ATTENTION_BY_VARIANT[cfg.variant](cfg, 2)

  def forward(params, x):
    return module.apply({'params': params}, x.astype(cfg.compute_dtype)).astype(jnp.float32)

  def loss(params, x, probe):
    return jnp.sum(forward(params, x) * probe)

  return module, jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1)))


def _run_three_ways(case):
  """Outputs and gradients of cuDNN in bf16, XLA in bf16 and XLA in float32, from the same float32 params."""
  variant, n_heads, n_kv_heads, head_dim, seq = case
  cudnn = ModelConfig(variant=variant, d_model=n_heads * head_dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      dtype='bfloat16', attention_impl='cudnn').validated()
  configs = {'cudnn': cudnn, 'xla_bf16': dataclasses.replace(cudnn, attention_impl='xla'),
             'xla_f32': dataclasses.replace(cudnn, attention_impl='xla', dtype='float32')}
  x = random_input((2, seq, cudnn.d_model), seed=1)
  probe = random_input((2, seq, cudnn.d_model), seed=2)
  # λ vectors near their initial scale keep λ well below 1, as in training.
  params = random_params(_functions(cudnn)[0], x, seed=3, qk_gain=1.0, lambda_std=0.1)
  results = {}
  for name, cfg in configs.items():
    _, forward, grad = _functions(cfg)
    with jax.default_matmul_precision('float32' if cfg.dtype == 'float32' else 'default'):
      results[name] = (np.asarray(forward(params, x)), jax.tree.map(np.asarray, grad(params, x, probe)))
  return results


@pytest.fixture(scope='module', params=CASES, ids=CASE_IDS)
def three_ways(request):
  return _run_three_ways(request.param)


def test_layer_forward_matches_xla(three_ways):
  y_cudnn, y_bf16, y_f32 = (three_ways[k][0] for k in ('cudnn', 'xla_bf16', 'xla_f32'))
  assert np.all(np.isfinite(y_cudnn))
  assert _rel(y_cudnn, y_bf16) < FORWARD_TOL
  assert _rel(y_cudnn, y_f32) < FORWARD_TOL


def test_layer_gradients_match_xla(three_ways):
  grads = {k: jax.tree_util.tree_flatten_with_path(v[1])[0] for k, v in three_ways.items()}
  for (path, g_cudnn), (_, g_bf16), (_, g_f32) in zip(grads['cudnn'], grads['xla_bf16'], grads['xla_f32']):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g_cudnn)), name
    if name.endswith(LAMBDA_VECTOR_KEYS):
      # dL/dλ = -Σ c·(A2 V), with c the cotangent behind the per-head RMSNorm. The norm's Jacobian makes c
      # orthogonal to A1 V - λ A2 V, so the sum cancels to a small fraction of its terms (by a factor of
      # thousands for some weights), and cuDNN's bf16-rounded A2 V moves it by several percent. Here only the
      # direction is checked; test_diff_v1_attention_cudnn_matches_xla checks dλ without the norm, tightly.
      np.testing.assert_array_equal(np.sign(g_cudnn), np.sign(g_f32), err_msg=name)
      continue
    assert _rel(g_cudnn, g_bf16) < GRAD_TOL, (name, _rel(g_cudnn, g_bf16))
    assert _rel(g_cudnn, g_f32) < GRAD_TOL, (name, _rel(g_cudnn, g_f32))


@pytest.mark.parametrize('groups,heads,head_dim,seq', [(2, 4, 64, 128), (1, 2, 128, 64), (3, 3, 64, 192)])
def test_diff_v1_attention_cudnn_matches_xla(groups, heads, head_dim, seq):
  # The kernel alone: cuDNN runs each map against both halves of V, which must reproduce (A1 - λ A2) V of the
  # XLA path, including which kv group each differential head reads, forward and backward.
  q = jnp.asarray(random_input((2, seq, 2 * heads, head_dim), seed=4), jnp.bfloat16)
  k = jnp.asarray(random_input((2, seq, 2 * groups, head_dim), seed=5), jnp.bfloat16)
  v = jnp.asarray(random_input((2, seq, groups, 2 * head_dim), seed=6), jnp.bfloat16)
  probe = random_input((2, seq, heads, 2 * head_dim), seed=7)
  lam = jnp.float32(0.37)

  def loss(q, k, v, lam, impl):
    return jnp.sum(attention.diff_v1_attention(q, k, v, lam, impl) * probe)

  outputs = {impl: jax.jit(attention.diff_v1_attention, static_argnums=4)(q, k, v, lam, impl)
             for impl in ('cudnn', 'xla')}
  assert outputs['cudnn'].shape == (2, seq, heads, 2 * head_dim)
  assert _rel(outputs['cudnn'], outputs['xla']) < FORWARD_TOL
  grads = {impl: jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(q, k, v, lam, impl)
           for impl in ('cudnn', 'xla')}
  for name, g_cudnn, g_xla in zip('qkvλ', grads['cudnn'], grads['xla']):
    assert _rel(g_cudnn, g_xla) < GRAD_TOL, (name, _rel(g_cudnn, g_xla))


def test_auto_picks_cudnn_for_bf16():
  assert attention.resolve_impl(tiny_config(attention_impl='auto', dtype='bfloat16', d_model=512)) == 'cudnn'


@pytest.mark.parametrize('impl', ['cudnn', 'tokamax'])
@pytest.mark.parametrize('variant', ['diff_v1', 'baseline'])
def test_document_mask_cudnn_matches_xla(variant, impl):
  # Segment ids reach cuDNN and tokamax as a mask beside their causal one; the XLA path is checked against each
  # document alone in test_document_mask.py.
  _skip_unless_runs(impl)
  b, seq, d = 2, 128, 64
  rng = np.random.default_rng(8)
  segments = jnp.asarray(np.cumsum(rng.random((b, seq)) < 0.05, axis=1), jnp.int32)
  q = jnp.asarray(random_input((b, seq, 4, d), seed=4), jnp.bfloat16)
  k = jnp.asarray(random_input((b, seq, 2, d), seed=5), jnp.bfloat16)
  v_shape = (b, seq, 1, 2 * d) if variant == 'diff_v1' else (b, seq, 2, d)
  v = jnp.asarray(random_input(v_shape, seed=6), jnp.bfloat16)

  def run(q, k, v, impl):
    if variant == 'diff_v1':
      return attention.diff_v1_attention(q, k, v, 0.37, impl, segment_ids_BxT=segments)
    return attention.softmax_attention(q, k, v, impl, segment_ids_BxT=segments)

  probe = random_input(jax.eval_shape(functools.partial(run, impl='xla'), q, k, v).shape, seed=7)
  loss = lambda q, k, v, impl: jnp.sum(run(q, k, v, impl) * probe)
  fast, reference = (jax.jit(run, static_argnums=3)(q, k, v, i) for i in (impl, 'xla'))
  assert _rel(fast, reference) < FORWARD_TOL
  fast_grads, reference_grads = (jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, i)
                                 for i in (impl, 'xla'))
  for name, g_fast, g_xla in zip('qkv', fast_grads, reference_grads):
    assert _rel(g_fast, g_xla) < GRAD_TOL, (name, _rel(g_fast, g_xla))


def _skip_unless_runs(impl):
  if impl == 'cudnn_wide' and not attention.cudnn_takes_wide_values():
    pytest.skip('this cuDNN or GPU does not take values wider than keys')
  if impl == 'tokamax' and not attention.tokamax_installed():
    pytest.skip("tokamax is not installed (pip install 'diffjax[tokamax]')")


@pytest.mark.parametrize('impl', ['cudnn_wide', 'cudnn_split', 'tokamax'])
@pytest.mark.parametrize('segments', [False, True])
def test_diff_v1_cudnn_forms_match_xla(impl, segments):
  """Both cuDNN forms of DIFF V1 (one call per map on 2D-wide values; each map on both halves of V), and tokamax's
  Mosaic GPU kernel on 2D-wide values, against XLA."""
  _skip_unless_runs(impl)
  b, t, h, g, d = 2, 256, 4, 2, 64
  q, k = (jnp.asarray(random_input((b, t, 2 * n, d), seed=s), jnp.bfloat16) for n, s in ((h, 1), (g, 2)))
  v = jnp.asarray(random_input((b, t, g, 2 * d), seed=3), jnp.bfloat16)
  segment_ids = jnp.asarray(np.repeat([[0] * 100 + [1] * 156], b, axis=0), jnp.int32) if segments else None
  probe = jnp.asarray(random_input((b, t, h, 2 * d), seed=4))

  def loss(impl, q, k, v, lam):
    return jnp.sum(attention.diff_v1_attention(q, k, v, lam, impl, segment_ids_BxT=segment_ids) * probe)

  value_and_grads = lambda impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3)))
  (value, grads), (want, want_grads) = (value_and_grads(i)(q, k, v, jnp.float32(0.6)) for i in (impl, 'xla'))
  assert abs(float(value) - float(want)) <= FORWARD_TOL * abs(float(want))
  for got, expected in zip(grads, want_grads):
    assert _rel(got, expected) < GRAD_TOL


def test_hopper_runs_diff_v1_with_wide_values():
  # cuDNN 9.10+ on Hopper takes values wider than keys, so 'cudnn' can run the one-call-per-map form where it wins
  # (tests/test_attention.py::test_cudnn_runs_diff_v1_wide_where_it_was_measured_faster).
  if not any(getattr(device, 'compute_capability', '0') >= '9.0' for device in jax.devices()):
    pytest.skip('wide values need a Hopper GPU or newer')
  assert attention.cudnn_takes_wide_values()
  assert attention.cudnn_diff_v1_form(64, 2048) == 'wide'
