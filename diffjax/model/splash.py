"""Causal GQA attention on TPUs through JAX's splash-attention Pallas kernel, values of any width.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) is JAX's flash-attention kernel for TPUs:
block-sparse over a mask that it knows statically (here causal), with segment ids for packed documents. It takes a
value width other than the key width, so DIFF V1 runs each of its two maps once against the 2D-wide values, as on
cuDNN with wide values. The kernel itself is multi-head (one kv head per query head) or multi-query (one kv head
for all); grouped-query attention runs the multi-query kernel once per kv group (vmapped), as the kernel's own
reference does.

Off a TPU it runs in Pallas interpret mode (slow; for tests), when DIFFJAX_PALLAS_INTERPRET=1 is set.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from diffjax.model import sharding

# The kernel's tiles along the sequence: its own defaults are 512, and shorter sequences take one tile each.
MAX_BLOCK = 512


def block(seq_len: int) -> int:
  return min(MAX_BLOCK, seq_len)


def runs_at(seq_len: int) -> bool:
  """Whether the kernel takes this sequence length: a multiple of its tile, itself a multiple of 128 (TPU lanes)."""
  return seq_len % block(seq_len) == 0 and block(seq_len) % 128 == 0


def _kernel(heads_per_group: int, seq_len: int, interpret: bool):
  size = block(seq_len)
  sizes = splash_kernel.BlockSizes(block_q=size, block_kv=size, block_kv_compute=size, block_q_dkv=size,
                                   block_kv_dkv=size, block_kv_dkv_compute=size, block_q_dq=size, block_kv_dq=size)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((seq_len, seq_len))] * heads_per_group)
  # Built in each trace, not cached: the kernel holds its mask tables as arrays of the trace that made it.
  return splash_kernel.make_splash_mqa(mask=mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                       interpret=interpret)


def splash_attention(q_BxTxNxD, k_BxTxKxD, v_BxTxKxW, segment_ids_BxT=None, *, interpret: bool = False):
  """Causal attention, query head n reading kv head n // (N / K); returns (B, T, N, W) in q's dtype.

  T must be a multiple of the kernel's tile (`runs_at`). `segment_ids_BxT` keeps each token inside its document.
  """
  b, t, n, d = q_BxTxNxD.shape
  kv, w = k_BxTxKxD.shape[2], v_BxTxKxW.shape[3]
  kernel = _kernel(n // kv, t, interpret)
  # The kernel does not scale the logits: the queries carry the 1/sqrt(D).
  q_BxKxRxTxD = (q_BxTxNxD * d ** -0.5).reshape(b, t, kv, n // kv, d).transpose(0, 2, 3, 1, 4)
  k_BxKxTxD, v_BxKxTxW = k_BxTxKxD.transpose(0, 2, 1, 3), v_BxTxKxW.astype(q_BxTxNxD.dtype).transpose(0, 2, 1, 3)
  if segment_ids_BxT is None:
    per_group = lambda q, k, v, segments: kernel(q, k, v)
    segments = jnp.zeros((b,), jnp.int32)  # a placeholder the function above ignores
  else:
    per_group = lambda q, k, v, segments: kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(segments, segments))
    segments = jnp.asarray(segment_ids_BxT, jnp.int32)
  run = jax.vmap(jax.vmap(per_group, in_axes=(0, 0, 0, None)))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    # A Mosaic kernel is one device's program, which XLA cannot partition: each device runs it on its own rows
    # and heads, as the logical rules shard them (batch over data and fsdp, heads and kv groups over tensor; the
    # kv group of each local query head is then local too).
    batch, heads = (sharding.mesh_axes(name) for name in ('batch', 'heads'))
    grouped = P(batch, heads, None, None, None)
    run = jax.shard_map(run, mesh=mesh, in_specs=(grouped, P(batch, heads, None, None), P(batch, heads, None, None),
                                                  P(batch) if segment_ids_BxT is None else P(batch, None)),
                        out_specs=grouped, check_vma=False)
  out_BxKxRxTxW = run(q_BxKxRxTxD, k_BxKxTxD, v_BxKxTxW, segments)
  return out_BxKxRxTxW.transpose(0, 3, 1, 2, 4).reshape(b, t, n, w)
