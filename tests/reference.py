"""A float64 NumPy statement of the Differential Transformer, written from the paper's equations.

It is deliberately plain (explicit loops over heads, complex-number RoPE) so that it shares no structure with
diffjax: the tests hold diffjax to these functions, never the other way round. Parameters are the Flax trees
diffjax uses (kernels in (in, out) layout), converted to float64.

Heads are counted as in the paper: `num_heads` differential heads H for DIFF V1 (each two q/k sub-heads of d and
a value head of 2d), `num_heads` differential heads h for DIFF V2 (each a pair of query heads of d), and plain
heads for the baseline. `diff_v1_attention` can also compute the mistakes people make (see MISTAKES), so the tests
can show that diffjax computes the right function and not a plausible wrong one.
"""

import math

import numpy as np

EPS = 1e-5

# Wrong versions of DIFF V1 (the facts sheet's list), computed by `diff_v1_attention(..., mistake=...)`.
MISTAKES = (
    'feature_axis_split',  # q1, q2 = the two halves of the projection's feature axis
    'logits_subtracted',  # softmax(q1k1 - λ q2k2) V instead of (A1 - λ A2) V
    'heads_halved_twice',  # H/2 differential heads of width 2d from the same weights
    'scale_two_d',  # logits scaled by 1/sqrt(2d)
    'one_based_depth',  # λ_init(l + 1)
    'norm_before_subtraction',  # norm(A1 V) - λ norm(A2 V)
    'norm_over_width',  # one RMSNorm over all E channels instead of one per head
    'no_lambda_init_factor',  # the (1 - λ_init) factor left out
    'naive_gqa_pairing',  # repeating the 2H_kv key sub-heads, as the reference's naive module does
)


# (deep, drop, rate) of the paper's λ_init(l) = 0.8 - 0.6 exp(-0.3 l).
PAPER_SCHEDULE = (0.8, 0.6, 0.3)


def lambda_init(layer, schedule=PAPER_SCHEDULE):
  """λ_init = deep - drop * exp(-rate * layer) for the 0-based layer index; the paper's by default."""
  deep, drop, rate = schedule
  return deep - drop * math.exp(-rate * layer)


