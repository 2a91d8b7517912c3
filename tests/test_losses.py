"""The chunked vocabulary loss: the plain full-logits loss's sums and gradients, a chunk of tokens at a time."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import jit
from diffjax.model import losses
from diffjax.model import transformer as model_lib
from diffjax.train import optim
from diffjax.train import step as train_step
from helpers_training import random_params, sharded_state, single_device_mesh, tiny_model, train_config

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')

BATCH, SEQ = 3, 10  # 30 tokens: a chunk of 7 leaves 5 mask-0 rows to fill the last chunk
Z_LOSS = 0.5


def padded_mask(rng, shape) -> np.ndarray:
  """Row 1 ends in padding, a few interior tokens are masked too, and the last row is full."""
  mask = (rng.random(shape) > 0.2).astype(np.float32)
  mask[1, shape[1] // 2:] = 0
  mask[-1] = 1
  return mask


def make_batch(cfg, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, SEQ + 1), dtype=np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': padded_mask(rng, (BATCH, SEQ))}


# --- The loss module against float64 NumPy. -------------------------------------------------------------------


def numpy_losses(hidden, kernel, targets, mask, z_loss):
  """(cross-entropy sum, z-loss sum, token count) and their gradients w.r.t. hidden and kernel, in float64."""
  hidden, kernel = np.asarray(hidden, np.float64), np.asarray(kernel, np.float64)
  logits = hidden @ kernel
  top = logits.max(-1, keepdims=True)
  lse = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
  probs = np.exp(logits - lse[..., None])
  target_logit = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  sums = (float(((lse - target_logit) * mask).sum()), float((z_loss * lse**2 * mask).sum()), float(mask.sum()))
  # d(ce + z)/dlogits = softmax - onehot(target) + 2 z lse softmax, on real tokens only.
  onehot = np.eye(kernel.shape[1])[targets]
  dlogits = (probs - onehot + 2 * z_loss * lse[..., None] * probs) * mask[..., None]
  return sums, dlogits @ kernel.T, np.einsum('bte,btv->ev', hidden, dlogits)


def test_cross_entropy_matches_float64_and_optax():
  rng = np.random.default_rng(4)
  logits = (rng.normal(size=(BATCH, SEQ, 37)) * 3).astype(np.float32)
  targets = rng.integers(0, 37, (BATCH, SEQ)).astype(np.int32)
  (ce, lse), vjp = jax.vjp(lambda x: losses.cross_entropy(x, targets), logits)
  x64 = logits.astype(np.float64)
  expected_lse = np.log(np.exp(x64).sum(-1))
  expected_ce = expected_lse - np.take_along_axis(x64, targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(ce, expected_ce, rtol=1e-6, atol=1e-6 * np.abs(expected_lse).max())  # float32 lse - logit
  np.testing.assert_allclose(lse, expected_lse, rtol=1e-6)
  np.testing.assert_array_equal(ce, optax.softmax_cross_entropy_with_integer_labels(logits, targets))
  weights = rng.normal(size=(BATCH, SEQ))  # an arbitrary cotangent for ce, none for lse
  (d_logits,) = vjp((jnp.asarray(weights, jnp.float32), jnp.zeros((BATCH, SEQ), jnp.float32)))
  expected = (np.exp(x64 - expected_lse[..., None]) - np.eye(37)[targets]) * weights[..., None]
  np.testing.assert_allclose(d_logits, expected, rtol=1e-5, atol=1e-6)


def test_cross_entropy_gradient_has_no_scatter():
  """The target's logit is picked by an index comparison, so the backward pass builds no (tokens, V) scatter."""
  logits, targets = jnp.zeros((BATCH, SEQ, 37)), jnp.zeros((BATCH, SEQ), jnp.int32)
  program = jax.jit(jax.grad(lambda x: jnp.sum(losses.cross_entropy(x, targets)[0]))).lower(logits).as_text()
  assert 'scatter' not in program
  gathered = lambda x: jnp.sum(jnp.take_along_axis(x, targets[..., None], axis=-1))  # what the check would catch
  assert 'scatter' in jax.jit(jax.grad(gathered)).lower(logits).as_text()


