"""AdamW with linear warmup, cosine/linear decay and global-norm clipping, as one optax chain."""

import jax
import jax.numpy as jnp
import optax

from diffjax.model.attention import LAMBDA_VECTORS


def decay_end(train_cfg) -> int:
  """The step at which the learning rate reaches its final value: `decay_steps`, or `steps` when that is 0."""
  return train_cfg.get('decay_steps', 0) or train_cfg.steps


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """0 -> peak linearly over `warmup_steps`, then decays to `peak * end_lr_ratio` at `decay_end`, and holds there."""
  peak, end = train_cfg.learning_rate, train_cfg.learning_rate * train_cfg.end_lr_ratio
  warmup = optax.linear_schedule(0.0, peak, train_cfg.warmup_steps)
  decay_steps = decay_end(train_cfg) - train_cfg.warmup_steps
  decay = {
      'cosine': lambda: optax.cosine_decay_schedule(peak, decay_steps, alpha=train_cfg.end_lr_ratio),
      'linear': lambda: optax.linear_schedule(peak, end, decay_steps),
      'constant': lambda: optax.constant_schedule(peak),
  }[train_cfg.decay]()
  return optax.join_schedules([warmup, decay], [train_cfg.warmup_steps])


def decay_mask(params):
  """True for the weights AdamW decays: every matrix. Norm scales and the λ vectors are left alone."""
  def decays(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    return leaf.ndim >= 2 and name not in LAMBDA_VECTORS
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """Clipping, then AdamW; `opt_moments_dtype` sets the dtype Adam's first moment is stored in between steps.

  bfloat16 halves that moment's memory; each update still computes it in float32 from the stored value and the new
  gradient, and rounds it only to store it. optax (to 0.2.8 at least) has no such setting for the second moment,
  which stays float32 like the parameters.
  """
  clip = optax.clip_by_global_norm(train_cfg.grad_clip) if train_cfg.grad_clip > 0 else optax.identity()
  return optax.chain(
      clip,
      optax.adamw(learning_rate_schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask,
                  mu_dtype=jnp.dtype(train_cfg.opt_moments_dtype)),
  )
