"""The generic layers that attention and the decoder blocks are built from: RMSNorm, the bias-free projection with
its initialisation, and the SwiGLU feed-forward network."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.model.config import ModelConfig


def rms_norm(x, scale, eps: float):
  """x / RMS(x) over the last axis in float32, times `scale` unless it is None."""
  x = x.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return x if scale is None else x * scale


def norm_scale(module: nn.Module, width: int):
  """The learnable scale of an RMSNorm over `width` channels (ones at init), declared in `module` as 'scale'."""
  return module.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)), (width,), jnp.float32)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learnable scale (ones at init), or none; computes and returns float32."""
  eps: float = 1e-5
  learnable_scale: bool = True

  @nn.compact
  def __call__(self, x):
    return rms_norm(x, norm_scale(self, x.shape[-1]) if self.learnable_scale else None, self.eps)


def dense(cfg: ModelConfig, features: int, axes: tuple, name: str, stddev: float = 0.02):
  """A bias-free projection with float32 parameters, computing in cfg's dtype."""
  return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.normal(stddev), axes))


def output_stddev(cfg: ModelConfig) -> float:
  # Scaled down with depth, the residual stream's variance stays O(1) at init however many blocks add to it.
  return cfg.residual_init_gain * (0.02 / math.sqrt(2 * cfg.n_layers) if cfg.scale_residual_init else 0.02)


class SwiGLU(nn.Module):
  """The feed-forward network: down(silu(gate(x)) * up(x)), d_ff wide inside."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE):
    cfg = self.cfg
    gate_BxTxF = dense(cfg, cfg.d_ff, ('embed', 'mlp'), 'gate_proj')(x_BxTxE)
    up_BxTxF = dense(cfg, cfg.d_ff, ('embed', 'mlp'), 'up_proj')(x_BxTxE)
    return dense(cfg, cfg.d_model, ('mlp', 'embed'), 'down_proj', output_stddev(cfg))(nn.silu(gate_BxTxF) * up_BxTxF)
