"""The fused Pallas DIFF V1 kernel against the XLA path of `diff_v1_attention`: values and gradients in q, k, v, λ.

On CPU the kernels run in Pallas interpret mode (the same kernel bodies, executed by XLA), at small shapes with
tiles smaller than the sequence so that the online softmax, the causal tile bounds and the backward loops all cross
tile boundaries. The kernels are also lowered to Triton IR for CUDA, which needs no GPU; the last test compiles
and runs them through Triton and runs only on an NVIDIA GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_close, lower_for_cuda, random_input, random_params, relative_error, tiny_config
from diffjax.errors import ConfigError
from diffjax.model import attention
from diffjax.model import kernels as pallas_attention
from diffjax.model.attention import DiffAttentionV1, MultiHeadAttention

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')

ON_GPU = jax.default_backend() == 'gpu'
LAMBDA = 0.6
# bfloat16 keeps 8 significant bits: two bf16 computations that round in different places differ by about 1% of
# the result's norm (the cuDNN tests use the same bounds).
BF16_FORWARD_TOL, BF16_GRAD_TOL = 2e-2, 4e-2


def _inputs(b, t, h, g, d, dtype=jnp.float32, seed=0):
  q = random_input((b, t, 2 * h, d), seed) * 1.5  # sharper maps, so that a wrong scale or mask shows
  k = random_input((b, t, 2 * g, d), seed + 1)
  v = random_input((b, t, g, 2 * d), seed + 2)
  return [jnp.asarray(x, dtype) for x in (q, k, v)]


def _pallas(block, interpret=True):
  return functools.partial(pallas_attention.diff_v1_flash_attention, block_q=block, block_k=block,
                           interpret=interpret)


def _xla(q, k, v, lam):
  return attention.diff_v1_attention(q, k, v, lam, 'xla')


@functools.lru_cache(maxsize=None)
def _value_and_grads(fn):
  """fn's output and the gradients of <output, cotangent> in (q, k, v, λ), from one forward."""
  def run(q, k, v, lam, cotangent):
    out, vjp = jax.vjp(fn, q, k, v, lam)
    return out, vjp(cotangent)
  return jax.jit(run)


def _compare(fn, b, t, h, g, d, dtype, forward_tol, grad_tol):
  q, k, v = _inputs(b, t, h, g, d, dtype)
  lam = jnp.float32(LAMBDA)
  cotangent = jnp.asarray(random_input((b, t, h, 2 * d), seed=9))
  out, grads = _value_and_grads(fn)(q, k, v, lam, cotangent)
  want_out, want_grads = _value_and_grads(_xla)(q, k, v, lam, cotangent)
  if dtype == jnp.float32:
    assert_close(out, want_out, forward_tol)
    for name, grad, want in zip(('q', 'k', 'v', 'λ'), grads, want_grads):
      assert grad.dtype == want.dtype, name
      assert_close(grad, want, grad_tol)
  else:
    assert relative_error(out, want_out) < forward_tol
    for name, grad, want in zip(('q', 'k', 'v', 'λ'), grads, want_grads):
      assert relative_error(grad.astype(jnp.float32), want.astype(jnp.float32)) < grad_tol, name


@pytest.mark.parametrize('b, t, h, g, d, block', [
    (1, 128, 2, 1, 32, 32),  # both differential heads in one kv group (GQA, R = 2)
    (2, 64, 2, 2, 16, 16),  # one kv group per head; two batch rows
])
def test_float32_values_and_gradients_match_xla(b, t, h, g, d, block):
  _compare(_pallas(block), b, t, h, g, d, jnp.float32, 1e-5, 1e-5)


def test_bfloat16_values_and_gradients_match_xla():
  _compare(_pallas(32), 1, 64, 2, 1, 32, jnp.bfloat16, BF16_FORWARD_TOL, BF16_GRAD_TOL)


@functools.lru_cache(maxsize=None)
def _forward(block):
  return jax.jit(_pallas(block))


def test_causal_future_keys_do_not_change_earlier_outputs():
  q, k, v = _inputs(1, 64, 2, 1, 16)
  cut = 37  # inside a tile, so the diagonal tile's mask matters
  k2 = k.at[:, cut:].set(jnp.asarray(random_input(k[:, cut:].shape, seed=5)))
  v2 = v.at[:, cut:].set(jnp.asarray(random_input(v[:, cut:].shape, seed=6)))
  out, out2 = _forward(16)(q, k, v, LAMBDA), _forward(16)(q, k2, v2, LAMBDA)
  np.testing.assert_array_equal(out[:, :cut], out2[:, :cut])
  assert not np.allclose(out[:, cut:], out2[:, cut:])


def test_gqa_head_reads_its_own_kv_group():
  # H = 4, G = 2: differential heads 0, 1 read kv group 0 (sub-heads k 0, 1 and value 0); heads 2, 3 group 1.
  q, k, v = _inputs(1, 64, 4, 2, 16)
  k2, v2 = k.at[:, :, 2:].multiply(-1.0), v.at[:, :, 1].multiply(-1.0)
  out, out2 = _forward(32)(q, k, v, LAMBDA), _forward(32)(q, k2, v2, LAMBDA)
  np.testing.assert_array_equal(out[:, :, :2], out2[:, :, :2])
  assert not np.allclose(out[:, :, 2:], out2[:, :, 2:])


