"""Settles DIFF against its baseline: paired training runs over several seeds, and the gap with its confidence.

  python launch/compare.py --config=configs/seed.py --root=runs/compare --seeds=0,1,2 \\
      --arms=baseline,diff_v1,diff_v1_nonorm=diff_v1:model.diff_head_norm=False \\
      --config.data.source=local --config.data.text_glob=corpus_en --config.train.steps=800

An arm is a variant plus config overrides, `NAME=VARIANT:KEY=VALUE:KEY=VALUE` (a bare `VARIANT` names itself).
Every run is a plain `python -m diffjax.train` in its own workdir ROOT/ARM_seedS, and the runs of one seed are
paired: they read the same batches (the data order depends only on the data config, the sequence length, the batch
size and the seed, which no arm may change) and start from the same weights wherever they share a parameter (the
same path and shape, drawn from the same initialiser): each arm's fresh initialisation for the seed, with every
shared parameter overwritten by the reference arm's, is saved under ROOT/init/ and given to the run as
`checkpoint.init_from`. An arm that initialises a shared parameter otherwise (model.embed_init_std, ...) keeps its
own draw of it, and says so.

For each arm it reports the gap of its final validation loss to the reference arm's (arm minus reference, so
positive is worse), per seed and as a mean with a 95% confidence interval from a paired t over the seeds, and for an
ablation (an arm with overrides) also its gap to the arm of its plain variant (`diff_v1_nonorm` against `diff_v1`,
where both are arms), as a table, ROOT/compare.json and ROOT/compare.png (loss curves, a band over the seeds of each
arm). Its tokens/s is the median over the runs of the arm that had the accelerator to themselves (`--parallel=1`);
runs trained side by side are left out of it.

With `--analyses=outliers,needles` the paper's other claims are measured on each seed's trained models once all of
its runs have finished, while their checkpoints are at hand: `python -m diffjax.outliers` (activation outliers,
low-bit quantization) and `python -m diffjax.needles` (multi-needle retrieval and attention to the answer, on the
config's local text files, at 512 tokens and at the longest context the model takes) over every arm's run of the
seed, into ROOT/analyses/seedS/NAME/. A seed already analysed is not measured again.

Rerunning the same command skips finished runs (those whose final validation is in their metrics.jsonl) and
resumes unfinished ones from their checkpoints, so a comparison can finish over several invocations (`--max_runs`
bounds one; `--report_only` trains nothing and reports the runs finished so far); arms and seeds may be added later.
A command that would train a run of ROOT with another config, or against another reference arm, is refused.
SIGTERM or Ctrl-C stops the runs at a saved step.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from etils import epath
from ml_collections import config_flags
from scipy import stats

from diffjax.data import pipeline as data_lib
from diffjax.errors import ConfigError
from diffjax.model.config import VARIANTS
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import metrics, preflight
from diffjax.train import step as train_step

# What an arm may not change: every arm of a seed must read the same batches and start from its seed's weights.
SHARED_BY_ARMS = ('seed', 'data.', 'train.seq_len', 'train.global_batch_size', 'model.variant',
                  'checkpoint.init_from')
# Keys that say how or where a run is computed, logged and saved, not what it trains: they may change between
# invocations without making a finished run incomparable with the others.
NOT_PROTOCOL = tuple(name for name in defaults.KEYS if name.startswith(('model.', 'data.'))
                     and name not in defaults.IDENTITY) + ('log.', 'checkpoint.', 'mesh.', 'train.microbatches',
                                                           'train.loss_chunk_tokens')
PLAN = 'compare_plan.json'


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
  """`key` is one of `patterns`, or lies under one that ends with a dot."""
  return any(key == p or (p.endswith('.') and key.startswith(p)) for p in patterns)


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  variant: str
  overrides: tuple[str, ...]  # KEY=VALUE


def parse_arm(spec: str) -> Arm:
  """`NAME=VARIANT:KEY=VALUE:...` or a bare `VARIANT`, checked; raises ConfigError naming the problem."""
  head, *overrides = spec.split(':')
  name, variant = head.split('=', 1) if '=' in head else (head, head)
  if not re.fullmatch(r'[\w.-]+', name):
    raise ConfigError(f'--arms: arm name {name!r} must be letters, digits, _, - or . (it names the runs\' folders)')
  if variant not in VARIANTS:
    raise ConfigError(f'--arms: {spec}: unknown variant {variant!r}; use one of {", ".join(VARIANTS)}')
  for item in overrides:
    key = item.split('=', 1)[0]
    if '=' not in item:
      raise ConfigError(f'--arms: {spec}: {item!r} is not KEY=VALUE')
    if _matches(key, SHARED_BY_ARMS):
      raise ConfigError(f'--arms: {spec}: an arm may not set {key}: every arm of a seed reads the same batches and '
                        'starts from the same weights (set data keys with --config.KEY=VALUE, the variant before the '
                        'colon)')
  return Arm(name, variant, tuple(overrides))


def load_config(config_file: str, overrides: list[str]):
  """The config `python -m diffjax.train --config=CONFIG_FILE --config.KEY=VALUE...` trains with."""
  for item in overrides:
    if item.split('=', 1)[0] not in defaults.KEYS:
      raise ConfigError(f'{item}: unknown config key; see the config keys in README.md')
  argv = ['compare', f'--config={config_file}', *(f'--config.{item}' for item in overrides)]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'the config file', flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)
    return values.config
  except Exception as error:  # a value of the wrong type, or a config file that does not load
    raise ConfigError(str(error).strip().splitlines()[0]) from None


@dataclasses.dataclass
class Run:
  arm: Arm
  seed: int
  workdir: str
  init_dir: str
  flags: list[str]  # the KEY=VALUE overrides of its training command
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return f'{self.arm.name} seed {self.seed}'

  @property
  def stem(self) -> str:
    return os.path.basename(self.workdir)

  def finished(self) -> bool:
    """Its final validation is logged: that is the run's result, so a finished run's checkpoints may be deleted to
    free the disk (or left behind on another machine) and it still counts, untrained again."""
    return any(record.get('step') == self.config.train.steps and 'eval_loss' in record
               for record in metrics.read_records(self.workdir))

  def command(self, config_file: str) -> list[str]:
    return [sys.executable, '-m', 'diffjax.train', f'--config={config_file}', f'--workdir={self.workdir}',
            *(f'--config.{item}' for item in self.flags)]


def plan_runs(args, arms: list[Arm], seeds: list[int]) -> list[Run]:
  """Every run of the comparison, seed by seed (so paired results arrive early), with its config."""
  runs = []
  for seed in seeds:
    for arm in arms:
      stem = f'{arm.name}_seed{seed}'
      init_dir = os.path.join(os.path.abspath(args.root), 'init', stem)
      items = [*args.overrides, f'model.variant={arm.variant}', *arm.overrides, f'seed={seed}',
               f'checkpoint.init_from={init_dir}', 'log.progress_bar=False']
      try:
        config = load_config(args.config, items)
        defaults.model_config(config, data_lib.tokenizer_vocab_size(config.data))  # a bad model key fails here
      except ConfigError as error:
        raise ConfigError(f'arm {arm.name}: {error}') from None
      runs.append(Run(arm, seed, os.path.join(args.root, stem), init_dir, items, config))
  return runs


def protocol(run: Run) -> dict:
  """What a run trains: its config without the keys that only say how it is computed, logged or saved."""
  flat = json.loads(json.dumps(defaults.flatten(run.config.to_dict())))
  return {key: value for key, value in flat.items() if not _matches(key, NOT_PROTOCOL)}


def check_plan(root: str, reference: Arm, runs: list[Run]):
  """Records the runs' protocols in ROOT; refuses, in one line, a command that would mix in incomparable runs.

  Once a run in ROOT has trained a step, every run must keep its protocol and the reference arm must stay; new arms
  and seeds may join. Before that, a new command replaces the plan (and the initial weights drawn for the old one).
  """
  path = os.path.join(root, PLAN)
  plan = {'reference': reference.name, 'runs': {}}
  if os.path.exists(path):
    with open(path) as f:
      plan = json.load(f)
  now = {run.stem: protocol(run) for run in runs}
  started = sorted(stem for stem in plan['runs'] if os.path.exists(os.path.join(root, stem, 'metrics.jsonl')))
  if not started:
    if plan['runs'] and (plan['reference'] != reference.name or any(
        plan['runs'].get(stem, value) != value for stem, value in now.items())):
      shutil.rmtree(os.path.join(root, 'init'), ignore_errors=True)
    plan = {'reference': reference.name, 'runs': {}}
  if plan['reference'] != reference.name:
    raise ConfigError(f'--reference: {root} holds a comparison against {plan["reference"]}, whose weights its '
                      f'arms started from; keep --reference={plan["reference"]} or use another --root')
  for stem, value in now.items():
    before = plan['runs'].setdefault(stem, value)
    changed = [key for key in sorted(set(before) | set(value)) if before.get(key) != value.get(key)]
    if changed:
      key = changed[0]
      raise ConfigError(f'--root: {root} holds {stem} with {key}={before.get(key)!r}, and this command asks for '
                        f'{value.get(key)!r}; runs of both would not compare. Rerun the original command, or use '
                        'another --root')
  os.makedirs(root, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(plan, f, indent=1)
  os.replace(path + '.tmp', path)


# -- paired initial weights ----------------------------------------------------------------------------------------


def drawn_alike(ours: np.ndarray, theirs: np.ndarray) -> bool:
  """Whether two draws of one parameter come from the same initialiser: equal constants (norm scales), or spreads
  within 5 standard errors of each other. An arm that initialises a parameter otherwise (model.embed_init_std,
  model.scale_residual_init, ...) changes its spread by far more, and must keep its own draw."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  spread_ours, spread_theirs = ours.std(), theirs.std()
  if min(spread_ours, spread_theirs) == 0:
    return bool(np.array_equal(ours, theirs))
  return abs(math.log(spread_ours / spread_theirs)) < 5 / math.sqrt(ours.size)


