"""Times the full train step of a config for each variant: tokens/s, MFU and memory, on real text or random tokens.

  python launch/bench_train.py --config=configs/seed.py --config.train.global_batch_size=64 \
      --data='corpus_en/*.txt.gz' --steps=50
  python launch/bench_train.py --config=configs/seed.py --config.train.global_batch_size=16 --data=config
  python launch/bench_train.py --config=configs/seed.py --config.train.global_batch_size=16 \
      --config.train.loss_chunk_tokens=8192 --config.model.remat=True --config.model.remat_policy=dots \
      --config.train.opt_moments_dtype=bfloat16   # the memory options, each can be set alone

Uses the same compiled step, shardings, mesh and share of the accelerator's memory as training
(`diffjax.train.step`, `preflight.memory_env`), so the numbers are those of `python -m diffjax.train` minus the input
pipeline; any config key is set as in training, `--config.KEY=VALUE`.
With `--data` the step runs on real batches of that corpus (prepared first where needed, as training prepares it),
each timed step on another batch: some costs depend on the tokens (a scatter-add into rows that many tokens share,
for one), and random tokens spread evenly hide them. Without it, random tokens over `--vocab`. The first line of the
table names the data. Prints a table and writes JSON (`--out`).

With `--hf`, each variant that has a Hugging Face twin (DiffLlama for diff_v1, Llama for the baseline) is also timed
as PyTorch users train it, on the same batches and in the same microbatches, before the JAX rows take the GPU:
SDPA attention, autocast to the config's compute dtype over float32 weights, `torch.compile` on a GPU, the loss
from float32 logits, global-norm clipping and fused AdamW with the config's hyper-parameters (a constant learning
rate), Hugging Face's own initial weights. Its MFU counts the same model FLOPs as the diffjax row.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffjax import cli
from diffjax.data import pipeline as data
from diffjax.infer import hf
from diffjax.model import sharding
from diffjax.model import transformer as model
from diffjax.run import checkpoint, defaults
from diffjax.train import metrics, optim, preflight
from diffjax.train import step as train_step


class RandomTokens:
  """One batch of tokens drawn uniformly from the vocabulary, one document per row."""

  def __init__(self, vocab_size: int, batch: int, seq_len: int):
    rng = np.random.default_rng(0)
    shape = (batch, seq_len)
    self.vocab_size, self.name = vocab_size, f'random tokens (uniform over {vocab_size:,})'
    self.host_batches = [{'inputs': rng.integers(0, vocab_size, shape, dtype=np.int32),
                          'targets': rng.integers(0, vocab_size, shape, dtype=np.int32),
                          'mask': np.ones(shape, np.float32), 'segment_ids': np.zeros(shape, np.int32)}]


class CorpusBatches:
  """The first `count` batches of a config's training stream, read from its prepared corpus."""

  def __init__(self, config, count: int):
    tc = config.train
    pipeline = data.build_input(config.data, seq_len=tc.seq_len, batch_size=tc.global_batch_size,
                                seed=config.seed, workdir=None)
    stream = pipeline.train_batches()
    self.vocab_size, self.name = pipeline.tokenizer.vocab_size, pipeline.identity
    self.host_batches = [stream[i] for i in range(count)]