def rms_norm(x, scale, eps=EPS):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, positions, theta, pairing):
  """Rotates each pair of channels of x (..., T, N, D) by position * theta^(-2i/D), as a complex product.

  `interleaved` pairs channels (2i, 2i+1) (GPT-J, the paper's reference); `half` pairs (i, i + D/2) (GPT-NeoX).
  """
  dim = x.shape[-1]
  if pairing == 'interleaved':
    first, second = np.arange(0, dim, 2), np.arange(1, dim, 2)
  elif pairing == 'half':
    first, second = np.arange(dim // 2), np.arange(dim // 2, dim)
  else:
    raise ValueError(pairing)
  freq = theta ** (-2.0 * np.arange(dim // 2) / dim)
  angle = np.asarray(positions, np.float64)[..., :, None, None] * freq  # (..., T, 1, D/2)
  z = (x[..., first] + 1j * x[..., second]) * np.exp(1j * angle)
  out = np.empty_like(x)
  out[..., first], out[..., second] = z.real, z.imag
  return out


def causal_softmax(logits):
  """Softmax over keys of logits (..., T, S); query t sees keys s <= t."""
  t = logits.shape[-1]
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  return weights / weights.sum(-1, keepdims=True)


def attention_map(q, k, scale):
  """Causal attention weights (B, T, S) of one query head q (B, T, D) against one key head k (B, S, D)."""
  return causal_softmax(np.einsum('btd,bsd->bts', q, k) * scale)


def softmax_attention(q, k, v):
  """Causal GQA attention: q (B, T, N, D), k (B, S, K, D), v (B, S, K, Dv); head n reads kv head n // (N / K)."""
  n, kv = q.shape[2], k.shape[2]
  scale = 1.0 / math.sqrt(q.shape[-1])
  heads = [attention_map(q[:, :, i], k[:, :, i // (n // kv)], scale) @ v[:, :, i // (n // kv)] for i in range(n)]
  return np.stack(heads, axis=2)


def _positions(x):
  return np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])


def diff_v1_core(x, w_q, w_k, w_v, w_o, lambda_vectors, subln_scale, *, num_heads, num_kv_heads, layer, theta,
                 pairing, positions=None, mistake=None, head_norm=True, schedule=PAPER_SCHEDULE):
  """One DIFF V1 layer from (in, out) projection matrices; `lambda_vectors` = (λq1, λk1, λq2, λk2).

  The paper's ablations: `head_norm=False` leaves out the per-head norm and its fixed scale (1 - λ_init), so
  (A1 - λ A2) V meets W_o directly; `schedule` = (deep, drop, rate) of λ_init.
  """
  if mistake is not None and mistake not in MISTAKES:
    raise ValueError(mistake)
  positions = _positions(x) if positions is None else positions
  b, t, e = x.shape
  lq1, lk1, lq2, lk2 = lambda_vectors
  if mistake == 'heads_halved_twice':
    # The same weights read as half as many heads of twice the width. λ is kept equal (zero-padded vectors)
    # and the norm keeps each channel's scale, so only the head split differs.
    num_heads, num_kv_heads = num_heads // 2, num_kv_heads // 2
    lq1, lk1, lq2, lk2 = (np.concatenate([vec, np.zeros_like(vec)]) for vec in (lq1, lk1, lq2, lk2))
    subln_scale = np.concatenate([subln_scale, subln_scale])
  d = e // num_heads // 2
  n_rep = num_heads // num_kv_heads

  q_flat, k_flat, v_flat = x @ w_q, x @ w_k, x @ w_v
  if mistake == 'feature_axis_split':
    half_q, half_k = q_flat.shape[-1] // 2, k_flat.shape[-1] // 2
    q1, q2 = q_flat[..., :half_q], q_flat[..., half_q:]
    k1, k2 = k_flat[..., :half_k], k_flat[..., half_k:]
    q = np.stack([q1.reshape(b, t, num_heads, d), q2.reshape(b, t, num_heads, d)], axis=3)
    k = np.stack([k1.reshape(b, t, num_kv_heads, d), k2.reshape(b, t, num_kv_heads, d)], axis=3)
    q, k = q.reshape(b, t, 2 * num_heads, d), k.reshape(b, t, 2 * num_kv_heads, d)
  else:
    # Sub-heads 2h and 2h+1 of the head axis are (q1, q2) of differential head h; the same for keys.
    q, k = q_flat.reshape(b, t, 2 * num_heads, d), k_flat.reshape(b, t, 2 * num_kv_heads, d)
  v = v_flat.reshape(b, t, num_kv_heads, 2 * d)
  q, k = rope(q, positions, theta, pairing), rope(k, positions, theta, pairing)

  depth = layer + 1 if mistake == 'one_based_depth' else layer
  lam_init = lambda_init(depth, schedule)
  lam = math.exp(np.dot(lq1, lk1)) - math.exp(np.dot(lq2, lk2)) + lam_init
  scale = 1.0 / math.sqrt(2 * d if mistake == 'scale_two_d' else d)

  heads = []
  for h in range(num_heads):
    group = h // n_rep
    if mistake == 'naive_gqa_pairing':
      k1, k2 = k[:, :, (2 * h) // n_rep], k[:, :, (2 * h + 1) // n_rep]
    else:
      k1, k2 = k[:, :, 2 * group], k[:, :, 2 * group + 1]
    q1, q2, v_h = q[:, :, 2 * h], q[:, :, 2 * h + 1], v[:, :, group]
    if mistake == 'logits_subtracted':
      logits = (np.einsum('btd,bsd->bts', q1, k1) - lam * np.einsum('btd,bsd->bts', q2, k2)) * scale
      heads.append(causal_softmax(logits) @ v_h)
      continue
    a1v, a2v = attention_map(q1, k1, scale) @ v_h, attention_map(q2, k2, scale) @ v_h
    if mistake == 'norm_before_subtraction':
      heads.append(rms_norm(a1v, subln_scale) - lam * rms_norm(a2v, subln_scale))
    else:
      heads.append(a1v - lam * a2v)
  out = np.stack(heads, axis=2)  # (B, T, H, 2d)
  if not head_norm:
    return out.reshape(b, t, e) @ w_o
  if mistake == 'norm_over_width':
    out = rms_norm(out.reshape(b, t, e), np.tile(subln_scale, num_heads)).reshape(out.shape)
  elif mistake != 'norm_before_subtraction':
    out = rms_norm(out, subln_scale)
  if mistake != 'no_lambda_init_factor':
    out = out * (1.0 - lam_init)
  return out.reshape(b, t, e) @ w_o


def diff_v1_attention(p, x, *, num_heads, num_kv_heads, layer, theta=10000.0, pairing='interleaved',
                      positions=None, mistake=None, head_norm=True, schedule=PAPER_SCHEDULE):
  """DIFF V1 from the Flax parameters of one layer (q_proj/kernel ..., lambda_q1 ..., subln/scale); without the
  head norm there is no subln."""
  return diff_v1_core(x, p['q_proj']['kernel'], p['k_proj']['kernel'], p['v_proj']['kernel'],
                      p['out_proj']['kernel'], [p[n] for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')],
                      p['subln']['scale'] if head_norm else None, num_heads=num_heads, num_kv_heads=num_kv_heads,
                      layer=layer, theta=theta, pairing=pairing, positions=positions, mistake=mistake,
                      head_norm=head_norm, schedule=schedule)


def diff_v1_from_state_dict(sd, x, *, num_heads, num_kv_heads, depth, theta=10000.0, pairing='interleaved'):
  """DIFF V1 from the reference PyTorch module's state_dict, whose Linear layers compute x W^T."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  return diff_v1_core(x, sd['q_proj.weight'].T, sd['k_proj.weight'].T, sd['v_proj.weight'].T,
                      sd['out_proj.weight'].T, [sd[n] for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')],
                      sd['subln.weight'], num_heads=num_heads, num_kv_heads=num_kv_heads, layer=depth, theta=theta,
                      pairing=pairing)


def diff_v2_attention(p, x, *, num_heads, num_kv_heads, theta=10000.0, pairing='interleaved', positions=None,
                      mistake=None):
  """DIFF V2: 2h query heads in adjacent pairs, h_kv k/v heads, out[2i] - sigmoid(W_λ x)_i out[2i+1], W_o.

  `mistake='halves_paired'` pairs query head i with head i + h instead of the adjacent one.
  """
  positions = _positions(x) if positions is None else positions
  b, t, _ = x.shape
  d = p['q_proj']['kernel'].shape[1] // (2 * num_heads)
  q = rope((x @ p['q_proj']['kernel']).reshape(b, t, 2 * num_heads, d), positions, theta, pairing)
  k = rope((x @ p['k_proj']['kernel']).reshape(b, t, num_kv_heads, d), positions, theta, pairing)
  v = (x @ p['v_proj']['kernel']).reshape(b, t, num_kv_heads, d)
  out = softmax_attention(q, k, v)
  lam = 1.0 / (1.0 + np.exp(-(x @ p['lambda_proj']['kernel'])))  # (B, T, h)
  if mistake == 'halves_paired':
    first, second = out[:, :, :num_heads], out[:, :, num_heads:]
  elif mistake is None:
    first, second = out[:, :, 0::2], out[:, :, 1::2]
  else:
    raise ValueError(mistake)
  diff = first - lam[..., None] * second
  return diff.reshape(b, t, num_heads * d) @ p['out_proj']['kernel']


def baseline_attention(p, x, *, num_heads, num_kv_heads, theta=10000.0, pairing='interleaved', positions=None):
  """Causal multi-head (GQA when num_kv_heads < num_heads) attention with RoPE."""
  positions = _positions(x) if positions is None else positions
  b, t, e = x.shape
  d = e // num_heads
  q = rope((x @ p['q_proj']['kernel']).reshape(b, t, num_heads, d), positions, theta, pairing)
  k = rope((x @ p['k_proj']['kernel']).reshape(b, t, num_kv_heads, d), positions, theta, pairing)
  v = (x @ p['v_proj']['kernel']).reshape(b, t, num_kv_heads, d)
  return softmax_attention(q, k, v).reshape(b, t, e) @ p['out_proj']['kernel']


def attention_layer(variant, p, x, *, n_heads, n_kv_heads, layer, theta=10000.0, pairing='interleaved',
                    head_norm=True, schedule=PAPER_SCHEDULE):
  """One attention layer with heads counted as the baseline's (diffjax's ModelConfig convention).

  DIFF V1 with the baseline's width and head width has n_heads/2 differential heads (and n_kv_heads/2 kv
  groups); DIFF V2 pairs 2 n_heads query heads into n_heads differential heads. `head_norm` and `schedule` are
  DIFF V1's ablations (see diff_v1_core).
  """
  if variant == 'diff_v1':
    return diff_v1_attention(p, x, num_heads=n_heads // 2, num_kv_heads=n_kv_heads // 2, layer=layer, theta=theta,
                             pairing=pairing, head_norm=head_norm, schedule=schedule)
  if variant == 'diff_v2':
    return diff_v2_attention(p, x, num_heads=n_heads, num_kv_heads=n_kv_heads, theta=theta, pairing=pairing)
  if variant == 'baseline':
    return baseline_attention(p, x, num_heads=n_heads, num_kv_heads=n_kv_heads, theta=theta, pairing=pairing)
  raise ValueError(variant)


def silu(x):
  return x / (1.0 + np.exp(-x))


def swiglu(p, x):
  return (silu(x @ p['gate_proj']['kernel']) * (x @ p['up_proj']['kernel'])) @ p['down_proj']['kernel']


def decoder(p, tokens, *, variant, n_layers, n_heads, n_kv_heads, theta=10000.0, pairing='interleaved',
            tie_embeddings=False, eps=EPS, head_norm=True, schedule=PAPER_SCHEDULE):
  """Logits (B, T, vocab) of the pre-RMSNorm decoder: embed, blocks, final norm, lm_head or tied embedding."""
  table = p['embed']['embedding']
  x = table[tokens]
  for layer in range(n_layers):
    block = p[f'block_{layer}']
    x = x + attention_layer(variant, block['attn'], rms_norm(x, block['attn_norm']['scale'], eps), n_heads=n_heads,
                            n_kv_heads=n_kv_heads, layer=layer, theta=theta, pairing=pairing, head_norm=head_norm,
                            schedule=schedule)
    x = x + swiglu(block['ffn'], rms_norm(x, block['ffn_norm']['scale'], eps))
  x = rms_norm(x, p['final_norm']['scale'], eps)
  return x @ table.T if tie_embeddings else x @ p['lm_head']['kernel']