def shared_with(params: dict, reference: dict) -> tuple[dict, list[str]]:
  """`params` with every leaf that `reference` has at the same path and shape, drawn alike, replaced by the
  reference's; and the paths of those shared leaves that the arm draws otherwise and so keeps."""
  by_path = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(reference)[0]}
  kept = []

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    theirs = by_path.get(key)
    if theirs is None or theirs.shape != leaf.shape:
      return leaf
    if not drawn_alike(leaf, theirs):
      kept.append(key)
      return leaf
    return theirs
  return jax.tree_util.tree_map_with_path(pick, params), kept


def save_params(params: dict, directory: str):
  """A parameters-only checkpoint that `checkpoint.init_from` reads: DIRECTORY/state and its checksums, written
  beside it and renamed into place, so DIRECTORY exists only when complete."""
  partial = directory + '.partial'
  shutil.rmtree(partial, ignore_errors=True)  # left by an invocation killed while writing it
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(partial, 'state'), {'params': params})
  sums = epath.Path(partial) / 'checksums'
  sums.mkdir()
  ocp.JsonCheckpointHandler().save(sums, args=ocp.args.JsonSave(checkpoint_lib.checksums({'params': params})))
  os.replace(partial, directory)


def write_initial_weights(runs: list[Run], needed: list[Run], reference: Arm):
  """ROOT/init/ARM_seedS for each needed run that has none: the arm's fresh init (the trainer's own draw for its
  seed), with the parameters it shares with the reference arm taken from the reference's."""
  draw = jax.jit(train_step.new_params, static_argnums=0)  # compiled once per arm, drawn for every seed
  fresh = lambda run: draw(defaults.model_config(run.config, data_lib.tokenizer_vocab_size(run.config.data)),
                           jax.random.key(run.seed))
  for seed in sorted({run.seed for run in needed}):
    missing = [run for run in needed if run.seed == seed and not os.path.isdir(run.init_dir)]
    if not missing:
      continue
    print(f'initial weights for seed {seed}: {", ".join(run.arm.name for run in missing)}', flush=True)
    reference_params = fresh(next(run for run in runs if run.seed == seed and run.arm == reference))
    for run in missing:
      params, kept = (reference_params, []) if run.arm == reference else shared_with(fresh(run), reference_params)
      if kept:
        print(f'  {run.arm.name} initialises {len(kept)} shared parameter(s) otherwise, and keeps its own draw: '
              f'{", ".join(kept[:4])}{" ..." if len(kept) > 4 else ""}', flush=True)
      save_params(params, run.init_dir)


