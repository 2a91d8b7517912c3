"""Trains a diffjax model and its Hugging Face twin from identical initial weights on identical batches, and prints
their loss curves side by side.

  python launch/hf_side_by_side.py --text 'corpus_en/*.txt.gz' --steps 300 --out runs/hf_side_by_side
  python launch/hf_side_by_side.py --text 'docs/*.md' --steps 3 --layers 1 --width 64 --ffn 128 --batch 2 \
      --seq 128 --dtype float32 --out /tmp/side_by_side                                  # a CPU smoke run

diffjax builds each variant (diff_v1 -> DiffLlamaForCausalLM, baseline -> LlamaForCausalLM) at the seed shape with
the settings that Hugging Face hard-codes (flat 0.02 init, no sub-layer norm scale, rotate_half RoPE, RMSNorm eps
1e-6), and diffjax.infer.hf exports its initial weights into the PyTorch model. Both then take the same steps: random
windows of the byte stream of the text files (documents end with byte 0), drawn in one fixed order; AdamW (β 0.9,
0.95, weight decay 0.1 on matrices only), peak lr 6e-4 scaled by min(1, (s+1)/warmup) × (0.1 + 0.45 (1 + cos(π s /
steps))) at step s, gradient clipping at 1.0, bf16 compute with float32 weights. diffjax trains with its own
train_step; PyTorch with autocast (and torch.compile on a GPU). Step 0's losses agree up to bf16 rounding if the
export is right; later gaps come from the training step. Writes side_by_side.json and side_by_side.png into --out.
Needs torch and transformers.
"""

import argparse
import glob
import gzip
import json
import os
import sys
import time
import types

# JAX would otherwise take 75% of GPU memory up front and leave PyTorch too little.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import flax.linen as nn  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position

from diffjax.infer import hf  # pylint: disable=wrong-import-position
from diffjax.model.config import ModelConfig  # pylint: disable=wrong-import-position
from diffjax.model.transformer import Transformer  # pylint: disable=wrong-import-position
from diffjax.train import optim  # pylint: disable=wrong-import-position
from diffjax.train import step as train_step  # pylint: disable=wrong-import-position

VOCAB = 256  # bytes


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--text', required=True, help='glob of text files (.gz is decompressed), one document each')
  p.add_argument('--variants', default='diff_v1,baseline')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--seq', type=int, default=2048)
  p.add_argument('--layers', type=int, default=8)
  p.add_argument('--width', type=int, default=512)
  p.add_argument('--heads', type=int, default=8, help='baseline head count, as ModelConfig.n_heads')
  p.add_argument('--ffn', type=int, default=1792)
  p.add_argument('--lr', type=float, default=6e-4)
  p.add_argument('--warmup', type=int, default=120)
  p.add_argument('--weight_decay', type=float, default=0.1)
  p.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32'))
  p.add_argument('--seed', type=int, default=0, help='initial weights and window order')
  p.add_argument('--compile', default='auto', choices=('auto', 'yes', 'no'), help='torch.compile; auto: on a GPU')
  p.add_argument('--log_every', type=int, default=25)
  p.add_argument('--out', default='runs/hf_side_by_side')
  return p.parse_args(argv)


def byte_stream(pattern: str) -> np.ndarray:
  paths = sorted(glob.glob(pattern))
  if not paths:
    sys.exit(f'--text: no files match {pattern!r}')
  docs = []
  for path in paths:
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt', encoding='utf-8-sig') as f:
      docs.append(np.frombuffer(f.read().replace('\r\n', '\n').encode('utf-8'), np.uint8))
    docs.append(np.zeros(1, np.uint8))  # byte 0 ends a document
  return np.concatenate(docs)


def windows(stream: np.ndarray, args) -> list[np.ndarray]:
  """Every step's (batch, seq + 1) windows, drawn once so both frameworks see the same ones in the same order."""
  if len(stream) <= args.seq + 1:
    sys.exit(f'--text: {len(stream)} bytes is too little for windows of {args.seq + 1}')
  rng = np.random.default_rng(args.seed)
  starts = rng.integers(0, len(stream) - args.seq - 1, (args.steps, args.batch))
  return [np.stack([stream[s:s + args.seq + 1] for s in row]).astype(np.int32) for row in starts]


def lr_at(step, args):
  """The learning rate of optimizer step `step` (0-based), for both frameworks (jnp or Python numbers)."""
  warm = jnp.minimum(1.0, (step + 1) / args.warmup)
  cosine = 0.1 + 0.45 * (1 + jnp.cos(jnp.pi * jnp.minimum(1.0, step / args.steps)))
  return args.lr * warm * cosine


