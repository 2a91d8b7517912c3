"""Compiles a config's state creation and train step ahead of time, allocating nothing, and times the compilation.

  python launch/compile_time.py --config=configs/paper_1_4b.py --config.train.global_batch_size=16 --scan=0,1

Each row is one `model.scan_layers` setting: the seconds to compile the sharded state creation and the train step
on this machine's backend, and the train step's temporary memory per device, at the config's batch (in one
microbatch) and sequence length; `--config.KEY=VALUE` sets any key. Prints a table and writes JSON.
"""

import functools
import json
import time

import flax.linen as nn
import jax
from absl import app, flags
from ml_collections import config_flags

from diffjax import cli
from diffjax.model import sharding
from diffjax.model.sharding import LOGICAL_AXIS_RULES
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step

CONFIG = config_flags.DEFINE_config_file('config', 'configs/paper_1_4b.py', 'A config file; --config.KEY=VALUE sets '
                                         'any key.', lock_config=True)
SCAN = flags.DEFINE_list('scan', ['0', '1'], 'model.scan_layers settings to compile.')
VOCAB = flags.DEFINE_integer('vocab', 32_000, 'Vocabulary size of the model.')
OUT = flags.DEFINE_string('out', 'compile_time.json', 'Where the JSON rows go.')


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


def main(argv):
  del argv
  rows = []
  for scan in SCAN.value:
    config = CONFIG.value.copy_and_resolve_references()
    config.model.scan_layers = bool(int(scan))
    config.train.microbatches = 1
    config.model.max_len = max(config.model.max_len, config.train.seq_len)
    rows.append(compile_times(config, VOCAB.value))
  tc = CONFIG.value.train
  print(f'{config_flags.get_config_filename(flags.FLAGS["config"])}, {rows[0]["variant"]}, batch '
        f'{tc.global_batch_size} x {tc.seq_len}, backend {rows[0]["backend"]}')
  print(f'{"scan_layers":<12} {"layers":>6} {"state compile s":>16} {"step compile s":>15} {"step temp GiB":>14}')
  for r in rows:
    print(f'{str(r["scan_layers"]):<12} {r["layers"]:>6} {r["init_compile_s"]:>16.1f} {r["step_compile_s"]:>15.1f} '
          f'{r["temp_gib"]:>14.2f}')
  with open(OUT.value, 'w') as f:
    json.dump(rows, f, indent=2)


if __name__ == '__main__':
  app.run(cli.report_errors(main), flags_parser=cli.parse_flags)
