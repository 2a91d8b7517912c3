"""Orbax checkpoints of a run: train state, data-iterator position and config, saved together.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save leaves
no step directory behind, only a temporary one that the next start cleans up. A step that is present but
unreadable (a truncated or deleted file) is moved aside and the previous step is used instead.
"""

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

from diffjax.errors import ConfigError

ITEMS = ('state', 'data', 'config')
# Keys whose change makes a workdir's checkpoints belong to another run.
RUN_IDENTITY = ('model', 'data', 'train.seq_len')


class Checkpointer:
  """Saves every `every_steps` steps, keeps the last `keep`, restores the newest readable step."""

  def __init__(self, directory: str, *, keep: int, async_save: bool):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict, config: dict):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)),
        force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

  def saved_config(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def restore_latest(self, abstract_state):
    """(step, state, data_state) of the newest readable checkpoint, or None when there is none at all.

    An unreadable step is moved to `<dir>_corrupt/` (kept for inspection, out of Orbax's way) with a warning.
    Raises ConfigError if steps exist but none can be read: a run never silently restarts from scratch.
    """
    steps = self.steps()
    for position in range(len(steps) - 1, -1, -1):
      step = steps[position]
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, restored['state'], restored['data']
      except Exception as error:  # any failure to read means this step cannot be trusted
        fallback = steps[position - 1] if position else None
        self._move_aside(step)
        logging.warning('checkpoint step %d in %s is unreadable (%s: %s); falling back to %s', step, self.directory,
                        type(error).__name__, str(error).splitlines()[0][:200] if str(error) else '',
                        f'step {fallback}' if fallback is not None else 'nothing')
    if steps:
      raise ConfigError(f'checkpoint: none of steps {steps} in {self.directory} can be read (moved to '
                        f'{self.directory}_corrupt); restore them or use a fresh --workdir')
    return None

  def _move_aside(self, step: int):
    if jax.process_index() == 0:
      target = os.path.join(f'{self.directory}_corrupt', f'{step}-{int(time.time())}')
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    self.manager.reload()


def config_differences(saved: dict, current: dict) -> list[str]:
  """`key: saved -> current` for every run-identity key that differs between two config dicts."""
  def flatten(tree, prefix=''):
    if isinstance(tree, dict):
      return {k: v for key, sub in tree.items() for k, v in flatten(sub, f'{prefix}{key}.').items()}
    return {prefix[:-1]: tree}
  old, new = flatten(saved), flatten(current)
  keys = sorted(k for k in set(old) | set(new) if any(k == p or k.startswith(p + '.') for p in RUN_IDENTITY))
  return [f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys if old.get(k) != new.get(k)]


def load_params(path: str, abstract_params, param_shardings):
  """Parameters of another run's checkpoint (a step directory, a checkpoint directory or a workdir)."""
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
  checkpointer = ocp.StandardCheckpointer()
  saved = checkpointer.metadata(state_dir)
  saved_tree = getattr(saved, 'item_metadata', saved)
  saved_params = saved_tree['params'] if 'params' in saved_tree else None
  if saved_params is None:
    raise ConfigError(f'checkpoint.init_from: {state_dir} has no parameters; give a diffjax checkpoint')
  expected = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  found = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(saved_params)[0]}
  for key in sorted(set(expected) | set(found)):
    if tuple(expected.get(key, ())) != found.get(key, ()):
      raise ConfigError(f'checkpoint.init_from: parameter {key} has shape {found.get(key)} in {path} but this '
                        f'model needs {expected.get(key)}; start from a checkpoint of the same model config')
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