def test_a_zero_z_loss_is_not_computed():
  lse, mask = jnp.full((4,), jnp.inf), jnp.ones((4,))  # a computed 0 * inf would be nan
  assert float(losses.z_term(0.0, lse, mask)) == 0.0
  assert float(losses.z_term(0.5, jnp.full((4,), 2.0), mask)) == 8.0


@functools.cache
def _module_fn(z_loss: float, chunk: int):
  def total(hidden, kernel, targets, mask):
    ce, z, tokens = losses.chunked_token_losses(hidden, kernel, targets, mask, z_loss, chunk)
    return ce + z, (ce, z, tokens)
  return jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize('chunk', [1, 7, 10, 30, 64])  # one token, not dividing, dividing, all, more than all
def test_chunked_losses_match_float64(chunk):
  rng = np.random.default_rng(1)
  hidden = rng.normal(size=(BATCH, SEQ, 16)).astype(np.float32)
  kernel = (rng.normal(size=(16, 37)) / 2).astype(np.float32)
  targets = rng.integers(0, 37, (BATCH, SEQ)).astype(np.int32)
  mask = padded_mask(rng, (BATCH, SEQ))
  (_, sums), (d_hidden, d_kernel) = _module_fn(Z_LOSS, chunk)(hidden, kernel, targets, mask)
  expected, expected_d_hidden, expected_d_kernel = numpy_losses(hidden, kernel, targets, mask, Z_LOSS)
  np.testing.assert_allclose([float(s) for s in sums], expected, rtol=1e-5)
  assert sums[2] == mask.sum()
  np.testing.assert_allclose(d_hidden, expected_d_hidden, rtol=1e-5, atol=1e-6 * np.abs(expected_d_hidden).max())
  np.testing.assert_allclose(d_kernel, expected_d_kernel, rtol=1e-5, atol=1e-6 * np.abs(expected_d_kernel).max())
  np.testing.assert_array_equal(np.asarray(d_hidden)[mask == 0], 0.0)  # padding gets no gradient


def test_padding_contributes_nothing_in_any_bit():
  """Changing what padded positions hold (hidden states, targets) changes no sum and no gradient of a real token."""
  rng = np.random.default_rng(2)
  hidden = rng.normal(size=(BATCH, SEQ, 16)).astype(np.float32)
  kernel = rng.normal(size=(16, 37)).astype(np.float32)
  targets = rng.integers(0, 37, (BATCH, SEQ)).astype(np.int32)
  mask = padded_mask(rng, (BATCH, SEQ))
  changed_hidden, changed_targets = hidden.copy(), targets.copy()
  changed_hidden[mask == 0] = 100.0
  changed_targets[mask == 0] = (targets[mask == 0] + 1) % 37
  fn = _module_fn(Z_LOSS, 7)
  (_, sums), (d_hidden, _) = fn(hidden, kernel, targets, mask)
  (_, changed_sums), (changed_d_hidden, _) = fn(changed_hidden, kernel, changed_targets, mask)
  assert [float(s) for s in sums] == [float(s) for s in changed_sums]
  np.testing.assert_array_equal(np.asarray(d_hidden)[mask == 1], np.asarray(changed_d_hidden)[mask == 1])


