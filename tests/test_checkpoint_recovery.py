"""Damaged checkpoints and foreign workdirs: fall back to the previous good step with one warning, refuse rather
than start from scratch, and refuse a workdir of another run unless told to continue it."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import reliability_helpers as rh
from diffjax.errors import ConfigError
from diffjax.model import sharding
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step

# A restore that fails part-way leaves Orbax's pending reads to be collected later, which pytest reports as
# exceptions raised in `__del__`; failing restores are what these tests are about.
pytestmark = [pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
              pytest.mark.slow]  # end-to-end runs: the quick subset (pytest -m "not slow") leaves them out

# The harness's run: checkpoints every 3 steps, the last 3 kept.
LAST = rh.STEPS
PREVIOUS, FIRST = LAST - 3, LAST - 6
KEPT = [FIRST, PREVIOUS, LAST]


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  """(workdir, flags) of a finished run; tests work on copies of it."""
  folder = tmp_path_factory.mktemp('recovery')
  run_flags = rh.flags(rh.make_corpus(folder), LAST)
  result = rh.train(folder / 'base', run_flags)
  assert result.returncode == 0, result.stderr
  assert rh.steps(folder / 'base') == KEPT
  return folder / 'base', run_flags


def copy_of(base, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(base[0], workdir)
  return workdir


def largest_file(folder) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
  return max(files, key=os.path.getsize)


def abstract_state(workdir, **model):
  config = ml_collections.ConfigDict(json.loads((workdir / 'config.json').read_text()))
  config.model.update(model)
  tx = optim.make_optimizer(config.train)
  return train_step.abstract_state(defaults.model_config(config, 258), tx, sharding.make_mesh(config.mesh))


def restore(workdir, **model):
  checkpoints = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'), keep=3, async_save=False)
  try:
    return checkpoints.restore_latest(abstract_state(workdir, **model))
  finally:
    checkpoints.close()


def test_truncated_file_falls_back_to_the_previous_step_with_one_warning(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  damaged = largest_file(workdir / 'checkpoints' / str(LAST) / 'state')
  os.truncate(damaged, os.path.getsize(damaged) // 2)
  result = rh.train(workdir, base[1])
  assert result.returncode == 0, result.stderr
  assert [line for line in rh.nonempty_lines(result.stderr) if 'W' in line[:1]] == [
      line for line in rh.nonempty_lines(result.stderr) if 'unreadable' in line]
  [warning] = [line for line in rh.nonempty_lines(result.stderr) if 'unreadable' in line]
  assert f'checkpoint step {LAST} in {workdir}/checkpoints is unreadable (' in warning
  assert f'resuming from step {PREVIOUS} instead (step {LAST} moved to {workdir}/checkpoints_corrupt/' in warning
  # What TensorStore found, not Orbax's wrapping of it, which printed a bound method's repr.
  assert 'is unreadable (ValueError: OUT_OF_RANGE: Error reading ' in warning and 'pybind11' not in warning
  assert f'resumed from step {PREVIOUS} in {workdir}/checkpoints' in result.stdout
  assert [name.split('-')[0] for name in os.listdir(f'{workdir}/checkpoints_corrupt')] == [str(LAST)]
  # The steps after PREVIOUS were logged twice, and the same both times.
  assert rh.losses(workdir) == rh.losses(base[0])
  assert rh.steps(workdir)[-1] == LAST


@pytest.mark.parametrize('damage', ['delete state/_METADATA', 'delete the largest state file',
                                    'truncate config/metadata', 'delete data/metadata'])
def test_missing_or_truncated_file_is_detected_at_restore(base, tmp_path, caplog, damage):
  workdir = copy_of(base, tmp_path)
  action, what = damage.split(' ', 1)
  step_dir = workdir / 'checkpoints' / str(LAST)
  path = largest_file(step_dir / 'state') if what == 'the largest state file' else step_dir / what
  if action == 'delete':
    os.remove(path)
  else:
    os.truncate(path, 0)
  with caplog.at_level(logging.WARNING):
    step, _, data = restore(workdir)
  assert step == PREVIOUS and data['corpus']
  [warning] = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert f'checkpoint step {LAST} ' in warning and f'resuming from step {PREVIOUS} instead' in warning
  assert '\n' not in warning
  assert rh.steps(workdir) == [FIRST, PREVIOUS]


def test_every_step_unreadable_refuses_instead_of_starting_from_scratch(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  for step in KEPT:
    os.remove(workdir / 'checkpoints' / str(step) / 'state' / '_METADATA')
  metrics_before = (workdir / 'metrics.jsonl').read_text()
  for _ in range(2):  # and again: nothing was moved aside that would let a second start begin from scratch
    result = rh.train(workdir, base[1])
    assert result.returncode == 1
    assert rh.nonempty_lines(result.stderr) == [
        f'error: checkpoint: none of steps {KEPT} in {workdir}/checkpoints can be read (step {LAST}: '
        f'FileNotFoundError: Metadata file (named _METADATA) does not exist at {workdir}/checkpoints/{LAST}/state.); '
        'repair or remove them, or use a fresh --workdir']
  assert rh.steps(workdir) == KEPT
  assert not os.path.exists(f'{workdir}/checkpoints_corrupt')
  assert (workdir / 'metrics.jsonl').read_text() == metrics_before


def test_every_step_truncated_ends_in_one_line_without_other_threads_tracebacks(base, tmp_path):
  """The arrays of a step are read concurrently; when the reads failed, those still pending printed tracebacks of
  their own (unraisable coroutines, asyncio's 'Task exception was never retrieved') around the one-line error, in
  most runs, each with a TensorStore spec of some 60 lines."""
  workdir = copy_of(base, tmp_path)
  for step in KEPT:
    for path in (workdir / 'checkpoints' / str(step) / 'state').glob('*/d/*'):
      os.truncate(path, os.path.getsize(path) // 2)
  for _ in range(3):
    result = rh.train(workdir, base[1])
    assert result.returncode == 1
    assert len(rh.nonempty_lines(result.stderr)) == 1, result.stderr
    assert result.stderr.startswith(f'error: checkpoint: none of steps {KEPT} in {workdir}/checkpoints can be read '
                                    f'(step {LAST}: ValueError: OUT_OF_RANGE: Error reading ')
  assert rh.steps(workdir) == KEPT


def test_workdir_of_another_run_is_refused_naming_the_differences(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  config_before = (workdir / 'config.json').read_text()
  result = rh.train(workdir, base[1] + ['--config.model.rope_theta=5000.0', '--config.data.validation_fraction=0.1'])
  assert result.returncode == 1
  assert rh.nonempty_lines(result.stderr) == [
      f'error: --workdir: {workdir} holds another run (step {LAST}), whose config differs in '
      'data.validation_fraction: 0.05 -> 0.1; model.rope_theta: 10000.0 -> 5000.0; use a fresh --workdir, or pass '
      '--config.checkpoint.allow_config_change=True to continue it with this config']
  assert (workdir / 'config.json').read_text() == config_before
  assert rh.steps(workdir) == KEPT


def test_allow_config_change_continues_the_run(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  result = rh.train(workdir, base[1] + ['--config.model.rope_theta=5000.0', f'--config.train.steps={LAST + 3}',
                                        '--config.checkpoint.allow_config_change=True'])
  assert result.returncode == 0, result.stderr
  assert f'resumed from step {LAST} in {workdir}/checkpoints' in result.stdout
  assert rh.steps(workdir)[-1] == LAST + 3
  assert json.loads((workdir / 'config.json').read_text())['model']['rope_theta'] == 5000.0


def test_parameters_of_another_shape_are_refused_not_treated_as_damage(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  with pytest.raises(ConfigError, match=rf"^checkpoint: step {LAST} in .* holds parameters of another shape "
                                        r"\(parameter \['block_0'\]\['attn'\]\['k_proj'\]\['kernel'\] has shape "
                                        r'\(64, 64\) saved but the model needs \(32, 32\)\), so this model cannot '
                                        r'continue that run; use a fresh --workdir'):
    restore(workdir, d_model=32)
  assert rh.steps(workdir) == KEPT
  assert not os.path.exists(f'{workdir}/checkpoints_corrupt')


def save_one_more_step(workdir):
  """Resumes the workdir's newest step and saves it again three steps on, so that the oldest kept step retires."""
  checkpoints = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'), keep=3, async_save=False)
  try:
    step, state, data = checkpoints.restore_latest(abstract_state(workdir))
    checkpoints.save(step + 3, state, data, json.loads((workdir / 'config.json').read_text()))
    checkpoints.wait()
  finally:
    checkpoints.close()


def test_old_steps_are_retired_by_one_rename(base, tmp_path, monkeypatch):
  """Orbax deletes a step file by file, so a kill then would leave a half-deleted step; it is renamed away first."""
  workdir = copy_of(base, tmp_path)
  renames = []
  replace = os.replace

  def recording_replace(source, target):
    renames.append((os.path.basename(source), os.path.relpath(target, workdir / 'checkpoints')))
    return replace(source, target)

  monkeypatch.setattr(os, 'replace', recording_replace)
  save_one_more_step(workdir)
  assert (str(FIRST), os.path.join(checkpoint_lib.DELETING, str(FIRST))) in renames
  assert rh.steps(workdir) == [PREVIOUS, LAST, LAST + 3]
  assert os.listdir(workdir / 'checkpoints' / checkpoint_lib.DELETING) == []


def test_a_retired_step_that_is_a_link_leaves_no_dangling_link(base, tmp_path):
  """A step folder that is a link (here to a copy kept elsewhere in the workdir) is renamed into .deleting/ when
  retired, where its relative target no longer resolves; rmtree refused the link, which stayed for good."""
  workdir = copy_of(base, tmp_path)
  (workdir / 'kept').mkdir()
  os.replace(workdir / 'checkpoints' / str(FIRST), workdir / 'kept' / str(FIRST))
  os.symlink(os.path.join('..', 'kept', str(FIRST)), workdir / 'checkpoints' / str(FIRST))
  save_one_more_step(workdir)
  assert rh.steps(workdir) == [PREVIOUS, LAST, LAST + 3]
  assert os.listdir(workdir / 'checkpoints' / checkpoint_lib.DELETING) == []
  assert (workdir / 'kept' / str(FIRST) / 'state').is_dir()  # nothing was deleted through the link


def flip_bytes(path, count: int):
  """Flips `count` bytes spread over the middle half of a file, as a failing disk or a bad copy would."""
  data = bytearray(open(path, 'rb').read())
  for i in range(count):
    data[len(data) // 4 + i * (len(data) // 2) // count] ^= 0xFF
  open(path, 'wb').write(data)


@pytest.mark.parametrize('flips', [1, 16])
def test_flipped_bytes_fail_and_fall_back(base, tmp_path, caplog, flips):
  """Without checksums, one flipped byte restored silently (a changed eval_loss) and sixteen gave a non-finite loss
  blamed on the learning rate. Where the flips land in the data file varies with the order Orbax wrote its chunks
  in, so the step fails either its checksum or, where a flip hits a compressed chunk's framing, its read."""
  workdir = copy_of(base, tmp_path)
  flip_bytes(largest_file(workdir / 'checkpoints' / str(LAST) / 'state'), flips)
  with caplog.at_level(logging.WARNING):
    step, _, _ = restore(workdir)
  assert step == PREVIOUS
  [warning] = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert f'checkpoint step {LAST} ' in warning
  assert rh.steps(workdir) == [FIRST, PREVIOUS]


def test_a_step_that_reads_but_fails_its_checksum_falls_back(base, tmp_path, caplog):
  """The checksum catches what reads cleanly but differs from what was saved (here the saved sum is the one changed,
  which has the same effect as a silently changed value)."""
  workdir = copy_of(base, tmp_path)
  path = workdir / 'checkpoints' / str(LAST) / 'checksums' / 'metadata'
  saved = json.loads(path.read_text())
  key = "['params']['embed']['embedding']"
  saved[key] ^= 1
  path.write_text(json.dumps(saved))
  with caplog.at_level(logging.WARNING):
    step, _, _ = restore(workdir)
  assert step == PREVIOUS
  [warning] = [r.getMessage() for r in caplog.records if 'unreadable' in r.getMessage()]
  assert f'checkpoint step {LAST} ' in warning and f'{key} does not match the checksum saved with it' in warning
  assert rh.steps(workdir) == [FIRST, PREVIOUS]


def test_steps_saved_without_checksums_still_restore(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / str(LAST) / 'checksums')
  assert restore(workdir)[0] == LAST


def test_reader_falls_back_quietly_and_moves_nothing(base, tmp_path):
  """evaluate on damaged steps: one warning per bad step, not thousands of lines of Orbax's failed reads, and
  nothing moved or deleted, since a training run may be using the workdir."""
  workdir = copy_of(base, tmp_path)
  # Readers restore the parameters alone, so the damage must reach them: every file of both steps is cut short.
  for step in (LAST, PREVIOUS):
    for root, _, names in os.walk(workdir / 'checkpoints' / str(step) / 'state'):
      for name in names:
        os.truncate(os.path.join(root, name), 100)
  before = sorted(os.listdir(workdir / 'checkpoints'))
  result = subprocess.run([sys.executable, '-m', 'diffjax.evaluate', f'--workdir={workdir}', '--batches=1'],
                          cwd=rh.REPO, env=rh.env(), capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr
  assert json.loads(result.stdout)['step'] == FIRST
  warnings = [line for line in rh.nonempty_lines(result.stderr) if 'unreadable' in line]
  assert len(warnings) == 2 and warnings[0].endswith(f'; using step {FIRST} instead'), result.stderr
  assert len(rh.nonempty_lines(result.stderr)) == 2, result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints')) == before
  assert not os.path.exists(f'{workdir}/checkpoints_corrupt')


def test_init_from_verifies_the_checksums(base, tmp_path):
  workdir = copy_of(base, tmp_path)
  params = abstract_state(workdir)['params']
  shardings = jax.tree.map(lambda x: x.sharding, params)
  checkpoint_lib.load_params(str(workdir), params, shardings)  # intact: loads
  path = workdir / 'checkpoints' / str(LAST) / 'checksums' / 'metadata'
  saved = json.loads(path.read_text())
  key = "['params']['embed']['embedding']"
  saved[key] ^= 1
  path.write_text(json.dumps(saved))
  with pytest.raises(ConfigError, match=rf"^checkpoint\.init_from: {workdir}/checkpoints/{LAST}/state is damaged "
                                        rf"\({re.escape(key)} does not match the checksum saved with it\)"):
    checkpoint_lib.load_params(str(workdir), params, shardings)


def test_kv_heads_placeholder_and_its_value_are_the_same_run():
  config = lambda kv_heads: {'model': {'n_heads': 8, 'n_kv_heads': kv_heads}, 'train': {'seq_len': 64}}
  assert checkpoint_lib.config_differences(config(0), config(8)) == []
  assert checkpoint_lib.config_differences(config(0), config(4)) == ['model.n_kv_heads: 8 -> 4']


def test_how_the_input_is_read_is_not_part_of_a_runs_identity():
  saved = defaults.base_config().to_dict()
  resumed = defaults.base_config()
  resumed.data.update(read_threads=32, prefetch_batches=6, max_undecodable_fraction=0.01, data_dir='/elsewhere')
  assert checkpoint_lib.config_differences(saved, resumed.to_dict()) == []
  resumed.data.sp_vocab_size = 16_000  # what the input is still is
  assert checkpoint_lib.config_differences(saved, resumed.to_dict()) == ['data.sp_vocab_size: 8000 -> 16000']


@pytest.mark.parametrize('saved, resumed', [('float32', 'bfloat16'), ('bfloat16', 'float32')])
def test_a_changed_moments_dtype_resumes_the_moments_cast(tmp_path, saved, resumed):
  """The checksums hold for the arrays as saved; the first moment then arrives in the dtype the run asks for now."""
  config = defaults.base_config()
  config.model.update(d_model=32, n_layers=1, n_heads=4, d_ff=64, max_len=32, dtype='float32', vocab_size=64)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  cfg = defaults.model_config(config, 64)

  def moments_state(dtype):
    config.train.opt_moments_dtype = dtype
    tx = optim.make_optimizer(config.train)
    return tx, train_step.init_state(cfg, tx, mesh, seed=0)

  tx, state = moments_state(saved)
  # Moments that bfloat16 cannot hold exactly (a fresh state's are zeros, the same bits in either dtype).
  state['opt_state'] = optax.tree_utils.tree_map_params(tx, lambda m: m + 1 / 3, state['opt_state'])
  expected = jax.tree.map(np.asarray, optax.tree_utils.tree_get(state['opt_state'], 'mu'))
  checkpoints = checkpoint_lib.Checkpointer(str(tmp_path / 'checkpoints'), keep=1, async_save=False)
  checkpoints.save(1, state, {}, config.to_dict())
  tx, _ = moments_state(resumed)
  step, restored, _ = checkpoints.restore_latest(train_step.abstract_state(cfg, tx, mesh))
  checkpoints.close()
  assert step == 1
  mu = optax.tree_utils.tree_get(restored['opt_state'], 'mu')
  assert {leaf.dtype for leaf in jax.tree.leaves(mu)} == {jnp.dtype(resumed)}
  jax.tree.map(lambda got, want: np.testing.assert_array_equal(np.asarray(got), want.astype(resumed)), mu, expected)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored['params']), jax.device_get(state['params']))
