"""Orbax checkpoints of a run: train state, data-iterator position and config, saved together.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
no step directory behind, only a temporary one that the next start removes. Old steps are renamed out of the
way before they are deleted, so a run killed mid-deletion leaves no half-deleted step either. A step that is
present but unreadable (a truncated or deleted file) is moved aside and the previous step is used instead.
"""

import logging
import os
import shutil
import time
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from diffjax import defaults
from diffjax.errors import ConfigError

ITEMS = ('state', 'data', 'config')
# Keys whose change makes a workdir's checkpoints belong to another run, except those that only say how or where
# the same model and data are computed and read.
RUN_IDENTITY = ('model', 'data', 'train.seq_len')
NOT_IDENTITY = ('model.attention_impl', 'model.remat', 'data.data_dir', 'data.read_threads', 'data.prefetch_batches')
# Orbax renames steps beyond `keep` into this subdirectory (one atomic rename), where they are deleted.
DELETING = '.deleting'


class Checkpointer:
  """Saves every `every_steps` steps, keeps the last `keep`, restores the newest readable step."""

  def __init__(self, directory: str, *, keep: int, async_save: bool):
    self.directory = os.path.abspath(directory)
    # Unfinished saves of a killed run are removed here, synchronously: Orbax's own clean-up runs in a thread
    # that a start failing right away (a config error) would leave running at exit.
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if ocp.path.step.TMP_DIR_SUFFIX in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('diffjax: unfinished checkpoints removed')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           todelete_subdir=DELETING)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._purge_deleted()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict):
    self._purge_deleted()
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)),
        force=True)

  def wait(self):
    self.manager.wait_until_finished()
    self._purge_deleted()

  def close(self):
    self.manager.close()

  def _purge_deleted(self):
    """Deletes the steps Orbax retired; an entry it renames in meanwhile waits for the next call."""
    folder = os.path.join(self.directory, DELETING)
    if jax.process_index() == 0 and os.path.isdir(folder):
      for name in os.listdir(folder):
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)

  def latest_config(self) -> tuple[int, dict] | None:
    """(step, config) of the newest step whose config can be read; damaged steps are left to `restore_latest`."""
    for step in reversed(self.steps()):
      try:
        return step, self._read_config(step)
      except Exception:  # a damaged step: restore_latest reports it and falls back
        continue
    return None

  def _read_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def restore_latest(self, abstract_state, check_config: Callable[[int, dict], None] = lambda step, config: None):
    """(step, state, data_state) of the newest readable checkpoint, or None when there is none at all.

    `check_config(step, saved_config)` may raise ConfigError to refuse a checkpoint of another run. Unreadable
    steps newer than the one restored are moved to `<dir>_corrupt/` (kept for inspection, out of Orbax's way),
    each with a one-line warning. Raises ConfigError, moving nothing, if steps exist but none can be read: a run
    never silently restarts from scratch.
    """
    steps, unreadable = self.steps(), []
    for step in reversed(steps):
      try:
        config = self._read_config(step)
      except Exception as error:  # any failure to read means this step cannot be trusted
        unreadable.append((step, error))
        continue
      check_config(step, config)
      state_dir = os.path.join(self.directory, str(step), 'state')
      try:
        saved_shapes = _param_shapes(state_dir)
      except Exception as error:
        unreadable.append((step, error))
        continue
      mismatch = shape_mismatch(saved_shapes, abstract_state['params'])
      if mismatch:  # not damage: this model cannot hold that state, so nothing is moved aside
        raise ConfigError(f'checkpoint: step {step} in {self.directory} holds parameters of another shape '
                          f'({mismatch}), so this model cannot continue that run; use a fresh --workdir')
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
      except Exception as error:
        unreadable.append((step, error))
        continue
      for bad_step, error in unreadable:
        moved_to = self._move_aside(bad_step)
        logging.warning('checkpoint step %d in %s is unreadable (%s); resuming from step %d instead (step %d moved '
                        'to %s)', bad_step, self.directory, _first_line(error), step, bad_step, moved_to)
      return step, restored['state'], restored['data']
    if steps:
      bad_step, error = unreadable[0]
      raise ConfigError(f'checkpoint: none of steps {steps} in {self.directory} can be read (step {bad_step}: '
                        f'{_first_line(error)}); repair or remove them, or use a fresh --workdir')
    return None

  def _move_aside(self, step: int) -> str:
    target = os.path.join(f'{self.directory}_corrupt', f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'diffjax: step {step} moved aside')
    self.manager.reload()
    return target