# -- training ------------------------------------------------------------------------------------------------------


class StopRequest:
  """SIGTERM to this process stops the runs at a saved step (their own SIGTERM handling), then this command."""

  def __init__(self):
    self.requested, self.processes = False, []
    signal.signal(signal.SIGTERM, self._stop)

  def _stop(self, signum, frame):
    del signum, frame
    self.requested = True
    for process in self.processes:
      if process.poll() is None:
        process.terminate()


def progress_line(index: str, run: Run, started: float) -> str:
  """`[i/n] ARM seed S: step s/N, loss, latest validation, ETA` from the run's metrics so far."""
  records = metrics.read_records(run.workdir)
  train = [r for r in records if 'loss' in r]
  evals = [r for r in records if 'eval_loss' in r]
  if not train:
    return f'{index} {run.name}: starting, compiling ({time.time() - started:.0f} s)'
  step, total = train[-1]['step'], run.config.train.steps
  speed = train[-1].get('tokens_per_s', 0) / (run.config.train.global_batch_size * run.config.train.seq_len)
  eta = f', about {(total - step) / speed / 60:.1f} min left' if speed > 0 and step < total else ''
  val = f', validation {evals[-1]["eval_loss"]:.4f} at step {evals[-1]["step"]}' if evals else ''
  # The newest start's figure: a run resumed with more train.steps reads its split more often.
  passes = next((r['train_passes'] for r in reversed(records) if 'train_passes' in r), 0)
  repeats = (f'; {passes:.1f} passes over its training split, past the {data_lib.USEFUL_PASSES} where repeated text '
             'trains about as well as new (see its log)') if passes > data_lib.USEFUL_PASSES else ''
  return (f'{index} {run.name}: step {step}/{total} ({100 * step / total:.0f}%), loss {train[-1]["loss"]:.4f}{val}'
          f'{eta}{repeats}')


