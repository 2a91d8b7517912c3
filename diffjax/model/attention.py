"""Differential attention (DIFF V1 and V2) and the baseline multi-head attention, with switchable kernels.

Tensor names carry their shapes: B batch, T query length, S key length, E model width, D head width,
H differential heads, G kv groups, R query heads per kv group (GQA), N query heads, K kv heads.
Every kernel path computes the same function; `xla` is the reference on every platform.

Each layer also runs against a KV cache (generation): given `cache = {'k': (B, S, K, D), 'v': (B, S, ·, ·)}`, it
stores this call's rotated keys and values at the slots of their absolute positions, lets the query at position p
see the slots s <= p, and returns (output, updated cache). Projections, RoPE, λ and norms are the training path's.

Analysis reads the einsum path from the layer itself. Run with `mutable=['intermediates']`, each layer sows its
scaled pre-softmax logits (B, sub-heads, T, S), entries a query cannot see set to NaN, and its maps: `a1`, `a2`
(B, H, T, S) and `lambda` for DIFF V1, `probs` (B, query heads, T, S) for the others (and DIFF V2's per-token
`lambda`). The logits also pass through the layer's `attention_logits` method, the identity, so that
`nn.intercept_methods` can alter them (quantization studies). Without that mutable collection nothing is sown and
the identity compiles away; the kernel paths (cuDNN, Pallas, splash, tokamax) have no logits to show and sow nothing.
"""

import contextlib
import functools
import importlib
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.errors import ConfigError
from diffjax.model import kernels, splash
from diffjax.model.config import PAPER_LAMBDA_INIT, ModelConfig, lambda_init_for
from diffjax.model.layers import dense, norm_scale, output_stddev, rms_norm

_MASKED = jnp.finfo(jnp.float32).min


def apply_rope(x_BxTxNxD, positions_BxT, theta: float, pairing: str):
  """Rotary embedding over the last axis; `interleaved` rotates channels (0,1),(2,3)..., `half` (i, i + D/2)."""
  dim = x_BxTxNxD.shape[-1]
  inv_freq_F = theta ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angle_BxTx1xF = (positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxTx1xF), jnp.cos(angle_BxTx1xF)
  x = x_BxTxNxD.astype(jnp.float32)
  if pairing == 'interleaved':
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x.shape)
  else:
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x_BxTxNxD.dtype)


def recording(module: nn.Module) -> bool:
  """Whether `module` sows what analysis reads: only where a caller made 'intermediates' mutable, never while the
  parameters are created, so training and state creation trace none of it."""
  return module.is_mutable_collection('intermediates') and not module.is_initializing()


_warned = set()


