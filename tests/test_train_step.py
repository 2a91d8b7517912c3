"""Tests of the compiled train step: gradient accumulation, the masked loss, z-loss and non-finite steps."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.model import losses
from diffjax.model import transformer as model_lib
from diffjax.train import optim
from diffjax.train import step as train_step
from helpers_training import random_params, sharded_state, single_device_mesh, tiny_model, train_config

CFG = tiny_model()
BATCH, SEQ = 8, 16
PEAK, WARMUP = 1e-2, 4
# b1 = 0 makes Adam's first moment the gradient itself, so a test can read the gradient a step used; b2 = 0 makes
# every update lr * g / (|g| + eps), so the size of a step on a non-decayed parameter is the learning rate applied.
# Clipping is off so that gradients are compared unscaled.
STEP_CONFIG = dict(learning_rate=PEAK, warmup_steps=WARMUP, steps=100, decay='constant', b1=0.0, b2=0.0,
                   grad_clip=0.0, weight_decay=0.1)


def compiled_step(microbatches: int = 1, z_loss: float = 0.0):
  """(optimizer, train step) as the trainer compiles them, on a one-device mesh; compiled once per setting."""
  return _compiled_step(microbatches, float(z_loss))  # one cache key per setting, however it was spelled


@functools.cache
def _compiled_step(microbatches: int, z_loss: float):
  train_cfg = train_config(microbatches=microbatches, z_loss=z_loss, **STEP_CONFIG)
  tx = optim.make_optimizer(train_cfg)
  train, _ = train_step.compile_steps(CFG, tx, optim.learning_rate_schedule(train_cfg), train_cfg,
                                      single_device_mesh())
  return tx, train


def fresh_state(microbatches: int = 1, z_loss: float = 0.0):
  tx, _ = compiled_step(microbatches, z_loss)
  return sharded_state(CFG, tx, single_device_mesh(), random_params(CFG))


def make_batch(seed: int) -> dict:
  """Random tokens with padding (mask 0) spread unevenly, so microbatches hold different numbers of real tokens.

  Even rows are full, odd rows keep 3 real tokens and row 5 none; two interior targets are masked as well.
  """
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int32)
  mask = np.ones((BATCH, SEQ), np.float32)
  mask[1::2, 3:] = 0
  mask[5] = 0
  mask[0, 4] = mask[2, 9] = 0
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': mask}


def host_copy(tree):
  """A NumPy copy that outlives the device buffers, which the next step receives donated."""
  return jax.tree.map(np.array, jax.device_get(tree))


def gradient_of(state) -> dict:
  """The gradient the last step used: with b1 = 0 it is Adam's first moment."""
  return host_copy(optax.tree_utils.tree_get(state['opt_state'], 'mu'))


def optimizer_count(state) -> int:
  counts = {int(c) for _, c in optax.tree_utils.tree_get_all_with_path(state['opt_state'], 'count')}
  assert len(counts) == 1, counts
  return counts.pop()


def assert_trees_close(actual, expected, rtol, floor):
  """Leafwise relative comparison, with an absolute floor at `floor` times the leaf's largest entry."""
  def check(path, a, e):
    e = np.asarray(e)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=floor * np.max(np.abs(e)), err_msg=jax.tree_util.keystr(path))
  jax.tree_util.tree_map_with_path(check, actual, expected)


def assert_trees_equal(actual, expected):
  jax.tree_util.tree_map_with_path(
      lambda path, a, e: np.testing.assert_array_equal(a, e, err_msg=jax.tree_util.keystr(path)), actual, expected)


def run_two_steps(microbatches: int) -> dict:
  """Loss and gradient of step 1, loss of step 2 and the parameters after step 2 (step 1 runs at lr 0)."""
  _, train = compiled_step(microbatches)
  state, first = train(fresh_state(microbatches), make_batch(1))
  grads = gradient_of(state)
  state, second = train(state, make_batch(2))
  return {'loss': [float(first['loss']), float(second['loss'])], 'grad_norm': float(first['grad_norm']),
          'tokens': float(first['tokens']), 'grads': grads, 'params': host_copy(state['params'])}


