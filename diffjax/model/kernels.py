"""A fused differential flash-attention kernel for DIFF V1 in Pallas (the Triton lowering on NVIDIA GPUs).

It computes `diff_v1_attention`'s function, (A1 - λ A2) V with the causal mask, GQA and optionally segment ids
(attention inside each document of a packed row), in one pass over the key
and value tiles: both softmax maps of a differential head run as two online softmaxes against the same 2D-wide
value tile, loaded once, and λ is applied at the end. The backward (FlashAttention-2 style) recomputes both maps
from the two saved logsumexps in two Pallas kernels, one for dq (a grid over query tiles) and one for dk and dv (a
grid over key tiles), so that no kernel needs atomics. The forward also keeps A2 V (one extra float32 activation):
with it, the softmax terms Δc = rowsum(dO ∘ Ac V) and dλ = −Σ dO ∘ A2 V are elementwise reductions, not a third
pass over K/V.

Layout: the sub-heads (q1, q2) = (2h, 2h+1) of a differential head sit next to each other, so reshaping
(B, T, 2H, D) to (B, T, H, 2D) is free and puts [q1 | q2] in one row; the same for keys. A kernel instance owns one
(batch, differential head, tile) and reads the kv group h // R.

On CPU the kernels run only in Pallas interpret mode (slow; for tests): `resolve_impl` allows `attention_impl=
'pallas'` off the GPU only when the environment variable DIFFJAX_PALLAS_INTERPRET=1 is set.
"""

import dataclasses
import functools
import os

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

INTERPRET_ENV = 'DIFFJAX_PALLAS_INTERPRET'

# Finite, unlike -inf: a masked logit minus a finite running max exponentiates to exactly 0, never to NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def interpret_requested() -> bool:
  return os.environ.get(INTERPRET_ENV, '') not in ('', '0')


def head_dim_supported(head_dim: int) -> bool:
  """Triton tiles need power-of-two sizes, and its matmuls at least 16 along every axis."""
  return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def tile(head_dim: int) -> int:
  """The query and key tile length for a head width.

  The kernels hold tiles 2D wide (both halves of a differential head, and its values), double-buffered by Triton's
  software pipeline: at D = 128, tiles of 64 rows asked an H100 for 288 KiB of shared memory, above its 227 KiB per
  block, so wider heads take tiles half as long.
  """
  return 64 if head_dim <= 64 else 32


def runs_at(seq_len: int, head_dim: int) -> bool:
  """Whether the kernels take this sequence length: a multiple of the tile (or, shorter, a power of two >= 16)."""
  block = min(tile(head_dim), seq_len)
  return seq_len % block == 0 and head_dim_supported(block) and head_dim_supported(head_dim)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels are specialised on (hashable: a non-differentiable argument of the custom vjp)."""
  head_dim: int
  n_rep: int  # differential heads per kv group
  block_q: int
  block_k: int
  interpret: bool
  segments: bool  # segment ids come after λ among the inputs, and restrict attention to one document

  @property
  def scale(self):
    return self.head_dim ** -0.5

  def params(self, head_dim):
    return dict(interpret=self.interpret,
                compiler_params=plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2))


def _dot(a, b, precision, *, trans_a=False, trans_b=False):
  """a @ b with either operand transposed, accumulated in float32 (IEEE float32 for float32 inputs, not TF32)."""
  contract = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, contract, precision=precision, preferred_element_type=jnp.float32)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def _visible(rows_Q, start_k, block_k, segments_Q=None, segments_K=None):
  causal_QxK = rows_Q[:, None] >= (start_k + jnp.arange(block_k))[None, :]
  return causal_QxK if segments_Q is None else causal_QxK & (segments_Q[:, None] == segments_K[None, :])


def _split_refs(refs, st: _Static):
  """(query-side segment ids ref, key-side segment ids ref, the other refs); the first two None without ids.

  Masked tiles are still visited: a row fully masked within a tile gets weight exp(_MASKED - m) = 0 as soon as it
  meets a visible key, and every row sees at least itself.
  """
  return (refs[0], refs[1], refs[2:]) if st.segments else (None, None, refs)


def _halves(ref, rows, d):
  """The two D-wide halves [x1 | x2] of a 2D-wide tile, loaded separately: Triton cannot slice a loaded tile."""
  return ref[rows, :d], ref[rows, d:]


def _query_tile(q_ref, segq_ref, st: _Static):
  """What a kernel over one query tile reads first: the tile's first row, its rows' positions, both D-wide query
  halves and the rows' segment ids (None without)."""
  start_q = pl.program_id(0) * st.block_q
  q1_QxD, q2_QxD = _halves(q_ref, slice(None), st.head_dim)
  return (start_q, start_q + jnp.arange(st.block_q), q1_QxD, q2_QxD,
          None if segq_ref is None else segq_ref[...])