def resolve_impl(cfg: ModelConfig, cached: bool = False, seq_len: int | None = None) -> str:
  """The kernel a layer of `cfg` runs, from the platform, variant, dtype, head width and sequence length: `auto`
  becomes the fastest that can run here, an explicit choice that cannot run is a ConfigError. The only place these
  rules live: the config check before a run starts and the layers themselves both ask here.

  On a TPU `auto` is 'splash'; on an NVIDIA GPU it is 'cudnn' where cuDNN takes the dtype and head width. The
  platform is this machine's, or the one a program is being compiled for (`compiling_for`).

  'tokamax' (tokamax's Mosaic GPU flash kernels, an optional GPU dependency) is only ever chosen by name.

  With a KV cache (`cached`, decoding) every choice runs the einsum path, the one that takes the cache's mask. So
  do 'pallas', 'splash' and 'tokamax' at a `seq_len` their tiles do not divide: state creation traces the model on
  a few tokens, and such short sequences cost nothing to run either way.
  """
  requested, head_dim = cfg.attention_impl, cfg.head_dim
  on_gpu, on_tpu = target_platform() == 'gpu', target_platform() == 'tpu'
  half_precision = jnp.dtype(cfg.compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  cudnn_ok = on_gpu and half_precision and head_dim % 8 == 0 and head_dim <= 128
  if requested == 'cudnn' and not cudnn_ok:
    reason = ('there is no GPU' if not on_gpu else 'it needs model.dtype bfloat16 or float16' if not half_precision
              else 'it needs a head width that is a multiple of 8 and at most 128')
    raise ConfigError(f"model.attention_impl: 'cudnn' cannot run here ({reason}); use 'auto' or 'xla'")
  if requested == 'pallas' and cfg.variant != 'diff_v1':
    raise ConfigError(f"model.attention_impl: 'pallas' has a kernel for diff_v1 only, not {cfg.variant}; use "
                      "'auto', 'xla' or 'cudnn'")
  if requested == 'pallas' and not (on_gpu or kernels.interpret_requested()):
    raise ConfigError(f"model.attention_impl: 'pallas' needs an NVIDIA GPU (or {kernels.INTERPRET_ENV}=1 "
                      "for the slow interpret mode on CPU); use 'auto' or 'xla'")
  if requested == 'pallas' and not kernels.head_dim_supported(head_dim):
    raise ConfigError(f"model.attention_impl: 'pallas' needs a power-of-two head width >= 16, not {head_dim}")
  if requested == 'tokamax' and not (on_gpu and tokamax_installed()):
    raise ConfigError("model.attention_impl: 'tokamax' needs an NVIDIA GPU and the tokamax package (pip install "
                      "'diffjax[tokamax]', JAX 0.11.1 or later); use 'auto' or 'cudnn'")
  if requested == 'splash' and not (on_tpu or kernels.interpret_requested()):
    raise ConfigError(f"model.attention_impl: 'splash' needs a TPU (or {kernels.INTERPRET_ENV}=1 for the slow "
                      "interpret mode elsewhere); use 'auto' or 'xla'")
  if requested == 'auto' and on_tpu:
    requested = 'splash'
  if cached or (seq_len is not None and (requested == 'pallas' and not kernels.runs_at(seq_len, head_dim)
                                         or requested == 'splash' and not splash.runs_at(seq_len)
                                         or requested == 'tokamax' and seq_len % TOKAMAX_BLOCK)):
    return 'xla'
  if requested != 'auto':
    return requested
  if cudnn_ok:
    return 'cudnn'
  if on_gpu and 'auto' not in _warned:
    _warned.add('auto')
    logging.warning('attention_impl=auto: cuDNN flash attention needs bf16/fp16 and head width <= 128 '
                    '(multiple of 8); falling back to the XLA path')
  return 'xla'


# tokamax's Mosaic GPU kernels tile sequences by 64; state creation's few tokens run the einsum path instead.
TOKAMAX_BLOCK = 64
# The tokamax implementation the path calls; its 'xla' one runs anywhere, which the tests use to check the plumbing.
TOKAMAX_KERNEL = 'mosaic'


@functools.cache
def tokamax_installed() -> bool:
  """Whether tokamax (an optional GPU dependency: it needs JAX 0.11.1 or later) can be imported here."""
  try:
    importlib.import_module('tokamax')
    return True
  except Exception:  # not installed, or installed beside a JAX older than it needs
    return False


_compile_target = []


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within it, kernels are chosen for `platform` ('tpu', 'gpu', 'cpu') rather than for this machine's backend:
  a train step compiled here ahead of time for a TPU slice (launch/aot_compile.py) runs the TPU's kernels."""
  _compile_target.append(platform)
  try:
    yield
  finally:
    _compile_target.pop()


def target_platform() -> str:
  return _compile_target[-1] if _compile_target else jax.default_backend()


def _interpret() -> bool:
  """Pallas kernels run in interpret mode off their own platform (only ever asked for with the interpret switch)."""
  return target_platform() not in ('gpu', 'tpu')


def describe_impl(cfg: ModelConfig, seq_len: int) -> str:
  """The kernel training at `seq_len` runs, in words for the run's first lines, e.g. 'cudnn (wide values)'."""
  impl = resolve_impl(cfg, seq_len=seq_len)
  if impl == 'cudnn' and cfg.variant == 'diff_v1':
    return f'cudnn ({cudnn_diff_v1_form(cfg.head_dim, seq_len)} values)'
  return impl


def same_document(segment_ids_BxT, segment_ids_BxS=None):
  """(B, T, S) bool: query t and key s lie in the same document of a packed row."""
  segment_ids_BxS = segment_ids_BxT if segment_ids_BxS is None else segment_ids_BxS
  return segment_ids_BxT[:, :, None] == segment_ids_BxS[:, None, :]


def _document_mask(segment_ids_BxT):
  """(B, 1, T, S) bool for the kernels that take a mask beside their own causal one (cuDNN, tokamax); None without
  segment ids."""
  return None if segment_ids_BxT is None else same_document(segment_ids_BxT)[:, None]


def _einsum_attention(logits_spec: str, out_spec: str, q, k, v, visible_BxTxS, segment_ids_BxT, observer, maps):
  """The einsum path of both attention functions, returned float32 as `out_spec` lays it out. `logits_spec` gives
  (B, ..., T, S), whose axes between B and T flatten to the query heads N; the observer records `maps(probs)` of the
  (B, N, T, S) softmax maps. The mask is the cache's `visible_BxTxS`, else causal (query t sees keys s <= t), within
  documents when segment ids are given."""
  logits = jnp.einsum(logits_spec, q, k, preferred_element_type=jnp.float32)
  b, t, s = logits.shape[0], logits.shape[-2], logits.shape[-1]
  if visible_BxTxS is None:
    visible_BxTxS = (jnp.arange(t)[:, None] + (s - t) >= jnp.arange(s)[None, :])[None]
    if segment_ids_BxT is not None:
      visible_BxTxS = visible_BxTxS & same_document(segment_ids_BxT)
  visible_Bx1xTxS = visible_BxTxS[:, None]
  scaled_BxNxTxS = (logits * q.shape[-1] ** -0.5).reshape(b, -1, t, s)
  if observer is not None:
    scaled_BxNxTxS = observer.attention_logits(scaled_BxNxTxS, visible_Bx1xTxS)
  # Keys a query cannot see get no weight; the softmax is float32 whatever the compute dtype.
  probs_BxNxTxS = jax.nn.softmax(jnp.where(visible_Bx1xTxS, scaled_BxNxTxS.astype(jnp.float32), _MASKED), axis=-1)
  if observer is not None and recording(observer):
    for name, value in maps(probs_BxNxTxS).items():
      observer.sow('intermediates', name, value)
  return jnp.einsum(out_spec, probs_BxNxTxS.reshape(logits.shape).astype(v.dtype), v,
                    preferred_element_type=jnp.float32)


def softmax_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, impl: str, visible_BxTxS=None, segment_ids_BxT=None,
                      observer=None):
  """Causal attention with GQA (query head n reads kv head n // (N / K)); returns (B, T, N, D) float32.

  `segment_ids_BxT` (training, T == S) keeps each token inside its document; `visible_BxTxS` replaces the causal
  mask (the cache path; `xla` only). `observer`, the calling layer, sees the einsum path's logits and maps.
  """
  if kernel := _kernel(impl):
    return kernel(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT).astype(jnp.float32)
  b, t, n, d = q_BxTxNxD.shape
  kv = k_BxSxKxD.shape[2]
  # Query head n = k·R + r, so (K, R) flattens to the head axis as it stands.
  out = _einsum_attention('btkrd,bskd->bkrts', 'bkrts,bskd->btkrd', q_BxTxNxD.reshape(b, t, kv, n // kv, d),
                          k_BxSxKxD, v_BxSxKxD, visible_BxTxS, segment_ids_BxT, observer,
                          lambda probs_BxNxTxS: {'probs': probs_BxNxTxS})
  return out.reshape(b, t, n, d)


@functools.cache
def cudnn_takes_wide_values() -> bool:
  """Whether cuDNN here runs attention with values wider than keys (multi-head latent attention): cuDNN 9.10 or
  later on Hopper or newer, reached through JAX's own cuDNN attention module (`jax.nn.dot_product_attention` asks
  for equal widths)."""
  if jax.default_backend() != 'gpu':
    return False
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    return cudnn_attention.check_cudnn_version() >= 91000 and cudnn_attention.check_compute_capability('9.0')
  except (ImportError, AttributeError, RuntimeError):  # a JAX that moved the module, or no cuDNN
    return False


def cudnn_diff_v1_form(head_dim: int, seq_len: int) -> str:
  """How 'cudnn' runs DIFF V1: 'wide' (one call per map against the 2D-wide values) or 'split' (each map against
  the two D-wide halves of V, four calls' worth of work).

  Measured with launch/bench_attention.py on an H100 (batch 8, forward + backward, against the baseline's cuDNN):
  at D = 64 wide takes 1.44x (T 2048) and 1.50x (T 8192) of the baseline's time and split 1.96x and 2.04x. At
  D = 128 the kernels alone are even at T 2048 and split leads at T 8192 (2.00x against 2.19x), but inside the
  1.4B model wide still wins at T 2048 (617.3 against 625.3 ms a step) and ties at T 4096 (711.6 against 714.2),
  since it writes none of the split form's concatenations (docs/performance.md).
  """
  wide = head_dim <= 64 or (head_dim <= 128 and seq_len <= 4096)
  return 'wide' if wide and cudnn_takes_wide_values() else 'split'


def _kernel(impl: str):
  """The kernel function of `impl`, (q, k, v, segment ids) -> (B, T, N, W) in q's dtype; None for the einsum path.
  'cudnn' takes values as wide as the keys, 'cudnn_wide', 'splash' and 'tokamax' any width."""
  return {'cudnn': _cudnn_attention, 'cudnn_wide': _wide_value_attention, 'tokamax': _tokamax_attention,
          'splash': functools.partial(splash.splash_attention, interpret=_interpret())}.get(impl)


def _cudnn_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, segment_ids_BxT):
  """Causal GQA attention through cuDNN, values as wide as keys; returns (B, T, N, D) in q's dtype."""
  # cuDNN applies the document mask as a bias next to its own causal mask.
  return jax.nn.dot_product_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, mask=_document_mask(segment_ids_BxT),
                                      scale=q_BxTxNxD.shape[-1] ** -0.5, is_causal=True, implementation='cudnn')


