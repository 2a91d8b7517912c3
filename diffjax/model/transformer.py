"""The decoder-only language model: pre-RMSNorm blocks of (differential) attention and a SwiGLU FFN."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.model.attention import ATTENTION_BY_VARIANT, recording, reparameterised_lambda
from diffjax.model.config import ModelConfig, remat_policy
from diffjax.model.layers import RMSNorm, SwiGLU, dense

ACTIVATION_AXES = ('batch', 'length', 'act_embed')


class Block(nn.Module):
  """x + Attn(norm(x)), then x + SwiGLU(norm(x)); the residual stream stays float32.

  With 'intermediates' mutable (analysis), the block sows the residual stream it hands on, (B, T, E), as
  `residual`, beside what its attention sows.
  """
  cfg: ModelConfig
  layer: int

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT, cache=None, segment_ids_BxT=None):
    """The new residual stream; with a layer cache, (the new residual stream, the updated layer cache)."""
    cfg = self.cfg
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, ACTIVATION_AXES)
    attention = ATTENTION_BY_VARIANT[cfg.variant](cfg, self.layer, name='attn')
    normed_BxTxE = RMSNorm(cfg.norm_eps, name='attn_norm')(x_BxTxE)
    if cache is None:
      x_BxTxE = x_BxTxE + attention(normed_BxTxE, positions_BxT, segment_ids_BxT=segment_ids_BxT)
    else:
      attended_BxTxE, cache = attention(normed_BxTxE, positions_BxT, cache)
      x_BxTxE = x_BxTxE + attended_BxTxE
    x_BxTxE = x_BxTxE + SwiGLU(cfg, name='ffn')(RMSNorm(cfg.norm_eps, name='ffn_norm')(x_BxTxE))
    x_BxTxE = nn.with_logical_constraint(x_BxTxE, ACTIVATION_AXES)
    if recording(self):
      self.sow('intermediates', 'residual', x_BxTxE)
    return x_BxTxE if cache is None else (x_BxTxE, cache)


def block_class(cfg: ModelConfig):
  """Block, or with `remat` a Block whose backward pass recomputes what `remat_policy` did not save."""
  return nn.remat(Block, policy=remat_policy(cfg.remat_policy)) if cfg.remat else Block


class _LayerStack(nn.Module):
  """The body of `nn.scan` over layers: one Block whose layer index (for DIFF's λ_init) arrives as the scanned
  input, so the same traced block serves every layer."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxE, layer, positions_BxT, segment_ids_BxT):
    return block_class(self.cfg)(self.cfg, layer, name='block')(x_BxTxE, positions_BxT, None, segment_ids_BxT), None


class Transformer(nn.Module):
  """tokens (B, T) int -> logits (B, T, vocab) float32.

  With `segment_ids_BxT` (int, one id per document of a packed row; see `document_mask` in ModelConfig), a token
  attends only to earlier tokens of its own document. With `cache` (from `init_cache`; `positions_BxT` then
  required, the tokens' absolute positions), it returns (logits, updated cache): the tokens' keys and values are
  stored at their positions' slots and each token attends to the cached slots up to its own position.

  With `return_hidden`, the final-normed hidden states (B, T, E) in the compute dtype take the logits' place: the
  output projection (`output_kernel`) is left to the caller, so a loss can apply it a chunk of tokens at a time
  (`diffjax.model.losses`). The parameters are those of the default call, which is what `init` must run.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT=None, cache=None, segment_ids_BxT=None, return_hidden: bool = False):
    cfg = self.cfg
    if cache is not None and positions_BxT is None:
      raise ValueError('Transformer with a KV cache needs positions_BxT, the tokens\' absolute positions')
    if cache is not None and segment_ids_BxT is not None:
      raise ValueError('Transformer with a KV cache takes no segment ids: generation continues one document')
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    # The lookup reads the float32 table, not a compute-dtype copy: its backward pass scatter-adds the gradient
    # into the table, and a 16-bit scatter-add is very slow on GPUs when many updates hit the same rows, which real
    # text does (a few bytes or Zipfian tokens carry most of it). The stream is float32 from here on anyway.
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32, param_dtype=jnp.float32, name='embed',
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.embed_init_std),
                                                                 ('vocab', 'embed')))
    x_BxTxE = embed(tokens_BxT)
    block = block_class(cfg)
    new_cache = []
    if cfg.scan_layers:
      if cache is not None:
        raise ValueError('the KV cache path runs unscanned layers; convert the parameters with unstack_layers')
      layers = nn.scan(_LayerStack, variable_axes={'params': 0}, split_rngs={'params': True},
                       in_axes=(0, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BxTxE, _ = layers(cfg, name='layers')(x_BxTxE, jnp.arange(cfg.n_layers), positions_BxT, segment_ids_BxT)
    for layer in range(0 if cfg.scan_layers else cfg.n_layers):
      if cache is None:
        x_BxTxE = block(cfg, layer, name=f'block_{layer}')(x_BxTxE, positions_BxT, None, segment_ids_BxT)
      else:
        x_BxTxE, layer_cache = block(cfg, layer, name=f'block_{layer}')(x_BxTxE, positions_BxT, cache[layer])
        new_cache.append(layer_cache)
    x_BxTxE = RMSNorm(cfg.norm_eps, name='final_norm')(x_BxTxE).astype(cfg.compute_dtype)
    if return_hidden:
      return x_BxTxE if cache is None else (x_BxTxE, new_cache)
    if cfg.tie_embeddings:  # in the compute dtype, as an untied head: `embed.attend` would now compute in float32
      logits_BxTxV = jnp.dot(x_BxTxE, embed.embedding.T.astype(cfg.compute_dtype))
    else:
      logits_BxTxV = dense(cfg, cfg.vocab_size, ('embed', 'vocab'), 'lm_head')(x_BxTxE)
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    return logits_BxTxV if cache is None else (logits_BxTxV, new_cache)


def output_kernel(cfg: ModelConfig, params):
  """The output projection (E, V) the model's head applies, float32: the embedding table transposed when tied,
  else `lm_head`'s kernel. The head casts it to the compute dtype; so must a caller that applies it itself."""
  params = nn.meta.unbox(params)
  return params['embed']['embedding'].T if cfg.tie_embeddings else params['lm_head']['kernel']


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> list[dict]:
  """An empty KV cache for `slots` positions: per layer, keys (B, S, kv_heads, D) and values in the layer's layout,
  in the compute dtype (the keys are stored after RoPE)."""
  d = cfg.head_dim
  # DIFF V1 pairs kv heads: kv_heads/2 values of width 2D.
  v_heads, v_width = (cfg.kv_heads // 2, 2 * d) if cfg.variant == 'diff_v1' else (cfg.kv_heads, d)
  return [{'k': jnp.zeros((batch, slots, cfg.kv_heads, d), cfg.compute_dtype),
           'v': jnp.zeros((batch, slots, v_heads, v_width), cfg.compute_dtype)} for _ in range(cfg.n_layers)]


def abstract_params(cfg: ModelConfig):
  """Parameter shapes (with their logical partitioning boxes) without allocating anything."""
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(params)))


