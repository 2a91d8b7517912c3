"""Crash-safety harness: kills a real training run with SIGKILL at random moments and checks what survives.

    python launch/crash_harness.py [--kills 10] [--seed 0] [--workdir DIR]

It trains the tiny model (width 64, 2 layers, sequences of 64, batches of 8, an asynchronous checkpoint every 3
steps) on a small synthetic corpus, twice:

  reference/  one uninterrupted run;
  crashed/    the same command, killed with SIGKILL `--kills` times and restarted after each kill, until it ends.

Kill moments are drawn at random from three kinds: during start-up (imports, restore, compilation), at a random
moment of training, and while an asynchronous checkpoint is being written (the harness polls for Orbax's
`<step>.orbax-checkpoint-tmp` folder and kills as soon as one appears, or a few milliseconds later). After every
kill it checks that

  (a) the next start resumes from the newest complete checkpoint that the kill left behind;
  (b) every step folder left behind restores in full (all arrays finite) and never changes afterwards; temporary
      folders are gone once the next start has restored; nothing was moved to `checkpoints_corrupt/` and no start
      warned of an unreadable checkpoint;
  (c) every loss, gradient norm and learning rate logged by any start equals the reference run's for that step bit
      for bit, including steps logged twice (before a kill and again after the resume); every step is logged at
      least once; every checkpoint (train state and data position) and the final evaluation loss equal the
      reference run's bit for bit.

It prints a table of the kill points and writes WORKDIR/crash_report.json; the exit status is 1 if any check
failed. About 3 minutes on 2 CPU cores for 10 kills (the runs share a JAX compilation cache).
"""

import argparse
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY_STEPS = 3  # checkpoint interval: short, so kills often land in or near an asynchronous save
STEPS = 90  # enough for 10 kills, whose runs start in a few seconds; more kills get 9 steps each
TMP_MARKER = '.orbax-checkpoint-tmp'
# How long after training starts (first new step logged) a kill of kind 'training' may land.
TRAINING_WINDOW_S = 0.8
# A kill of kind 'startup' lands this long after the process starts, unless training started first.
STARTUP_WINDOW_S = (1.0, 6.0)


def overrides(steps: int, corpus: str, data_dir: str) -> list[str]:
  values = {
      'model.d_model': 64, 'model.n_layers': 2, 'model.n_heads': 4, 'model.d_ff': 128, 'model.max_len': 64,
      'train.seq_len': 64, 'train.global_batch_size': 8, 'train.steps': steps, 'train.warmup_steps': 5,
      'checkpoint.every_steps': EVERY_STEPS, 'checkpoint.keep': 3,
      'log.every_steps': 1, 'log.eval_every_steps': 10 ** 6, 'log.eval_batches': 2, 'log.sample_tokens': 4,
      'log.progress_bar': False, 'data.source': 'local', 'data.text_glob': corpus, 'data.data_dir': data_dir,
  }
  return [f'--config.{key}={value}' for key, value in values.items()]


def write_corpus(folder: str, seed: int = 1234, documents: int = 24):
  """Pseudo-English documents of a few kilobytes each: enough for many batches of 8 x 64 bytes."""
  rng = random.Random(seed)
  syllables = ['ka', 'lo', 'mi', 'ne', 'ru', 'sa', 'ti', 'vo', 'be', 'da', 'fu', 'go', 'hi', 'ja', 'pe', 'zu']
  words = [''.join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(300)]
  os.makedirs(folder, exist_ok=True)
  for index in range(documents):
    sentences = [' '.join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + '.'
                 for _ in range(rng.randint(40, 60))]
    with open(os.path.join(folder, f'doc_{index:02d}.txt'), 'w') as f:
      f.write(' '.join(sentences) + '\n')


# -- looking at a workdir ---------------------------------------------------------------------------------------


