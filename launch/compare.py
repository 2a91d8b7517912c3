"""Trains several variants under one protocol and compares their training and validation losses.

  python launch/compare.py --config=configs/seed.py --variants=diff_v1,baseline --seeds=0,1 --root=runs/compare \
      --set data.source=local --set data.text_glob=corpus_en --set train.global_batch_size=64 --set train.steps=800

Every run is a plain `python -m diffjax.train` with `--config.model.variant` and `--config.seed` set and everything
else equal. Runs that share a seed share their data order (it depends only on the seed and the corpus) and their
initial weights outside attention (Flax derives each parameter's random key from its module path), so a gap between
variants comes from attention alone. `--parallel N` runs N trainings at once on one accelerator. Prints a table of
training loss (mean of the logged steps in each window) and final validation loss, and writes compare.json and
compare.png into --root. A run already finished in --root is reused, not trained again.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from diffjax import metrics


def run_name(variant: str, seed: int) -> str:
  return f'{variant}_seed{seed}'


def train_command(config: str, workdir: str, variant: str, seed: int, overrides: list[str]) -> list[str]:
  return [sys.executable, '-m', 'diffjax.train', f'--config={config}', f'--workdir={workdir}',
          f'--config.model.variant={variant}', f'--config.seed={seed}', '--config.log.progress_bar=False',
          *(f'--config.{item}' for item in overrides)]


def read_metrics(workdir: str) -> list[dict]:
  """One record per step, merging its training and validation records (a replayed step keeps its last values)."""
  records = {}
  for record in metrics.read_records(workdir):
    records.setdefault(record['step'], {}).update(record)
  return [records[step] for step in sorted(records)]


def summarise(records: list[dict], window: int) -> dict:
  """Mean training loss per `window` steps, the last validation loss and the median throughput."""
  train = [(r['step'], r['loss']) for r in records if 'loss' in r]
  evals = [(r['step'], r['eval_loss']) for r in records if 'eval_loss' in r]
  by_window = {}
  for step, loss in train:
    by_window.setdefault(-(-step // window) * window, []).append(loss)
  speeds = [r['tokens_per_s'] for r in records if 'tokens_per_s' in r]
  return {'train_loss': {str(w): float(np.mean(v)) for w, v in sorted(by_window.items())},
          'eval_loss': evals[-1][1] if evals else None, 'eval_step': evals[-1][0] if evals else None,
          'median_tokens_per_s': float(np.median(speeds)) if speeds else None, 'curve': train, 'evals': evals}


def train_all(args, jobs):
  """Runs the trainings, at most `args.parallel` at a time, each logging to its workdir's train.log."""
  env = dict(os.environ)
  if args.parallel > 1:  # JAX would otherwise give each process three quarters of the accelerator's memory
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', f'{0.9 / args.parallel:.2f}')
  waiting, running = list(jobs), []
  while waiting or running:
    while waiting and len(running) < args.parallel:
      name, workdir, command = waiting.pop(0)
      os.makedirs(workdir, exist_ok=True)
      log = open(os.path.join(workdir, 'train.log'), 'a')
      print(f'[{time.strftime("%H:%M:%S")}] training {name}', flush=True)
      running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    time.sleep(1.0)
    for item in list(running):
      name, process, log = item
      if process.poll() is not None:
        log.close()
        running.remove(item)
        print(f'[{time.strftime("%H:%M:%S")}] {name} finished with exit code {process.returncode}', flush=True)
        if process.returncode:
          raise SystemExit(f'error: {name} failed; see its train.log in {args.root}')