def unstack_layers(cfg: ModelConfig, params) -> dict:
  """Parameters of a `scan_layers` model in the unscanned layout (`block_0`, `block_1`, ...); others unchanged.

  The two layouts compute the same function, so a scanned run can be sampled, exported or inspected unscanned.
  """
  params = nn.meta.unbox(params)
  if not cfg.scan_layers:
    return params
  stacked = params['layers']['block']
  blocks = {f'block_{layer}': jax.tree.map(lambda x, i=layer: x[i], stacked) for layer in range(cfg.n_layers)}
  return {**{k: v for k, v in params.items() if k != 'layers'}, **blocks}


def unscanned(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
  """(cfg, unboxed parameters) of the same model in the unscanned layout, which the KV cache, the attention maps and
  Hugging Face's modules (one per layer) need."""
  return dataclasses.replace(cfg, scan_layers=False), unstack_layers(cfg, params)


def stack_layers(cfg: ModelConfig, params) -> dict:
  """The inverse of `unstack_layers`: unscanned parameters in the layout of a `scan_layers` model."""
  params = nn.meta.unbox(params)
  blocks = [params[f'block_{layer}'] for layer in range(cfg.n_layers)]
  rest = {k: v for k, v in params.items() if not k.startswith('block_')}
  return {**rest, 'layers': {'block': jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}}


def lambdas(cfg: ModelConfig, params) -> list | None:
  """DIFF V1's λ of every layer, from the `params` collection (V2's λ is per token; the baseline has none)."""
  if cfg.variant != 'diff_v1':
    return None
  params = unstack_layers(cfg, params)
  return [reparameterised_lambda(params[f'block_{layer}']['attn'], layer, cfg.lambda_init_schedule)
          for layer in range(cfg.n_layers)]


def summary(cfg: ModelConfig) -> str:
  """A printable table: every parameter's path, shape, logical axes and count, then the total."""
  boxed = abstract_params(cfg)['params']
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    shape = leaf.value.shape if isinstance(leaf, nn.Partitioned) else leaf.shape
    axes = leaf.names if isinstance(leaf, nn.Partitioned) else ()
    rows.append((name, str(tuple(shape)), str(tuple(axes)), int(np.prod(shape))))
  width = max(len(r[0]) for r in rows)
  lines = [f'{cfg.variant} model: {cfg.n_layers} layers, width {cfg.d_model}, {cfg.n_heads} heads (baseline count), '
           f'head width {cfg.head_dim}, kv heads {cfg.kv_heads}, FFN {cfg.d_ff}, vocab {cfg.vocab_size}']
  lines += [f'{n:<{width}}  {s:<16} {a:<22} {c:>12,}' for n, s, a, c in rows]
  lines.append(f'{"total":<{width}}  {"":<16} {"":<22} {sum(r[3] for r in rows):>12,}')
  return '\n'.join(lines)
