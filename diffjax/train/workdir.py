"""What keeps a workdir safe to share: one writer at a time, and nothing written or deleted outside it.

The lock is the file WORKDIR/lock, naming its holder (pid, host, start time). It is created complete under its
final name by one hard link, which is atomic on local disks and NFS alike, and the holder keeps a POSIX (fcntl)
lock on it, which NFS forwards to the server: a lock file that nobody holds was left by a process that died, and
is taken over. Where the file system has no fcntl locks, a holder on this host is looked up by its pid; one on
another host is assumed alive.
"""

import atexit
import fcntl
import json
import logging
import os
import re
import socket
import time

import jax

from diffjax.errors import ConfigError

LOCK = 'lock'
# What a run writes or deletes in its workdir: name -> whether it is a folder.
ENTRIES = {'config.json': False, 'config.json.partial': False, 'metrics.jsonl': False, 'curves.png': False,
           LOCK: False, 'tensorboard': True, 'checkpoints': True, 'checkpoints/.deleting': True,
           'checkpoints_corrupt': True, 'profile': True, 'wandb': True, 'wandb_id': False}

_held = {}  # lock path -> the open lock file, kept for the life of the process
# A URL scheme (gs://, s3://, hdfs://, file://...): a path that os.path would silently turn into a local folder.
_SCHEME = re.compile(r'^[A-Za-z][A-Za-z0-9+.-]*://')


def check_local(path: str | None, key: str):
  """Raises ConfigError (one line) if `path` is a URL such as gs://bucket/run rather than a local or mounted path.

  The workdir lock, the checkpoint clean-up and the prepared data rely on a POSIX file system, which object stores
  are not; a bucket works through a mount (gcsfuse, s3fs, Filestore/NFS) that every host sees at the same path.
  """
  if path and _SCHEME.match(str(path)):
    scheme = str(path).split('://', 1)[0]
    raise ConfigError(f'{key}: {path} is a {scheme}:// URL, but diffjax reads and writes only local or mounted '
                      f'paths; mount the bucket (e.g. gcsfuse for gs://, s3fs or mountpoint-s3 for s3://, on every '
                      f'host at the same path) and give that path, e.g. /mnt/{scheme}/{str(path).split("://", 1)[1]}')


def claim(workdir: str):
  """Makes this process the workdir's only writer until it exits, after checking the entries it will write.

  Raises ConfigError (one line) if another live process holds the workdir or an entry is of the wrong type or a
  link that leads out of the workdir. Only process 0 of a multi-host run writes the workdir's files.
  """
  if jax.process_index() != 0:
    return
  check_entries(workdir)
  path = os.path.join(os.path.realpath(workdir), LOCK)
  if path in _held:
    return
  me = {'pid': os.getpid(), 'host': socket.gethostname(), 'since': time.strftime('%Y-%m-%d %H:%M:%S %Z')}
  while True:
    try:
      _held[path] = _create(path, me)
      return
    except FileExistsError:
      pass
    try:
      f = open(path, 'r+')
    except FileNotFoundError:  # its holder released it meanwhile
      continue
    holder = _read(f)
    locked = _try_lock(f)
    if locked is False or (locked is None and _alive(holder)):
      f.close()
      raise ConfigError(f'--workdir: {workdir} is in use by another training run (pid {holder.get("pid")} on '
                        f'{holder.get("host")}, since {holder.get("since")}); wait for it to end, or use another '
                        '--workdir')
    if not _same_file(f, path):  # unlocked because its holder was removing it: try again
      f.close()
      continue
    logging.warning('workdir %s was locked by pid %s on %s (since %s), which is no longer running; taking the lock '
                    'over', workdir, holder.get('pid'), holder.get('host'), holder.get('since'))
    f.seek(0)
    f.truncate()
    _write(f, me)
    _held[path] = f
    return


def check_no_link_out(workdir: str, path: str, kind: str = 'file'):
  """Raises ConfigError if `path`, inside `workdir`, is a link that leads out of it."""
  root, target = os.path.realpath(workdir), os.path.realpath(path)
  if os.path.islink(path) and os.path.commonpath([root, target]) != root:
    raise ConfigError(f'--workdir: {path} is a link to {target}, outside the workdir; diffjax never writes or '
                      f'deletes through such links, so replace it with a {kind} of its own')


def check_entries(workdir: str):
  """Raises ConfigError for an entry a run writes that is of the wrong type or a link out of the workdir."""
  for name, is_folder in ENTRIES.items():
    path = os.path.join(workdir, name)
    check_no_link_out(workdir, path, _kind(is_folder))
    if os.path.lexists(path) and os.path.isdir(path) != is_folder:
      raise ConfigError(f'--workdir: {path} is a {_kind(not is_folder)}, but a run keeps a {_kind(is_folder)} '
                        'there; move it away or use a fresh --workdir')


def release():
  """Gives up every workdir this process holds (at exit, or before leaving without Python's clean-up)."""
  for path, f in list(_held.items()):
    if _same_file(f, path):
      os.remove(path)
    f.close()
    del _held[path]


atexit.register(release)


def _kind(is_folder: bool) -> str:
  return 'folder' if is_folder else 'file'


def _create(path: str, me: dict):
  """The new lock file, open and locked, or FileExistsError: it appears under its name only once complete."""
  tmp = f'{path}.{me["host"]}.{me["pid"]}'
  f = open(tmp, 'w')
  try:
    _try_lock(f)
    _write(f, me)
    os.link(tmp, path)
  except BaseException:
    f.close()
    raise
  finally:
    os.remove(tmp)
  return f


def _try_lock(f) -> bool | None:
  """True if this process now holds the fcntl lock, False if another does, None if the file system has none."""
  try:
    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except (BlockingIOError, PermissionError):
    return False
  except OSError:  # ENOLCK: NFS without its lock service
    return None


def _alive(holder: dict) -> bool:
  if holder.get('host') != socket.gethostname():
    return True  # without fcntl locks, a process on another host cannot be checked
  try:
    os.kill(int(holder['pid']), 0)
    return True
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, ValueError, TypeError):  # another user's process, or a record without a pid
    return True


def _read(f) -> dict:
  try:
    holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except ValueError:  # empty or torn: written by a process that died while creating it
    return {}


def _write(f, me: dict):
  json.dump(me, f)
  f.flush()
  os.fsync(f.fileno())


def _same_file(f, path: str) -> bool:
  try:
    return os.path.samestat(os.fstat(f.fileno()), os.stat(path))
  except FileNotFoundError:
    return False