def _wide_value_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxW, segment_ids_BxT):
  """Causal GQA attention through cuDNN with a value width W other than D; returns (B, T, N, W) in q's dtype."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  mask = _document_mask(segment_ids_BxT)
  return cudnn_attention.dot_product_attention(
      q_BxTxNxD, k_BxSxKxD, v_BxSxKxW.astype(q_BxTxNxD.dtype), mask=mask, scale=q_BxTxNxD.shape[-1] ** -0.5,
      mask_type=cudnn_attention.MaskType.CAUSAL)


def _tokamax_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxW, segment_ids_BxT):
  """Causal GQA attention through tokamax's Mosaic GPU flash kernel, forward and backward, which takes a value
  width W other than D; returns (B, T, N, W) in q's dtype."""
  import tokamax
  mask = _document_mask(segment_ids_BxT)
  return tokamax.dot_product_attention(
      q_BxTxNxD, k_BxSxKxD, v_BxSxKxW.astype(q_BxTxNxD.dtype), mask=mask, scale=q_BxTxNxD.shape[-1] ** -0.5,
      is_causal=True, implementation=TOKAMAX_KERNEL)


def diff_v1_attention(q_BxTx2HxD, k_BxSx2GxD, v_BxSxGx2D, lam, impl: str, visible_BxTxS=None,
                      segment_ids_BxT=None, observer=None):
  """(A1 - λ A2) V for DIFF V1, returned as (B, T, H, 2D) float32; the arguments are `diff_v1_map_outputs`'s."""
  return combine_maps(*diff_v1_map_outputs(q_BxTx2HxD, k_BxSx2GxD, v_BxSxGx2D, lam, impl, visible_BxTxS,
                                           segment_ids_BxT, observer), lam)


