"""Text generation with a KV cache, for DIFF V1, DIFF V2 and the baseline.

A batch of prompts is right-padded to the longest one, so every token keeps its absolute position (the RoPE
position it had in training) and no padding is ever attended to: one compiled prefill writes the prompts' keys
and values into the cache and gives each row's next-token logits at its own last prompt token, then one compiled
loop of decode steps feeds each row's newest token at that row's next position. Row b's token at position p sees
the cache slots 0..p, which always hold that row's own tokens (a padding slot is overwritten before it is seen).

Sampling: temperature 0 is greedy; otherwise the logits over temperature are cut to the top-k tokens (0: all;
tokens tied with the k-th are kept) and then to the smallest set whose probability reaches top_p (1: all), and
one token is drawn. Each step's key is the seed's key folded with the step number, so a seed gives the same text.
A row that emits EOS stops; its later slots are padding.

Parameters are unboxed (`flax.linen.meta.unbox`), as `load.open_run` returns them.
"""

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import ConfigError
from diffjax.model import transformer as model_lib
from diffjax.model.config import ModelConfig

# Fills a row's slots after its EOS in the decode loop's output (never a token id).
_NO_TOKEN = -1


@dataclasses.dataclass(frozen=True)
class Generation:
  tokens: list[list[int]]  # each prompt's continuation, EOS excluded
  prefill_s: float  # wall time of the prefill, compilation excluded
  decode_s: float  # wall time of the decode loop, compilation excluded
  decoded: int  # tokens produced by the decode loop over all rows (the first of each row comes from the prefill)

  @property
  def tokens_per_s(self) -> float:
    return self.decoded / max(self.decode_s, 1e-9)


def check_sampling(num_tokens: int, temperature: float, top_k: int, top_p: float):
  """Raises ConfigError, one line naming the argument, for a value generation cannot use."""
  if not (isinstance(num_tokens, (int, np.integer)) and num_tokens >= 0):
    raise ConfigError(f'num_tokens: must be a whole number >= 0, got {num_tokens!r}')
  if not (math.isfinite(temperature) and temperature >= 0):
    raise ConfigError(f'temperature: must be a finite number >= 0 (0 is greedy), got {temperature!r}')
  if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
    raise ConfigError(f'top_k: must be a whole number >= 0 (0 keeps every token), got {top_k!r}')
  if not 0 < top_p <= 1:
    raise ConfigError(f'top_p: must be in (0, 1] (1 keeps every token), got {top_p!r}')


def check_length(cfg: ModelConfig, prompt_len: int, num_tokens: int):
  if prompt_len + num_tokens > cfg.max_len:
    raise ConfigError(f'generation: a prompt of {prompt_len} tokens and {num_tokens} new tokens exceed the model\'s '
                      f'max_len of {cfg.max_len}; ask for at most {max(cfg.max_len - prompt_len, 0)} new tokens or '
                      'shorten the prompt')