@pytest.fixture(scope='module')
def one_big_batch():
  return run_two_steps(1)


@pytest.mark.parametrize('microbatches', [2, 4])
def test_accumulation_equals_one_big_batch(one_big_batch, microbatches):
  got = run_two_steps(microbatches)
  assert got['tokens'] == one_big_batch['tokens'] == make_batch(1)['mask'].sum()
  np.testing.assert_allclose(got['loss'], one_big_batch['loss'], rtol=1e-6)
  np.testing.assert_allclose(got['grad_norm'], one_big_batch['grad_norm'], rtol=1e-5)
  assert_trees_close(got['grads'], one_big_batch['grads'], rtol=1e-5, floor=1e-6)
  assert_trees_close(got['params'], one_big_batch['params'], rtol=1e-5, floor=1e-6)


def test_accumulation_weights_microbatches_by_their_tokens():
  """The two microbatches of k=2 hold 62 and 9 real tokens: a plain mean of their mean losses would be off."""
  batch = make_batch(1)
  per_microbatch = [batch['mask'][i::2].sum() for i in range(2)]
  assert per_microbatch[0] > 4 * per_microbatch[1]  # so the test below could tell the two means apart
  _, train = compiled_step(2)
  _, metrics = train(fresh_state(2), batch)
  reference = numpy_masked_loss(random_params(CFG), batch)
  np.testing.assert_allclose(float(metrics['loss']), reference, rtol=1e-6)


@functools.cache
def _logits_fn():
  return jax.jit(lambda params, inputs: model_lib.Transformer(CFG).apply({'params': params}, inputs))


def numpy_masked_loss(params, batch, z_loss: float = 0.0) -> float:
  """Mean over real tokens of -log softmax(logits)[target] (+ z * logsumexp^2), in float64 NumPy."""
  logits = np.asarray(_logits_fn()(params, batch['inputs']), np.float64)
  top = logits.max(-1, keepdims=True)
  lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
  log_probs = logits - lse[..., None]
  nll = -np.take_along_axis(log_probs, batch['targets'][..., None], axis=-1)[..., 0]
  mask = batch['mask']
  return float(((nll + z_loss * lse**2) * mask).sum() / mask.sum())


def test_loss_is_the_masked_mean_cross_entropy(one_big_batch):
  params = random_params(CFG)
  np.testing.assert_allclose(one_big_batch['loss'][0], numpy_masked_loss(params, make_batch(1)), rtol=1e-6)


def test_masked_tokens_change_neither_loss_nor_gradient():
  batch = make_batch(1)
  changed = {key: value.copy() for key, value in batch.items()}
  rng = np.random.default_rng(7)
  padding = batch['mask'] == 0
  changed['targets'][padding] = (batch['targets'][padding] + rng.integers(1, CFG.vocab_size, padding.sum())) % (
      CFG.vocab_size)
  # Inputs may change only where every later target of the row is padding too (the tail of a padded row):
  # earlier inputs still feed the real tokens after them through causal attention.
  tail = np.flip(np.cumprod(np.flip(padding, -1), -1), -1).astype(bool)
  changed['inputs'][tail] = rng.integers(0, CFG.vocab_size, tail.sum())
  assert (changed['targets'] != batch['targets']).sum() == padding.sum() and tail.sum() > 40

  _, train = compiled_step()
  results = []
  for b in (batch, changed):
    state, metrics = train(fresh_state(), b)
    results.append((float(metrics['loss']), float(metrics['grad_norm']), gradient_of(state)))
  # Padding enters only multiplied by an exact zero, so nothing may differ in any bit.
  assert results[0][:2] == results[1][:2]
  assert_trees_equal(results[1][2], results[0][2])