def combine_maps(a1v_BxTxHx2D, a2v_BxTxHx2D, lam):
  """A1 V - λ A2 V in float32, from `diff_v1_map_outputs`: the subtraction comes after both softmaxes, never on the
  logits."""
  a1v_BxTxHx2D = a1v_BxTxHx2D.astype(jnp.float32)
  return a1v_BxTxHx2D if a2v_BxTxHx2D is None else a1v_BxTxHx2D - lam * a2v_BxTxHx2D.astype(jnp.float32)


def diff_v1_map_outputs(q_BxTx2HxD, k_BxSx2GxD, v_BxSxGx2D, lam, impl: str, visible_BxTxS=None,
                        segment_ids_BxT=None, observer=None):
  """(A1 V, A2 V) of DIFF V1, each (B, T, H, 2D) as the kernel returns it (cuDNN's and tokamax's in the compute
  dtype); the Pallas kernel, which applies λ itself, returns ((A1 - λ A2) V in float32, None).

  Query sub-heads 2h and 2h+1 are (q1, q2) of differential head h, and the same for keys; q1 meets k1 and q2
  meets k2 of the same kv group h // R (the reference's flash semantics). `segment_ids_BxT` (training, T == S)
  keeps each token inside its document; `visible_BxTxS` replaces the causal mask (the cache path; `xla` only).
  `observer`, the calling layer, sees the einsum path's logits, both maps and λ.
  """
  b, t, two_h, d = q_BxTx2HxD.shape
  heads, groups = two_h // 2, k_BxSx2GxD.shape[2] // 2
  if impl == 'pallas':
    return kernels.diff_v1_flash_attention(q_BxTx2HxD, k_BxSx2GxD, v_BxSxGx2D, lam,
                                           segment_ids_BxT=segment_ids_BxT), None
  if impl == 'cudnn':
    impl = f'cudnn_{cudnn_diff_v1_form(d, t)}'
  if impl in ('cudnn_wide', 'splash', 'tokamax'):
    # One call per map, each against the whole 2D-wide V: q1 heads meet k1, q2 heads meet k2, of one kv group.
    wide = _kernel(impl)
    return tuple(wide(q_BxTx2HxD[:, :, c::2], k_BxSx2GxD[:, :, c::2], v_BxSxGx2D, segment_ids_BxT) for c in (0, 1))
  if impl == 'cudnn_split':
    # Value width == key width, as cuDNN asks without wide values: each map runs against both halves of V. Stacking
    # the q1 heads before the q2 heads (and k1 before k2) keeps jax's GQA grouping n // R on the right kv group.
    q_BxTx2HxD = jnp.concatenate([q_BxTx2HxD[:, :, 0::2], q_BxTx2HxD[:, :, 1::2]], axis=2)
    k_BxSx2GxD = jnp.concatenate([k_BxSx2GxD[:, :, 0::2], k_BxSx2GxD[:, :, 1::2]], axis=2)
    halves = (v_BxSxGx2D[..., :d], v_BxSxGx2D[..., d:])
    out_a, out_b = (_cudnn_attention(q_BxTx2HxD, k_BxSx2GxD, jnp.concatenate([half, half], axis=2), segment_ids_BxT)
                    for half in halves)
    return tuple(jnp.concatenate([out_a[:, :, maps], out_b[:, :, maps]], axis=-1)
                 for maps in (slice(0, heads), slice(heads, None)))
  # Sub-head (g·R + r)·2 + c is query sub-head 2h + c of head h = g·R + r: (G, R, 2) flattens to the query layout.
  out_BxTxGxRx2x2D = _einsum_attention(
      'btgrcd,bsgcd->bgrcts', 'bgrcts,bsge->btgrce', q_BxTx2HxD.reshape(b, t, groups, heads // groups, 2, d),
      k_BxSx2GxD.reshape(b, -1, groups, 2, d), v_BxSxGx2D, visible_BxTxS, segment_ids_BxT, observer,
      lambda probs_Bx2HxTxS: {'a1': probs_Bx2HxTxS[:, 0::2], 'a2': probs_Bx2HxTxS[:, 1::2], 'lambda': lam})
  return tuple(out_BxTxGxRx2x2D[..., c, :].reshape(b, t, heads, 2 * d) for c in (0, 1))


LAMBDA_VECTORS = ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')


def reparameterised_lambda(attn_params, layer, lambda_init_schedule=PAPER_LAMBDA_INIT):
  """λ = exp(λq1·λk1) − exp(λq2·λk2) + λ_init in float32; one scalar shared by all heads of the layer."""
  p = {n: jnp.asarray(attn_params[n], jnp.float32) for n in LAMBDA_VECTORS}
  return (jnp.exp(jnp.sum(p['lambda_q1'] * p['lambda_k1'])) - jnp.exp(jnp.sum(p['lambda_q2'] * p['lambda_k2']))
          + lambda_init_for(layer, lambda_init_schedule))


def _project(cfg: ModelConfig, x_BxTxE, positions_BxT, n_q: int, v_width: int):
  """Queries (B, T, n_q, D) and keys (B, T, kv_heads, D), both rotated, and values (B, T, ·, v_width)."""
  b, t, _ = x_BxTxE.shape
  d = cfg.head_dim
  q = dense(cfg, n_q * d, ('embed', 'heads'), 'q_proj')(x_BxTxE).reshape(b, t, n_q, d)
  k = dense(cfg, cfg.kv_heads * d, ('embed', 'kv'), 'k_proj')(x_BxTxE).reshape(b, t, cfg.kv_heads, d)
  v = dense(cfg, cfg.kv_heads * d, ('embed', 'kv'), 'v_proj')(x_BxTxE).reshape(b, t, -1, v_width)
  rope = functools.partial(apply_rope, positions_BxT=positions_BxT, theta=cfg.rope_theta, pairing=cfg.rope_pairing)
  return rope(q), rope(k), v


def _keys_values(cfg: ModelConfig, k_BxTxKxD, v_BxTxKxW, positions_BxT, cache):
  """(keys, values, impl, visible mask, cache) the attention runs on: this call's own keys and values causally,
  or, with a cache, the cache after storing them at their positions' slots."""
  if cache is None:
    return k_BxTxKxD, v_BxTxKxW, resolve_impl(cfg, seq_len=k_BxTxKxD.shape[1]), None, None
  # Row b's tokens sit at consecutive positions from positions[b, 0] (rows may be at different positions).
  put = jax.vmap(lambda buffer, new, start: jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype),
                                                                                start, axis=0))
  start_B = positions_BxT[:, 0]
  cache = {'k': put(cache['k'], k_BxTxKxD, start_B), 'v': put(cache['v'], v_BxTxKxW, start_B)}
  slots = cache['k'].shape[1]
  visible_BxTxS = jnp.arange(slots)[None, None, :] <= positions_BxT[:, :, None]
  return cache['k'], cache['v'], resolve_impl(cfg, cached=True), visible_BxTxS, cache