def bench(config, variant, batches, steps, init_from=''):
  config = config.copy_and_resolve_references()
  config.model.variant = variant
  cfg = defaults.model_config(config, batches.vocab_size)
  tc = config.train
  peak_before = (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use', 0)
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(tc), optim.learning_rate_schedule(tc)
  start = time.perf_counter()
  state = train_step.init_state(cfg, tx, mesh, seed=0)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - start
  if init_from:  # a trained model's weights: step time can depend on the values (power draw sets the clocks)
    abstract = train_step.abstract_state(cfg, tx, mesh)['params']
    state['params'] = checkpoint.load_params(init_from, abstract, train_step.state_shardings(cfg, tx, mesh)['params'])
  train, _ = train_step.compile_steps(cfg, tx, schedule, tc, mesh)
  # On the devices before the clock starts: the input pipeline's time is not the step's.
  device_batches = jax.device_put(batches.host_batches, train_step.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = train.lower(state, device_batches[0]).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  start = time.perf_counter()
  state, out = train(state, device_batches[0])
  jax.block_until_ready(out)
  compile_and_first = time.perf_counter() - start
  start = time.perf_counter()
  for i in range(steps):
    state, out = train(state, device_batches[(i + 1) % len(device_batches)])
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / steps
  tokens_per_s = tc.global_batch_size * tc.seq_len / seconds
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use', 0)
  return {'variant': variant + (' (trained)' if init_from else ''), 'device': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'data': batches.name, 'vocab_size': cfg.vocab_size,
          'params': model.count_params(state['params']), 'batch': tc.global_batch_size, 'seq_len': tc.seq_len,
          'microbatches': tc.microbatches, 'attention_impl': cfg.attention_impl,
          'remat': cfg.remat_policy if cfg.remat else 'off', 'loss_chunk_tokens': tc.loss_chunk_tokens,
          'opt_moments_dtype': tc.opt_moments_dtype, 'step_ms': seconds * 1e3,
          'tokens_per_s': tokens_per_s, 'init_s': init_s, 'compile_s': compile_s, 'first_step_s': compile_and_first,
          'mfu': model_flops_utilisation(config, cfg, tokens_per_s, jax.device_count()),
          'temp_gib': getattr(memory, 'temp_size_in_bytes', 0) / 2**30,
          # The device's high-water mark since the process began, which no API resets: a row whose own peak was
          # lower than an earlier row's shows that row's (`peak_set_here` False; devices without memory stats: True).
          'peak_gib': peak / 2**30, 'pool_gib': stats.get('bytes_limit', 0) / 2**30,
          'peak_set_here': peak > peak_before or not peak, 'final_loss': float(out['loss'])}


def pool_warnings(rows: list[dict]) -> list[str]:
  """A line for each row whose peak filled the device's memory pool. A step at the pool's edge may have been slowed
  to fit: the 1.4B step with remat_policy=dots ran no faster than recomputing everything in 75% of an H100, and 8-9%
  faster in 92% (docs/performance.md)."""
  return [f'{r["variant"]}: its peak filled the memory pool ({r["pool_gib"]:.1f} GiB), which may have slowed it; '
          'time it again with a larger XLA_CLIENT_MEM_FRACTION' for r in rows
          if r.get('pool_gib') and r.get('peak_set_here', True) and r['peak_gib'] > 0.99 * r['pool_gib']]


def model_flops_utilisation(config, cfg, tokens_per_s: float, devices: int) -> float | None:
  peak = metrics.peak_flops_per_device(config.log.peak_flops_per_device)
  return tokens_per_s * metrics.flops_per_token(cfg, config.train.seq_len) / (devices * peak) if peak else None


def bench_hf(config, variant, batches, steps) -> dict | None:
  """The Hugging Face twin of `variant` trained on the same batches (module docstring); None without a twin."""
  import torch  # pylint: disable=import-outside-toplevel  (only --hf needs PyTorch)
  if variant not in hf.ARCHITECTURES:
    return None
  config = config.copy_and_resolve_references()
  config.model.variant = variant
  cfg = defaults.model_config(config, batches.vocab_size)
  tc = config.train
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  start = time.perf_counter()
  model = hf.hf_model(cfg, attn_implementation='sdpa').to(device).train()
  optimizer = torch.optim.AdamW(hf.decay_groups(model, tc.weight_decay), lr=tc.learning_rate, betas=(tc.b1, tc.b2),
                                eps=tc.eps, fused=device == 'cuda')
  compute_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(config.model.dtype)

  def summed_loss(inputs, targets, mask):
    with torch.autocast(device, dtype=compute_dtype, enabled=compute_dtype is not None):
      logits = model(input_ids=inputs).logits
    losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction='none')
    return (losses * mask.flatten()).sum()

  # Compiled with the model, the float32 loss fuses into a few kernels; left eager, it holds the (tokens,
  # vocabulary) logits in float32 twice over, which at the seed shape (batch 64, 32k vocabulary) does not fit 80 GB.
  loss_fn = torch.compile(summed_loss) if device == 'cuda' else summed_loss
  to_device = lambda x, dtype: torch.from_numpy(np.asarray(x)).to(device, dtype)
  device_batches = [{'inputs': to_device(b['inputs'], torch.long), 'targets': to_device(b['targets'], torch.long),
                     'mask': to_device(b['mask'], torch.float32)} for b in batches.host_batches]
  init_s = time.perf_counter() - start

  def step(batch):
    tokens = batch['mask'].sum()
    for part in zip(*(batch[k].chunk(tc.microbatches) for k in ('inputs', 'targets', 'mask'))):
      loss = loss_fn(*part) / tokens
      loss.backward()
    if tc.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  def run(count: int, first: int) -> tuple[float, float]:
    """(seconds, the last loss) of `count` steps from batch `first` on."""
    if device == 'cuda':
      torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(count):
      loss = step(device_batches[(first + i) % len(device_batches)])
    if device == 'cuda':
      torch.cuda.synchronize()
    return time.perf_counter() - start, float(loss)

  compile_s, _ = run(3, 0)  # torch.compile traces and compiles in the first calls
  seconds, final_loss = run(steps, 1)
  seconds /= steps
  tokens_per_s = tc.global_batch_size * tc.seq_len / seconds
  row = {'variant': f'{variant} (HF {hf.ARCHITECTURES[variant][1].removesuffix("ForCausalLM")})',
         'device': torch.cuda.get_device_name() if device == 'cuda' else 'cpu', 'devices': 1, 'data': batches.name,
         'vocab_size': cfg.vocab_size, 'params': sum(p.numel() for p in model.parameters()),
         'batch': tc.global_batch_size, 'seq_len': tc.seq_len, 'microbatches': tc.microbatches,
         'attention_impl': 'sdpa', 'remat': 'off', 'loss_chunk_tokens': 0, 'opt_moments_dtype': 'float32',
         'step_ms': seconds * 1e3, 'tokens_per_s': tokens_per_s, 'init_s': init_s, 'compile_s': compile_s,
         'first_step_s': compile_s, 'mfu': None, 'temp_gib': 0.0,
         'peak_gib': torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else 0.0, 'final_loss': final_loss,
         'model_config': cfg}
  del model, optimizer, loss_fn, device_batches
  if device == 'cuda':
    torch.cuda.empty_cache()  # the JAX rows that follow get the whole GPU
  return row


CONFIG = config_flags.DEFINE_config_file('config', 'configs/seed.py', 'A config file; --config.KEY=VALUE sets any key.',
                                          lock_config=True)
VARIANTS = flags.DEFINE_list('variants', ['diff_v1', 'baseline', 'diff_v2'], 'model.variant of each row.')
DATA = flags.DEFINE_string('data', '', "Real text to time on: a folder, file or glob of .txt or .txt.gz files, or "
                           "'config' for the config's data section; empty: random tokens over --vocab.")
VOCAB = flags.DEFINE_integer('vocab', 32_000, 'Vocabulary of the random tokens (without --data).')
STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps, after one that compiles.')
INIT_FROM = flags.DEFINE_string('init_from', '', 'Also time the first variant with the weights of this run.')
OUT = flags.DEFINE_string('out', 'bench_train.json', 'Where the JSON rows go.')
HF = flags.DEFINE_bool('hf', False, "Also time each variant's Hugging Face twin on the same batches (needs torch and "
                       'transformers; see the module docstring).')


def main(argv):
  del argv
  # Read when JAX first reaches the GPU, which happens below: the memory a training takes, and with --hf none of it
  # up front, since PyTorch trains first.
  os.environ.update(preflight.memory_env(1))
  if HF.value:
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  config = CONFIG.value
  if DATA.value and DATA.value != 'config':
    config.data.update(source='local', text_glob=DATA.value)
  tc = config.train
  # One real batch per timed step (the first also compiles), so the timing sees the corpus's spread of tokens.
  batches = (CorpusBatches(config, STEPS.value + 1) if DATA.value
             else RandomTokens(VOCAB.value, tc.global_batch_size, tc.seq_len))
  hf_rows = [row for v in VARIANTS.value if (row := bench_hf(config, v, batches, STEPS.value))] if HF.value else []
  rows = [bench(config, v, batches, STEPS.value) for v in VARIANTS.value]
  for row in hf_rows:  # the peak FLOP/s comes from JAX's device, so only now that JAX has the GPU
    row['mfu'] = model_flops_utilisation(config, row.pop('model_config'), row['tokens_per_s'], 1)
  rows += hf_rows
  if INIT_FROM.value:
    rows.append(bench(config, VARIANTS.value[0], batches, STEPS.value, INIT_FROM.value))
  print(f'data: {batches.name}')
  print(f'{rows[0]["device"]} x{rows[0]["devices"]}, {config_flags.get_config_filename(flags.FLAGS["config"])}, '
        f'batch {tc.global_batch_size} x {tc.seq_len}, microbatches {tc.microbatches}, vocab {rows[0]["vocab_size"]}, '
        f'remat {rows[0]["remat"]}, loss chunk {rows[0]["loss_chunk_tokens"] or "off"}, '
        f'moments {rows[0]["opt_moments_dtype"]}')
  print(f'{"variant":<24} {"params":>12} {"step ms":>9} {"tokens/s":>11} {"MFU":>6} {"temp GiB":>9} {"peak GiB":>9} '
        f'{"init s":>7} {"compile s":>9}')
  for r in rows:
    mfu = f'{100 * r["mfu"]:5.1f}%' if r['mfu'] else '   n/a'
    print(f'{r["variant"]:<24} {r["params"]:>12,} {r["step_ms"]:>9.1f} {r["tokens_per_s"]:>11,.0f} {mfu:>6} '
          f'{r["temp_gib"]:>9.2f} {r["peak_gib"]:>8.2f}{" *"[not r.get("peak_set_here", True)]} '
          f'{r["init_s"]:>7.1f} {r["compile_s"]:>9.1f}')
  if any(not r.get('peak_set_here', True) for r in rows):
    print("* an earlier row's peak: this row's own is no higher (the device's peak cannot be reset)")
  for line in pool_warnings(rows):
    print(line)
  with open(OUT.value, 'w') as f:
    json.dump(rows, f, indent=2)


if __name__ == '__main__':
  app.run(cli.report_errors(main), flags_parser=cli.parse_flags)
