"""What a run reports: a line per logging step, `metrics.jsonl`, TensorBoard events, throughput and MFU.

Model FLOPs per token (the PaLM convention, causal attention counted at half):
    6 * N + 6 * L * T * E
N: parameters used in matrix products (all but an untied input embedding), L layers, T sequence length,
E width. The attention term is the baseline's; DIFF is counted with the same model FLOPs as the baseline, so
MFU compares variants at equal work. MFU = tokens/s * FLOPs per token / (devices * peak FLOP/s per device).
"""

import json
import logging
import os
import secrets

import jax
import numpy as np

from diffjax.errors import ConfigError
from diffjax.model import transformer as model_lib
from diffjax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per device, from the vendors' datasheets.
PEAK_FLOPS = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12, 'A10': 125e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v5': 459e12,
    'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
}


def peak_flops_per_device(override: float = 0.0) -> float | None:
  if override:
    return override
  kind = jax.devices()[0].device_kind
  matches = [name for name in PEAK_FLOPS if name.lower() in kind.lower()]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  params = model_lib.abstract_params(cfg)['params']
  n_matmul = model_lib.count_params(params)
  if not cfg.tie_embeddings:
    n_matmul -= cfg.vocab_size * cfg.d_model
  return 6.0 * n_matmul + 6.0 * cfg.n_layers * seq_len * cfg.d_model


class MetricsWriter:
  """Appends JSON records to WORKDIR/metrics.jsonl and scalars to TensorBoard, and with `wandb_project` to Weights &
  Biases; prints one line per record.

  The W&B run's id is kept in WORKDIR/wandb_id, so a resumed training continues the same W&B run. W&B's own
  settings come from its environment (`WANDB_MODE=offline` logs without a network, for `wandb sync` later).
  """

  def __init__(self, workdir: str, *, print_fn=print, wandb_project: str = '', run_config: dict | None = None):
    self.is_chief = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.print_fn = print_fn
    self.tensorboard = self.wandb = None
    if self.is_chief:
      _end_torn_line(self.path)
      from tensorboardX import SummaryWriter  # imported lazily: it is only needed on the chief host
      self.tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      if wandb_project:
        self.wandb = _wandb_run(workdir, wandb_project, run_config or {})

  def write(self, step: int, record: dict):
    if not self.is_chief:
      return
    record = {'step': step, **{k: np.asarray(v).tolist() for k, v in record.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    scalars = dict(_scalars(record))
    for key, value in scalars.items():
      self.tensorboard.add_scalar(key, value, step)
    self.tensorboard.flush()
    if self.wandb is not None:
      self.wandb.log(scalars, step=step, commit=True)
    self.print_fn(format_line(record))

  def close(self):
    if self.tensorboard is not None:
      self.tensorboard.close()
    if self.wandb is not None:
      self.wandb.finish()


def _scalars(record: dict):
  """(name, number) for each number of a record; a list (one value per layer) gives `name/layer_i`."""
  for key, value in record.items():
    if key == 'step':
      continue
    for suffix, scalar in (enumerate(value) if isinstance(value, list) else [(None, value)]):
      if isinstance(scalar, (int, float)):
        yield (key if suffix is None else f'{key}/layer_{suffix}'), scalar


def _wandb_run(workdir: str, project: str, run_config: dict):
  try:
    import wandb  # pylint: disable=import-outside-toplevel  (an optional dependency: pip install -e ".[wandb]")
  except ImportError:
    raise ConfigError('log.wandb_project: the wandb package is not installed; pip install -e ".[wandb]", or leave '
                      'log.wandb_project empty') from None
  id_path = os.path.join(workdir, 'wandb_id')
  if not os.path.exists(id_path):
    with open(id_path, 'w') as f:
      f.write(secrets.token_hex(4))
  with open(id_path) as f:
    run_id = f.read().strip()
  return wandb.init(project=project, id=run_id, resume='allow', dir=workdir, config=run_config,
                    name=os.path.basename(os.path.normpath(workdir)))


def format_line(record: dict) -> str:
  parts = [f'step {record["step"]}']
  for key, value in record.items():
    if key == 'step':
      continue
    if isinstance(value, list):
      parts.append(f'{key} [{" ".join(f"{v:.3f}" for v in value)}]')
    elif isinstance(value, float):
      parts.append(f'{key} {value:.4g}' if abs(value) < 1e5 else f'{key} {value:.3e}')
    else:
      parts.append(f'{key} {value}')
  return ' | '.join(parts)


def _end_torn_line(path: str):
  """A run killed mid-append leaves a torn last line: ending it keeps the next record on a line of its own."""
  if os.path.exists(path) and os.path.getsize(path):
    with open(path, 'rb+') as f:
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b'\n':
        f.write(b'\n')


def read_records(workdir: str) -> list[dict]:
  """metrics.jsonl's records; a line torn by a killed run is skipped, with one warning."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records, torn = [], 0
  with open(path) as f:
    for line in filter(str.strip, f):
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        torn += 1
  if torn:
    logging.warning('%s: skipped %d unreadable line(s), cut short when a run was killed while writing', path, torn)
  return records


def plot_curves(workdir: str) -> str | None:
  """WORKDIR/curves.png: training and validation loss, and DIFF V1's λ per layer, against the step."""
  # After a resume, steps since the last checkpoint are run and logged again: the last record of a step wins.
  records = list({(r['step'], 'eval_loss' in r): r for r in read_records(workdir)}.values())
  records.sort(key=lambda r: r['step'])
  train = [(r['step'], r['loss']) for r in records if 'loss' in r]
  if not train:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  evals = [(r['step'], r['eval_loss']) for r in records if 'eval_loss' in r]
  lambdas = [(r['step'], r['lambda']) for r in records if 'lambda' in r]
  fig, axes = plt.subplots(1, 2 if lambdas else 1, figsize=(11 if lambdas else 6, 4), squeeze=False)
  ax = axes[0, 0]
  ax.plot(*zip(*train), label='train')
  if evals:
    ax.plot(*zip(*evals), 'o-', label='validation')
  ax.set(xlabel='step', ylabel='loss (nats/token)', title='Loss')
  ax.legend()
  if lambdas:
    ax = axes[0, 1]
    steps, values = zip(*lambdas)
    for layer, series in enumerate(np.asarray(values).T):
      ax.plot(steps, series, label=f'layer {layer}')
    ax.set(xlabel='step', ylabel='λ', title='DIFF λ per layer')
    ax.legend(fontsize='small', ncol=2)
  fig.tight_layout()
  path = os.path.join(workdir, 'curves.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