def _positions(x_BxTxE, positions_BxT, cache):
  """The given positions, else 0..T-1 (without a cache only: cached tokens must say where they are)."""
  if positions_BxT is not None:
    return positions_BxT
  if cache is not None:
    raise ValueError('attention with a KV cache needs the tokens\' absolute positions')
  b, t, _ = x_BxTxE.shape
  return jnp.broadcast_to(jnp.arange(t), (b, t))


class _Attention(nn.Module):
  """What the three attention layers share: their config and depth, the point where analysis sees the einsum
  path's logits, softmax heads and the output projection."""
  cfg: ModelConfig
  layer: int

  def attention_logits(self, logits_BxNxTxS, visible_BxNxTxS):
    """The scaled logits the softmax takes, unchanged: sown (unseen entries as NaN) when 'intermediates' is
    mutable, and a method so that `nn.intercept_methods` can replace them, e.g. by a quantized copy."""
    if recording(self):
      self.sow('intermediates', 'logits', jnp.where(visible_BxNxTxS, logits_BxNxTxS, jnp.nan))
    return logits_BxNxTxS

  def softmax_heads(self, x_BxTxE, positions_BxT, cache, segment_ids_BxT, n_q: int):
    """Softmax attention of `n_q` query heads over the layer's kv heads, as DIFF V2 and the baseline run it:
    (outputs (B, T, n_q, D) float32, the kernel that ran, the updated cache or None)."""
    cfg = self.cfg
    positions_BxT = _positions(x_BxTxE, positions_BxT, cache)
    q_BxTxNxD, k_BxTxKxD, v_BxTxKxD = _project(cfg, x_BxTxE, positions_BxT, n_q, cfg.head_dim)
    k_BxSxKxD, v_BxSxKxD, impl, visible_BxTxS, cache = _keys_values(cfg, k_BxTxKxD, v_BxTxKxD, positions_BxT, cache)
    out_BxTxNxD = softmax_attention(q_BxTxNxD, k_BxSxKxD, v_BxSxKxD, impl, visible_BxTxS, segment_ids_BxT,
                                    _observer(self, impl))
    return out_BxTxNxD, impl, cache

  def project_out(self, heads_BxTxF, cache):
    """W_o on the heads' concatenated outputs; with a cache, (output, updated cache)."""
    cfg = self.cfg
    out_BxTxE = dense(cfg, cfg.d_model, ('heads', 'embed'), 'out_proj', output_stddev(cfg))(heads_BxTxF)
    return out_BxTxE if cache is None else (out_BxTxE, cache)


