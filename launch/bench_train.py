"""Times the full train step of a config for each variant: tokens/s, MFU and memory, on real text or random tokens.

  python launch/bench_train.py --config configs/seed.py --batch 64 --data 'corpus_en/*.txt.gz' --steps 50
  python launch/bench_train.py --config configs/seed.py --batch 16 --data config   # the config's own data section
  python launch/bench_train.py --config configs/seed.py --batch 16 --loss_chunk_tokens 8192 --remat 1 \
      --remat_policy dots --opt_moments_dtype bfloat16   # the memory options, each can be set alone

Uses the same compiled step, shardings and mesh as training (`diffjax.train_step`), so the numbers are those
of `python -m diffjax.train` minus the input pipeline. With `--data` the step runs on real batches of that corpus
(prepared first where needed, as training prepares it), each timed step on another batch: some costs depend on the
tokens (a scatter-add into rows that many tokens share, for one), and random tokens spread evenly hide them. Without
it, random tokens over `--vocab`. The first line of the table names the data. Prints a table and writes JSON
(`--out`).
"""

import argparse
import importlib.util
import json
import time

import jax
import numpy as np

from diffjax import checkpoint, data, defaults, metrics, model, optim, sharding, train_step


def load_config(path):
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_overrides(config, items):
  """KEY=VALUE strings (dotted keys) onto a config, each value parsed as the diffjax.train flags parse it."""
  for item in items:
    key, _, text = item.partition('=')
    *parents, name = key.split('.')
    section = config
    for parent in parents:
      section = section[parent]
    section[name] = _parse(text, section[name])


def _parse(text: str, current):
  if isinstance(current, bool):
    return text.lower() in ('1', 'true', 'yes')
  if isinstance(current, (int, float)):
    return type(current)(float(text)) if isinstance(current, int) and float(text).is_integer() else float(text)
  return text


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
  peak = metrics.peak_flops_per_device(config.log.peak_flops_per_device)
  stats = jax.devices()[0].memory_stats() or {}
  return {'variant': variant + (' (trained)' if init_from else ''), 'device': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'data': batches.name, 'vocab_size': cfg.vocab_size,
          'params': model.count_params(state['params']), 'batch': tc.global_batch_size, 'seq_len': tc.seq_len,
          'microbatches': tc.microbatches, 'attention_impl': cfg.attention_impl,
          'remat': cfg.remat_policy if cfg.remat else 'off', 'loss_chunk_tokens': tc.loss_chunk_tokens,
          'opt_moments_dtype': tc.opt_moments_dtype, 'step_ms': seconds * 1e3,
          'tokens_per_s': tokens_per_s, 'init_s': init_s, 'compile_s': compile_s, 'first_step_s': compile_and_first,
          'mfu': tokens_per_s * metrics.flops_per_token(cfg, tc.seq_len) / (jax.device_count() * peak) if peak else None,
          'temp_gib': getattr(memory, 'temp_size_in_bytes', 0) / 2**30,
          'peak_gib': stats.get('peak_bytes_in_use', 0) / 2**30, 'final_loss': float(out['loss'])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/seed.py')
  parser.add_argument('--variants', default='diff_v1,baseline,diff_v2')
  parser.add_argument('--batch', type=int, default=16, help='global batch in sequences')
  parser.add_argument('--microbatches', type=int, default=1)
  parser.add_argument('--seq', type=int, default=0, help='sequence length (0: the config\'s)')
  parser.add_argument('--data', default='',
                      help="real text to time on: a folder, file or glob of .txt or .txt.gz files, or 'config' for "
                           "the config's data section (with --set data.*); empty: random tokens over --vocab")
  parser.add_argument('--vocab', type=int, default=32_000, help='vocabulary of the random tokens (without --data)')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--impl', default='', help='model.attention_impl override')
  parser.add_argument('--remat', type=int, default=-1, help='model.remat override (0/1)')
  parser.add_argument('--remat_policy', default='', help='model.remat_policy override (nothing/dots)')
  parser.add_argument('--loss_chunk_tokens', type=int, default=-1, help='train.loss_chunk_tokens override (0: off)')
  parser.add_argument('--opt_moments_dtype', default='', help='train.opt_moments_dtype override (float32/bfloat16)')
  parser.add_argument('--ffn', type=int, default=0, help='model.d_ff override (0: the config\'s)')
  parser.add_argument('--scan', type=int, default=-1, help='model.scan_layers override (0/1)')
  parser.add_argument('--init_from', default='', help='also time the first variant with the weights of this run')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='any config override, as --config.KEY=VALUE of diffjax.train (applied first)')
  parser.add_argument('--out', default='bench_train.json')
  args = parser.parse_args()
  config = load_config(args.config)
  apply_overrides(config, args.set)
  config.train.global_batch_size, config.train.microbatches = args.batch, args.microbatches
  if args.seq:
    config.train.seq_len = args.seq
  if args.impl:
    config.model.attention_impl = args.impl
  if args.ffn:
    config.model.d_ff = args.ffn
  if args.scan >= 0:
    config.model.scan_layers = bool(args.scan)
  if args.remat >= 0:
    config.model.remat = bool(args.remat)
  if args.remat_policy:
    config.model.remat_policy = args.remat_policy
  if args.loss_chunk_tokens >= 0:
    config.train.loss_chunk_tokens = args.loss_chunk_tokens
  if args.opt_moments_dtype:
    config.train.opt_moments_dtype = args.opt_moments_dtype
  if args.data and args.data != 'config':
    config.data.update(source='local', text_glob=args.data)
  # One real batch per timed step (the first also compiles), so the timing sees the corpus's spread of tokens.
  batches = CorpusBatches(config, args.steps + 1) if args.data else RandomTokens(args.vocab, args.batch,
                                                                                  config.train.seq_len)
  variants = args.variants.split(',')
  rows = [bench(config, v, batches, args.steps) for v in variants]
  if args.init_from:
    rows.append(bench(config, variants[0], batches, args.steps, args.init_from))
  print(f'data: {batches.name}')
  print(f'{rows[0]["device"]} x{rows[0]["devices"]}, {args.config}, batch {args.batch} x {rows[0]["seq_len"]}, '
        f'microbatches {args.microbatches}, vocab {rows[0]["vocab_size"]}, remat {rows[0]["remat"]}, '
        f'loss chunk {rows[0]["loss_chunk_tokens"] or "off"}, moments {rows[0]["opt_moments_dtype"]}')
  print(f'{"variant":<19} {"params":>12} {"step ms":>9} {"tokens/s":>11} {"MFU":>6} {"temp GiB":>9} {"peak GiB":>9} '
        f'{"init s":>7} {"compile s":>9}')
  for r in rows:
    mfu = f'{100 * r["mfu"]:5.1f}%' if r['mfu'] else '   n/a'
    print(f'{r["variant"]:<19} {r["params"]:>12,} {r["step_ms"]:>9.1f} {r["tokens_per_s"]:>11,.0f} {mfu:>6} '
          f'{r["temp_gib"]:>9.2f} {r["peak_gib"]:>9.2f} {r["init_s"]:>7.1f} {r["compile_s"]:>9.1f}')
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
