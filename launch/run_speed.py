"""A real `diffjax.train` run against the train step alone, for one config: alone, and with others sharing the device.

  python launch/run_speed.py --config=configs/seed.py --root=runs/run_speed --steps=1000 --sharing=2 \
      --config.data.source=local --config.data.text_glob=corpus_en --config.data.tokenizer=byte \
      --config.train.global_batch_size=64 --config.train.microbatches=1

First `launch/bench_train.py` times the compiled step on the run's own data (same config, same shardings, the first
batches of the same training stream: every `--config.KEY=VALUE` reaches both, as written); then one training runs alone, then `--sharing` trainings run at once on the same accelerator. From each run's
`metrics.jsonl` it takes the median tokens/s over steps [--from_step, --steps], its ratio to the step alone, the
trend (the median of the last `--trend_steps` steps against that of the first `--trend_steps` of the window) and
the median input wait. Where `nvidia-smi` exists, the GPU's clock, temperature and power are sampled every second
into gpu.csv, so a slowdown from the clocks shows apart from one in the software. Prints a table, writes
run_speed.json into --root.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffjax import cli
from diffjax.errors import ConfigError
from diffjax.train import metrics, preflight

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = config_flags.DEFINE_config_file('config', 'configs/seed.py', 'A config file; --config.KEY=VALUE sets any key '
                                         'for the bench and every run.', lock_config=True)
ROOT = flags.DEFINE_string('root', 'runs/run_speed', 'Folder of the runs, gpu.csv and run_speed.json.')
STEPS = flags.DEFINE_integer('steps', 1000, 'Steps of each training.')
FROM_STEP = flags.DEFINE_integer('from_step', 100, 'First step of the measured window.')
TREND_STEPS = flags.DEFINE_integer('trend_steps', 200, 'Steps at each end of the window that the trend compares.')
LOG_EVERY = flags.DEFINE_integer('log_every', 10, 'log.every_steps of the trainings.')
SHARING = flags.DEFINE_integer('sharing', 2, 'Trainings at once in the shared part (0: skip it).')
BENCH_STEPS = flags.DEFINE_integer('bench_steps', 50, 'Timed steps of the step alone.')


def config_arguments(argv: list[str]) -> list[str]:
  """The config file and its `--config.KEY=VALUE` overrides as given, for the bench's and the runs' command lines."""
  overrides = [arg for arg in argv if arg.startswith('--config.')]
  for arg in overrides:
    if '=' not in arg:
      raise ConfigError(f'{arg}: write config overrides as --config.KEY=VALUE, with "="')
  return [f'--config={config_flags.get_config_filename(flags.FLAGS["config"])}', *overrides]


def train_command(config_args: list[str], workdir: str) -> list[str]:
  # Evaluation and saves happen once, at the end: their time is left out of tokens/s anyway, but they would also
  # interrupt the other runs sharing the device. The config file comes before any override (the flag parser asks
  # for it), and the user's overrides come last, so they win.
  steps = STEPS.value
  config_file, *overrides = config_args
  return [sys.executable, '-m', 'diffjax.train', f'--workdir={workdir}', config_file, f'--config.train.steps={steps}',
          '--config.log.progress_bar=False', f'--config.log.every_steps={LOG_EVERY.value}',
          f'--config.log.eval_every_steps={steps}', f'--config.checkpoint.every_steps={steps}', *overrides]


def run_all(commands: list[tuple[str, list[str], str]], env: dict):
  """Starts every (name, command, workdir) at once and waits for all; each logs to its workdir's train.log."""
  running = []
  for name, command, workdir in commands:
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, 'train.log'), 'w')
    print(f'[{time.strftime("%H:%M:%S")}] {name}: {" ".join(command)}', flush=True)
    running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
  for name, process, log in running:
    process.wait()
    log.close()
    if process.returncode:
      raise SystemExit(f'error: {name} failed (exit code {process.returncode}); see its train.log')


def speed_of(workdir: str, from_step: int, to_step: int, trend_steps: int) -> dict:
  """Median tokens/s and input wait of the logged steps in [from_step, to_step], and their trend."""
  records = [r for r in metrics.read_records(workdir) if 'tokens_per_s' in r and from_step <= r['step'] <= to_step]
  if not records:
    raise SystemExit(f'error: {workdir} logged no throughput between steps {from_step} and {to_step}; lower '
                     '--from_step or raise --steps')
  speeds = np.array([r['tokens_per_s'] for r in records])
  steps = np.array([r['step'] for r in records])
  early, late = speeds[steps < from_step + trend_steps], speeds[steps > to_step - trend_steps]
  return {'median_tokens_per_s': float(np.median(speeds)), 'records': len(records),
          'trend': float(np.median(late) / np.median(early) - 1.0) if len(early) and len(late) else None,
          'median_data_wait_ms': float(np.median([r['data_wait_ms'] for r in records]))}


