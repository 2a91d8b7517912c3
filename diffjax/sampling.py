"""Autoregressive sampling from a trained model."""

import functools

import jax
import jax.numpy as jnp

from diffjax import model as model_lib
from diffjax.config import ModelConfig


@functools.partial(jax.jit, static_argnames=('cfg', 'prompt_len'))
def _sample_window(cfg: ModelConfig, params, tokens_1xL, prompt_len: int, temperature, rng):
  """Fills positions prompt_len..L-1 one token at a time.

  Each step runs the model over the whole fixed-size window: causality makes the not-yet-written tail
  irrelevant, and one fixed shape means one compilation.
  """
  model = model_lib.Transformer(cfg)

  def step(position, carry):
    tokens, rng = carry
    rng, key = jax.random.split(rng)
    logits_V = model.apply({'params': params}, tokens)[0, position - 1]
    greedy = jnp.argmax(logits_V)
    sampled = jax.random.categorical(key, logits_V / jnp.maximum(temperature, 1e-6))
    token = jnp.where(temperature > 0, sampled, greedy)
    return tokens.at[0, position].set(token.astype(tokens.dtype)), rng

  tokens, _ = jax.lax.fori_loop(prompt_len, tokens_1xL.shape[1], step, (tokens_1xL, rng))
  return tokens


def generate(cfg: ModelConfig, params, prompt_ids: list[int], num_tokens: int, *, temperature: float = 0.8,
             seed: int = 0, window: int | None = None) -> list[int]:
  """The prompt's continuation (at most `window` - len(prompt) new tokens; window defaults to max_len)."""
  window = min(window or cfg.max_len, cfg.max_len)
  prompt_ids = list(prompt_ids)[-(window - 1):] or [0]
  length = min(window, len(prompt_ids) + num_tokens)
  tokens = jnp.zeros((1, length), jnp.int32).at[0, :len(prompt_ids)].set(jnp.asarray(prompt_ids, jnp.int32))
  out = _sample_window(cfg, params, tokens, len(prompt_ids), jnp.float32(temperature), jax.random.key(seed))
  return [int(t) for t in out[0, len(prompt_ids):]]