def model_config(variant: str, args) -> ModelConfig:
  return ModelConfig(vocab_size=VOCAB, d_model=args.width, n_layers=args.layers, n_heads=args.heads, d_ff=args.ffn,
                     max_len=args.seq, variant=variant, dtype=args.dtype, rope_pairing='half', norm_eps=1e-6,
                     scale_residual_init=False, subln_scale=False).validated()


def train_diffjax(cfg: ModelConfig, params, batches, args) -> tuple[list[float], float]:
  schedule = lambda count: lr_at(count, args)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=args.weight_decay,
                               mask=optim.decay_mask))
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
           'nonfinite_steps': jnp.zeros((), jnp.int32), 'first_nonfinite_step': jnp.full((), -1, jnp.int32)}
  step_cfg = types.SimpleNamespace(microbatches=1, z_loss=0.0, loss_chunk_tokens=0)
  step = jax.jit(lambda s, b: train_step.train_step(cfg, tx, schedule, step_cfg, s, b), donate_argnums=0)
  losses, start = [], time.time()
  for window in batches:
    batch = {'inputs': window[:, :-1], 'targets': window[:, 1:], 'mask': np.ones_like(window[:, 1:])}
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
    start = start if len(losses) > 1 else time.time()  # time the steps after the first, which compiles
  return losses, time.time() - start


def train_torch(cfg: ModelConfig, params, batches, args) -> tuple[list[float], float]:
  import torch  # pylint: disable=import-outside-toplevel
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = hf.hf_model(cfg, params, attn_implementation='sdpa').to(device).train()
  opt = torch.optim.AdamW(hf.decay_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                          fused=device == 'cuda')
  sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: float(lr_at(s, args)) / args.lr)
  forward = torch.compile(model) if args.compile == 'yes' or (args.compile == 'auto' and device == 'cuda') else model
  losses, start = [], time.time()
  for window in batches:
    tokens = torch.from_numpy(window.astype(np.int64)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16'):
      logits = forward(input_ids=tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
    start = start if len(losses) > 1 else time.time()
  if device == 'cuda':
    torch.cuda.synchronize()
  seconds = time.time() - start
  del model, opt
  if device == 'cuda':
    torch.cuda.empty_cache()
  return losses, seconds


def table(results: dict, log_every: int) -> str:
  """Per variant: the loss of both frameworks at every `log_every`-th step and the last, and their difference."""
  lines = []
  for variant, r in results.items():
    gap = max(abs(a - b) for a, b in zip(r['diffjax'], r['torch']))
    lines += [f'{variant}: steps after the first took diffjax {r["diffjax_s"]:.1f}s, PyTorch {r["torch_s"]:.1f}s; '
              f'largest loss difference {gap:.2e}',
              f'{"step":>6} {"diffjax":>9} {"PyTorch":>9} {"diff":>9}']
    steps = len(r['diffjax'])
    for s in sorted({*range(0, steps, log_every), steps - 1}):
      a, b = r['diffjax'][s], r['torch'][s]
      lines.append(f'{s:>6} {a:>9.4f} {b:>9.4f} {a - b:>+9.4f}')
  return '\n'.join(lines)


def plot(results: dict, path: str):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(8, 5))
  for variant, r in results.items():
    line, = ax.plot(r['diffjax'], label=f'{variant} diffjax')
    ax.plot(r['torch'], '--', color=line.get_color(), label=f'{variant} Hugging Face')
  ax.set(xlabel='step', ylabel='training loss (nats/byte)', title='identical weights and batches')
  ax.legend()
  fig.savefig(path, dpi=120, bbox_inches='tight')
  plt.close(fig)


def main(argv=None):
  args = parse_args(argv)
  batches = windows(byte_stream(args.text), args)
  results = {}
  for variant in args.variants.split(','):
    cfg = model_config(variant, args)
    variables = nn.meta.unbox(jax.jit(Transformer(cfg).init)(
        jax.random.key(args.seed), jnp.zeros((1, 8), jnp.int32)))
    params = jax.tree.map(np.asarray, variables['params'])
    torch_losses, torch_s = train_torch(cfg, params, batches, args)
    diffjax_losses, diffjax_s = train_diffjax(cfg, params, batches, args)
    results[variant] = {'diffjax': diffjax_losses, 'torch': torch_losses, 'diffjax_s': diffjax_s,
                        'torch_s': torch_s}
    print(f'{variant}: step 0 loss diffjax {diffjax_losses[0]:.6f}, PyTorch {torch_losses[0]:.6f}', flush=True)
  report = table(results, args.log_every)
  print(report)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'side_by_side.json'), 'w') as f:
    json.dump({'args': vars(args), 'results': results}, f, indent=1)
  plot(results, os.path.join(args.out, 'side_by_side.png'))
  print(f'wrote {args.out}/side_by_side.json and side_by_side.png')


if __name__ == '__main__':
  main()
