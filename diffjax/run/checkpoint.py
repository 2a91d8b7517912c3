"""Orbax checkpoints of a run: train state, data-iterator position and config, saved together.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
no step directory behind, only a temporary one that the next start removes. Old steps are renamed out of the
way before they are deleted, so a run killed mid-deletion leaves no half-deleted step either. A step that is
present but unreadable (a truncated or deleted file, or an array whose checksum no longer matches) is moved aside
and the previous step is used instead.

Only the workdir's writer (the training run holding its lock) removes, moves or deletes anything here; a reader
(evaluate, sample, attention maps) opens the checkpoints read-only and sees only completed steps.
"""

import contextlib
import functools
import gc
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from diffjax import errors
from diffjax.errors import ConfigError, SaveError
from diffjax.run import defaults

ITEMS = ('state', 'data', 'config', 'checksums')
# Orbax renames steps beyond `keep` into this subdirectory (one atomic rename), where they are deleted.
DELETING = '.deleting'


class Checkpointer:
  """Saves every `every_steps` steps, keeps the last `keep`, restores the newest readable step.

  With `read_only`, it only restores: no clean-up, no moving aside, no saving.
  """

  def __init__(self, directory: str, *, keep: int, async_save: bool, read_only: bool = False):
    self.directory, self.read_only, self.failed = os.path.abspath(directory), read_only, False
    if read_only:
      return
    # Unfinished saves of a killed run are removed here, synchronously: Orbax's own clean-up runs in a thread
    # that a start failing right away (a config error) would leave running at exit.
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if ocp.path.step.TMP_DIR_SUFFIX in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('diffjax: unfinished checkpoints removed')
    self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True, todelete_subdir=DELETING))
    self._purge_deleted()

  @functools.cached_property
  def manager(self) -> ocp.CheckpointManager:
    """A reader's, made only when it restores a whole state: one stats every step it lists, and fails when the
    writer retires one in between. A writer makes its own at once."""
    return ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                 item_names=ITEMS)

  def steps(self) -> list[int]:
    """The steps saved, a save in flight included for a writer; the finished ones on disk for a reader."""
    return completed_steps(self.directory) if self.read_only else sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict):
    self._purge_deleted()
    with self._failing_save():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config),
          checksums=ocp.args.JsonSave(checksums(state))), force=True)

  def check(self):
    """Raises SaveError as soon as an asynchronous save has failed, so no more steps are trained after it."""
    if not self.manager.is_saving_in_progress():
      self.wait()  # returns at once, raising the failure of a save that has just ended

  def wait(self):
    if self.failed:  # Orbax's threads of a failed save may never finish
      return
    with self._failing_save():
      self.manager.wait_until_finished()
    self._purge_deleted()

  def close(self):
    if not self.failed:
      self.manager.close()

  @contextlib.contextmanager
  def _failing_save(self):
    try:
      yield
    except Exception as error:
      self.failed = True
      steps = completed_steps(self.directory)  # Orbax's own list may already hold the step that failed
      last_good = f'step {steps[-1]} in {self.directory}' if steps else 'none'
      raise SaveError(f'checkpoint: saving to {self.directory} failed ({first_line(error)}); last good checkpoint: '
                      f'{last_good}. Fix the cause (disk space, permissions) and run the same command to resume '
                      'from it') from error

  def _purge_deleted(self):
    """Deletes the steps Orbax retired; an entry it renames in meanwhile waits for the next call.

    A retired step that is a link is removed as a link (rmtree refuses links, and a relative one dangles once
    moved here): what it points to is not deleted through it.
    """
    folder = os.path.join(self.directory, DELETING)
    if not self.read_only and jax.process_index() == 0 and os.path.isdir(folder):
      for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isdir(path):
          with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        else:
          shutil.rmtree(path, ignore_errors=True)

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

    `check_config(step, saved_config)` may raise ConfigError to refuse a checkpoint of another run; see
    `_newest_readable` for the steps that cannot be read.
    """
    def read(step):
      check_config(step, self._read_config(step))
      metadata = state_metadata(os.path.join(self.directory, str(step), 'state'))
      self._check_shapes(step, metadata, abstract_state['params'])
      restored = self._restore(step, abstract_state, saved_dtypes(metadata))
      return restored['state'], restored['data']
    found = self._newest_readable(read)
    return None if found is None else (found[0], *found[1])

  def restore_params(self, target_params) -> tuple[int, dict] | None:
    """(step, parameters) of the newest checkpoint whose parameters alone read back intact, as `target_params` (a
    tree of ShapeDtypeStructs with shardings) describes them, or None when there is none at all."""
    def read(step):
      state_dir = os.path.join(self.directory, str(step), 'state')
      self._check_shapes(step, state_metadata(state_dir), target_params)
      return read_params(state_dir, target_params)
    return self._newest_readable(read)

  def _newest_readable(self, read: Callable[[int], Any]) -> tuple[int, Any] | None:
    """(step, read(step)) of the newest step that `read` reads, or None when there is no step at all.

    A step that `read` fails on (a ConfigError aside: a checkpoint of another run or model is no damage, and ends the
    search) cannot be trusted, and the one before it is read instead. The unreadable steps newer than the one read,
    those whose arrays no longer match their checksums included, are moved to `<dir>_corrupt/` (kept for inspection,
    out of Orbax's way; left in place when read-only), each with a one-line warning. A step that the writer retires
    while a reader reads it is passed over silently. Raises ConfigError, moving nothing, if steps exist but none can
    be read: a run never silently restarts from scratch.
    """
    steps, unreadable = self.steps(), []
    for step in reversed(steps):
      try:
        result = read(step)
      except ConfigError:
        raise
      except Exception as error:  # any failure to read means this step cannot be trusted
        if not self.read_only or os.path.isdir(os.path.join(self.directory, str(step))):
          unreadable.append((step, first_line(error)))
        continue
      drop_failed_reads()
      for bad_step, error in unreadable:
        if self.read_only:
          logging.warning('checkpoint step %d in %s is unreadable (%s); using step %d instead', bad_step,
                          self.directory, error, step)
        else:
          moved_to = self._move_aside(bad_step)
          logging.warning('checkpoint step %d in %s is unreadable (%s); resuming from step %d instead (step %d '
                          'moved to %s)', bad_step, self.directory, error, step, bad_step, moved_to)
      return step, result
    drop_failed_reads()
    if unreadable:
      bad_step, error = unreadable[0]
      raise ConfigError(f'checkpoint: none of steps {steps} in {self.directory} can be read (step {bad_step}: '
                        f'{error}); repair or remove them{"" if self.read_only else ", or use a fresh --workdir"}')
    # Every step listed was retired while it was read: the run has newer ones now.
    return self._newest_readable(read) if steps else None

  def _check_shapes(self, step: int, metadata: dict, abstract_params):
    """Raises ConfigError if the step's parameters have other shapes than the model's: not damage, so nothing is
    moved aside."""
    mismatch = shape_mismatch(param_shapes(metadata), abstract_params)
    if mismatch:
      remedy = (" than its run's config.json describes; the workdir mixes two runs" if self.read_only else
                ', so this model cannot continue that run; use a fresh --workdir')
      raise ConfigError(f'checkpoint: step {step} in {self.directory} holds parameters of another shape '
                        f'({mismatch}){remedy}')

  def _restore(self, step: int, abstract_state, saved: dict) -> dict:
    """The step's state and data position; raises ChecksumError if an array is not the one saved.

    Arrays are read in the dtype they were saved in (`saved_dtypes`), so that their checksums can be verified, and
    only then cast to the dtype the state asks for now (`train.opt_moments_dtype` may differ from the run's earlier
    setting).
    """
    as_saved = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.ShapeDtypeStruct(x.shape, saved.get(_path_names(path), x.dtype), sharding=x.sharding),
        abstract_state)
    items = {'state': ocp.args.StandardRestore(as_saved), 'data': ocp.args.JsonRestore()}
    # Steps saved before checksums were recorded have none to verify.
    has_checksums = os.path.isdir(os.path.join(self.directory, str(step), 'checksums'))
    if has_checksums:
      items['checksums'] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if has_checksums:
      verify(restored['state'], restored['checksums'])
    cast = lambda x, target: x if x.dtype == target.dtype else x.astype(target.dtype)
    return {**restored, 'state': jax.tree.map(cast, restored['state'], abstract_state)}

  def _move_aside(self, step: int) -> str:
    target = os.path.join(f'{self.directory}_corrupt', f'{step}-{int(time.time())}')
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'diffjax: step {step} moved aside')
    self.manager.reload()
    return target


class ChecksumError(ValueError):
  """An array read back from a checkpoint is not the one that was saved."""


@jax.jit
def _checksums(tree):
  """A uint32 checksum per array: the sum of its elements' bit patterns, each times an odd weight from its position.

  Computed where the arrays live (sharded arrays included), so it costs one pass over the state. Any change to a
  single element changes the sum, since an odd weight times a nonzero difference below 2^32 is nonzero mod 2^32.
  """
  def checksum(x):
    bits = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(
        x, jnp.dtype(f'uint{8 * x.dtype.itemsize}'))
    index, stride = jnp.zeros(x.shape, jnp.uint32), 1
    for axis in reversed(range(x.ndim)):
      index += jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
      stride *= x.shape[axis]
    return jnp.sum(bits.astype(jnp.uint32) * (2 * index + 1), dtype=jnp.uint32)
  return jax.tree.map(checksum, tree)


def checksums(tree) -> dict[str, int]:
  """{array path: checksum} of a pytree of arrays, as saved with each step."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(_checksums(tree)))[0]
  return {jax.tree_util.keystr(path): int(value) for path, value in leaves}


def verify(tree, saved: dict[str, int]):
  """Raises ChecksumError naming the first array whose checksum differs from the saved one."""
  for key, value in checksums(tree).items():
    if key in saved and saved[key] != value:
      raise ChecksumError(f'{key} does not match the checksum saved with it')


def completed_steps(directory: str) -> list[int]:
  """The steps in a checkpoints folder that a writer has finished, read from the folder alone.

  Orbax renames a step into place only once it is complete, so digit names are exactly the finished steps.
  """
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def drop_failed_reads():
  """A restore that fails part-way leaves Orbax's pending reads behind, and each prints a traceback when it is
  collected ('Exception ignored in ...', 'Event loop is closed'), thousands of lines: they are collected here,
  silently, once their failure has been reported."""
  hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook


# Orbax wraps a failed array read as 'Encountered error while reading array index: ... See full TensorStore details:
# <bound method ...spec of TensorStore({...})>' (the method, not its result); the error it chains says what failed.
_TENSORSTORE_DETAILS = re.compile(r'\s*See full TensorStore details:.*', re.DOTALL)


def first_line(error: Exception) -> str:
  """`Type: the message's first line`, for a one-line warning or error; Orbax's wrapping of TensorStore's errors
  gives way to the error it wraps."""
  text = str(error)
  if _TENSORSTORE_DETAILS.search(text):
    if error.__cause__ is not None:
      return first_line(error.__cause__)
    text = _TENSORSTORE_DETAILS.sub('', text)
  return f'{type(error).__name__}: {errors.first_line(text) if text.strip() else ""}'


def config_differences(saved: dict, current: dict) -> list[str]:
  """`key: saved -> current` for every run-identity key (`defaults.IDENTITY`) that differs between two config dicts.

  A key only one side has (added to or removed from diffjax since the run started) is not a difference.
  """
  def identity(config):
    flat = defaults.flatten({**config, 'model': defaults.resolved_model(config.get('model', {}))})
    return {key: value for key, value in flat.items() if key in defaults.IDENTITY}

  old, new = identity(saved), identity(current)
  return [f'{k}: {old[k]!r} -> {new[k]!r}' for k in sorted(set(old) & set(new)) if old[k] != new[k]]


def state_metadata(state_dir: str) -> dict:
  """The tree of a saved state with every array's shape and dtype but no values; raises if it cannot be read."""
  return ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))


