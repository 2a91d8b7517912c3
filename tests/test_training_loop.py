"""End-to-end runs of `python -m diffjax.train`, as a user runs it, on a small synthetic English corpus.

Four training processes share the work, each paying seconds of JAX start-up:
  full:     40 steps from scratch, the reference for everything else;
  resumed:  the same command run to step 20, then run again in the same workdir with train.steps=40;
  init:     a new workdir started from the full run's parameters (checkpoint.init_from).
The schedule is warmup-then-constant, the one whose learning rate at a step does not depend on train.steps: only
then may a run to 20 continued to 40 log the very numbers of one run to 40. The processes share a persistent
compilation cache, so only the first one compiles. Four bad configs fail before compiling, side by side.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffjax.data import pipeline as data_lib
from diffjax.data.tokenizers import ByteTokenizer
from diffjax.model import losses as losses_lib
from diffjax.model import sharding
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step
from helpers_training import cli_command, cli_env, load_config, read_metrics, run_overrides, train_losses, write_corpus

pytestmark = pytest.mark.slow  # end-to-end runs: the quick subset (pytest -m "not slow") leaves them out

STEPS, HALF = 40, 20
PROMPT = 'The '
VOCAB = -(-ByteTokenizer().vocab_size // 128) * 128  # the model's vocabulary: bytes and specials, rounded up


@pytest.fixture(scope='module')
def space(tmp_path_factory):
  root = tmp_path_factory.mktemp('loop')
  return {'root': root, 'corpus': write_corpus(root / 'corpus'), 'data_dir': root / 'tfds',
          'env': cli_env(compilation_cache=root / 'jax_cache')}


def overrides(space, **changes) -> dict:
  return run_overrides(space['corpus'], space['data_dir'], train__decay='constant', log__sample_prompt=PROMPT,
                       **changes)


def run(space, workdir, **changes) -> subprocess.CompletedProcess:
  proc = subprocess.run(cli_command(workdir, overrides(space, **changes)), env=space['env'], capture_output=True,
                        text=True, timeout=400, cwd=pathlib.Path(__file__).parents[1])
  assert proc.returncode == 0 and 'Traceback' not in proc.stderr, proc.stderr[-4000:]
  return proc


def checkpoint_steps(workdir) -> list[int]:
  # Orbax keeps bookkeeping folders such as `.deleting` beside the step folders.
  return sorted(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())


@pytest.fixture(scope='module')
def full(space):
  workdir = space['root'] / 'full'
  # It also traces steps 5 and 6 with jax.profiler; the records must not change for it.
  proc = run(space, workdir, train__steps=STEPS, log__profile_start_step=5, log__profile_steps=2)
  return {'workdir': workdir, 'proc': proc, 'records': read_metrics(workdir)}


@pytest.fixture(scope='module')
def resumed(space):
  workdir = space['root'] / 'resumed'
  first = run(space, workdir, train__steps=HALF, checkpoint__every_steps=8)
  after_first = {'records': read_metrics(workdir), 'checkpoints': checkpoint_steps(workdir)}
  second = run(space, workdir, train__steps=STEPS, checkpoint__every_steps=8)
  return {'workdir': workdir, 'first': first, 'second': second, 'after_first': after_first,
          'records': read_metrics(workdir)}


@pytest.fixture(scope='module')
def restored(space, full):
  """The full run's newest checkpoint, read back in this process, with the run's model and input pipeline."""
  config = load_config(overrides(space, train__steps=STEPS))
  pipeline = data_lib.build_input(config.data, seq_len=config.train.seq_len,
                                  batch_size=config.train.global_batch_size, seed=config.seed,
                                  workdir=str(full['workdir']))
  cfg = defaults.model_config(config, pipeline.tokenizer.vocab_size)
  tx = optim.make_optimizer(config.train)
  mesh = sharding.make_mesh(config.mesh)
  checkpointer = checkpoint_lib.Checkpointer(str(full['workdir'] / 'checkpoints'), keep=3, async_save=False)
  step, state, data_state = checkpointer.restore_latest(train_step.abstract_state(cfg, tx, mesh))
  checkpointer.close()
  return {'config': config, 'pipeline': pipeline, 'cfg': cfg, 'step': step, 'state': state,
          'data_state': data_state}


def test_loss_falls(full):
  losses = train_losses(full['records'])
  assert sorted(losses) == list(range(1, STEPS + 1))
  # Small random weights start at the loss of a uniform guess over the vocabulary.
  assert abs(losses[1] - math.log(VOCAB)) < 0.1, losses[1]
  first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)])
  assert last < first - 2.0, (first, last)
  assert all(math.isfinite(r['grad_norm']) and r['skipped_steps'] == 0 for r in full['records'] if 'loss' in r)


def test_speed_is_reported_for_every_step_but_those_timed_apart(full):
  """Step 1 compiles and step 6 ends the trace (steps 5-6): the window restarts after each, so their records, read
  a step later, hold no steps to time, and report no speed rather than a speed of 0."""
  trained = [r for r in full['records'] if 'loss' in r]
  assert [r['step'] for r in trained if 'tokens_per_s' not in r] == [1, 6]
  assert all(r['tokens_per_s'] > 0 and r.get('mfu', 1) > 0 for r in trained if 'tokens_per_s' in r)


def test_the_run_says_how_often_its_steps_read_the_training_split(full, restored):
  batch, rows = restored['config'].train.global_batch_size, restored['pipeline'].meta['splits']['train']['rows']
  first = next(r for r in full['records'] if 'train_passes' in r)
  assert first['step'] == 1 and first['train_passes'] == pytest.approx(STEPS * batch / rows)
  assert f'{STEPS} steps read {STEPS * batch:,} training sequences' in full['proc'].stdout


def test_logged_learning_rate_follows_the_schedule(full):
  """Step s applies the rate of optimizer step s - 1: warmup 0, 0.2, ..., then the peak (decay 'constant')."""
  peak, warmup = 3e-3, 5
  for record in full['records']:
    if 'loss' in record:
      want = peak * min(record['step'] - 1, warmup) / warmup
      np.testing.assert_allclose(record['learning_rate'], want, rtol=1e-6, err_msg=str(record['step']))


def test_evaluation_runs_every_interval_and_at_the_end(full):
  evals = {r['step']: r for r in full['records'] if 'eval_loss' in r}
  assert sorted(evals) == [HALF, STEPS]
  for record in evals.values():
    assert record['eval_perplexity'] == pytest.approx(math.exp(record['eval_loss']), rel=1e-9)
  assert evals[STEPS]['eval_loss'] < math.log(VOCAB) - 2.0


def test_checkpoints_are_written_and_restore(full, restored):
  # Every 10 steps, the last 3 kept (checkpoint.keep's default); the final step is among them.
  assert checkpoint_steps(full['workdir']) == [20, 30, 40]
  assert restored['step'] == STEPS and int(restored['state']['step']) == STEPS
  assert int(restored['state']['nonfinite_steps']) == 0
  # The restored weights give back the evaluation loss the run logged with them, to float32 rounding.
  evaluate = jax.jit(lambda params, batch: losses_lib.eval_step(restored['cfg'], params, batch))
  loss_sum = tokens = 0.0
  for batch in restored['pipeline'].eval_batches(restored['config'].log.eval_batches):
    out = evaluate(restored['state']['params'], batch)
    loss_sum, tokens = loss_sum + float(out['loss_sum']), tokens + float(out['tokens'])
  logged = [r['eval_loss'] for r in full['records'] if r.get('eval_loss') is not None and r['step'] == STEPS]
  assert loss_sum / tokens == pytest.approx(logged[0], rel=1e-5)


def test_run_writes_config_sample_and_curves(full):
  with open(full['workdir'] / 'config.json') as f:
    saved = json.load(f)
  assert saved['train']['steps'] == STEPS and saved['data']['text_glob'] == str(full['workdir'].parent / 'corpus')
  lines = full['proc'].stdout.splitlines()
  header = lines.index(f'sample after step {STEPS}:')
  assert lines[header + 1].startswith(PROMPT) and len(lines[header + 1]) > len(PROMPT)
  png = (full['workdir'] / 'curves.png').read_bytes()
  assert png.startswith(b'\x89PNG\r\n\x1a\n') and len(png) > 10_000


def test_profile_of_the_chosen_steps_is_written_and_summarised(full):
  assert f'profile of steps 5-6 in {full["workdir"] / "profile"}' in full['proc'].stdout
  traces = list((full['workdir'] / 'profile').glob('plugins/profile/*/*.trace.json.gz'))
  assert len(traces) == 1
  summary = subprocess.run([sys.executable, 'launch/profile_summary.py', str(full['workdir'] / 'profile'), '--top',
                            '5', '--out', str(full['workdir'] / 'summary.json')], capture_output=True, text=True,
                           cwd=pathlib.Path(__file__).parents[1], timeout=120)
  assert summary.returncode == 0, summary.stderr
  assert summary.stdout.startswith('host (no device events in this trace): busy ')  # a CPU run traces the host
  written = json.loads((full['workdir'] / 'summary.json').read_text())
  assert len(written['host']['ops']) == 5 and written['host']['busy_ms'] > 0


def test_rerun_with_more_steps_continues_from_the_checkpoint(resumed):
  assert resumed['after_first']['checkpoints'] == [8, 16, 20]
  assert f'resumed from step {HALF}' in resumed['second'].stdout
  assert 'resumed from' not in resumed['first'].stdout
  # Every step is logged once, in order: the second run neither repeats a step nor skips one.
  steps = [r['step'] for r in resumed['records'] if 'loss' in r]
  assert steps == list(range(1, STEPS + 1))
  assert [r['step'] for r in resumed['records'] if 'eval_loss' in r] == [HALF, STEPS]
  assert checkpoint_steps(resumed['workdir']) == [24, 32, 40]


def test_interrupted_run_logs_what_one_uninterrupted_run_logs(full, resumed):
  timings = ('tokens_per_s', 'mfu', 'data_wait_ms')  # measured, so they differ from run to run

  def logged(records):
    return {(r['step'], 'eval' if 'eval_loss' in r else 'train'):
            {k: v for k, v in r.items() if k not in timings} for r in records}
  assert all(r['data_wait_ms'] >= 0 for r in full['records'] + resumed['records'] if 'loss' in r)
  reference, interrupted = logged(full['records']), logged(resumed['records'])
  assert reference.keys() == interrupted.keys()
  for key in sorted(reference):
    # Bit for bit: restoring the state and the input position must lose nothing, not even float rounding.
    assert interrupted[key] == reference[key], key


def test_init_from_starts_a_new_run_from_another_runs_parameters(space, full, restored):
  workdir = space['root'] / 'init'
  proc = run(space, workdir, train__steps=6, checkpoint__init_from=str(full['workdir']))
  assert f'parameters from {full["workdir"]}' in proc.stdout and 'resumed from' not in proc.stdout
  losses = train_losses(read_metrics(workdir))
  assert sorted(losses) == list(range(1, 7))  # a new run: its own steps, from 1
  # Step 1 runs the full run's final weights on this run's first batch (the same seed, so the same batch).
  batch = next(restored['pipeline'].train_iterator())
  ce_sum, _, tokens = jax.jit(lambda p, b: losses_lib.token_losses(restored['cfg'], p, b, 0.0))(
      restored['state']['params'], batch)
  assert losses[1] == pytest.approx(float(ce_sum / tokens), rel=1e-5)
  assert losses[1] < train_losses(full['records'])[1] - 2.0
  assert checkpoint_steps(workdir) == [6]


BAD_CONFIGS = {
    'train.global_batch_size': {'train.microbatches': 3},  # 8 sequences cannot split into 3 microbatches
    'train.warmup_steps': {'train.warmup_steps': STEPS},
    'train.seq_len': {'train.seq_len': 128},  # the model's max_len is 64
    'model.variant': {'model.variant': 'diff_v3'},
}


@pytest.fixture(scope='module')
def bad_runs(space):
  """The CLI on each bad config; they fail before compiling anything, so they run side by side."""
  procs = {}
  for key, change in BAD_CONFIGS.items():
    values = {**overrides(space), **change}
    procs[key] = subprocess.Popen(cli_command(space['root'] / f'bad_{key}', values), env=space['env'],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=pathlib.Path(__file__).parents[1])
  return {key: (proc, *proc.communicate(timeout=300)) for key, proc in procs.items()}


@pytest.mark.parametrize('key', list(BAD_CONFIGS))
def test_bad_config_fails_in_one_line(bad_runs, key):
  proc, stdout, stderr = bad_runs[key]
  assert proc.returncode != 0
  assert 'Traceback' not in stderr, stderr
  last = [line for line in stderr.splitlines() if line.strip()][-1]
  assert last.startswith(f'error: {key}'), stderr
  assert 'step 1 |' not in stdout  # it failed before training