def _observer(layer: _Attention, impl: str):
  """The layer, for the attention function to show its logits and maps to, on the einsum path; None on the
  kernels, which have none to show."""
  return layer if impl == 'xla' else None


class DiffAttentionV1(_Attention):
  """DIFF V1: n_heads/2 differential heads, λ re-parameterised per layer, per-head RMSNorm, ×(1 − λ_init).

  With `diff_head_norm=False` (the paper's ablation) the heads' (A1 − λ A2) V goes to W_o as it is.
  """

  def lam(self):
    init = nn.with_logical_partitioning(nn.initializers.normal(0.1), ('head_dim',))
    return reparameterised_lambda({n: self.param(n, init, (self.cfg.head_dim,), jnp.float32) for n in LAMBDA_VECTORS},
                                  self.layer, self.cfg.lambda_init_schedule)

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT=None, cache=None, segment_ids_BxT=None):
    cfg = self.cfg
    b, t, _ = x_BxTxE.shape
    d, heads = cfg.head_dim, cfg.n_heads // 2
    positions_BxT = _positions(x_BxTxE, positions_BxT, cache)
    q_BxTx2HxD, k_BxTx2GxD, v_BxTxGx2D = _project(cfg, x_BxTxE, positions_BxT, cfg.n_heads, 2 * d)
    k_BxSx2GxD, v_BxSxGx2D, impl, visible_BxTxS, cache = _keys_values(cfg, k_BxTx2GxD, v_BxTxGx2D, positions_BxT,
                                                                      cache)
    lam = self.lam()
    maps = diff_v1_map_outputs(q_BxTx2HxD, k_BxSx2GxD, v_BxSxGx2D, lam, impl, visible_BxTxS, segment_ids_BxT,
                               _observer(self, impl))
    out_BxTxHx2D = nn.remat(DiffHeadOutputs)(cfg, self.layer, name='subln')(*maps, lam)
    return self.project_out(out_BxTxHx2D.reshape(b, t, heads * 2 * d), cache)