class GpuSampler:
  """nvidia-smi's SM clock, temperature and power, once a second, into a CSV file; nothing without nvidia-smi."""

  def __init__(self, path: str):
    self.path, self.process = path, None
    if shutil.which('nvidia-smi'):
      self.file = open(path, 'w')
      self.process = subprocess.Popen(
          ['nvidia-smi', '--query-gpu=timestamp,clocks.sm,temperature.gpu,power.draw', '--format=csv,noheader,nounits',
           '-l', '1'], stdout=self.file, stderr=subprocess.DEVNULL)

  def close(self) -> dict | None:
    """Minimum, median and maximum of each sampled quantity."""
    if self.process is None:
      return None
    self.process.terminate()
    self.process.wait()
    self.file.close()
    with open(self.path) as f:
      rows = [row for row in csv.reader(f) if len(row) == 4]
    columns = {'sm_clock_mhz': 1, 'temperature_c': 2, 'power_w': 3}
    summary = {}
    for key, index in columns.items():
      values = [float(row[index]) for row in rows if row[index].strip().replace('.', '', 1).isdigit()]
      if values:
        summary[key] = {'min': min(values), 'median': float(np.median(values)), 'max': max(values)}
    return summary


def main(argv):
  del argv
  root, steps, from_step, trend_steps = ROOT.value, STEPS.value, FROM_STEP.value, TREND_STEPS.value
  os.makedirs(root, exist_ok=True)
  config, config_args = CONFIG.value, config_arguments(sys.argv[1:])
  variant = config.model.variant
  env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
  sampler = GpuSampler(os.path.join(root, 'gpu.csv'))
  try:
    bench_json = os.path.join(root, 'bench_train.json')
    subprocess.run([sys.executable, os.path.join(REPO, 'launch', 'bench_train.py'), f'--variants={variant}',
                    '--data=config', f'--steps={BENCH_STEPS.value}', f'--out={bench_json}', *config_args],
                   check=True, env=env, cwd=REPO)
    with open(bench_json) as f:
      step_speed = json.load(f)[0]['tokens_per_s']
    groups = {'alone': [os.path.join(root, 'alone')]}
    if SHARING.value:
      groups[f'{SHARING.value} sharing'] = [os.path.join(root, f'shared_{i}') for i in range(SHARING.value)]
    for name, workdirs in groups.items():
      run_env = preflight.memory_env(len(workdirs), env)
      for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)  # a fresh run each time: a resumed one would train nothing
      run_all([(f'{name} #{i}', train_command(config_args, w), w) for i, w in enumerate(workdirs)], run_env)
  finally:
    gpu = sampler.close()
  rows = []
  for name, workdirs in groups.items():
    for i, workdir in enumerate(workdirs):
      speed = speed_of(workdir, from_step, steps, trend_steps)
      rows.append({'run': f'{name} #{i}' if len(workdirs) > 1 else name, 'workdir': workdir,
                   'of_step_speed': speed['median_tokens_per_s'] / step_speed, **speed})
  result = {'config': config_args[0].partition('=')[2], 'overrides': config_args[1:], 'variant': variant,
            'steps': steps, 'window': [from_step, steps], 'step_tokens_per_s': step_speed, 'runs': rows, 'gpu': gpu}
  with open(os.path.join(root, 'run_speed.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(f'{variant}, {" ".join(config_args)}')
  print(f'train step alone (bench_train): {step_speed:,.0f} tokens/s')
  print(f'{"run":<14} {"median tokens/s":>16} {"of step":>8} {"trend":>7} {"data wait ms":>13}  '
        f'(steps {from_step}-{steps})')
  for r in rows:
    trend = f'{100 * r["trend"]:+6.1f}%' if r['trend'] is not None else '    n/a'
    print(f'{r["run"]:<14} {r["median_tokens_per_s"]:>16,.0f} {100 * r["of_step_speed"]:>7.1f}% {trend:>7} '
          f'{r["median_data_wait_ms"]:>13.2f}')
  if gpu:
    print('GPU ' + ', '.join(f'{k} {v["min"]:.0f}-{v["max"]:.0f} (median {v["median"]:.0f})' for k, v in gpu.items()))


if __name__ == '__main__':
  app.run(cli.report_errors(main), flags_parser=cli.parse_flags)
