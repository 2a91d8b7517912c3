"""Document masking: with `model.document_mask`, a packed row computes what each of its documents computes alone.

Segment ids come from the EOS tokens of a row (`data.segment_ids`). The attention functions with segment ids equal
per-document calls exactly; the whole model on a packed row equals the model (and the float64 NumPy decoder) run
on each document by itself, since RoPE depends on relative positions only; the Pallas kernel with segment ids
equals the XLA path, values and gradients; and the train step refuses batches without segment ids.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from conftest import assert_close, lower_for_cuda, random_input, random_params, tiny_config, to_float64
from diffjax.data import pipeline as data_lib
from diffjax.model import attention, losses
from diffjax.model import kernels as pallas_attention
from diffjax.model import transformer as model_lib

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')

EOS = 7
# A row of three documents: the first continues one that began in an earlier row; the other two open with EOS.
ROW = np.array([3, 9, 4, 12, 5, EOS, 8, 2, 11, 6, 15, 1, 13, 10, 2, EOS, 4, 4, 9, 16, 3, 14, 5, 8], np.int32)
SEGMENTS = np.array([0] * 5 + [1] * 10 + [2] * 9, np.int32)


def _documents(segments_T):
  """(start, end) of each document of a row."""
  bounds = np.flatnonzero(np.diff(segments_T)) + 1
  return list(zip([0, *bounds], [*bounds, len(segments_T)]))


def test_segment_ids_open_a_document_at_each_eos():
  np.testing.assert_array_equal(data_lib.segment_ids(ROW[None], EOS)[0], SEGMENTS)
  # The EOS input predicts the next document's first token, so it belongs to that document.
  assert data_lib.segment_ids(np.array([[EOS, 1, EOS, EOS]]), EOS).tolist() == [[1, 1, 2, 3]]


def _random_segments(b, t, seed):
  """Segment ids of rows cut at random places (several cuts inside a tile, and documents of one token)."""
  rng = np.random.default_rng(seed)
  starts = rng.random((b, t)) < 0.15
  starts[:, 0] = False
  starts[0, 5] = starts[0, 6] = True  # a one-token document
  return np.cumsum(starts, axis=1).astype(np.int32)


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['diff_v1', 'baseline'])
def test_attention_with_segments_equals_each_document_alone(variant):
  b, t, d = 2, 32, 8
  segments = _random_segments(b, t, seed=3)
  if variant == 'diff_v1':
    q, k, v = (jnp.asarray(random_input(shape, seed)) for seed, shape in enumerate(
        [(b, t, 4, d), (b, t, 2, d), (b, t, 1, 2 * d)]))
    run = lambda q, k, v, segments=None: attention.diff_v1_attention(q, k, v, 0.4, 'xla', segment_ids_BxT=segments)
  else:
    q, k, v = (jnp.asarray(random_input(shape, seed)) for seed, shape in enumerate(
        [(b, t, 4, d), (b, t, 2, d), (b, t, 2, d)]))
    run = lambda q, k, v, segments=None: attention.softmax_attention(q, k, v, 'xla', segment_ids_BxT=segments)
  packed = np.asarray(run(q, k, v, jnp.asarray(segments)))
  for row in range(b):
    for start, end in _documents(segments[row]):
      alone = run(*(x[row:row + 1, start:end] for x in (q, k, v)))
      np.testing.assert_allclose(packed[row, start:end], np.asarray(alone)[0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(packed, np.asarray(run(q, k, v)))  # without segments, documents do see each other


@functools.lru_cache(maxsize=None)
def _model(variant, scan_layers):
  cfg = tiny_config(variant=variant, document_mask=True, scan_layers=scan_layers)
  module = model_lib.Transformer(cfg)
  unscanned = model_lib.Transformer(tiny_config(variant=variant, document_mask=True))
  params = random_params(unscanned, jnp.zeros((1, 8), jnp.int32))
  if scan_layers:
    params = model_lib.stack_layers(cfg, params)
  forward = jax.jit(lambda tokens, segments=None: module.apply({'params': params}, tokens, segment_ids_BxT=segments))
  return cfg, params, forward


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('variant', ['diff_v1', 'diff_v2', 'baseline'])
def test_packed_row_equals_each_document_alone(variant, scan_layers):
  cfg, params, forward = _model(variant, scan_layers)
  packed = np.asarray(forward(jnp.asarray(ROW[None]), jnp.asarray(SEGMENTS[None])))[0]
  flat_params = model_lib.unstack_layers(cfg, params)
  for start, end in _documents(SEGMENTS):
    alone = np.asarray(forward(jnp.asarray(ROW[None, start:end])))[0]
    assert_close(packed[start:end], alone, 2e-5)
    if not scan_layers:  # the float64 decoder of the equations, on the document by itself
      want = reference.decoder(to_float64(flat_params), ROW[None, start:end], variant=variant,
                               n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads)[0]
      assert_close(packed[start:end], want, 2e-5)
  # Without the mask the later documents read the earlier ones.
  assert not np.allclose(packed[5:], np.asarray(forward(jnp.asarray(ROW[None])))[0, 5:], atol=1e-3)


@pytest.mark.slow
def test_train_step_needs_segment_ids_with_document_mask():
  cfg = tiny_config(document_mask=True)
  params = random_params(model_lib.Transformer(cfg), jnp.zeros((1, 8), jnp.int32))
  batch = {'inputs': ROW[None, :-1], 'targets': ROW[None, 1:], 'mask': np.ones((1, len(ROW) - 1), np.float32)}
  with pytest.raises(ValueError, match='model.document_mask needs batches with segment_ids'):
    losses.token_losses(cfg, params, batch, 0.0)
  batch['segment_ids'] = data_lib.segment_ids(batch['inputs'], EOS)
  masked = losses.token_losses(cfg, params, batch, 0.0)[0]
  plain = losses.token_losses(tiny_config(), params, batch, 0.0)[0]
  assert np.isfinite(masked) and not np.isclose(masked, plain)
  # The chunked loss reads the same masked hidden states.
  chunked = losses.token_losses(cfg, params, batch, 0.0, chunk_tokens=7)[0]
  np.testing.assert_allclose(chunked, masked, rtol=1e-5)


# -- the Pallas kernel with segment ids ------------------------------------------------------------------------------

def _vjp(fn, q, k, v, lam, cotangent):
  out, pullback = jax.vjp(fn, q, k, v, lam)
  return out, pullback(cotangent)


@pytest.mark.parametrize('b, t, h, g, d, block', [(1, 64, 2, 1, 16, 16), (2, 64, 2, 2, 16, 32)])
def test_pallas_with_segments_matches_xla(b, t, h, g, d, block):
  segments = jnp.asarray(_random_segments(b, t, seed=b))
  q = jnp.asarray(random_input((b, t, 2 * h, d), 0) * 1.5)
  k, v = jnp.asarray(random_input((b, t, 2 * g, d), 1)), jnp.asarray(random_input((b, t, g, 2 * d), 2))
  cotangent = jnp.asarray(random_input((b, t, h, 2 * d), 9))
  fused = functools.partial(pallas_attention.diff_v1_flash_attention, segment_ids_BxT=segments, block_q=block,
                            block_k=block, interpret=True)
  plain = lambda q, k, v, lam: attention.diff_v1_attention(q, k, v, lam, 'xla', segment_ids_BxT=segments)
  out, grads = jax.jit(functools.partial(_vjp, fused))(q, k, v, jnp.float32(0.6), cotangent)
  want_out, want_grads = jax.jit(functools.partial(_vjp, plain))(q, k, v, jnp.float32(0.6), cotangent)
  assert_close(out, want_out, 1e-5)
  for grad, want in zip(grads, want_grads):
    assert_close(grad, want, 1e-5)


def test_pallas_kernels_with_segments_lower_to_triton():
  q = jnp.asarray(random_input((1, 128, 4, 32)), jnp.bfloat16)
  k, v = jnp.asarray(random_input((1, 128, 4, 32), 1), jnp.bfloat16), jnp.asarray(random_input((1, 128, 2, 64), 2),
                                                                                 jnp.bfloat16)
  segments = jnp.asarray(_random_segments(1, 128, seed=0))
  loss = lambda q, k, v, lam: jnp.sum(pallas_attention.diff_v1_flash_attention(
      q, k, v, lam, segment_ids_BxT=segments, block_q=64, block_k=64, interpret=False))
  lowered = lower_for_cuda(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).trace(
      q, k, v, jnp.float32(0.6)))
  assert lowered.as_text().count('__gpu$xla.gpu.triton') == 3  # forward, dq, dk/dv