def last_error(log_path: str) -> str:
  with open(log_path, errors='replace') as f:
    lines = [line.strip() for line in f if line.strip()]
  errors = [line for line in lines if line.startswith('error:')]
  return (errors or lines or ['(empty log)'])[-1]


SHARING_FILE = 'compare_sharing.json'


def trained_alongside(run: Run) -> int:
  """The most trainings that shared the accelerator with any part of this run (1: it trained alone)."""
  try:
    with open(os.path.join(run.workdir, SHARING_FILE)) as f:
      return int(json.load(f)['parallel'])
  except (OSError, ValueError, KeyError):
    return 1


def note_sharing(run: Run, parallel: int):
  """Keeps in the run's folder how many trainings shared the accelerator with it, so that the report quotes
  throughput only of runs that had it to themselves."""
  most = max(parallel, trained_alongside(run))
  with open(os.path.join(run.workdir, SHARING_FILE), 'w') as f:
    json.dump({'parallel': most}, f)


def train(args, todo: list[tuple[str, Run]], stop: StopRequest):
  """Trains the runs, at most `args.parallel` at a time, printing each one's progress every `args.progress_every`
  seconds; each run logs to its workdir's train.log. Raises ConfigError when a run fails or stops early."""
  env = preflight.memory_env(args.parallel)
  waiting, running, last_report = list(todo), [], time.time()
  try:
    while (waiting and not stop.requested) or running:
      while waiting and len(running) < args.parallel and not stop.requested:
        index, run = waiting.pop(0)
        os.makedirs(run.workdir, exist_ok=True)
        note_sharing(run, args.parallel)
        log_path = os.path.join(run.workdir, 'train.log')
        resumed = 'resuming' if checkpoint_lib.completed_steps(os.path.join(run.workdir, 'checkpoints')) else 'training'
        print(f'{index} {run.name}: {resumed} in {run.workdir} (log: {log_path})', flush=True)
        with open(log_path, 'a') as log:
          process = subprocess.Popen(run.command(args.config), stdout=log, stderr=subprocess.STDOUT, env=env)
        stop.processes.append(process)
        running.append((index, run, process, time.time()))
      time.sleep(0.5)
      for item in list(running):
        index, run, process, started = item
        if process.poll() is None:
          continue
        running.remove(item)
        log_path = os.path.join(run.workdir, 'train.log')
        if process.returncode:
          raise ConfigError(f'{run.name} failed (exit code {process.returncode}: {last_error(log_path)}); see '
                            f'{log_path}, fix the cause and rerun the same command to continue')
        finished = run.finished()  # reads the run's metrics.jsonl
        if not finished and not stop.requested:
          raise ConfigError(f'{run.name} stopped before its last step; see {log_path}, and rerun the same command '
                            'to continue it')
        if finished:
          print(f'{index} {run.name}: finished in {(time.time() - started) / 60:.1f} min, validation loss '
                f'{summarise(run)["final_eval_loss"]:.4f}', flush=True)
      if running and time.time() - last_report >= args.progress_every:
        last_report = time.time()
        for index, run, _, started in running:
          print(progress_line(index, run, started), flush=True)
  finally:  # a failure or Ctrl-C: the other runs save their step and stop, to be resumed by the next invocation
    for _, _, process, _ in running:
      if process.poll() is None:
        process.terminate()
    for _, _, process, _ in running:
      process.wait()


