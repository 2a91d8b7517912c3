"""What a trained model attends to: every layer's attention input from one forward pass, one layer's maps at chosen
query rows (DIFF V1's A1, A2 and the differential map A1 − λ·A2 it applies; the baseline's softmax map), and their
plot. `python -m diffjax.attention_maps` (diffjax/attention_maps.py) draws them for a run.
"""

import jax.numpy as jnp
import numpy as np

from diffjax.errors import ConfigError
from diffjax.model import attention
from diffjax.model import transformer as model_lib
from diffjax.model.config import ModelConfig


def layer_inputs(cfg: ModelConfig, params, tokens_BxT) -> list:
  """Every layer's attention input (the output of its attn_norm, (B, T, E)), from one forward pass."""
  _, captured = model_lib.Transformer(cfg).apply({'params': params}, tokens_BxT, capture_intermediates=True)
  return [captured['intermediates'][f'block_{layer}']['attn_norm']['__call__'][0] for layer in range(cfg.n_layers)]


def maps_from_input(cfg: ModelConfig, attn_params, x_BxTxE, layer: int, rows_R=None) -> dict:
  """One layer's attention maps (jnp float32) at the query positions `rows_R` (default: all): `a1`, `a2`, `diff`
  (B, H, R, T) and the scalar `lambda` for DIFF V1; `a` (B, N, R, T) for the baseline. Traceable, so callers may jit
  it; only the rows asked for are computed, so one row of a long context stays cheap."""
  if cfg.variant == 'diff_v2':
    raise ConfigError('model.variant: attention maps are drawn for diff_v1 and baseline; diff_v2\'s λ is per token')
  p = attn_params
  b, t, d = x_BxTxE.shape[0], x_BxTxE.shape[1], cfg.head_dim
  rows_R = jnp.arange(t) if rows_R is None else jnp.asarray(rows_R)
  positions_BxT = jnp.broadcast_to(jnp.arange(t), (b, t))
  rotate = lambda z: attention.apply_rope(z, positions_BxT, cfg.rope_theta, cfg.rope_pairing)
  q_BxRxNxD = rotate((x_BxTxE @ p['q_proj']['kernel']).reshape(b, t, -1, d))[:, rows_R]
  k_BxTxKxD = rotate((x_BxTxE @ p['k_proj']['kernel']).reshape(b, t, -1, d))
  visible_RxT = rows_R[:, None] >= jnp.arange(t)[None, :]  # causal: row r sees keys s <= r
  group = lambda n, n_q, n_k: n // (n_q // n_k)  # GQA: query head n reads kv head n // (N / K)
  if cfg.variant == 'baseline':
    n, kv = q_BxRxNxD.shape[2], k_BxTxKxD.shape[2]
    k_BxTxNxD = k_BxTxKxD[:, :, [group(i, n, kv) for i in range(n)]]
    logits = jnp.einsum('brnd,bsnd->bnrs', q_BxRxNxD, k_BxTxNxD) * d ** -0.5
    return {'a': attention._causal_softmax(logits, visible_RxT)}
  # DIFF V1: sub-heads (2h, 2h+1) are (q1, q2) of head h; they meet (k1, k2) of kv group h // R.
  heads, groups = q_BxRxNxD.shape[2] // 2, k_BxTxKxD.shape[2] // 2
  maps = {}
  for c, name in ((0, 'a1'), (1, 'a2')):
    k_c = k_BxTxKxD[:, :, 2 * np.array([group(h, heads, groups) for h in range(heads)]) + c]
    logits = jnp.einsum('brhd,bshd->bhrs', q_BxRxNxD[:, :, c::2], k_c) * d ** -0.5
    maps[name] = attention._causal_softmax(logits, visible_RxT)
  maps['lambda'] = attention.reparameterised_lambda(p, layer, cfg.lambda_init_schedule)
  maps['diff'] = maps['a1'] - maps['lambda'] * maps['a2']
  return maps


def layer_maps(cfg: ModelConfig, params, tokens_1xT, layer: int) -> dict[str, np.ndarray]:
  """Attention maps of one layer as float32 NumPy arrays: `a1`, `a2`, `diff` (H, T, T) for DIFF V1, `a` for the
  baseline (N, T, T)."""
  if cfg.variant == 'diff_v2':
    raise ConfigError('model.variant: attention maps are drawn for diff_v1 and baseline; diff_v2\'s λ is per token')
  maps = maps_from_input(cfg, params[f'block_{layer}']['attn'], layer_inputs(cfg, params, tokens_1xT)[layer], layer)
  return {key: np.float32(value) if key == 'lambda' else np.asarray(value[0]) for key, value in maps.items()}


def plot(maps: dict, labels: list[str], title: str, path: str, head: int):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  panels = [('a', 'softmax map')] if 'a' in maps else [
      ('a1', 'A1'), ('a2', 'A2'), ('diff', f'A1 − λ·A2 (λ = {float(maps["lambda"]):.3f})')]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), squeeze=False)
  for ax, (key, name) in zip(axes[0], panels):
    values = maps[key][head]
    limit = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap='RdBu_r' if key == 'diff' else 'viridis',
                      vmin=-limit if key == 'diff' else 0.0, vmax=limit)
    ax.set(title=name, xlabel='key position', ylabel='query position')
    if len(labels) <= 48:
      ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
      ax.set_yticks(range(len(labels)), labels, fontsize=6)
    fig.colorbar(image, ax=ax, fraction=0.046)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