class DiffHeadOutputs(nn.Module):
  """DIFF V1's head outputs from its two maps' (`diff_v1_map_outputs`): A1 V - λ A2 V, then with the per-head norm
  RMSNorm over each head's 2D channels and ×(1 - λ_init), in float32; returned in the compute dtype, which W_o
  reads.

  The layer runs it under `nn.remat`: the backward pass recomputes these few elementwise steps from the maps'
  outputs, which the attention kernels keep for their own backward pass anyway, rather than keeping the float32
  intermediates of the forward pass, each twice the bytes of a bf16 map output. Named 'subln' by the layer, its
  scale keeps the parameter path of the per-head norm.
  """
  cfg: ModelConfig
  layer: int  # 0-based depth, a traced index under scan_layers

  @nn.compact
  def __call__(self, a1v_BxTxHx2D, a2v_BxTxHx2D, lam):
    cfg = self.cfg
    out_BxTxHx2D = combine_maps(a1v_BxTxHx2D, a2v_BxTxHx2D, lam)
    if cfg.diff_head_norm:
      scale = norm_scale(self, out_BxTxHx2D.shape[-1]) if cfg.subln_scale else None
      out_BxTxHx2D = rms_norm(out_BxTxHx2D, scale, cfg.norm_eps)
      out_BxTxHx2D = out_BxTxHx2D * (1.0 - lambda_init_for(self.layer, cfg.lambda_init_schedule))
    return out_BxTxHx2D.astype(cfg.compute_dtype)


