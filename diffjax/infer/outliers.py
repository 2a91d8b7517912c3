"""Two more of the paper's claims, measured on trained runs: DIFF has fewer activation outliers, and it keeps its
loss better when quantized to few bits. `python -m diffjax.outliers` (diffjax/outliers.py) runs them and describes
the protocol.

Outliers: the largest |value| and Pearson's kurtosis, E[(x − mean)^4] / var^2 (3 for a Gaussian, far more when a few
entries dwarf the rest), of the attention logits and of the residual stream on the scored positions. Each batch's
moments are central sums computed on the device in float32; batches and layers are merged on the host in float64.

Quantization: symmetric round-to-nearest to b bits, q = clip(round(x / s), −(2^(b−1) − 1), 2^(b−1) − 1) · s with
s = max|x| / (2^(b−1) − 1) over the values that share a scale. Every loss comes from the einsum attention path, the
unquantized one included, since the kernels have no logits to quantize.
"""

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.infer import attention_maps
from diffjax.model import losses
from diffjax.model.config import ModelConfig

# What `moments` returns, in order: count, mean and the central sums of powers 2-4, then max |x|.
_COUNT, _MEAN, _M2, _M3, _M4, _MAX_ABS = range(6)


def moments(x, valid=None):
  """(6,) float32: count, mean, Σ(x − mean)^2, Σ(x − mean)^3, Σ(x − mean)^4 and max|x| over the entries of `x`
  where `valid` (broadcast against it) holds; two passes, so the central sums never cancel."""
  valid = jnp.ones(x.shape, bool) if valid is None else jnp.broadcast_to(valid, x.shape)
  x = jnp.where(valid, x.astype(jnp.float32), 0.0)
  count = jnp.sum(valid, dtype=jnp.float32)
  mean = jnp.sum(x) / jnp.maximum(count, 1.0)
  centred = jnp.where(valid, x - mean, 0.0)
  squared = centred * centred
  return jnp.stack([count, mean, jnp.sum(squared), jnp.sum(squared * centred), jnp.sum(squared * squared),
                    jnp.max(jnp.abs(x), initial=0.0)])