def _first_line(error: Exception) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:200] if lines else ""}'


def config_differences(saved: dict, current: dict) -> list[str]:
  """`key: saved -> current` for every run-identity key that differs between two config dicts.

  A key only one side has (added to or removed from diffjax since the run started) is not a difference.
  """
  old, new = defaults.flatten(saved), defaults.flatten(current)
  keys = sorted(k for k in set(old) & set(new)
                if any(k == p or k.startswith(p + '.') for p in RUN_IDENTITY) and k not in NOT_IDENTITY)
  return [f'{k}: {old[k]!r} -> {new[k]!r}' for k in keys if old[k] != new[k]]


def _param_shapes(state_dir: str) -> dict[str, tuple]:
  """Parameter path -> shape in a saved train state, from its metadata; raises if that cannot be read."""
  tree = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
  if 'params' not in tree:
    raise ValueError(f'{state_dir} has no readable parameter metadata')
  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree['params'])[0]}


def shape_mismatch(saved_shapes: dict[str, tuple], abstract_params) -> str | None:
  """'parameter P has shape S saved but the model needs M' for the first difference, or None."""
  expected = {jax.tree_util.keystr(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  for key in sorted(set(expected) | set(saved_shapes)):
    if expected.get(key) != saved_shapes.get(key):
      return f'parameter {key} has shape {saved_shapes.get(key)} saved but the model needs {expected.get(key)}'
  return None


def params_checkpoint(path: str) -> str:
  """The `state` folder of the newest step under a workdir, a checkpoints/ folder or one step folder."""
  path = os.path.abspath(path)
  for candidate in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(candidate) and any(name.isdigit() for name in os.listdir(candidate)):
      step = max(int(name) for name in os.listdir(candidate) if name.isdigit())
      path = os.path.join(candidate, str(step))
      break
  state_dir = os.path.join(path, 'state')
  if not os.path.isdir(state_dir):
    raise ConfigError(f'checkpoint.init_from: {path} holds no diffjax checkpoint; give a workdir, its '
                      'checkpoints/ folder or one step folder')
  return state_dir


def check_init_from(path: str, abstract_params) -> str:
  """The state folder `path` names, after checking (from metadata only) that its parameters fit the model."""
  state_dir = params_checkpoint(path)
  try:
    saved_shapes = _param_shapes(state_dir)
  except Exception as error:  # a missing or damaged metadata file
    raise ConfigError(f'checkpoint.init_from: cannot read the parameters of {state_dir} ({_first_line(error)}); '
                      'give a complete diffjax checkpoint') from None
  mismatch = shape_mismatch(saved_shapes, abstract_params)
  if mismatch:
    raise ConfigError(f'checkpoint.init_from: {mismatch} in {state_dir}; start from a checkpoint of the same '
                      'model config')
  return state_dir


def load_params(path: str, abstract_params, param_shardings):
  """Parameters of another run's checkpoint (a step directory, a checkpoint directory or a workdir)."""
  state_dir = check_init_from(path, abstract_params)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params,
                        param_shardings)
  return _restore_params_only(state_dir, target)


def _restore_params_only(state_dir: str, target_params):
  """Reads just the `params` subtree of a saved train state."""
  checkpointer = ocp.PyTreeCheckpointer()
  restore_args = ocp.checkpoint_utils.construct_restore_args({'params': target_params})
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item={'params': target_params}, restore_args=restore_args, partial_restore=True))
  return restored['params']
