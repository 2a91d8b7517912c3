"""The TPU path (JAX's splash-attention kernel) against the XLA path, in Pallas interpret mode on the CPU: values and
gradients of causal GQA attention with values of any width, with and without document segments, and DIFF V1 (each
map against the 2D-wide values) inside a layer. Its choice by `resolve_impl` is checked for a TPU target.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, random_input, random_params, tiny_config
from diffjax.errors import ConfigError
from diffjax.model import attention, kernels, splash
from diffjax.model.attention import DiffAttentionV1

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')

T = 256  # two of the TPU's 128-lane tiles per row of blocks: one tile of 256


def _segments():
  return jnp.asarray(np.repeat([[0] * 100 + [1] * 90 + [2] * 66], 2, axis=0), jnp.int32)


def _value_and_grads(fn, *inputs):
  probe = jnp.asarray(random_input(jax.eval_shape(fn, *inputs).shape, seed=9))
  return jax.value_and_grad(lambda *x: jnp.sum(fn(*x) * probe), argnums=tuple(range(len(inputs))))(*inputs)


@pytest.mark.parametrize('segments', [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize('heads,kv_heads', [pytest.param(4, 4, marks=pytest.mark.slow), (4, 2)])
def test_splash_matches_xla(segments, heads, kv_heads):
  q, k = (jnp.asarray(random_input((2, T, n, 32), seed=s)) * 1.5 for n, s in ((heads, 1), (kv_heads, 2)))
  v = jnp.asarray(random_input((2, T, kv_heads, 32), seed=3))
  segment_ids = _segments() if segments else None
  fast = lambda q, k, v: splash.splash_attention(q, k, v, segment_ids, interpret=True)
  plain = lambda q, k, v: attention.softmax_attention(q, k, v, 'xla', segment_ids_BxT=segment_ids)
  (value, grads), (want, want_grads) = _value_and_grads(fast, q, k, v), _value_and_grads(plain, q, k, v)
  assert_close(value, want, 1e-5)
  for got, expected in zip(grads, want_grads):
    assert_close(got, expected, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('segments', [False, True])
def test_diff_v1_with_wide_values_matches_xla(segments):
  """Each map against the 2D-wide values (GQA: 2 differential heads per kv group), with λ."""
  q = jnp.asarray(random_input((2, T, 8, 32), seed=1)) * 1.5
  k = jnp.asarray(random_input((2, T, 4, 32), seed=2))
  v = jnp.asarray(random_input((2, T, 2, 64), seed=3))
  segment_ids = _segments() if segments else None
  with attention.compiling_for('cpu'):
    run = lambda impl: lambda q, k, v, lam: attention.diff_v1_attention(q, k, v, lam, impl,
                                                                         segment_ids_BxT=segment_ids)
    (value, grads), (want, want_grads) = (_value_and_grads(run(impl), q, k, v, jnp.float32(0.6))
                                          for impl in ('splash', 'xla'))
  assert_close(value, want, 1e-5)
  for got, expected in zip(grads, want_grads):
    assert_close(got, expected, 1e-5)


@pytest.mark.slow
def test_diff_v1_layer_with_splash_matches_xla(monkeypatch):
  monkeypatch.setenv(kernels.INTERPRET_ENV, '1')
  x = jnp.asarray(random_input((1, T, 64)))
  xla, fast = (DiffAttentionV1(tiny_config(d_model=64, max_len=T, attention_impl=impl), layer=1)
               for impl in ('xla', 'splash'))
  params = random_params(xla, x)
  assert_close(fast.apply({'params': params}, x), xla.apply({'params': params}, x), 1e-5)
  grad = lambda layer: jax.grad(lambda p: jnp.sum(jnp.square(layer.apply({'params': p}, x))))(params)
  for got, expected in zip(jax.tree.leaves(grad(fast)), jax.tree.leaves(grad(xla))):
    assert_close(got, expected, 1e-5)


def test_resolve_impl_picks_splash_for_a_tpu(monkeypatch):
  monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)
  cfg = tiny_config(attention_impl='auto', dtype='bfloat16')
  with attention.compiling_for('tpu'):
    assert attention.resolve_impl(cfg, seq_len=1024) == 'splash'
    assert attention.resolve_impl(cfg, seq_len=8) == 'xla'  # state creation's few tokens
    assert attention.resolve_impl(cfg, seq_len=1024, cached=True) == 'xla'
    assert attention.describe_impl(tiny_config(attention_impl='splash'), seq_len=512) == 'splash'
  if jax.default_backend() == 'cpu':
    assert attention.resolve_impl(cfg, seq_len=1024) == 'xla'
    with pytest.raises(ConfigError, match=r"^model\.attention_impl: 'splash' needs a TPU"):
      attention.resolve_impl(tiny_config(attention_impl='splash'), seq_len=1024)


def test_inside_a_mesh_each_device_runs_the_kernel_on_its_shard():
  """Within the train step's mesh the kernel runs under shard_map (XLA cannot partition a Mosaic kernel)."""
  from diffjax.model import sharding
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  q = jnp.asarray(random_input((2, T, 4, 32), seed=1))
  k, v = (jnp.asarray(random_input((2, T, 2, 32), seed=s)) for s in (2, 3))
  fast = jax.jit(lambda q, k, v: splash.splash_attention(q, k, v, _segments(), interpret=True))
  with jax.set_mesh(mesh):
    assert 'shard_map' in str(jax.make_jaxpr(fast)(q, k, v))
    out = fast(q, k, v)
  assert_close(out, attention.softmax_attention(q, k, v, 'xla', segment_ids_BxT=_segments()), 1e-5)