# -- the paper's other claims on the trained runs ----------------------------------------------------------------


# The short needle context beside the longest: small models that retrieve nothing at the longest (the seed shape's
# byte models at 2032) may still separate at this length.
SHORT_NEEDLE_CONTEXT = 512


def _outliers_flags(config) -> list[str]:
  del config  # the runs' own validation windows
  return ['--windows=64']


def _needles_flags(config) -> list[str]:
  if config.data.source != 'local':
    raise ConfigError('needles builds its contexts from local text files (data.source=local, data.text_glob)')
  # The longest prompt the model takes with room for the answer's tokens after it, and the short one.
  longest = config.model.max_len - 16
  contexts = sorted({min(SHORT_NEEDLE_CONTEXT, longest), longest})
  return [f'--text_glob={config.data.text_glob}', f'--context={",".join(map(str, contexts))}', '--needles=4',
          '--queries=1', '--trials=8']



ANALYSES = {'outliers': _outliers_flags, 'needles': _needles_flags}


def analyse(args, seeds: list[int], runs: list[Run]):
  """Each requested analysis of each seed whose runs all finished and kept their checkpoints (see the module
  docstring); a seed whose runs cannot be analysed here says why and is left for later."""
  for seed in seeds:
    group = [run for run in runs if run.seed == seed]
    for name in args.analyses:
      out = os.path.join(args.root, 'analyses', f'seed{seed}', name)
      if os.path.exists(os.path.join(out, f'{name}.json')):
        continue
      absent = [run.name for run in group if not run.finished()
                or not checkpoint_lib.completed_steps(os.path.join(run.workdir, 'checkpoints'))]
      if absent:
        print(f'{name} of seed {seed} waits: {", ".join(absent)} not finished, or its checkpoints are gone', flush=True)
        continue
      command = [sys.executable, '-m', f'diffjax.{name}', *(f'--workdir={run.workdir}' for run in group),
                 f'--out={out}', *ANALYSES[name](group[0].config)]
      print(f'{name} of seed {seed}: {" ".join(command[1:])}', flush=True)
      if subprocess.run(command).returncode:
        raise ConfigError(f'{name} of seed {seed} failed (its error is above); rerun the same command to try again')


# -- the report ------------------------------------------------------------------------------------------------


def summarise(run: Run) -> dict:
  """Final validation loss, the loss curves (the last record of a step replayed after a resume wins), the median
  throughput of a finished run and how many trainings shared the accelerator with it."""
  records = {}
  for record in metrics.read_records(run.workdir):
    records.setdefault(record['step'], {}).update(record)
  steps = sorted(records)
  curve = [(s, records[s]['loss']) for s in steps if 'loss' in records[s]]
  evals = [(s, records[s]['eval_loss']) for s in steps if 'eval_loss' in records[s]]
  speeds = [records[s]['tokens_per_s'] for s in steps if 'tokens_per_s' in records[s]]
  return {'final_eval_loss': evals[-1][1], 'final_step': evals[-1][0], 'evals': evals, 'curve': curve,
          'median_tokens_per_s': float(np.median(speeds)) if speeds else None,
          'trained_alongside': trained_alongside(run)}


def paired_gap(arm_losses: dict[int, float], reference_losses: dict[int, float]) -> dict | None:
  """Arm minus reference final loss over the seeds both finished: per seed, the mean and its 95% confidence
  interval from the t distribution with n - 1 degrees of freedom (None below two seeds)."""
  seeds = sorted(set(arm_losses) & set(reference_losses))
  if not seeds:
    return None
  gaps = np.array([arm_losses[s] - reference_losses[s] for s in seeds], np.float64)
  mean = float(gaps.mean())
  ci95 = None
  if len(gaps) > 1:
    half_width = stats.t.ppf(0.975, len(gaps) - 1) * gaps.std(ddof=1) / math.sqrt(len(gaps))
    ci95 = [mean - half_width, mean + half_width]
  return {'seeds': seeds, 'per_seed': gaps.tolist(), 'mean': mean, 'ci95': ci95}