def read_records(workdir: str) -> tuple[list[dict], list[str]]:
  """metrics.jsonl as records, and the lines that are not valid JSON (a torn write would show here)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  records, torn = [], []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          torn.append(line)
  return records, torn


def last_logged_step(workdir: str) -> int:
  steps = [r['step'] for r in read_records(workdir)[0] if 'loss' in r]
  return max(steps, default=0)


def checkpoint_entries(workdir: str) -> tuple[list[int], list[str], list[str]]:
  """(complete steps, temporary folders, folders being deleted) under WORKDIR/checkpoints."""
  directory = os.path.join(workdir, 'checkpoints')
  names = os.listdir(directory) if os.path.isdir(directory) else []
  deleting = os.path.join(directory, '.deleting')
  return (sorted(int(n) for n in names if n.isdigit()), sorted(n for n in names if TMP_MARKER in n),
          sorted(os.listdir(deleting)) if os.path.isdir(deleting) else [])


def manifest(folder: str) -> dict[str, int]:
  return {os.path.relpath(os.path.join(root, name), folder): os.path.getsize(os.path.join(root, name))
          for root, _, names in os.walk(folder) for name in names}


class CheckpointReader:
  """Restores step folders read-only (no clean-up, no target shapes) and fingerprints their train state."""

  def __init__(self):
    from absl import logging  # imported late: the harness's own start-up stays fast
    import orbax.checkpoint as ocp
    logging.set_verbosity(logging.ERROR)  # read-only managers warn that they are read-only
    self.ocp = ocp

  def fingerprint(self, directory: str, step: int) -> str:
    """A hash of every array of the step's train state; raises if any item of the step cannot be read."""
    import jax
    ocp = self.ocp
    manager = ocp.CheckpointManager(directory, item_names=('state', 'data', 'config'),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(), data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    finally:
      manager.close()
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored['state'])[0]:
      value = np.asarray(leaf)
      if not np.all(np.isfinite(value)):
        raise ValueError(f'non-finite values in {jax.tree_util.keystr(path)}')
      digest.update(jax.tree_util.keystr(path).encode() + value.tobytes())
    digest.update(json.dumps(restored['data'], sort_keys=True).encode())
    return digest.hexdigest()[:16]


# -- running and killing ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Incarnation:
  """One start of the training command in the crashed workdir."""
  index: int
  aim: str  # 'startup' | 'training' | 'mid-save' | 'none' (the last start, left to finish)
  expected_resume: int  # the newest complete checkpoint left by the previous kill (0: none)
  resumed: int | None = None  # from the run's 'resumed from step N' line; 0 for a fresh start; None: not reached
  killed_at_s: float | None = None
  doing: str = ''
  last_logged: int = 0
  complete_after: list = dataclasses.field(default_factory=list)
  tmp_after: list = dataclasses.field(default_factory=list)
  exit_code: int | None = None
  problems: list = dataclasses.field(default_factory=list)  # (check 'a' | 'b' | 'c', what went wrong)


def command(workdir: str, flags: list[str]) -> list[str]:
  return [sys.executable, '-m', 'diffjax.train', f'--config={os.path.join(REPO, "configs/tiny.py")}',
          f'--workdir={workdir}', *flags]


def start(cmd: list[str], logs: str, name: str, env: dict) -> tuple[subprocess.Popen, str, str]:
  out, err = os.path.join(logs, f'{name}.out'), os.path.join(logs, f'{name}.err')
  with open(out, 'w') as stdout, open(err, 'w') as stderr:
    process = subprocess.Popen(cmd, cwd=REPO, stdout=stdout, stderr=stderr, env=env)
  return process, out, err


def resumed_step(stdout_path: str) -> int | None:
  with open(stdout_path) as f:
    text = f.read()
  match = re.search(r'^resumed from step (\d+) in ', text, re.MULTILINE)
  if match:
    return int(match[1])
  return 0 if re.search(r'^\w+: [\d,]+ parameters', text, re.MULTILINE) else None