def sample_logits(logits_BxV, key, temperature, top_k, top_p):
  """One token per row: argmax at temperature 0, else a draw from the temperature-scaled, top-k and top-p cut
  distribution (the arguments are traced values, so changing them compiles nothing new)."""
  logits_BxV = logits_BxV.astype(jnp.float32)
  scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
  sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
  vocab = logits_BxV.shape[-1]
  kth_Bx1 = sorted_BxV[:, jnp.clip(jnp.where(top_k > 0, top_k, vocab), 1, vocab) - 1][:, None]
  scaled_BxV = jnp.where(scaled_BxV >= kth_Bx1, scaled_BxV, -jnp.inf)
  # top-p over what top-k kept: keep the tokens whose higher-ranked mass is still below top_p (the first always).
  sorted_BxV = jnp.where(sorted_BxV >= kth_Bx1, sorted_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
  mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
  kept_BxV = mass_before_BxV < top_p
  cutoff_Bx1 = jnp.min(jnp.where(kept_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
  scaled_BxV = jnp.where(scaled_BxV >= cutoff_Bx1, scaled_BxV, -jnp.inf)
  sampled_B = jax.random.categorical(key, scaled_BxV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('cfg', 'slots'))
def prefill(cfg: ModelConfig, params, tokens_BxP, lengths_B, slots: int):
  """(logits (B, V) after each row's last prompt token, a cache of `slots` slots holding the prompts)."""
  b, p = tokens_BxP.shape
  positions_BxP = jnp.broadcast_to(jnp.arange(p), (b, p))
  logits_BxPxV, cache = model_lib.Transformer(cfg).apply(
      {'params': params}, tokens_BxP, positions_BxP, model_lib.init_cache(cfg, b, slots))
  return logits_BxPxV[jnp.arange(b), lengths_B - 1], cache


def _step(cfg: ModelConfig, params, cache, tokens_B, positions_B):
  logits_Bx1xV, cache = model_lib.Transformer(cfg).apply({'params': params}, tokens_B[:, None], positions_B[:, None],
                                                         cache)
  return logits_Bx1xV[:, 0], cache


# One token per row at its own position: (logits (B, V) for the next token, the cache with this token stored).
decode_step = jax.jit(_step, static_argnums=0, donate_argnums=2)


@functools.partial(jax.jit, static_argnames=('cfg', 'num_tokens'))
def _decode(cfg: ModelConfig, params, cache, logits_BxV, lengths_B, key, temperature, top_k, top_p, eos_id,
            num_tokens: int):
  """Samples up to `num_tokens` tokens per row, stopping early once every row has emitted `eos_id`."""
  b = logits_BxV.shape[0]
  draw = lambda logits, i: sample_logits(logits, jax.random.fold_in(key, i), temperature, top_k, top_p)
  first_B = draw(logits_BxV, 0)
  out_BxN = jnp.full((b, num_tokens), _NO_TOKEN, jnp.int32).at[:, 0].set(first_B)

  def unfinished(carry):
    i, _, _, done_B = carry
    return (i < num_tokens) & ~jnp.all(done_B)

  def step(carry):
    i, cache, out_BxN, done_B = carry
    logits_BxV, cache = _step(cfg, params, cache, out_BxN[:, i - 1], lengths_B + i - 1)
    token_B = jnp.where(done_B, _NO_TOKEN, draw(logits_BxV, i))
    return i + 1, cache, out_BxN.at[:, i].set(token_B), done_B | (token_B == eos_id)

  _, _, out_BxN, _ = jax.lax.while_loop(unfinished, step, (jnp.int32(1), cache, out_BxN, first_B == eos_id))
  return out_BxN


def generate(cfg: ModelConfig, params, prompts: list[list[int]], num_tokens: int, *, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None) -> Generation:
  """Continues every prompt (token ids) by up to `num_tokens` tokens, each row stopping after `eos_id`. Raises
  ConfigError if a prompt is empty, or a prompt and its continuation would pass the model's max_len."""
  check_sampling(num_tokens, temperature, top_k, top_p)
  cfg, params = model_lib.unscanned(cfg, params)  # the cache is per layer
  if not prompts or any(len(prompt) == 0 for prompt in prompts):
    raise ConfigError('prompts: every prompt needs at least one token (start a document with the EOS token)')
  lengths = [len(prompt) for prompt in prompts]
  check_length(cfg, max(lengths), num_tokens)
  if num_tokens == 0:
    return Generation([[] for _ in prompts], 0.0, 0.0, 0)
  tokens_BxP = np.zeros((len(prompts), max(lengths)), np.int32)
  for row, prompt in enumerate(prompts):
    tokens_BxP[row, :len(prompt)] = prompt
  tokens_BxP, lengths_B = jnp.asarray(tokens_BxP), jnp.asarray(lengths, jnp.int32)
  # Slot p holds position p; the last token sampled is never fed back, so it needs no slot.
  slots = max(lengths) + num_tokens - 1
  compiled_prefill = prefill.lower(cfg, params, tokens_BxP, lengths_B, slots).compile()
  start = time.perf_counter()
  logits_BxV, cache = jax.block_until_ready(compiled_prefill(params, tokens_BxP, lengths_B))
  prefill_s = time.perf_counter() - start
  sampling = (jax.random.key(seed), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
              jnp.int32(_NO_TOKEN if eos_id is None else eos_id))
  compiled_decode = _decode.lower(cfg, params, cache, logits_BxV, lengths_B, *sampling, num_tokens).compile()
  start = time.perf_counter()
  out_BxN = np.asarray(compiled_decode(params, cache, logits_BxV, lengths_B, *sampling))
  decode_s = time.perf_counter() - start
  continuations = [row[:row.index(eos_id)] if eos_id in row else row for row in out_BxN.tolist()]
  # Each row's first token comes from the prefill's logits; the rest, EOS included, from decode steps.
  decoded = int(np.sum(out_BxN[:, 1:] != _NO_TOKEN))
  return Generation(continuations, prefill_s, decode_s, decoded)