def test_resolve_impl_pallas_needs_a_gpu_or_interpret_mode(monkeypatch):
  layer = lambda impl, dtype, head_width: tiny_config(attention_impl=impl, dtype=dtype, d_model=4 * head_width)
  monkeypatch.delenv(pallas_attention.INTERPRET_ENV, raising=False)
  if not ON_GPU:
    with pytest.raises(ConfigError, match=r"^model\.attention_impl: 'pallas' needs an NVIDIA GPU"):
      attention.resolve_impl(layer('pallas', 'bfloat16', 64))
  monkeypatch.setenv(pallas_attention.INTERPRET_ENV, '1')
  assert attention.resolve_impl(layer('pallas', 'float32', 64)) == 'pallas'
  assert attention.resolve_impl(layer('auto', 'float32', 64)) != 'pallas'  # not measured yet: never chosen by auto
  with pytest.raises(ConfigError, match="power-of-two head width"):
    attention.resolve_impl(layer('pallas', 'float32', 48))


def test_layers_with_pallas(monkeypatch):
  monkeypatch.setenv(pallas_attention.INTERPRET_ENV, '1')
  x = jnp.asarray(random_input((1, 64, 64)))
  xla, fused = (DiffAttentionV1(tiny_config(d_model=64, attention_impl=impl), layer=1) for impl in ('xla', 'pallas'))
  params = random_params(xla, x)
  assert_close(fused.apply({'params': params}, x), xla.apply({'params': params}, x), 1e-5)
  baseline = MultiHeadAttention(tiny_config(d_model=64, variant='baseline', attention_impl='pallas'), layer=0)
  with pytest.raises(ConfigError, match="'pallas' has a kernel for diff_v1 only"):
    baseline.init(jax.random.key(0), x)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_kernels_lower_to_triton(dtype):
  # Lowering for CUDA needs no GPU: it catches operations the Triton lowering lacks (it cannot slice a loaded tile,
  # for one) before a GPU ever runs the kernels. Compiling the Triton IR is the GPU test's job.
  q, k, v = _inputs(1, 128, 4, 2, 32, dtype)
  loss = lambda q, k, v, lam: jnp.sum(_pallas(64, interpret=False)(q, k, v, lam))
  lowered = lower_for_cuda(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(
      q, k, v, jnp.float32(LAMBDA)))
  assert lowered.as_text().count('__gpu$xla.gpu.triton') == 3  # forward, dq, dk/dv


@pytest.mark.skipif(not ON_GPU, reason='the compiled Triton kernel needs an NVIDIA GPU')
@pytest.mark.parametrize('d', [64, 128])
@pytest.mark.parametrize('g', [1, 2])
def test_compiled_kernel_matches_xla_on_gpu(d, g):
  # The default tiles for the head width: they must fit the card's shared memory.
  _compare(_pallas(None, interpret=False), 2, 256, 2, g, d, jnp.bfloat16, BF16_FORWARD_TOL, BF16_GRAD_TOL)
  _compare(_pallas(None, interpret=False), 1, 128, 2, g, d, jnp.float32, 1e-5, 1e-5)


def test_short_sequences_fall_back_to_xla():
  cfg = tiny_config(attention_impl='pallas', d_model=64)  # head width 16: tiles of 64
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv(pallas_attention.INTERPRET_ENV, '1')
    assert attention.resolve_impl(cfg, seq_len=128) == 'pallas'
    assert attention.resolve_impl(cfg, seq_len=32) == 'pallas'  # one tile, shortened to the sequence
    assert attention.resolve_impl(cfg, seq_len=8) == 'xla'  # state creation traces the model on 8 tokens
    assert attention.resolve_impl(cfg, seq_len=96) == 'xla'  # not a multiple of the tile
  assert pallas_attention.tile(128) * 2 * 128 * 2 <= 32 * 1024  # a 2D-wide bf16 tile at D = 128 stays <= 32 KiB


@pytest.mark.skipif(not ON_GPU, reason='the compiled Triton kernel needs an NVIDIA GPU')
@pytest.mark.parametrize('head_dim', [64, 128])
def test_model_trains_with_the_kernel_on_gpu(head_dim):
  """State creation (8 tokens, the XLA path), then train steps at 512 tokens with the kernel: the losses match
  the same steps on the XLA path to bf16 tolerance."""
  from helpers_training import single_device_mesh, tiny_model, train_config
  from diffjax.train import optim, step as train_step
  mesh, train_cfg = single_device_mesh(), train_config(steps=10, warmup_steps=1, grad_clip=1.0)
  tx = optim.make_optimizer(train_cfg)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, size=(4, 513), dtype=np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((4, 512), np.float32)}
  losses = {}
  for impl in ('xla', 'pallas'):
    cfg = tiny_model(d_model=4 * head_dim, n_heads=4, max_len=512, dtype='bfloat16', attention_impl=impl)
    state = train_step.init_state(cfg, tx, mesh, seed=0)
    train, _ = train_step.compile_steps(cfg, tx, optim.learning_rate_schedule(train_cfg), train_cfg, mesh)
    losses[impl] = []
    for _ in range(3):
      state, metrics = train(state, batch)
      losses[impl].append(float(metrics['loss']))
  np.testing.assert_allclose(losses['pallas'], losses['xla'], rtol=2e-2)
