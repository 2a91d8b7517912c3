"""The compiled pieces of training: sharded state creation, the train step and the eval step."""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from diffjax.data import pipeline
from diffjax.model import losses
from diffjax.model import transformer as model_lib
from diffjax.model.config import ModelConfig
from diffjax.model.sharding import LOGICAL_AXIS_RULES

State = dict[str, Any]  # {'step', 'params', 'opt_state', 'nonfinite_steps', 'first_nonfinite_step'}


def batch_sharding(mesh) -> NamedSharding:
  """A batch's rows spread as the logical 'batch' axis of the rules table."""
  return nn.logical_to_mesh_sharding(P('batch'), mesh, LOGICAL_AXIS_RULES)


def batch_spec(batch_size: int, seq_len: int, sharding=None) -> dict:
  """ShapeDtypeStructs of a batch (`diffjax.data.pipeline.BATCH_DTYPES`), for compiling the steps ahead of time."""
  return {key: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=sharding)
          for key, dtype in pipeline.BATCH_DTYPES.items()}


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh):
  """Shardings of the train state, from the logical axes each parameter was created with."""
  boxed = model_lib.abstract_params(cfg)['params']
  param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)
  abstract_opt = jax.eval_shape(tx.init, nn.meta.unbox(boxed))
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, param_shardings,
                                        transform_non_params=lambda _: replicated)
  return {'step': replicated, 'params': param_shardings, 'opt_state': opt_shardings,
          'nonfinite_steps': replicated, 'first_nonfinite_step': replicated}


def new_params(cfg: ModelConfig, key: jax.Array) -> dict:
  """Initial parameters, drawn through the scanned layout whatever the model's layout.

  Every layer's initialisers are alike (the layer index enters only the forward pass, through λ_init), so the
  scanned model draws from the same distribution with one block's initialisers in the program instead of
  `n_layers` copies: compiling the unscanned init for an 8-layer model took half a minute on a GPU.
  """
  scanned = dataclasses.replace(cfg, scan_layers=True)
  params = nn.meta.unbox(model_lib.Transformer(scanned).init(key, jnp.zeros((1, 8), jnp.int32)))['params']
  return params if cfg.scan_layers else model_lib.unstack_layers(scanned, params)


def new_state(cfg: ModelConfig, tx, key: jax.Array) -> State:
  params = new_params(cfg, key)
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'nonfinite_steps': jnp.zeros((), jnp.int32), 'first_nonfinite_step': jnp.full((), -1, jnp.int32)}


def init_state(cfg: ModelConfig, tx, mesh, seed: int) -> State:
  """Creates the train state directly in its shards: no device ever holds a full copy first.

  The key is an argument, not a constant of the traced function: with a constant key every initialiser is a
  constant expression, and XLA's GPU compiler spends minutes folding the random draws of a large model.
  """
  shardings = state_shardings(cfg, tx, mesh)  # outside the mesh: there, unboxing would constrain eagerly
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    create = jax.jit(functools.partial(new_state, cfg, tx), out_shardings=shardings)
    return create(jax.random.key(seed))


def abstract_state(cfg: ModelConfig, tx, mesh) -> State:
  """Shapes, dtypes and shardings of the train state, without computing anything (the target of a restore)."""
  shapes = jax.eval_shape(functools.partial(new_state, cfg, tx), jax.random.key(0))
  return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes,
                      state_shardings(cfg, tx, mesh))


def _split_microbatches(batch, microbatches: int):
  """(B, ...) -> (k, B/k, ...): microbatch i takes rows i, i+k, ..., so each stays spread over the batch shards."""
  def split(x):
    x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, 'batch'))
  return jax.tree.map(split, batch)


def train_step(cfg: ModelConfig, tx, schedule, train_cfg, state: State, batch) -> tuple[State, dict]:
  """One optimizer step over the global batch, accumulating gradients over `train_cfg.microbatches`."""
  def loss_sums(params, microbatch):
    ce, z, tokens = losses.token_losses(cfg, params, microbatch, train_cfg.z_loss, train_cfg.loss_chunk_tokens)
    return ce + z, (ce, tokens)

  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
  if train_cfg.microbatches == 1:  # no accumulation loop, and no zero-filled gradient buffers to add into
    (_, (ce_sum, token_sum)), grad_sums = grad_fn(state['params'], batch)
  else:
    def accumulate(carry, microbatch):
      grads, ce_sum, token_sum = carry
      (_, (ce, tokens)), micro_grads = grad_fn(state['params'], microbatch)
      return (jax.tree.map(jnp.add, grads, micro_grads), ce_sum + ce, token_sum + tokens), None

    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    (grad_sums, ce_sum, token_sum), _ = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0), _split_microbatches(batch, train_cfg.microbatches))
  # Dividing the summed gradient by the global token count makes k microbatches equal one big batch.
  denominator = jnp.maximum(token_sum, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grad_sums)
  loss = ce_sum / denominator
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  # A non-finite step never touches the weights; the host decides whether to stop or carry on.
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = {
      'step': state['step'] + 1,
      'params': keep_old(params, state['params']),
      'opt_state': keep_old(opt_state, state['opt_state']),
      'nonfinite_steps': state['nonfinite_steps'] + (~finite).astype(jnp.int32),
      'first_nonfinite_step': jnp.where((state['first_nonfinite_step'] < 0) & ~finite, state['step'],
                                        state['first_nonfinite_step']),
  }
  # A skipped step does not advance the optimizer's own count, so its schedule runs behind `step` by the skips.
  applied_lr = schedule(state['step'] - state['nonfinite_steps'])
  metrics = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': applied_lr, 'tokens': token_sum,
             'nonfinite_steps': new_state['nonfinite_steps'], 'first_nonfinite_step': new_state['first_nonfinite_step']}
  lambdas = model_lib.lambdas(cfg, new_state['params'])
  if lambdas is not None:
    metrics['lambda'] = jnp.stack(lambdas)
  return new_state, metrics


def compile_steps(cfg: ModelConfig, tx, schedule, train_cfg, mesh):
  """jit-compiled train and eval steps with explicit shardings; the train state is donated."""
  shardings = state_shardings(cfg, tx, mesh)
  data = batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  train = jax.jit(functools.partial(train_step, cfg, tx, schedule, train_cfg),
                  in_shardings=(shardings, data), out_shardings=(shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(losses.eval_step, cfg, loss_chunk_tokens=train_cfg.loss_chunk_tokens),
                     in_shardings=(shardings['params'], data), out_shardings=replicated)
  return _in_mesh(train, mesh), _in_mesh(evaluate, mesh)


def _in_mesh(fn, mesh):
  """`fn`, and its `lower`, traced where logical activation constraints can resolve against the mesh."""
  def in_mesh(call):
    @functools.wraps(call)
    def wrapped(*args):
      with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        return call(*args)
    return wrapped

  wrapped = in_mesh(fn)
  wrapped.lower = in_mesh(fn.lower)
  return wrapped