def merge(a, b) -> np.ndarray:
  """The moments of two sets together, from theirs (Pébay's pairwise formulas), in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  na, nb = a[_COUNT], b[_COUNT]
  if not na or not nb:
    return a if nb == 0 else b
  n, delta = na + nb, b[_MEAN] - a[_MEAN]
  m2a, m2b, m3a, m3b = a[_M2], b[_M2], a[_M3], b[_M3]
  m2 = m2a + m2b + delta ** 2 * na * nb / n
  m3 = m3a + m3b + delta ** 3 * na * nb * (na - nb) / n ** 2 + 3 * delta * (na * m2b - nb * m2a) / n
  m4 = (a[_M4] + b[_M4] + delta ** 4 * na * nb * (na * na - na * nb + nb * nb) / n ** 3
        + 6 * delta ** 2 * (na * na * m2b + nb * nb * m2a) / n ** 2 + 4 * delta * (na * m3b - nb * m3a) / n)
  return np.array([n, a[_MEAN] + delta * nb / n, m2, m3, m4, max(a[_MAX_ABS], b[_MAX_ABS])])


def describe(m) -> dict:
  """The reported numbers of merged moments."""
  m = np.asarray(m, np.float64)
  variance = m[_M2] / m[_COUNT]
  return {'max_abs': float(m[_MAX_ABS]), 'kurtosis': float(m[_M4] / m[_COUNT] / variance ** 2),
          'mean': float(m[_MEAN]), 'std': float(np.sqrt(variance)), 'count': int(m[_COUNT])}


@functools.partial(jax.jit, static_argnums=0)
def _batch_moments(cfg: ModelConfig, params, batch):
  """(L, 2, 6): per layer, the moments of its attention logits and residual stream on the scored positions."""
  _, layers = attention_maps.sown(cfg, params, batch['inputs'], losses.document_segments(cfg, batch))
  scored_BxT = batch['mask'] > 0
  return jnp.stack([jnp.stack([
      moments(sown['logits'], ~jnp.isnan(sown['logits']) & scored_BxT[:, None, :, None]),
      moments(sown['residual'], scored_BxT[:, :, None])]) for sown in layers])


def activation_outliers(cfg: ModelConfig, params, batches) -> dict:
  """Max |value| and kurtosis of the attention logits and the residual stream, per layer and over all layers."""
  per_batch_BxLx2x6 = np.array([_batch_moments(cfg, params, batch) for batch in batches], np.float64)
  report = {}
  for i, name in enumerate(('attention_logits', 'hidden_states')):
    per_layer = [functools.reduce(merge, batches_Bx6) for batches_Bx6 in per_batch_BxLx2x6[:, :, i].swapaxes(0, 1)]
    report[name] = {'layers': [describe(m) for m in per_layer],
                    'overall': describe(functools.reduce(merge, per_layer))}
  return report


def quantize(x, bits: int, axes, valid=None):
  """Symmetric round-to-nearest to `bits` bits, one scale per slice that `axes` (those reduced for the scale) leave,
  from its largest |x| where `valid` holds (all of it by default). An all-zero slice stays zero."""
  levels = 2 ** (bits - 1) - 1
  magnitude = jnp.abs(x) if valid is None else jnp.where(valid, jnp.abs(x), 0.0)
  scale = jnp.max(magnitude, axis=axes, keepdims=True) / levels
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale), -levels, levels) * scale


def quantize_weights(params, bits: int):
  """The parameters with every projection kernel (in, out) quantized per output channel; the rest unchanged."""
  def one(path, leaf):
    is_kernel = getattr(path[-1], 'key', None) == 'kernel' and leaf.ndim == 2
    return quantize(jnp.asarray(leaf, jnp.float32), bits, axes=0).astype(leaf.dtype) if is_kernel else leaf
  return jax.tree_util.tree_map_with_path(one, params)


def _logits_quantized_to(bits: int):
  """An interceptor that quantizes every attention layer's logits before its softmax: one scale per sequence and
  query (sub-)head, from the logits its queries see (the others are masked out by the softmax anyway)."""
  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != 'attention_logits':  # a method only the attention layers have
      return next_fun(*args, **kwargs)
    logits_BxNxTxS, visible = args
    return next_fun(quantize(logits_BxNxTxS, bits, axes=(-2, -1), valid=visible), visible)
  return interceptor


@functools.partial(jax.jit, static_argnums=(0, 3))
def _loss_sums(cfg: ModelConfig, params, batch, logit_bits: int):
  """(summed nats, scored tokens) on the batch, the attention logits quantized to `logit_bits` (0: not)."""
  with nn.intercept_methods(_logits_quantized_to(logit_bits)) if logit_bits else contextlib.nullcontext():
    out = losses.eval_step(cfg, params, batch)
  return out['loss_sum'], out['tokens']


def eval_loss(cfg: ModelConfig, params, batches, logit_bits: int = 0) -> float:
  """Nats per scored token over the batches, on the einsum attention path."""
  cfg = dataclasses.replace(cfg, attention_impl='xla')
  nats = tokens = 0.0
  for batch in batches:
    batch_nats, batch_tokens = _loss_sums(cfg, params, batch, logit_bits)
    nats, tokens = nats + float(batch_nats), tokens + float(batch_tokens)
  return nats / max(tokens, 1.0)


def quantization_losses(cfg: ModelConfig, params, batches, bits: list[int]) -> dict:
  """The loss unquantized, and with the weights or the attention logits quantized to each of `bits` (str keys)."""
  return {'unquantized': eval_loss(cfg, params, batches),
          'weights': {str(b): eval_loss(cfg, quantize_weights(params, b), batches) for b in bits},
          'attention_logits': {str(b): eval_loss(cfg, params, batches, logit_bits=b) for b in bits}}


def first_windows(batches: list[dict], windows: int) -> list[dict]:
  """The batches with every row after the first `windows` masked out (mask 0), so exactly that many count."""
  out, seen = [], 0
  for batch in batches:
    keep_B = np.arange(seen, seen + len(batch['mask'])) < windows
    out.append({**batch, 'mask': np.where(keep_B[:, None], batch['mask'], 0).astype(batch['mask'].dtype)})
    seen += len(batch['mask'])
  return out


def tables(report: dict) -> str:
  """Per run: the overall outlier numbers, and the loss per quantization setting."""
  lines = [f'{"run":<40} {"max |logit|":>11} {"kurt logit":>10} {"max |hidden|":>12} {"kurt hidden":>11}']
  for run in report['runs']:
    logits, hidden = run['attention_logits']['overall'], run['hidden_states']['overall']
    lines.append(f'{run["label"][:40]:<40} {logits["max_abs"]:>11.2f} {logits["kurtosis"]:>10.2f} '
                 f'{hidden["max_abs"]:>12.2f} {hidden["kurtosis"]:>11.2f}')
  bits = report['bits']
  lines += ['', f'{"run":<40} {"loss":>7} ' + ' '.join(f'{"W" + str(b):>7}' for b in bits) + ' ' +
            ' '.join(f'{"logit" + str(b):>7}' for b in bits) + '   (nats/token; W: weights, logit: attention logits)']
  for run in report['runs']:
    loss = run['loss']
    lines.append(f'{run["label"][:40]:<40} {loss["unquantized"]:>7.4f} ' +
                 ' '.join(f'{loss["weights"][str(b)]:>7.4f}' for b in bits) + ' ' +
                 ' '.join(f'{loss["attention_logits"][str(b)]:>7.4f}' for b in bits))
  return '\n'.join(lines)


def plot(report: dict, path: str):
  """Per layer, max |logit|, logit kurtosis and max |hidden| of each run; and each run's loss change against the
  bits (the runs' own losses differ, so changes are what can share an axis)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  panels = [(axes[0, 0], 'attention_logits', 'max_abs', 'max |attention logit|'),
            (axes[0, 1], 'attention_logits', 'kurtosis', 'kurtosis of attention logits'),
            (axes[1, 0], 'hidden_states', 'max_abs', 'max |hidden state|')]
  for ax, quantity, key, title in panels:
    for run in report['runs']:
      values = [layer[key] for layer in run[quantity]['layers']]
      ax.plot(range(len(values)), values, marker='o', label=run['label'])
      ax.set_xticks(range(len(values)))
    ax.set(title=title, xlabel='layer', yscale='log')
  bits = report['bits']
  ax = axes[1, 1]
  for i, run in enumerate(report['runs']):
    loss = run['loss']
    for setting, marker, style in (('weights', 'o', '-'), ('attention_logits', 's', '--')):
      ax.plot(bits, [loss[setting][str(b)] - loss['unquantized'] for b in bits], color=f'C{i}', marker=marker,
              linestyle=style, label=f'{run["label"]}: {setting.replace("_", " ")}')
  ax.axhline(0.0, color='grey', linewidth=0.8)
  ax.set(title='loss change after quantization', xlabel='bits', ylabel='nats / token, quantized − unquantized')
  ax.set_xticks(bits)
  ax.invert_xaxis()
  axes[0, 0].legend(fontsize=7)
  ax.legend(fontsize=7)
  fig.suptitle(f'{report["windows"]} windows of {report["seq_len"]} tokens ({report["data"]})')
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