def verdict(arm: str, reference: str, gap: dict) -> str:
  """One sentence: which way the arm differs from the reference, by how much, and how sure that is."""
  n, mean = len(gap['seeds']), gap['mean']
  text = (f'{arm} is level with {reference} in final validation loss' if mean == 0 else
          f'{arm} is {"worse" if mean > 0 else "better"} than {reference} by {abs(mean):.4f} nats/token in final '
          'validation loss')
  if gap['ci95'] is None:
    return f'{text} (one seed: no confidence interval)'
  low, high = gap['ci95']
  settled = 'excludes 0' if low > 0 or high < 0 else 'includes 0: not settled'
  return (f'{text}, mean of {n} seeds (95% CI of {arm} - {reference}: {low:+.4f} to {high:+.4f}, {settled}; per '
          f'seed: {", ".join(f"{g:+.4f}" for g in gap["per_seed"])})')


def plain_arm(arm: Arm, arms: list[Arm], reference: Arm) -> Arm | None:
  """The arm that trains `arm`'s variant with no overrides, when `arm` is an ablation of it and neither is the
  reference: an ablation is read against the model it changes as well as against the reference."""
  if not arm.overrides or arm == reference:
    return None
  return next((other for other in arms if other.variant == arm.variant and not other.overrides
               and other != reference), None)


def report(arms: list[Arm], reference: Arm, results: dict[tuple[str, int], dict]) -> dict:
  """Per arm: its finished seeds' final losses and the paired gap against the reference arm, and, for an ablation,
  against the arm of its plain variant (`plain_arm`)."""
  final = {arm.name: {seed: r['final_eval_loss'] for (name, seed), r in results.items() if name == arm.name}
           for arm in arms}
  out = {}
  for arm in arms:
    plain = plain_arm(arm, arms, reference)
    losses = final[arm.name]
    # Throughput of runs that shared the accelerator says nothing about the arm, so only runs alone count.
    speeds = [r['median_tokens_per_s'] for (name, _), r in results.items() if name == arm.name
              and r['median_tokens_per_s'] and r['trained_alongside'] == 1]
    out[arm.name] = {'variant': arm.variant, 'overrides': list(arm.overrides),
                     'final_eval_loss': {str(s): loss for s, loss in sorted(losses.items())},
                     'mean_final_eval_loss': float(np.mean(list(losses.values()))) if losses else None,
                     'median_tokens_per_s': float(np.median(speeds)) if speeds else None,
                     'gap': None if arm == reference else paired_gap(losses, final[reference.name]),
                     'plain_arm': plain and plain.name,
                     'gap_to_plain_arm': plain and paired_gap(losses, final[plain.name])}
  return out


def table(arms: list[Arm], reference: Arm, summary: dict) -> str:
  lines = [f'{"arm":<20}{"variant":<10}{"seeds":>6}{"final val":>10}{"gap":>10}{"95% CI of the gap":>22}  '
           f'{"tokens/s":>11}  per seed (arm - {reference.name})']
  for arm in arms:
    s = summary[arm.name]
    mean = f'{s["mean_final_eval_loss"]:>10.4f}' if s['mean_final_eval_loss'] is not None else f'{"-":>10}'
    speed = f'{s["median_tokens_per_s"]:>11,.0f}' if s['median_tokens_per_s'] else f'{"-":>11}'
    gap, ci, per_seed = s['gap'], '', ''
    if arm == reference:
      gap_text = f'{"reference":>10}'
    elif gap is None:
      gap_text = f'{"-":>10}'
    else:
      gap_text = f'{gap["mean"]:>+10.4f}'
      ci = f'{gap["ci95"][0]:+.4f} .. {gap["ci95"][1]:+.4f}' if gap['ci95'] else 'one seed'
      per_seed = ' '.join(f'{g:+.4f}' for g in gap['per_seed'])
    lines.append(f'{arm.name:<20}{arm.variant:<10}{len(s["final_eval_loss"]):>6}{mean}{gap_text}{ci:>22}  {speed}  '
                 f'{per_seed}')
  lines.append('')
  lines += [verdict(arm.name, reference.name, summary[arm.name]['gap']) for arm in arms
            if arm != reference and summary[arm.name]['gap'] is not None]
  lines += [verdict(arm.name, summary[arm.name]['plain_arm'], summary[arm.name]['gap_to_plain_arm']) for arm in arms
            if summary[arm.name]['gap_to_plain_arm']]
  return '\n'.join(lines)