def _forward_kernel(q_ref, k_ref, v_ref, lam_ref, *refs, st: _Static):
  segq_ref, segk_ref, (o_ref, a2v_ref, lse1_ref, lse2_ref) = _split_refs(refs, st)
  d, block_q, block_k, precision = st.head_dim, st.block_q, st.block_k, _precision(q_ref.dtype)
  start_q, rows_Q, q1_QxD, q2_QxD, segments_Q = _query_tile(q_ref, segq_ref, st)

  def online_softmax(q_QxD, k_KxD, v_Kx2D, visible_QxK, acc_Qx2D, max_Q, sum_Q):
    logits_QxK = jnp.where(visible_QxK, _dot(q_QxD, k_KxD, precision, trans_b=True) * st.scale, _MASKED)
    new_max_Q = jnp.maximum(max_Q, jnp.max(logits_QxK, axis=-1))
    probs_QxK = jnp.exp(logits_QxK - new_max_Q[:, None])
    rescale_Q = jnp.exp(max_Q - new_max_Q)
    acc_Qx2D = rescale_Q[:, None] * acc_Qx2D + _dot(probs_QxK.astype(v_Kx2D.dtype), v_Kx2D, precision)
    return acc_Qx2D, new_max_Q, rescale_Q * sum_Q + jnp.sum(probs_QxK, axis=-1)

  def body(j, carry):
    tile = pl.ds(j * block_k, block_k)
    (k1_KxD, k2_KxD), v_Kx2D = _halves(k_ref, tile, d), v_ref[tile, :]
    visible_QxK = _visible(rows_Q, j * block_k, block_k, segments_Q, None if segk_ref is None else segk_ref[tile])
    return (online_softmax(q1_QxD, k1_KxD, v_Kx2D, visible_QxK, *carry[:3])
            + online_softmax(q2_QxD, k2_KxD, v_Kx2D, visible_QxK, *carry[3:]))

  empty = (jnp.zeros((block_q, 2 * d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  # Causal: this query tile sees the key tiles up to its last row.
  n_tiles = lax.div(start_q + block_q + block_k - 1, block_k)
  acc1, max1, sum1, acc2, max2, sum2 = lax.fori_loop(0, n_tiles, body, empty + empty)
  a2v_Qx2D = acc2 / sum2[:, None]
  o_ref[...] = acc1 / sum1[:, None] - lam_ref[0] * a2v_Qx2D
  a2v_ref[...] = a2v_Qx2D
  lse1_ref[...] = max1 + jnp.log(sum1)
  lse2_ref[...] = max2 + jnp.log(sum2)


def _score_grads(q1_QxD, q2_QxD, k1_KxD, k2_KxD, v_Kx2D, do_Qx2D, lse1_Q, lse2_Q, delta1_Q, delta2_Q, lam,
                 visible_QxK, st):
  """Both maps' probabilities recomputed from their logsumexps, and the gradients of their logits.

  With dP = dO V^T: dS1 = P1 ∘ (dP - Δ1) and dS2 = -λ P2 ∘ (dP - Δ2), Δc = rowsum(dO ∘ Ac V).
  """
  precision = _precision(q1_QxD.dtype)
  def probs(q_QxD, k_KxD, lse_Q):
    logits_QxK = jnp.where(visible_QxK, _dot(q_QxD, k_KxD, precision, trans_b=True) * st.scale, _MASKED)
    return jnp.exp(logits_QxK - lse_Q[:, None])
  p1_QxK, p2_QxK = probs(q1_QxD, k1_KxD, lse1_Q), probs(q2_QxD, k2_KxD, lse2_Q)
  dp_QxK = _dot(do_Qx2D, v_Kx2D, precision, trans_b=True)
  ds1_QxK = p1_QxK * (dp_QxK - delta1_Q[:, None])
  ds2_QxK = -lam * p2_QxK * (dp_QxK - delta2_Q[:, None])
  return p1_QxK, p2_QxK, ds1_QxK, ds2_QxK


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse1_ref, lse2_ref, delta1_ref, delta2_ref, lam_ref, *refs,
               st: _Static):
  segq_ref, segk_ref, (dq_ref,) = _split_refs(refs, st)
  d, block_q, block_k, precision = st.head_dim, st.block_q, st.block_k, _precision(q_ref.dtype)
  start_q, rows_Q, q1_QxD, q2_QxD, segments_Q = _query_tile(q_ref, segq_ref, st)
  do_Qx2D, lam = do_ref[...], lam_ref[0]
  per_row = (lse1_ref[...], lse2_ref[...], delta1_ref[...], delta2_ref[...])

  def body(j, carry):
    dq1_QxD, dq2_QxD = carry
    tile = pl.ds(j * block_k, block_k)
    (k1_KxD, k2_KxD), v_Kx2D = _halves(k_ref, tile, d), v_ref[tile, :]
    visible_QxK = _visible(rows_Q, j * block_k, block_k, segments_Q, None if segk_ref is None else segk_ref[tile])
    _, _, ds1_QxK, ds2_QxK = _score_grads(q1_QxD, q2_QxD, k1_KxD, k2_KxD, v_Kx2D, do_Qx2D, *per_row, lam,
                                          visible_QxK, st)
    return (dq1_QxD + _dot(ds1_QxK.astype(k1_KxD.dtype), k1_KxD, precision),
            dq2_QxD + _dot(ds2_QxK.astype(k2_KxD.dtype), k2_KxD, precision))

  zeros = jnp.zeros((block_q, d), jnp.float32)
  dq1_QxD, dq2_QxD = lax.fori_loop(0, lax.div(start_q + block_q + block_k - 1, block_k), body, (zeros, zeros))
  dq_ref[:, :d] = (dq1_QxD * st.scale).astype(dq_ref.dtype)
  dq_ref[:, d:] = (dq2_QxD * st.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse1_ref, lse2_ref, delta1_ref, delta2_ref, lam_ref, *refs,
                st: _Static):
  segq_ref, segk_ref, (dk_ref, dv_ref) = _split_refs(refs, st)
  d, block_q = st.head_dim, st.block_q
  block_k = k_ref.shape[0]
  precision = _precision(q_ref.dtype)
  start_k = pl.program_id(0) * block_k
  k1_KxD, k2_KxD = _halves(k_ref, slice(None), d)
  v_Kx2D, lam = v_ref[...], lam_ref[0]
  segments_K = None if segk_ref is None else segk_ref[...]

  def body(i, carry):
    dk1_KxD, dk2_KxD, dv_Kx2D = carry
    tile = pl.ds(i * block_q, block_q)
    (q1_QxD, q2_QxD), do_Qx2D = _halves(q_ref, tile, d), do_ref[tile, :]
    per_row = (lse1_ref[tile], lse2_ref[tile], delta1_ref[tile], delta2_ref[tile])
    visible_QxK = _visible(i * block_q + jnp.arange(block_q), start_k, block_k,
                           None if segq_ref is None else segq_ref[tile], segments_K)
    p1_QxK, p2_QxK, ds1_QxK, ds2_QxK = _score_grads(q1_QxD, q2_QxD, k1_KxD, k2_KxD, v_Kx2D, do_Qx2D, *per_row, lam,
                                                    visible_QxK, st)
    dtype = q1_QxD.dtype
    return (dk1_KxD + _dot(ds1_QxK.astype(dtype), q1_QxD, precision, trans_a=True),
            dk2_KxD + _dot(ds2_QxK.astype(dtype), q2_QxD, precision, trans_a=True),
            dv_Kx2D + _dot((p1_QxK - lam * p2_QxK).astype(dtype), do_Qx2D, precision, trans_a=True))

  zeros = jnp.zeros((block_k, d), jnp.float32)
  # Causal: query tiles that end before this key tile's first key contribute nothing.
  dk1_KxD, dk2_KxD, dv_Kx2D = lax.fori_loop(lax.div(start_k, block_q), q_ref.shape[0] // block_q, body,
                                            (zeros, zeros, jnp.zeros((block_k, 2 * d), jnp.float32)))
  dk_ref[:, :d] = dk1_KxD * st.scale
  dk_ref[:, d:] = dk2_KxD * st.scale
  dv_ref[...] = dv_Kx2D


def _specs(st: _Static, t: int, s: int, d2: int):
  """BlockSpecs over grids (tile, batch, head): a query-side tile, the whole query side, the kv side likewise."""
  rep = st.n_rep
  return dict(
      q_tile=pl.BlockSpec((None, st.block_q, None, d2), lambda i, b, h: (b, i, h, 0)),
      q_all=pl.BlockSpec((None, t, None, d2), lambda i, b, h: (b, 0, h, 0)),
      kv_tile=pl.BlockSpec((None, st.block_k, None, d2), lambda i, b, h: (b, i, h // rep, 0)),
      kv_all=pl.BlockSpec((None, s, None, d2), lambda i, b, h: (b, 0, h // rep, 0)),
      kv_tile_per_head=pl.BlockSpec((None, st.block_k, None, d2), lambda i, b, h: (b, i, h, 0)),
      row_tile=pl.BlockSpec((None, None, st.block_q), lambda i, b, h: (b, h, i)),
      row_all=pl.BlockSpec((None, None, t), lambda i, b, h: (b, h, 0)),
      scalar=pl.BlockSpec((1,), lambda i, b, h: (0,)),
      segments_q_tile=pl.BlockSpec((None, st.block_q), lambda i, b, h: (b, i)),
      segments_q_all=pl.BlockSpec((None, t), lambda i, b, h: (b, 0)),
      segments_kv_tile=pl.BlockSpec((None, st.block_k), lambda i, b, h: (b, i)),
      segments_kv_all=pl.BlockSpec((None, s), lambda i, b, h: (b, 0)),
  )


def _segment_inputs(st: _Static, spec: dict, segments_BxT, query_side: str, key_side: str):
  """(extra in_specs, extra operands) that give the kernels the segment ids, when there are any."""
  if not st.segments:
    return [], []
  return [spec[f'segments_q_{query_side}'], spec[f'segments_kv_{key_side}']], [segments_BxT, segments_BxT]


def _forward(q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, lam_1, segments_BxT, st: _Static):
  b, t, h, d2 = q_BxTxHx2D.shape
  spec = _specs(st, t, k_BxSxGx2D.shape[1], d2)
  segment_specs, segment_operands = _segment_inputs(st, spec, segments_BxT, 'tile', 'all')
  rows = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
  out = jax.ShapeDtypeStruct((b, t, h, d2), jnp.float32)
  return pl.pallas_call(
      functools.partial(_forward_kernel, st=st), grid=(t // st.block_q, b, h),
      in_specs=[spec['q_tile'], spec['kv_all'], spec['kv_all'], spec['scalar']] + segment_specs,
      out_specs=[spec['q_tile'], spec['q_tile'], spec['row_tile'], spec['row_tile']],
      out_shape=[out, out, rows, rows], name='diff_v1_flash_forward', **st.params(d2),
  )(q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, lam_1, *segment_operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, lam_1, segments_BxT, st: _Static):
  return _forward(q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, lam_1, segments_BxT, st)[0]


def _flash_fwd(q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, lam_1, segments_BxT, st: _Static):
  out_BxTxHx2D, a2v_BxTxHx2D, lse1_BxHxT, lse2_BxHxT = _forward(q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, lam_1,
                                                                segments_BxT, st)
  return out_BxTxHx2D, (q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, lam_1, segments_BxT, out_BxTxHx2D, a2v_BxTxHx2D,
                        lse1_BxHxT, lse2_BxHxT)


def _flash_bwd(st: _Static, residuals, dout_BxTxHx2D):
  (q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, lam_1, segments_BxT, out_BxTxHx2D, a2v_BxTxHx2D, lse1_BxHxT,
   lse2_BxHxT) = residuals
  b, t, h, d2 = q_BxTxHx2D.shape
  s, g = k_BxSxGx2D.shape[1:3]
  # The forward keeps A2 V (one extra float32 output) so that Δ1, Δ2 and dλ are elementwise reductions here
  # (XLA fuses them) rather than another pass over K/V: Δc = rowsum(dO ∘ Ac V) with A1 V = O + λ A2 V, and
  # dλ = -Σ dO ∘ A2 V.
  dout_BxTxHx2D = dout_BxTxHx2D.astype(jnp.float32)
  delta2_BxTxH = jnp.sum(dout_BxTxHx2D * a2v_BxTxHx2D, axis=-1)
  delta1_BxTxH = jnp.sum(dout_BxTxHx2D * (out_BxTxHx2D + lam_1[0] * a2v_BxTxHx2D), axis=-1)
  dlam_1 = -jnp.sum(delta2_BxTxH).reshape(1)
  per_row = [x.transpose(0, 2, 1) for x in (delta1_BxTxH, delta2_BxTxH)]
  # The kernels' matmuls take dO in the input dtype (bf16 tensor cores); P and dS are cast likewise.
  dout_BxTxHx2D = dout_BxTxHx2D.astype(q_BxTxHx2D.dtype)
  operands = (q_BxTxHx2D, k_BxSxGx2D, v_BxSxGx2D, dout_BxTxHx2D, lse1_BxHxT, lse2_BxHxT, *per_row, lam_1)
  spec = _specs(st, t, s, d2)
  segment_specs, segment_operands = _segment_inputs(st, spec, segments_BxT, 'tile', 'all')
  dq_BxTxHx2D = pl.pallas_call(
      functools.partial(_dq_kernel, st=st), grid=(t // st.block_q, b, h),
      in_specs=[spec['q_tile'], spec['kv_all'], spec['kv_all'], spec['q_tile']] + [spec['row_tile']] * 4
      + [spec['scalar']] + segment_specs,
      out_specs=spec['q_tile'], out_shape=jax.ShapeDtypeStruct(q_BxTxHx2D.shape, q_BxTxHx2D.dtype),
      name='diff_v1_flash_dq', **st.params(d2),
  )(*operands, *segment_operands)
  # One dk, dv per differential head, summed over the R heads of each kv group below: no atomics across heads.
  per_head = jax.ShapeDtypeStruct((b, s, h, d2), jnp.float32)
  segment_specs, segment_operands = _segment_inputs(st, spec, segments_BxT, 'all', 'tile')
  dk_BxSxHx2D, dv_BxSxHx2D = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st), grid=(s // st.block_k, b, h),
      in_specs=[spec['q_all'], spec['kv_tile'], spec['kv_tile'], spec['q_all']] + [spec['row_all']] * 4
      + [spec['scalar']] + segment_specs,
      out_specs=[spec['kv_tile_per_head']] * 2, out_shape=[per_head, per_head],
      name='diff_v1_flash_dkv', **st.params(d2),
  )(*operands, *segment_operands)
  dk_BxSxGx2D, dv_BxSxGx2D = (x.reshape(b, s, g, st.n_rep, d2).sum(axis=3) for x in (dk_BxSxHx2D, dv_BxSxHx2D))
  return dq_BxTxHx2D, dk_BxSxGx2D.astype(k_BxSxGx2D.dtype), dv_BxSxGx2D.astype(v_BxSxGx2D.dtype), dlam_1, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def diff_v1_flash_attention(q_BxTx2HxD, k_BxSx2GxD, v_BxSxGx2D, lam, *, segment_ids_BxT=None, block_q=None,
                            block_k=None, interpret=None):
  """`diff_v1_attention` (causal, GQA, optional segment ids) as fused Pallas kernels; returns (B, T, H, 2D) float32.

  Differentiable in q, k, v and λ (a float32 scalar, traced). T must equal S (training, no cache) and be a multiple
  of the tile sizes (by default `tile(D)`, clipped to T); D and the tiles powers of two >= 16. `interpret` defaults
  to True off the GPU.
  """
  b, t, two_h, d = q_BxTx2HxD.shape
  s, two_g = k_BxSx2GxD.shape[1:3]
  block_q, block_k = min(block_q or tile(d), t), min(block_k or tile(d), s)
  if t != s or t % block_q or s % block_k or not all(map(head_dim_supported, (d, block_q, block_k))):
    raise ValueError(f'the Pallas DIFF V1 kernel needs T == S, a multiple of its tiles ({block_q}, {block_k}), and '
                     f'tiles and head width that are powers of two >= 16; got T={t}, S={s}, D={d}')
  interpret = jax.default_backend() != 'gpu' if interpret is None else interpret
  st = _Static(head_dim=d, n_rep=two_h // two_g, block_q=block_q, block_k=block_k, interpret=interpret,
               segments=segment_ids_BxT is not None)
  # Free reshapes: the adjacent sub-heads (2h, 2h+1) become the halves [x1 | x2] of one 2D-wide row.
  q_BxTxHx2D = q_BxTx2HxD.reshape(b, t, two_h // 2, 2 * d)
  k_BxSxGx2D = k_BxSx2GxD.reshape(b, s, two_g // 2, 2 * d)
  lam_1 = jnp.asarray(lam, jnp.float32).reshape(1)
  # Triton's matmuls need both operands in one dtype.
  segments_BxT = None if segment_ids_BxT is None else jnp.asarray(segment_ids_BxT, jnp.int32)
  return _flash(q_BxTxHx2D, k_BxSxGx2D.astype(q_BxTxHx2D.dtype), v_BxSxGx2D.astype(q_BxTxHx2D.dtype), lam_1,
                segments_BxT, st)