def plot(results: dict, path: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  colors = {}
  for name, result in results.items():
    variant = result['variant']
    color = colors.setdefault(variant, f'C{len(colors)}')
    steps, losses = zip(*result['curve']) if result['curve'] else ((), ())
    axes[0].plot(steps, losses, color=color, alpha=0.7, lw=1, label=name)
    if result['evals']:
      axes[1].plot(*zip(*result['evals']), 'o-', color=color, label=name)
  axes[0].set(xlabel='step', ylabel='training loss (nats/token)', title='training loss')
  axes[1].set(xlabel='step', ylabel='validation loss (nats/token)', title='validation loss')
  finite = [loss for r in results.values() for _, loss in r['curve']]
  if finite:
    axes[0].set_ylim(min(finite) - 0.05, np.percentile(finite, 90))
  for axis in axes:
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def table(results: dict, variants: list[str], seeds: list[int]) -> str:
  windows = sorted({int(w) for r in results.values() for w in r['train_loss']})
  shown = windows[:: max(1, len(windows) // 8)] + ([windows[-1]] if windows and windows[-1] not in windows[::max(
      1, len(windows) // 8)] else [])
  header = f'{"run":<22}' + ''.join(f'{"train@" + str(w):>12}' for w in shown) + f'{"val loss":>10}{"tokens/s":>11}'
  lines = [header]
  for name, r in results.items():
    speed = f'{r["median_tokens_per_s"]:>11,.0f}' if r['median_tokens_per_s'] else f'{"":>11}'
    lines.append(f'{name:<22}' + ''.join(f'{r["train_loss"].get(str(w), float("nan")):>12.4f}' for w in shown)
                 + f'{r["eval_loss"] if r["eval_loss"] is not None else float("nan"):>10.4f}' + speed)
  lines.append('')
  means = {}
  for variant in variants:
    losses = [results[run_name(variant, s)]['eval_loss'] for s in seeds]
    if all(loss is not None for loss in losses):
      means[variant] = float(np.mean(losses))
      lines.append(f'{variant:<12} validation loss, mean over seeds {seeds}: {means[variant]:.4f}  '
                   f'(per seed: {", ".join(f"{loss:.4f}" for loss in losses)})')
  if 'baseline' in means:
    for variant in means:
      if variant != 'baseline':
        per_seed = [results[run_name('baseline', s)]['eval_loss'] - results[run_name(variant, s)]['eval_loss']
                    for s in seeds]
        lines.append(f'{variant} below baseline by {means["baseline"] - means[variant]:+.4f} on average '
                     f'(per seed: {", ".join(f"{d:+.4f}" for d in per_seed)})')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/seed.py')
  parser.add_argument('--variants', default='diff_v1,baseline')
  parser.add_argument('--seeds', default='0,1')
  parser.add_argument('--root', default='runs/compare', help='one workdir per run is made under it')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='a config override for every run, e.g. train.steps=800 (repeatable)')
  parser.add_argument('--parallel', type=int, default=1, help='trainings at once on one accelerator')
  parser.add_argument('--window', type=int, default=100, help='steps per training-loss window in the table')
  args = parser.parse_args()
  variants = args.variants.split(',')
  seeds = [int(s) for s in args.seeds.split(',')]
  bad = [v for v in variants if v not in ('diff_v1', 'diff_v2', 'baseline')]
  if bad or args.parallel < 1:
    raise SystemExit(f'error: --variants takes diff_v1, diff_v2, baseline (got {bad}) and --parallel >= 1')
  jobs = []
  for seed in seeds:
    for variant in variants:
      name = run_name(variant, seed)
      workdir = os.path.join(args.root, name)
      records = read_metrics(workdir)
      if not (records and any('eval_loss' in r for r in records) and os.path.exists(os.path.join(workdir, 'done'))):
        jobs.append((name, workdir, train_command(args.config, workdir, variant, seed, args.set)))
  if jobs:  # the data are prepared once, here, rather than by the first of several runs while the others wait
    subprocess.run([sys.executable, '-m', 'diffjax.prepare', f'--config={args.config}',
                    *(f'--config.{item}' for item in args.set)], check=True)
    train_all(args, jobs)
  for _, workdir, _ in jobs:
    open(os.path.join(workdir, 'done'), 'w').close()
  results = {}
  for seed in seeds:
    for variant in variants:
      name = run_name(variant, seed)
      results[name] = {'variant': variant, 'seed': seed,
                       **summarise(read_metrics(os.path.join(args.root, name)), args.window)}
  text = table(results, variants, seeds)
  print(text)
  with open(os.path.join(args.root, 'compare.json'), 'w') as f:
    json.dump({'config': args.config, 'overrides': args.set, 'variants': variants, 'seeds': seeds,
               'runs': {k: {key: v for key, v in r.items() if key not in ('curve', 'evals')} for k, r in
                        results.items()}, 'table': text}, f, indent=1)
  plot(results, os.path.join(args.root, 'compare.png'))
  print(f'wrote {os.path.join(args.root, "compare.json")} and compare.png')


if __name__ == '__main__':
  main()
