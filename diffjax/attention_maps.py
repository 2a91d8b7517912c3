"""Plots what a trained model attends to: `python -m diffjax.attention_maps --workdir=DIR --prompt='...'`.

For DIFF V1 it draws, for one layer and head, the two softmax maps A1 and A2 and the differential map
A1 − λ·A2 that the layer actually applies; for the baseline, its single softmax map. Writes
WORKDIR/attention_layer{L}_head{H}.png.
"""

import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from diffjax import attention, cli, inference, model as model_lib
from diffjax.config import ModelConfig
from diffjax.errors import ConfigError

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
PROMPT = flags.DEFINE_string('prompt', 'def attention(query, key, value):\n    return', 'Text to look at.')
LAYER = flags.DEFINE_integer('layer', -1, 'Layer (0-based; negative counts from the last).')
HEAD = flags.DEFINE_integer('head', 0, 'Differential head (DIFF V1) or head (baseline).', lower_bound=0)


def layer_maps(cfg: ModelConfig, params, tokens_1xT, layer: int) -> dict[str, np.ndarray]:
  """Attention maps of one layer as float32 NumPy arrays: `a1`, `a2`, `diff` (H, T, T) for DIFF V1, `a` for the
  baseline (N, T, T)."""
  if cfg.variant == 'diff_v2':
    raise ConfigError('model.variant: attention maps are drawn for diff_v1 and baseline; diff_v2\'s λ is per token')
  _, captured = model_lib.Transformer(cfg).apply({'params': params}, tokens_1xT, capture_intermediates=True)
  x_1xTxE = captured['intermediates'][f'block_{layer}']['attn_norm']['__call__'][0]
  p = params[f'block_{layer}']['attn']
  t, d = tokens_1xT.shape[1], cfg.head_dim
  positions = jnp.arange(t)[None]
  rotate = lambda z: attention.apply_rope(z, positions, cfg.rope_theta, cfg.rope_pairing)
  q_TxNxD = rotate((x_1xTxE @ p['q_proj']['kernel']).reshape(1, t, -1, d))[0]
  k_TxKxD = rotate((x_1xTxE @ p['k_proj']['kernel']).reshape(1, t, -1, d))[0]
  group = lambda n, n_q, n_k: n // (n_q // n_k)  # GQA: query head n reads kv head n // (N / K)
  if cfg.variant == 'baseline':
    n, kv = q_TxNxD.shape[1], k_TxKxD.shape[1]
    k_TxNxD = k_TxKxD[:, [group(i, n, kv) for i in range(n)]]
    logits = jnp.einsum('tnd,snd->nts', q_TxNxD, k_TxNxD) * d ** -0.5
    return {'a': np.asarray(attention._causal_softmax(logits))}
  # DIFF V1: sub-heads (2h, 2h+1) are (q1, q2) of head h; they meet (k1, k2) of kv group h // R.
  heads, groups = q_TxNxD.shape[1] // 2, k_TxKxD.shape[1] // 2
  maps = {}
  for c, name in ((0, 'a1'), (1, 'a2')):
    k_c = k_TxKxD[:, 2 * np.array([group(h, heads, groups) for h in range(heads)]) + c]
    logits = jnp.einsum('thd,shd->hts', q_TxNxD[:, c::2], k_c) * d ** -0.5
    maps[name] = np.asarray(attention._causal_softmax(logits))
  lam = float(attention.reparameterised_lambda(p, layer))
  maps['diff'] = maps['a1'] - lam * maps['a2']
  maps['lambda'] = np.float32(lam)
  return maps


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


@cli.report_errors
def main(argv):
  del argv
  cfg, params, tokenizer, step = inference.open_run(WORKDIR.value)
  ids = tokenizer.encode(PROMPT.value)
  if not 0 < len(ids) <= cfg.max_len:
    raise ConfigError(f'--prompt: it is {len(ids)} tokens long; give 1 to {cfg.max_len} (the model\'s max_len)')
  layer = LAYER.value % cfg.n_layers
  maps = layer_maps(cfg, params, jnp.asarray([ids], jnp.int32), layer)
  heads = next(iter(v for k, v in maps.items() if k != 'lambda')).shape[0]
  if HEAD.value >= heads:
    raise ConfigError(f'--head: {HEAD.value} is out of range; this layer has {heads} heads (0..{heads - 1})')
  labels = [repr(tokenizer.decode([i]))[1:-1] or '·' for i in ids]
  path = os.path.join(WORKDIR.value, f'attention_layer{layer}_head{HEAD.value}.png')
  plot(maps, labels, f'{cfg.variant}, step {step}, layer {layer}, head {HEAD.value}', path, HEAD.value)
  print(path)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