def kill_when_due(process: subprocess.Popen, workdir: str, aim: str, logged_before: int, started_at: float,
                  rng: random.Random) -> tuple[float, str] | None:
  """Waits for the moment `aim` describes and SIGKILLs the run; (seconds since start, what it was doing) at the
  kill, or None if the run ended on its own first."""
  began = time.monotonic()
  startup_delay = rng.uniform(*STARTUP_WINDOW_S)
  training_delay = rng.uniform(0.0, TRAINING_WINDOW_S)
  saves_to_skip, save_delay = rng.randint(0, 2), rng.uniform(0.0, 0.05)  # early or late in one of the next saves
  training_since, save_seen, tmp_seen = None, None, set()
  while process.poll() is None:
    now = time.monotonic()
    if training_since is None and last_logged_step(workdir) > logged_before:
      training_since = now
    due = False
    if aim == 'startup':
      due = now - began >= startup_delay or training_since is not None
    elif aim == 'training':
      due = training_since is not None and now - training_since >= training_delay
    elif aim == 'mid-save' and training_since is not None:
      new_tmp = set(checkpoint_entries(workdir)[1]) - tmp_seen
      if new_tmp and save_seen is None:
        tmp_seen |= new_tmp
        if saves_to_skip:
          saves_to_skip -= 1
        else:
          save_seen = now
      due = save_seen is not None and now - save_seen >= save_delay
    if due:
      process.send_signal(signal.SIGKILL)
      process.wait()
      return now - began, describe(workdir, logged_before, started_at)
    time.sleep(0.002 if aim == 'mid-save' and training_since is not None else 0.02)
  return None


