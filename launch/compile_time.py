"""Compiles a config's state creation and train step ahead of time, allocating nothing, and times the compilation.

  python launch/compile_time.py --config configs/paper_1_4b.py --batch 16 --seq 2048 --scan 0,1

Each row is one `model.scan_layers` setting: the seconds to compile the sharded state creation and the train step
on this machine's backend, and the train step's temporary memory per device. Prints a table and writes JSON.
"""

import argparse
import functools
import json
import time

import flax.linen as nn
import jax

from diffjax import defaults, optim, sharding, train_step
from diffjax.sharding import LOGICAL_AXIS_RULES

from bench_train import load_config


def compile_times(config, vocab_size: int) -> dict:
  cfg = defaults.model_config(config, vocab_size)
  tc = config.train
  mesh = sharding.make_mesh(config.mesh)
  tx, schedule = optim.make_optimizer(tc), optim.learning_rate_schedule(tc)
  shardings = train_step.state_shardings(cfg, tx, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    start = time.perf_counter()
    jax.jit(functools.partial(train_step.new_state, cfg, tx), out_shardings=shardings).lower(
        jax.random.key(0)).compile()
    init_s = time.perf_counter() - start
  batch = train_step.batch_spec(tc.global_batch_size, tc.seq_len, train_step.batch_sharding(mesh))
  train, _ = train_step.compile_steps(cfg, tx, schedule, tc, mesh)
  start = time.perf_counter()
  compiled = train.lower(train_step.abstract_state(cfg, tx, mesh), batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  return {'scan_layers': cfg.scan_layers, 'layers': cfg.n_layers, 'variant': cfg.variant,
          'backend': jax.default_backend(), 'init_compile_s': init_s, 'step_compile_s': compile_s,
          'temp_gib': getattr(memory, 'temp_size_in_bytes', 0) / 2**30}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/paper_1_4b.py')
  parser.add_argument('--variant', default='diff_v1')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--seq', type=int, default=2048)
  parser.add_argument('--vocab', type=int, default=32_000)
  parser.add_argument('--scan', default='0,1', help='model.scan_layers settings to compile, e.g. 0,1')
  parser.add_argument('--out', default='compile_time.json')
  args = parser.parse_args()
  rows = []
  for scan in args.scan.split(','):
    config = load_config(args.config)
    config.model.variant, config.model.scan_layers = args.variant, bool(int(scan))
    config.train.update(global_batch_size=args.batch, microbatches=1, seq_len=args.seq)
    config.model.max_len = max(config.model.max_len, args.seq)
    rows.append(compile_times(config, args.vocab))
  print(f'{args.config}, {args.variant}, batch {args.batch} x {args.seq}, backend {rows[0]["backend"]}')
  print(f'{"scan_layers":<12} {"layers":>6} {"state compile s":>16} {"step compile s":>15} {"step temp GiB":>14}')
  for r in rows:
    print(f'{str(r["scan_layers"]):<12} {r["layers"]:>6} {r["init_compile_s"]:>16.1f} {r["step_compile_s"]:>15.1f} '
          f'{r["temp_gib"]:>14.2f}')
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=2)


if __name__ == '__main__':
  main()