def test_backward_pass_keeps_no_logits():
  """What the forward pass leaves for the backward (the leaves of the VJP closure) holds nothing of vocabulary
  width but the kernel itself: each chunk's logits are recomputed, not kept."""
  rng = np.random.default_rng(3)
  e, v = 16, 37
  hidden, kernel = rng.normal(size=(BATCH, SEQ, e)).astype(np.float32), rng.normal(size=(e, v)).astype(np.float32)
  targets, mask = rng.integers(0, v, (BATCH, SEQ)).astype(np.int32), padded_mask(rng, (BATCH, SEQ))
  total = lambda h, k: sum(losses.chunked_token_losses(h, k, targets, mask, Z_LOSS, 7)[:2])
  _, vjp = jax.vjp(total, hidden, kernel)
  saved = [leaf.shape for leaf in jax.tree.leaves(vjp)]
  assert (e, v) in saved
  assert [shape for shape in saved if v in shape and shape != (e, v)] == [], saved


# --- The model's hidden states and output projection. ---------------------------------------------------------


@pytest.mark.parametrize('tie', [False, True])
@pytest.mark.parametrize('scan', [False, True])
def test_hidden_states_times_the_output_kernel_are_the_logits(tie, scan):
  cfg = tiny_model(tie_embeddings=tie, scan_layers=scan)
  params, inputs = random_params(cfg), make_batch(cfg)['inputs']
  transformer = model_lib.Transformer(cfg)
  hidden_BxTxE = transformer.apply({'params': params}, inputs, return_hidden=True)
  assert hidden_BxTxE.shape == (BATCH, SEQ, cfg.d_model)
  np.testing.assert_allclose(hidden_BxTxE @ model_lib.output_kernel(cfg, params),
                             transformer.apply({'params': params}, inputs), rtol=1e-5, atol=1e-5)


def test_hidden_states_are_in_the_compute_dtype():
  cfg = tiny_model(dtype='bfloat16')
  hidden = model_lib.Transformer(cfg).apply({'params': random_params(cfg)}, make_batch(cfg)['inputs'],
                                            return_hidden=True)
  assert hidden.dtype == jnp.bfloat16


# --- The chunked path in the train step equals the plain one. ------------------------------------------------


@functools.cache
def _token_losses_fn(cfg, chunk: int):
  def total(params, batch):
    ce, z, tokens = losses.token_losses(cfg, params, batch, Z_LOSS, chunk)
    return ce + z, (ce, z, tokens)
  return jit(jax.value_and_grad(total, has_aux=True))


def assert_trees_close(actual, expected, rtol=1e-5, floor=1e-6):
  """Leafwise relative comparison, with an absolute floor at `floor` times the leaf's largest entry."""
  def check(path, a, e):
    e = np.asarray(e)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=floor * np.max(np.abs(e)), err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, actual, expected)


MODEL_CASES = [
    dict(chunk=7),
    dict(chunk=7, tie_embeddings=True),
    dict(chunk=10),
    dict(chunk=64, tie_embeddings=True),
    dict(chunk=7, tie_embeddings=True, scan_layers=True),
    dict(chunk=7, scan_layers=True, remat=True, remat_policy='dots'),
]
MODEL_IDS = ['-'.join(f'{k}={v}' for k, v in case.items()) for case in MODEL_CASES]


@pytest.mark.parametrize('case', MODEL_CASES, ids=MODEL_IDS)
def test_chunked_token_losses_and_gradients_equal_the_plain_path(case):
  case = dict(case)
  chunk = case.pop('chunk')
  cfg = tiny_model(**case)
  params, batch = random_params(cfg), make_batch(cfg)
  (_, plain), plain_grads = _token_losses_fn(cfg, 0)(params, batch)
  (_, chunked), chunked_grads = _token_losses_fn(cfg, chunk)(params, batch)
  np.testing.assert_allclose([float(s) for s in chunked], [float(s) for s in plain], rtol=1e-5)
  assert float(chunked[1]) > 0.1 * float(chunked[0])  # the z-loss term weighs in the gradient compared
  assert float(chunked[2]) == batch['mask'].sum() < BATCH * SEQ
  assert_trees_close(chunked_grads, plain_grads)