def describe(workdir: str, logged_before: int, started_at: float) -> str:
  """What the killed run was doing, from what it left on disk (folders older than this start are not its own)."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  _, tmp, deleting = checkpoint_entries(workdir)
  logged = last_logged_step(workdir)
  doing = f'training, step {logged} logged' if logged > logged_before else 'starting (restore / compile)'
  for name in tmp:
    folder = os.path.join(checkpoints, name)
    if os.stat(folder).st_ctime >= started_at:
      doing += f'; writing checkpoint {name.split(".")[0]} ({len(manifest(folder))} files so far)'
  if any(os.stat(os.path.join(checkpoints, '.deleting', name)).st_ctime >= started_at for name in deleting):
    doing += '; an old checkpoint retired'
  return doing


def plan(kills: int, rng: random.Random) -> list[str]:
  """Kill kinds: about 40% aimed at an asynchronous save, one at start-up, the rest at random moments."""
  mid_save = max(1, round(0.4 * kills))
  startup = 1 if kills >= 4 else 0
  aims = ['mid-save'] * mid_save + ['startup'] * startup + ['training'] * (kills - mid_save - startup)
  rng.shuffle(aims)
  return aims


# -- the checks -------------------------------------------------------------------------------------------------


def compare_logs(reference: list[dict], crashed: list[dict], steps: int) -> list[str]:
  problems = []
  expected = {r['step']: r for r in reference if 'loss' in r}
  seen = set()
  for record in (r for r in crashed if 'loss' in r):
    step, want = record['step'], expected.get(record['step'])
    seen.add(step)
    if want is None:
      problems.append(f'step {step} logged but the reference run has no record of it')
      continue
    for key in ('loss', 'grad_norm', 'learning_rate', 'skipped_steps'):
      if record[key] != want[key]:
        problems.append(f'step {step}: {key} {record[key]!r} != reference {want[key]!r}')
  missing = sorted(set(range(1, steps + 1)) - seen)
  if missing:
    problems.append(f'steps never logged: {missing}')
  evals = [[r['eval_loss'] for r in records if 'eval_loss' in r and r['step'] == steps] for records in
           (reference, crashed)]
  if not evals[1] or evals[1][-1] != evals[0][-1]:
    problems.append(f'final eval_loss {evals[1][-1:]} != reference {evals[0][-1:]}')
  return problems


def check_start(run: Incarnation, workdir: str, stderr_path: str, started_at: float, tmp_left: list[str],
                reader: CheckpointReader, reference_prints: dict[int, str], verified: dict[int, dict]) -> list[str]:
  """Checks (a), (b) and the checkpoint part of (c) after one start ended; returns the temporary folders whose
  removal a later start must still show."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  # (a) resumed from the newest complete checkpoint that the previous kill left.
  if run.resumed is not None and run.resumed != run.expected_resume:
    run.problems.append(('a', f'resumed from step {run.resumed}, expected {run.expected_resume}'))
  # (b) every step folder restores and never changes once complete; (c) it equals the reference run's.
  for step in run.complete_after:
    files = manifest(os.path.join(checkpoints, str(step)))
    if step in verified:
      if verified[step] != files:
        run.problems.append(('b', f'checkpoint {step} changed after it was complete'))
      continue
    try:
      fingerprint = reader.fingerprint(checkpoints, step)
    except Exception as error:  # any failure to read is what this check looks for
      run.problems.append(('b', f'checkpoint {step} unreadable: {type(error).__name__}: '
                                f'{str(error).strip().splitlines()[0][:120]}'))
      continue
    if fingerprint != reference_prints.get(step):
      run.problems.append(('c', f'checkpoint {step} differs from the reference run\'s'))
    verified[step] = files
  # (b) a start that got as far as restoring removed earlier kills' temporary folders (one of the same name made
  # since this start began is a new save of that step).
  if run.resumed is not None:
    stale = [name for name in tmp_left if name in run.tmp_after
             and os.stat(os.path.join(checkpoints, name)).st_ctime < started_at]
    if stale:
      run.problems.append(('b', f'temporary folders not removed by the restart: {stale}'))
    tmp_left = []
  if os.path.exists(checkpoints + '_corrupt'):
    run.problems.append(('b', 'a checkpoint was moved to checkpoints_corrupt/'))
  with open(stderr_path) as f:
    if 'unreadable' in f.read():
      run.problems.append(('b', f'the start warned of an unreadable checkpoint; see {stderr_path}'))
  return sorted(set(tmp_left) | set(run.tmp_after))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=10, help='SIGKILLs to deliver (default 10)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the kill plan and delays')
  parser.add_argument('--workdir', default=None, help='folder for both runs and the report (default: a new temp dir)')
  parser.add_argument('--steps', type=int, default=0, help=f'training steps (default: max({STEPS}, 9 * kills))')
  parser.add_argument('--compile-cache', default=None,
                      help='JAX compilation cache shared by all starts (default: WORKDIR/compile_cache)')
  parser.add_argument('--no-compile-cache', action='store_true', help='compile from scratch in every start')
  args = parser.parse_args()

  root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix='crash_harness_'))
  steps = args.steps or max(STEPS, 9 * args.kills)
  rng = random.Random(args.seed)
  logs, corpus = os.path.join(root, 'logs'), os.path.join(root, 'corpus')
  os.makedirs(logs, exist_ok=True)
  write_corpus(corpus)
  flags = overrides(steps, corpus, os.path.join(root, 'tfds'))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  if not args.no_compile_cache:
    env.update(JAX_COMPILATION_CACHE_DIR=os.path.abspath(args.compile_cache or os.path.join(root, 'compile_cache')),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  reference_dir, crashed_dir = os.path.join(root, 'reference'), os.path.join(root, 'crashed')
  began = time.monotonic()

  # The reference keeps every checkpoint, so each of the crashed run's can be compared with it.
  print(f'reference run: {steps} steps in {reference_dir}', flush=True)
  process, _, err = start(command(reference_dir, flags + ['--config.checkpoint.keep=1000']), logs, 'reference', env)
  if process.wait():
    sys.exit(f'the reference run failed (exit {process.returncode}); see {err}')
  reader = CheckpointReader()
  reference_prints = {step: reader.fingerprint(os.path.join(reference_dir, 'checkpoints'), step)
                      for step in checkpoint_entries(reference_dir)[0]}

  incarnations, verified = [], {}
  expected_resume, tmp_left = 0, []
  for index, aim in enumerate(plan(args.kills, rng) + ['none']):
    run = Incarnation(index=index, aim=aim, expected_resume=expected_resume)
    incarnations.append(run)
    logged_before = last_logged_step(crashed_dir)
    started_at = time.time()
    process, out, err = start(command(crashed_dir, flags), logs, f'crashed_{index:02d}', env)
    killed = kill_when_due(process, crashed_dir, aim, logged_before, started_at, rng) if aim != 'none' else None
    if killed is None:
      run.exit_code = process.wait()
      run.doing = 'ran to the end' if run.exit_code == 0 else f'exited {run.exit_code}'
      if aim != 'none':
        run.problems.append(('setup', 'the run ended before the kill; use more --steps'))
      elif run.exit_code:
        run.problems.append(('setup', f'the final start exited {run.exit_code}; see {err}'))
    else:
      run.killed_at_s, run.doing = killed
    run.last_logged, run.resumed = last_logged_step(crashed_dir), resumed_step(out)
    run.complete_after, run.tmp_after, _ = checkpoint_entries(crashed_dir)
    tmp_left = check_start(run, crashed_dir, err, started_at, tmp_left, reader, reference_prints, verified)
    expected_resume = max(run.complete_after, default=0)

  # (c) logged values and the final state equal the uninterrupted run's.
  reference_records, _ = read_records(reference_dir)
  crashed_records, torn = read_records(crashed_dir)
  problems = [('c', f'torn metrics line: {line!r}') for line in torn]
  problems += [('c', problem) for problem in compare_logs(reference_records, crashed_records, steps)]
  final = max(checkpoint_entries(crashed_dir)[0], default=None)
  if final != steps:
    problems.append(('c', f'the final checkpoint is step {final}, not {steps}'))
  kills = [run for run in incarnations if run.killed_at_s is not None]
  if len(kills) < args.kills:
    problems.append(('setup', f'only {len(kills)} of {args.kills} kills landed'))
  problems += [problem for run in incarnations for problem in run.problems]

  print_table(incarnations)
  names = {'a': '(a) resumes from the last complete checkpoint',
           'b': '(b) no checkpoint left half-written or unreadable',
           'c': '(c) every logged loss equals the uninterrupted run\'s',
           'setup': 'every planned kill landed and the last start ran to the end'}
  checks = {name: not any(check == key for check, _ in problems) for key, name in names.items()}
  logged = [r['step'] for r in crashed_records if 'loss' in r]
  mid_save = sum('writing checkpoint' in run.doing for run in kills)
  passed = all(checks.values())
  seconds = time.monotonic() - began
  print(f'\n{len(kills)} kills ({mid_save} while a checkpoint was being written), {len(incarnations)} starts, '
        f'{len(logged)} losses compared ({len(logged) - len(set(logged))} of steps logged twice), {seconds:.0f} s')
  for name, ok in checks.items():
    print(f'  {"PASS" if ok else "FAIL"}  {name}')
  for check, problem in problems:
    print(f'  problem ({check}): {problem}')
  report = {'passed': passed, 'checks': checks, 'steps': steps, 'seed': args.seed, 'kills': len(kills),
            'kills_mid_save': mid_save, 'losses_compared': len(logged),
            'steps_logged_twice': len(logged) - len(set(logged)), 'problems': problems,
            'seconds': round(seconds, 1), 'command': command(crashed_dir, flags),
            'incarnations': [dataclasses.asdict(run) for run in incarnations]}
  with open(os.path.join(root, 'crash_report.json'), 'w') as f:
    json.dump(report, f, indent=2)
  print(f'report: {os.path.join(root, "crash_report.json")}')
  sys.exit(0 if passed else 1)


def print_table(incarnations: list[Incarnation]):
  """One row per start: how it ended, where it resumed (and where it should have), the checks' verdict."""
  print(f'\n{"#":>2}  {"aim":9} {"killed at":>9}  {"resumed":>7} {"expected":>8}  {"checkpoints after":17}  '
        f'{"verdict":7} what it was doing')
  for run in incarnations:
    at = f'{run.killed_at_s:.2f} s' if run.killed_at_s is not None else '-'
    resumed = '-' if run.resumed is None else str(run.resumed)
    verdict = 'ok' if not run.problems else 'FAIL'
    print(f'{run.index:>2}  {run.aim:9} {at:>9}  {resumed:>7} {run.expected_resume:>8}  '
          f'{",".join(map(str, run.complete_after)):17}  {verdict:7} {run.doing}')
    for check, text in run.problems:
      print(f'{"":>4}({check}) {text}')


if __name__ == '__main__':
  main()
