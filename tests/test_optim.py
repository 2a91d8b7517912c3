"""Tests of the optimizer: the learning-rate schedule, the weight-decay mask, AdamW's decay and clipping."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffjax.model import transformer as model_lib
from diffjax.model.attention import LAMBDA_VECTORS
from diffjax.train import optim
from diffjax.train import step as train_step
from helpers_training import random_params, sharded_state, single_device_mesh, tiny_model, train_config


def expected_learning_rate(step, *, peak, warmup, steps, end_ratio, decay):
  """The schedule's definition, written out: linear 0 -> peak over `warmup`, then decay to peak*end_ratio."""
  if step < warmup:
    return peak * step / warmup
  progress = min(step - warmup, steps - warmup) / (steps - warmup)
  end = peak * end_ratio
  if decay == 'cosine':
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
  if decay == 'linear':
    return peak + (end - peak) * progress
  return peak


@pytest.mark.parametrize('decay', ['cosine', 'linear', 'constant'])
@pytest.mark.parametrize('peak, warmup, steps, end_ratio', [(6e-4, 120, 10_000, 0.1), (3e-3, 7, 50, 0.0),
                                                            (1.0, 1, 3, 0.5)])
def test_schedule_matches_its_definition(decay, peak, warmup, steps, end_ratio):
  schedule = optim.learning_rate_schedule(train_config(learning_rate=peak, warmup_steps=warmup, steps=steps,
                                                       end_lr_ratio=end_ratio, decay=decay))
  # Both ends of warmup, the hand-over to the decay, its middle and end, and beyond the last step.
  probes = sorted({0, 1, warmup // 2, warmup - 1, warmup, warmup + 1, (warmup + steps) // 2, steps - 1, steps,
                   steps + 37})
  for step in probes:
    want = expected_learning_rate(step, peak=peak, warmup=warmup, steps=steps, end_ratio=end_ratio, decay=decay)
    np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-12 * peak, err_msg=f'step {step}')


def test_schedule_landmarks():
  """The named values of the definition, independent of the closed form above."""
  cfg = dict(learning_rate=1e-3, warmup_steps=10, steps=110, end_lr_ratio=0.1)
  cosine = optim.learning_rate_schedule(train_config(decay='cosine', **cfg))
  linear = optim.learning_rate_schedule(train_config(decay='linear', **cfg))
  assert float(cosine(0)) == 0.0  # warmup starts from zero
  np.testing.assert_allclose(float(cosine(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(10)), 1e-3, rtol=1e-6)  # the peak right at the end of warmup
  np.testing.assert_allclose(float(cosine(60)), 0.55e-3, rtol=1e-6)  # halfway down: the mean of peak and end
  np.testing.assert_allclose(float(linear(60)), 0.55e-3, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(110)), 1e-4, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(500)), 1e-4, rtol=1e-6)  # held at the end value after `steps`
  np.testing.assert_allclose(float(linear(500)), 1e-4, rtol=1e-6)
  # Cosine stays above linear in the first half of the decay and below it in the second.
  assert float(cosine(30)) > float(linear(30)) and float(cosine(90)) < float(linear(90))


def _leaf_name(path):
  return str(getattr(path[-1], 'key', path[-1]))


@pytest.mark.parametrize('variant', ['diff_v1', 'diff_v2', 'baseline'])
def test_decay_mask_selects_exactly_the_matrices(variant):
  params = nn.meta.unbox(model_lib.abstract_params(tiny_model(variant=variant))['params'])
  mask = optim.decay_mask(params)
  names = set()
  for (path, leaf), (_, decays) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                       jax.tree_util.tree_flatten_with_path(mask)[0]):
    name = _leaf_name(path)
    names.add(name)
    expected = name in ('kernel', 'embedding')
    assert decays is expected, f'{jax.tree_util.keystr(path)} {leaf.shape}: mask {decays}, want {expected}'
    assert expected == (leaf.ndim == 2), jax.tree_util.keystr(path)
  # A parameter kind this test does not know about must be classified here, deliberately.
  known = {'kernel', 'embedding', 'scale'} | (set(LAMBDA_VECTORS) if variant == 'diff_v1' else set())
  assert names == known