def band(curves: list[list[tuple[int, float]]]):
  """(steps, mean, lowest, highest) over the seeds' curves, at the steps every seed logged."""
  common = sorted(set.intersection(*(set(dict(c)) for c in curves)))
  values = np.array([[dict(c)[s] for s in common] for c in curves])
  return common, values.mean(0), values.min(0), values.max(0)


def plot(arms: list[Arm], results: dict[tuple[str, int], dict], path: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  lows = []
  for i, arm in enumerate(arms):
    runs = [r for (name, _), r in sorted(results.items()) if name == arm.name]
    if not runs:
      continue
    for axis, key, marker in ((axes[0], 'curve', None), (axes[1], 'evals', 'o')):
      steps, mean, low, high = band([r[key] for r in runs])
      axis.plot(steps, mean, marker=marker, color=f'C{i}', lw=1.2, label=f'{arm.name} ({len(runs)} seeds)')
      axis.fill_between(steps, low, high, color=f'C{i}', alpha=0.25, lw=0)
      if key == 'curve':
        lows += list(low)
  axes[0].set(xlabel='step', ylabel='training loss (nats/token)', title='training loss: mean, band over seeds')
  axes[1].set(xlabel='step', ylabel='validation loss (nats/token)', title='validation loss: mean, band over seeds')
  if lows:  # the first steps' losses would flatten everything after them
    axes[0].set_ylim(min(lows) - 0.05, np.percentile(lows, 90))
  for axis in axes:
    axis.grid(alpha=0.3)
    if axis.lines:  # no run has finished yet: an empty plot, without a legend to warn about
      axis.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# -- the command ---------------------------------------------------------------------------------------------------


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                   allow_abbrev=False, epilog='--config.KEY=VALUE sets a config key for every arm, as '
                                   'in every other command, e.g. --config.train.steps=800 (repeatable).')
  parser.add_argument('--config', default='configs/seed.py',
                      help='the config file every run starts from (default: %(default)s)')
  parser.add_argument('--arms', default='baseline,diff_v1',
                      help='comma-separated arms, each VARIANT or NAME=VARIANT:KEY=VALUE:KEY=VALUE..., e.g. '
                           'diff_v1_nonorm=diff_v1:model.diff_head_norm=False; an arm may not change the data, the '
                           'seed, train.seq_len or train.global_batch_size (default: %(default)s)')
  parser.add_argument('--reference', default='', help='the arm the others are measured against (default: the first '
                      'of --arms)')
  parser.add_argument('--seeds', default='0,1,2',
                      help='comma-separated seeds; each seed pairs one run of every arm (default: %(default)s)')
  parser.add_argument('--root', default='runs/compare', help='where the runs, their initial weights and the report '
                      'go; the same command there again resumes the comparison (default: %(default)s)')
  parser.add_argument('--parallel', type=int, default=1,
                      help='trainings at once on one accelerator, each with an equal share of its memory and XLA\'s '
                           'stream-ordered allocator (diffjax.train.preflight.memory_env) (default: %(default)s)')
  parser.add_argument('--max_runs', type=int, default=0,
                      help='start at most this many runs in this invocation, 0 for all; the same command again '
                           'continues (default: %(default)s)')
  parser.add_argument('--report_only', action='store_true',
                      help='train and analyse nothing: report the runs of ROOT that have finished')
  parser.add_argument('--analyses', default='',
                      help=f'comma-separated analyses of each seed\'s trained runs, of {", ".join(ANALYSES)} '
                           '(default: none)')
  parser.add_argument('--progress_every', type=float, default=60.0,
                      help='seconds between progress lines of the runs in training (default: %(default)s)')
  args, rest = parser.parse_known_args(argv)
  for item in rest:
    if not item.startswith('--config.') or '=' not in item:
      parser.error(f'unrecognized argument {item}; config overrides are written --config.KEY=VALUE')
  args.overrides = [item[len('--config.'):] for item in rest]
  return args


