"""A model's loss on a batch (`token_losses`): from its logits, or from the final hidden states a chunk of tokens at a
time, without the full logits (`chunked_token_losses`).

The plain loss asks the model for float32 logits (B, T, V): at a 32k vocabulary and 16x2048 tokens they alone
take about 4 GiB, and their gradient as much again. Here the tokens are flattened and run through a loop, `chunk` at a
time; each chunk's logits exist only inside one iteration, and `jax.checkpoint` makes the backward pass recompute
them rather than keep every chunk's. The logits' memory falls to one chunk's, for one more (chunk, E) x (E, V)
matmul per chunk in the backward pass.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.model import transformer as model_lib
from diffjax.model.config import ModelConfig


def cross_entropy(logits_NxV, targets_N):
  """(cross-entropy, logsumexp) of each row of float32 logits against its target index, as optax's integer-label
  cross-entropy gives them. The target's logit is picked by comparing the vocabulary index with the target, not
  gathered: a gather's gradient is a scatter into a (tokens, V) float32 buffer that XLA writes, scatters into and
  converts in passes of its own, while the comparison's gradient fuses into the softmax gradient's one pass."""
  lse_N = jax.nn.logsumexp(logits_NxV, axis=-1)
  is_target_NxV = jnp.arange(logits_NxV.shape[-1]) == targets_N[..., None]
  return lse_N - jnp.sum(jnp.where(is_target_NxV, logits_NxV, 0.0), axis=-1), lse_N


def z_term(z_loss: float, lse_N, mask_N):
  """z * the masked sum of logsumexp^2; with z = 0 it is not computed at all: XLA keeps a product with 0 (it may
  be NaN), so the term and its gradient over the logits would still be computed."""
  return z_loss * jnp.sum(jnp.square(lse_N) * mask_N) if z_loss else jnp.zeros((), jnp.float32)


def chunked_token_losses(hidden_BxTxE, kernel_ExV, targets_BxT, mask_BxT, z_loss: float, chunk: int):
  """Sums over real tokens: (cross-entropy, z-loss term z * logsumexp^2, token count), as the plain loss gives.

  `hidden_BxTxE` is the model's final-normed output in its compute dtype, `kernel_ExV` the float32 output
  projection (`transformer.output_kernel`). Each chunk's logits are computed in the hidden states' dtype, as the model's
  head computes them; logsumexp and the sums are float32. Padding (mask 0) contributes nothing, and so do the mask-0
  rows that fill the last chunk when B*T is not a multiple of `chunk`.
  """
  tokens = hidden_BxTxE.shape[0] * hidden_BxTxE.shape[1]
  chunk = min(chunk, tokens)
  chunks = -(-tokens // chunk)

  def split(x):
    """(B, T, ...) -> (chunks, chunk, ...). Chunk i takes tokens i, i + chunks, ...: as with microbatches, every
    chunk then holds tokens of every batch shard, and the loop runs over an axis no device holds a slice of."""
    x = x.reshape(tokens, *x.shape[2:])
    x = jnp.pad(x, [(0, chunks * chunk - tokens)] + [(0, 0)] * (x.ndim - 1))
    x = x.reshape(chunk, chunks, *x.shape[1:]).swapaxes(0, 1)
    return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))

  mask_BxT = mask_BxT.astype(jnp.float32)
  hidden_NxCxE, targets_NxC, chunk_mask_NxC = split(hidden_BxTxE), split(targets_BxT), split(mask_BxT)

  # The kernel enters each chunk in float32 and is cast there, so that its gradient sums over the chunks in float32.
  # The logits leave the matmul in the compute dtype, as the model's own head gives them: a float32 result would make
  # the backward pass's two matmuls float32 too, several times slower on GPUs than the rest of the step.
  @jax.checkpoint
  def chunk_sums(kernel_ExV, hidden_CxE, targets_C, mask_C):
    logits_CxV = jnp.dot(hidden_CxE, kernel_ExV.astype(hidden_CxE.dtype)).astype(jnp.float32)
    ce_C, lse_C = cross_entropy(logits_CxV, targets_C)
    return jnp.sum(ce_C * mask_C), z_term(z_loss, lse_C, mask_C)

  ce_N, z_N = jax.lax.map(lambda xs: chunk_sums(kernel_ExV, *xs), (hidden_NxCxE, targets_NxC, chunk_mask_NxC))
  return jnp.sum(ce_N), jnp.sum(z_N), jnp.sum(mask_BxT)


def document_segments(cfg: ModelConfig, batch):
  """The batch's segment ids when the model keeps attention inside documents, else None."""
  if not cfg.document_mask:
    return None
  if 'segment_ids' not in batch:
    raise ValueError('model.document_mask needs batches with segment_ids (the input pipeline and text scoring give '
                     'them)')
  return batch['segment_ids']


def token_losses(cfg: ModelConfig, params, batch, z_loss: float, chunk_tokens: int = 0):
  """Sums over real tokens: (cross-entropy, z-loss term, token count); padding (mask 0) contributes nothing.

  With `chunk_tokens` > 0 the same sums come from the final hidden states, that many tokens at a time
  (`chunked_token_losses`), so the float32 logits of the whole batch never exist at once.
  """
  model = model_lib.Transformer(cfg)
  segments_BxT = document_segments(cfg, batch)
  if chunk_tokens:
    hidden_BxTxE = model.apply({'params': params}, batch['inputs'], segment_ids_BxT=segments_BxT, return_hidden=True)
    return chunked_token_losses(hidden_BxTxE, model_lib.output_kernel(cfg, params), batch['targets'],
                                batch['mask'], z_loss, chunk_tokens)
  logits_BxTxV = model.apply({'params': params}, batch['inputs'], segment_ids_BxT=segments_BxT)
  mask_BxT = batch['mask'].astype(jnp.float32)
  ce_BxT, lse_BxT = cross_entropy(logits_BxTxV, batch['targets'])
  return jnp.sum(ce_BxT * mask_BxT), z_term(z_loss, lse_BxT, mask_BxT), jnp.sum(mask_BxT)


def eval_step(cfg: ModelConfig, params, batch, loss_chunk_tokens: int = 0):
  ce, _, tokens = token_losses(cfg, params, batch, 0.0, loss_chunk_tokens)
  return {'loss_sum': ce, 'tokens': tokens}