def param_shapes(tree: dict) -> dict[str, tuple]:
  """Parameter path -> shape in a saved state's `state_metadata` tree."""
  if 'params' not in tree:
    raise ValueError('the saved state has no parameter metadata')
  return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree['params'])[0]}


def holds_parameters_only(state_dir: str) -> bool:
  """Whether a saved state is parameters alone (a model `diffjax import` wrote), not a train state to resume; False
  when its metadata cannot be read, which restoring it then reports."""
  try:
    tree = state_metadata(state_dir)
  except Exception:  # a damaged step: restore_latest reports it and falls back
    return False
  return 'params' in tree and 'opt_state' not in tree


def _path_names(path) -> tuple[str, ...]:
  """A pytree path as plain names, alike for the state's named tuples and the dicts of its saved metadata."""
  return tuple(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)


def saved_dtypes(tree: dict) -> dict[tuple[str, ...], jnp.dtype]:
  """Array path (as `_path_names`) -> dtype in a saved state's `state_metadata` tree."""
  return {_path_names(p): x.dtype for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, 'dtype')}


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
    steps = completed_steps(candidate)
    if steps:
      path = os.path.join(candidate, str(steps[-1]))
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
    saved_shapes = param_shapes(state_metadata(state_dir))
  except Exception as error:  # a missing or damaged metadata file
    raise ConfigError(f'checkpoint.init_from: cannot read the parameters of {state_dir} ({first_line(error)}); '
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
  try:
    return read_params(state_dir, target)
  except ChecksumError as error:
    raise ConfigError(f'checkpoint.init_from: {state_dir} is damaged ({error}); give another step or run') from None


def read_params(state_dir: str, target_params):
  """The `params` subtree of a saved train state, read alone and checked against the checksums saved with it (if
  any)."""
  params = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item={'params': target_params}, partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args({'params': target_params})))['params']
  checksums_dir = epath.Path(state_dir).parent / 'checksums'
  if checksums_dir.exists():  # steps saved before checksums were recorded have none
    verify({'params': params}, ocp.JsonCheckpointHandler().restore(checksums_dir))
  return params