def configure(args) -> tuple[list[Arm], Arm, list[int], list[Run]]:
  """The arms, the reference arm, the seeds and every run, checked; raises ConfigError in one line."""
  arms = [parse_arm(spec) for spec in args.arms.split(',') if spec]
  names = [arm.name for arm in arms]
  if not arms or len(set(names)) < len(names):
    raise ConfigError(f'--arms: give distinct arm names, got {", ".join(names) or "none"}')
  reference = next((arm for arm in arms if arm.name == (args.reference or names[0])), None)
  if reference is None:
    raise ConfigError(f'--reference: {args.reference} is not one of the arms ({", ".join(names)})')
  try:
    seeds = [int(s) for s in args.seeds.split(',')]
  except ValueError:
    raise ConfigError(f'--seeds: give comma-separated integers, got {args.seeds!r}') from None
  if len(set(seeds)) < len(seeds):
    raise ConfigError(f'--seeds: {args.seeds} repeats a seed')
  args.analyses = [name for name in args.analyses.split(',') if name]
  unknown = [name for name in args.analyses if name not in ANALYSES]
  if unknown:
    raise ConfigError(f'--analyses: {", ".join(unknown)} is not one of {", ".join(ANALYSES)}')
  if args.parallel < 1 or args.max_runs < 0:
    raise ConfigError('--parallel must be at least 1 and --max_runs 0 or more')
  if not os.path.isfile(args.config):
    raise ConfigError(f'--config: {args.config} is not a file; give one such as configs/seed.py')
  for item in args.overrides:
    if _matches(item.split('=', 1)[0], ('seed', 'model.variant', 'checkpoint.init_from')):
      raise ConfigError(f'--config.{item}: set by each arm and --seeds, not for all runs')
  load_config(args.config, args.overrides)  # so that a mistake here is not blamed on the first arm
  runs = plan_runs(args, arms, seeds)
  for name in args.analyses:
    ANALYSES[name](runs[0].config)  # an analysis this data cannot have fails now, not after the training
  return arms, reference, seeds, runs


def main(argv=None):
  args = parse_args(argv)
  try:
    arms, reference, seeds, runs = configure(args)
    check_plan(args.root, reference, runs)
  except ConfigError as error:
    raise SystemExit(f'error: {error}') from None
  jax.config.update('jax_platforms', 'cpu')  # the initial weights are drawn here; the accelerator is the runs'
  numbered = [(f'[{i + 1}/{len(runs)}]', run) for i, run in enumerate(runs)]
  todo = [(index, run) for index, run in numbered if not run.finished()]
  print(f'{len(arms)} arms x {len(seeds)} seeds = {len(runs)} runs in {args.root} against {reference.name}: '
        f'{len(runs) - len(todo)} finished, {len(todo)} to train'
        + (f', at most {args.max_runs} now' if args.max_runs and args.max_runs < len(todo) else ''), flush=True)
  todo = [] if args.report_only else todo[:args.max_runs or None]
  stop = StopRequest()
  try:
    if todo:
      write_initial_weights(runs, [run for _, run in todo], reference)
      # The data are prepared once, here, rather than by the first of several runs while the others wait.
      prepared = subprocess.run([sys.executable, '-m', 'diffjax.prepare', f'--config={args.config}',
                                 *(f'--config.{item}' for item in args.overrides)])
      if prepared.returncode:
        raise ConfigError(f'preparing the data failed (exit code {prepared.returncode}; its error is above)')
      train(args, todo, stop)
  except ConfigError as error:
    raise SystemExit(f'error: {error}') from None
  except KeyboardInterrupt:
    stop.requested = True
  if args.analyses and not stop.requested and not args.report_only:
    try:
      analyse(args, seeds, runs)
    except ConfigError as error:
      raise SystemExit(f'error: {error}') from None
  results = {(run.arm.name, run.seed): summarise(run) for run in runs if run.finished()}
  summary = report(arms, reference, results)
  text = table(arms, reference, summary)
  print(text)
  with open(os.path.join(args.root, 'compare.json'), 'w') as f:
    json.dump({'config': args.config, 'overrides': args.overrides, 'reference': reference.name, 'seeds': seeds,
               'arms': summary, 'runs': {f'{arm}_seed{seed}': {k: v for k, v in r.items() if k != 'curve'}
                                         for (arm, seed), r in results.items()},
               'table': text}, f, indent=1)
  plot(arms, results, os.path.join(args.root, 'compare.png'))
  print(f'wrote {os.path.join(args.root, "compare.json")} and compare.png')
  if len(results) < len(runs):
    why = (' (stopped on request)' if stop.requested else '') + (' (--report_only)' if args.report_only else '')
    command = 'the same command without --report_only' if args.report_only else 'the same command'
    print(f'{len(results)} of {len(runs)} runs finished{why}; rerun {command} to continue')


if __name__ == '__main__':
  main()