def test_decay_mask_on_diff_v1_lambda_vectors():
  cfg = tiny_model(n_layers=3)
  params = nn.meta.unbox(model_lib.abstract_params(cfg)['params'])
  mask = optim.decay_mask(params)
  for layer in range(cfg.n_layers):
    attn = mask[f'block_{layer}']['attn']
    assert [attn[name] for name in LAMBDA_VECTORS] == [False] * 4
    assert attn['subln']['scale'] is False
    assert all(attn[proj]['kernel'] is True for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'))
  assert mask['embed']['embedding'] is True and mask['lm_head']['kernel'] is True
  assert mask['final_norm']['scale'] is False


@pytest.fixture(scope='module')
def diff_v1_params():
  return jax.tree.map(jnp.asarray, random_params(tiny_model()))


def test_zero_gradient_step_decays_only_the_matrices(diff_v1_params):
  peak, warmup, weight_decay = 0.01, 4, 0.1
  tx = optim.make_optimizer(train_config(learning_rate=peak, warmup_steps=warmup, steps=100,
                                         weight_decay=weight_decay))
  zeros = jax.tree.map(jnp.zeros_like, diff_v1_params)
  step = jax.jit(lambda state, params: _apply(tx, zeros, state, params))
  # Step 0 runs at learning rate 0 (warmup starts from zero): nothing may move, decayed or not.
  params_1, state = step(tx.init(diff_v1_params), diff_v1_params)
  jax.tree.map(np.testing.assert_array_equal, params_1, diff_v1_params)
  # Step 1 runs at peak/warmup. Adam's part of a zero gradient is zero, so only decoupled decay acts.
  params_2, state = step(state, params_1)
  shrink = 1 - (peak / warmup) * weight_decay
  mask = optim.decay_mask(diff_v1_params)

  def check(path, new, old, decays):
    where = jax.tree_util.keystr(path)
    if decays:
      np.testing.assert_allclose(new, np.asarray(old) * shrink, rtol=1e-6, err_msg=where)
      assert not np.array_equal(new, old), where
    else:
      np.testing.assert_array_equal(new, old, err_msg=where)
  jax.tree_util.tree_map_with_path(check, params_2, params_1, mask)


def _apply(tx, grads, opt_state, params):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def _first_moment(opt_state):
  return optax.tree_utils.tree_get(opt_state, 'mu')


@pytest.mark.parametrize('scale, grad_clip, clipped', [(1e6, 1.0, True), (1e6, 0.25, True), (1e-3, 1.0, False),
                                                       (1e6, 0.0, False)])
def test_global_norm_clipping(scale, grad_clip, clipped):
  b1 = 0.9
  tx = optim.make_optimizer(train_config(grad_clip=grad_clip, b1=b1, warmup_steps=10, steps=100))
  # A few leaves of different shapes, decayed and not: the norm is global over all of them.
  params = {'dense': {'kernel': jnp.ones((6, 4))}, 'norm': {'scale': jnp.ones((4,))}, 'lambda_q1': jnp.ones((3,))}
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), params)
  norm = float(optax.tree.norm(grads))
  _, state = _apply(tx, grads, tx.init(params), params)
  # Adam's first moment after one step is (1 - b1) times the gradient it received: what clipping left of it.
  seen = jax.tree.map(lambda m: m / (1 - b1), _first_moment(state))
  factor = grad_clip / norm if clipped else 1.0
  if clipped:
    np.testing.assert_allclose(float(optax.tree.norm(seen)), grad_clip, rtol=1e-5)
  # Clipping rescales the whole gradient by one factor: the direction is kept.
  jax.tree.map(lambda s, g: np.testing.assert_allclose(s, np.asarray(g) * factor, rtol=1e-5,
                                                       atol=1e-6 * scale * factor), seen, grads)


# --- Adam's first moment stored in bfloat16. ------------------------------------------------------------------


def _leaf_dtypes(tree) -> set:
  return {leaf.dtype for leaf in jax.tree.leaves(tree)}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_first_moment_is_stored_in_the_dtype_asked(diff_v1_params, dtype):
  tx = optim.make_optimizer(train_config(opt_moments_dtype=dtype, warmup_steps=1, steps=10))
  state = tx.init(diff_v1_params)
  grads = jax.tree.map(jnp.ones_like, diff_v1_params)
  for state in (state, jax.jit(lambda s: _apply(tx, grads, s, diff_v1_params)[1])(state)):
    assert _leaf_dtypes(_first_moment(state)) == {jnp.dtype(dtype)}
    # optax has no setting for the second moment: it stays in the parameters' float32.
    assert _leaf_dtypes(optax.tree_utils.tree_get(state, 'nu')) == {jnp.dtype('float32')}


def _train_losses(cfg, moments_dtype: str, steps: int) -> tuple[list[float], dict, dict]:
  """Losses of `steps` train steps on one batch, with the final state and the state's shardings."""
  train_cfg = train_config(learning_rate=1e-2, warmup_steps=1, steps=100, decay='constant',
                           opt_moments_dtype=moments_dtype)
  tx, mesh = optim.make_optimizer(train_cfg), single_device_mesh()
  train, _ = train_step.compile_steps(cfg, tx, optim.learning_rate_schedule(train_cfg), train_cfg, mesh)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 17), dtype=np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((4, 16), np.float32)}
  state, losses = sharded_state(cfg, tx, mesh, random_params(cfg)), []
  for _ in range(steps):
    state, metrics = train(state, batch)
    losses.append(float(metrics['loss']))
  return losses, state, train_step.state_shardings(cfg, tx, mesh)


@pytest.mark.slow
def test_bfloat16_first_moment_trains():
  cfg = tiny_model()
  losses, state, shardings = _train_losses(cfg, 'bfloat16', steps=6)
  # The first step runs at learning rate 0 (warmup starts from zero); every later one lowers the loss.
  assert all(later < earlier for earlier, later in zip(losses[1:], losses[2:])), losses
  assert _leaf_dtypes(_first_moment(state['opt_state'])) == {jnp.dtype('bfloat16')}
  # The shardings describe the same tree as the state, leaf by leaf, and the state carries them.
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  jax.tree.map(lambda leaf, sharding: np.testing.assert_equal(leaf.sharding.is_equivalent_to(sharding, leaf.ndim),
                                                             True), state, shardings)
  reference, _, _ = _train_losses(cfg, 'float32', steps=6)
  np.testing.assert_allclose(losses, reference, rtol=1e-2)
