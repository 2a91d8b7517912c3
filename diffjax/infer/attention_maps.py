"""What a trained model attends to, as its layers computed it: one forward pass that keeps what every layer sows
(its logits and maps on the einsum path, and the residual stream each block hands on), one layer's maps (DIFF V1's
A1, A2 and the differential map A1 − λ·A2 it applies; the baseline's softmax map), and their plot.
`python -m diffjax.attention_maps` (diffjax/attention_maps.py) draws them for a run.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.errors import ConfigError
from diffjax.model import transformer as model_lib
from diffjax.model.config import ModelConfig


def sown(cfg: ModelConfig, params, tokens_BxT, segment_ids_BxT=None) -> tuple:
  """(logits (B, T, V), per layer a dict of what it sowed): `logits` (the scaled attention logits, NaN where a query
  cannot see), `a1`, `a2`, `lambda` (DIFF V1) or `probs` (the others), and `residual` (B, T, E), the block's output.
  The model runs on the einsum path, the one that sows (the cuDNN and Pallas kernels compute the same function but
  show no maps), with its layers unrolled. Traceable, so callers may jit it and keep only what they need."""
  cfg, params = model_lib.unscanned(dataclasses.replace(cfg, attention_impl='xla'), params)
  logits_BxTxV, state = model_lib.Transformer(cfg).apply({'params': params}, tokens_BxT,
                                                         segment_ids_BxT=segment_ids_BxT, mutable=['intermediates'])
  blocks = [state['intermediates'][f'block_{layer}'] for layer in range(cfg.n_layers)]
  return logits_BxTxV, [{**{name: value for name, (value,) in block['attn'].items()},
                         'residual': block['residual'][0]} for block in blocks]


def maps_of(cfg: ModelConfig, layer_sown: dict, rows=slice(None)) -> dict:
  """One layer's maps from what it sowed, at query rows `rows` (an index or slice of positions; default all):
  `a1`, `a2`, `diff` (B, H, R, S) and the scalar `lambda` for DIFF V1, `a` (B, N, R, S) for the baseline."""
  if cfg.variant == 'diff_v2':
    raise ConfigError('model.variant: attention maps are drawn for diff_v1 and baseline; diff_v2\'s λ is per token')
  if cfg.variant == 'baseline':
    return {'a': layer_sown['probs'][:, :, rows]}
  a1, a2, lam = layer_sown['a1'][:, :, rows], layer_sown['a2'][:, :, rows], layer_sown['lambda']
  return {'a1': a1, 'a2': a2, 'lambda': lam, 'diff': a1 - lam * a2}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _one_layer(cfg: ModelConfig, params, tokens_BxT, layer: int) -> dict:
  """One layer's maps; compiled, so only they leave the forward pass, not every layer's."""
  return maps_of(cfg, sown(cfg, params, tokens_BxT)[1][layer])


def layer_maps(cfg: ModelConfig, params, tokens_1xT, layer: int) -> dict[str, np.ndarray]:
  """Attention maps of one layer as float32 NumPy arrays: `a1`, `a2`, `diff` (H, T, T) for DIFF V1, `a` for the
  baseline (N, T, T)."""
  maps = _one_layer(cfg, params, jnp.asarray(tokens_1xT), layer)
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