class DiffAttentionV2(_Attention):
  """DIFF V2: 2·n_heads query heads in adjacent pairs, one attention call, per-token λ = sigmoid(W_λ x)."""

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT=None, cache=None, segment_ids_BxT=None):
    cfg = self.cfg
    b, t, _ = x_BxTxE.shape
    d, heads = cfg.head_dim, cfg.n_heads
    # Query heads 2h and 2h+1 fall in the same kv group because the group size 2H/K is even.
    out_BxTx2HxD, impl, cache = self.softmax_heads(x_BxTxE, positions_BxT, cache, segment_ids_BxT, 2 * heads)
    lam_BxTxH = jax.nn.sigmoid(dense(cfg, heads, ('embed', None), 'lambda_proj')(x_BxTxE).astype(jnp.float32))
    if recording(self) and impl == 'xla':
      self.sow('intermediates', 'lambda', lam_BxTxH)
    out_BxTxHxD = out_BxTx2HxD[:, :, 0::2] - lam_BxTxH[..., None] * out_BxTx2HxD[:, :, 1::2]
    return self.project_out(out_BxTxHxD.reshape(b, t, heads * d), cache)


class MultiHeadAttention(_Attention):
  """The baseline: causal multi-head (or grouped-query) softmax attention."""

  @nn.compact
  def __call__(self, x_BxTxE, positions_BxT=None, cache=None, segment_ids_BxT=None):
    cfg = self.cfg
    b, t, e = x_BxTxE.shape
    out_BxTxNxD, _, cache = self.softmax_heads(x_BxTxE, positions_BxT, cache, segment_ids_BxT, cfg.n_heads)
    return self.project_out(out_BxTxNxD.reshape(b, t, e), cache)


ATTENTION_BY_VARIANT = {'diff_v1': DiffAttentionV1, 'diff_v2': DiffAttentionV2, 'baseline': MultiHeadAttention}