@functools.cache
def _reference_grad_fn():
  """The gradient of mean over real tokens of (cross-entropy + z * logsumexp(logits)^2), written independently."""
  def objective(params, batch, z_loss):
    logits = model_lib.Transformer(CFG).apply({'params': params}, batch['inputs'])
    log_probs = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(log_probs, batch['targets'][..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.sum((nll + z_loss * lse**2) * batch['mask']) / jnp.sum(batch['mask'])
  return jax.jit(jax.grad(objective))


def test_gradient_is_that_of_the_masked_mean(one_big_batch):
  expected = _reference_grad_fn()(random_params(CFG), make_batch(1), 0.0)
  assert_trees_close(one_big_batch['grads'], expected, rtol=1e-5, floor=1e-6)


def test_z_loss_adds_z_times_mean_squared_logsumexp(one_big_batch):
  z_loss, params, batch = 0.5, random_params(CFG), make_batch(1)
  # The z term itself: z * sum over real tokens of logsumexp^2, against float64 NumPy.
  ce_sum, z_sum, tokens = jax.jit(functools.partial(losses.token_losses, CFG, z_loss=z_loss))(params, batch)
  np.testing.assert_allclose(float(z_sum / tokens),
                             numpy_masked_loss(params, batch, z_loss) - numpy_masked_loss(params, batch), rtol=1e-6)
  # In the step: the gradient includes z * mean(logsumexp^2), the logged loss stays the cross-entropy alone.
  _, train = compiled_step(z_loss=z_loss)
  state, metrics = train(fresh_state(z_loss=z_loss), batch)
  np.testing.assert_allclose(float(metrics['loss']), one_big_batch['loss'][0], rtol=1e-6)
  np.testing.assert_allclose(float(ce_sum / tokens), one_big_batch['loss'][0], rtol=1e-6)
  expected = _reference_grad_fn()(params, batch, z_loss)
  assert_trees_close(gradient_of(state), expected, rtol=1e-5, floor=1e-6)
  # The z term must move the gradient well beyond the tolerance, or the comparison above proves nothing.
  z_part = jax.tree.map(jnp.subtract, expected, one_big_batch['grads'])
  assert float(optax.tree.norm(z_part)) > 0.1 * float(optax.tree.norm(one_big_batch['grads']))


def nonfinite_batch(seed: int) -> dict:
  """A batch with one token id outside the vocabulary: its embedding lookup yields NaN, so the loss is NaN."""
  batch = make_batch(seed)
  batch['inputs'][3, 5] = CFG.vocab_size
  return batch


def test_nonfinite_step_leaves_state_unchanged_and_is_counted():
  _, train = compiled_step()
  state = fresh_state()
  sequence = [make_batch(1), nonfinite_batch(2), make_batch(3), nonfinite_batch(4), make_batch(5)]
  skipped = 0
  for step, batch in enumerate(sequence):
    before = host_copy({key: state[key] for key in ('params', 'opt_state')})
    count = optimizer_count(state)
    state, metrics = train(state, batch)
    bad = not np.isfinite(float(metrics['loss']))
    assert bad == (step in (1, 3))
    skipped += bad
    assert int(state['step']) == step + 1
    assert int(state['nonfinite_steps']) == int(metrics['nonfinite_steps']) == skipped
    assert int(state['first_nonfinite_step']) == int(metrics['first_nonfinite_step']) == (1 if skipped else -1)
    if bad:
      assert_trees_equal(jax.device_get(state['params']), before['params'])
      assert_trees_equal(jax.device_get(state['opt_state']), before['opt_state'])
      assert optimizer_count(state) == count
    else:
      assert optimizer_count(state) == count + 1
      assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(host_copy(state['params'])))


def test_logged_learning_rate_is_the_one_applied():
  """After a skipped step the optimizer's schedule is one step behind the step counter; the log must follow it."""
  _, train = compiled_step()
  state = fresh_state()
  for step, batch in enumerate([make_batch(1), nonfinite_batch(2), make_batch(3), make_batch(4)]):
    scale_before = host_copy(state['params']['final_norm']['scale'])
    state, metrics = train(state, batch)
    if step == 1:
      continue
    # Norm scales are not decayed and b2 = 0, so each entry moves by lr * |g| / (|g| + eps), i.e. by lr.
    applied = float(np.max(np.abs(np.asarray(state['params']['final_norm']['scale']) - scale_before)))
    np.testing.assert_allclose(applied, float(metrics['learning_rate']), rtol=1e-4, atol=1e-9,
                               err_msg=f'step {step + 1}')