def test_chunked_path_in_bfloat16_agrees_to_its_precision():
  """In bfloat16 the plain path rounds its logits to bfloat16 and the chunked one keeps them float32: they agree to
  bfloat16's precision, not bit for bit."""
  cfg = tiny_model(dtype='bfloat16', tie_embeddings=True)
  params, batch = random_params(cfg), make_batch(cfg)
  (_, plain), plain_grads = _token_losses_fn(cfg, 0)(params, batch)
  (_, chunked), chunked_grads = _token_losses_fn(cfg, 7)(params, batch)
  np.testing.assert_allclose([float(s) for s in chunked], [float(s) for s in plain], rtol=1e-2)
  for a, e in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(plain_grads)):
    assert a.dtype == jnp.float32
    assert np.linalg.norm(np.asarray(a) - e) <= 0.1 * np.linalg.norm(e)


# --- A whole compiled train step. -----------------------------------------------------------------------------

LEARNING_RATE = 1e-2
# b1 = 0 makes Adam's first moment the gradient itself, so the test can compare the gradients a step used.
STEP_CONFIG = dict(learning_rate=LEARNING_RATE, warmup_steps=1, steps=100, decay='constant', b1=0.0, z_loss=Z_LOSS)


def run_steps(cfg, chunk: int, microbatches: int, batches) -> dict:
  train_cfg = train_config(loss_chunk_tokens=chunk, microbatches=microbatches, **STEP_CONFIG)
  tx, mesh = optim.make_optimizer(train_cfg), single_device_mesh()
  train, evaluate = train_step.compile_steps(cfg, tx, optim.learning_rate_schedule(train_cfg), train_cfg, mesh)
  state, metrics = sharded_state(cfg, tx, mesh, random_params(cfg)), []
  for batch in batches:
    state, step_metrics = train(state, batch)
    metrics.append({key: float(step_metrics[key]) for key in ('loss', 'grad_norm', 'tokens')})
  return {'metrics': metrics, 'eval': {k: float(v) for k, v in evaluate(state['params'], batches[0]).items()},
          'grads': jax.device_get(optax.tree_utils.tree_get(state['opt_state'], 'mu')),
          'params': jax.device_get(state['params'])}


@pytest.mark.slow
@pytest.mark.parametrize('microbatches', [1, 2])
def test_train_step_with_chunks_gives_the_same_parameters(microbatches):
  cfg = tiny_model(tie_embeddings=True)
  rng = np.random.default_rng(3)
  batches = []
  for _ in range(3):  # the first step runs at learning rate 0; the next two move the weights
    tokens = rng.integers(0, cfg.vocab_size, (4, SEQ + 1), dtype=np.int32)
    batches.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': padded_mask(rng, (4, SEQ))})
  plain = run_steps(cfg, 0, microbatches, batches)
  chunked = run_steps(cfg, 7, microbatches, batches)
  for got, want in zip(chunked['metrics'], plain['metrics']):
    np.testing.assert_allclose([got['loss'], got['grad_norm']], [want['loss'], want['grad_norm']], rtol=1e-5)
    assert got['tokens'] == want['tokens']
  assert len({m['loss'] for m in plain['metrics']}) == 3  # the steps changed the weights
  np.testing.assert_allclose(chunked['eval']['loss_sum'], plain['eval']['loss_sum'], rtol=1e-5)
  assert chunked['eval']['tokens'] == plain['eval']['tokens']
  # The gradient sums the same float32 terms in another order, over chunks and microbatches, with a z-loss term
  # that outweighs the cross-entropy: entries that cancel to near zero differ by a few 1e-6 of the leaf's largest.
  assert_trees_close(chunked['grads'], plain['grads'], floor=1e-5)
  # Adam divides by sqrt(v): where a gradient is near zero, float32 noise moves a parameter by a fraction of the
  # learning rate, while a wrong update would move it by the learning rate itself.
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=0.02 * LEARNING_RATE),
               chunked['params'], plain['params'])

