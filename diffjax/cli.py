"""What the command-line entry points share: one-line errors, flag parsing, the help, and writing their output."""

import contextlib
import difflib
import itertools
import json
import logging as std_logging
import os
import re
import sys
import tempfile
import threading
import traceback
import warnings

import ml_collections
import tensorflow_datasets as tfds
from absl import flags, logging

from diffjax.errors import ConfigError, NonFiniteError, SaveError
from diffjax.infer import load
from diffjax.run import defaults
from diffjax.train import workdir

DEBUG = flags.DEFINE_bool('debug', False, 'Show full tracebacks instead of one-line errors.')


def _fail(message: str, show_traceback: bool):
  """Ends the program: the traceback of the error being handled if asked, then one `error:` line, exit 1."""
  _print_error(message, show_traceback)
  sys.exit(1)


def _print_error(message: str, show_traceback: bool):
  if show_traceback:
    traceback.print_exc()
  sys.stdout.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)


def report_errors(main):
  """Wraps an absl main: a ConfigError (or a stop for non-finite values) becomes one line on stderr, exit 1."""
  def wrapped(argv):
    if not DEBUG.value:
      logging.set_verbosity(logging.WARNING)  # Orbax and TFDS narrate every file at INFO
      # ... and some of it at WARNING (TFDS: 'Using custom data configuration'), and a failed save with its
      # traceback at ERROR, which the run reports in one line; they log through absl's logger, diffjax through
      # the standard one, so diffjax's warnings still show.
      std_logging.getLogger('absl').setLevel(std_logging.CRITICAL)
      # Exceptions that Python or asyncio can only print (raised in a destructor, a coroutine or task nobody
      # awaits, a background thread) come from the threads of a failed read or save, which the main thread
      # reports in its own line; printed, they put tracebacks before or after that line (--debug shows them).
      sys.unraisablehook = lambda unraisable: None
      std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)
      # ... and the reads a failed restore left pending are coroutines never awaited, which Python reports as a
      # warning when it collects them, at a moment that depends on the garbage collector.
      warnings.filterwarnings('ignore', message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
      threading.excepthook = _one_line_for_threads
    else:
      sys.unraisablehook = _without_closed_loops(sys.unraisablehook)
    if not sys.stderr.isatty():  # in a log file, TFDS's progress bars while preparing data are only noise
      tfds.disable_progress_bar()
    try:
      return main(argv)
    except SaveError as error:
      # Orbax's threads of the failed save may wait forever, and Python waits for them before exiting.
      workdir.release()
      _print_error(str(error), DEBUG.value)
      os._exit(1)
    except (ConfigError, NonFiniteError) as error:
      _fail(str(error), DEBUG.value)
  return wrapped


def _one_line_for_threads(args):
  if args.exc_type is not SystemExit:
    std_logging.getLogger('diffjax').warning('thread %s stopped: %s: %s (--debug shows the traceback)',
                                             args.thread.name if args.thread else '?', args.exc_type.__name__,
                                             str(args.exc_value).strip().split('\n')[0][:200])


def _without_closed_loops(unraisablehook):
  """After a failed save or restore, each array read or written finishes on an event loop of Orbax's that has
  closed, and reports it as unraisable: thousands of 'Event loop is closed' tracebacks that add nothing."""
  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed'):
      unraisablehook(unraisable)
  return hook


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (pass as `app.run(main, flags_parser=cli.parse_flags)`), failing in one line.

  absl prints two lines for a bad value, and ml_collections raises a traceback for an override of a config key
  that does not exist or a config file that does not run.
  """
  debug = any(re.fullmatch(r'--debug(=(true|True|1))?', arg) for arg in argv)
  if any(arg in ('-h', '-?', '--help', '--helpshort') for arg in argv[1:]):
    print(_help())
    sys.exit(0)  # absl exits 1 after its help, which scripts and CI take for a failure
  problem = _config_flag_problem(argv[1:])
  if problem:
    _fail(problem, debug)
  try:
    remaining = flags.FLAGS(argv)
  except Exception as error:  # whatever the parser raises, the cause is on the command line or in the config file
    _fail(_flag_error(error), debug)
  if len(remaining) > 1:  # no command takes positional arguments: a stray word is a mistake, never to be ignored
    _fail(f'{remaining[1]}: unexpected argument; this command takes --name=value flags only (quote a value that '
          "holds spaces, e.g. --prompt='def main'); see --helpfull for the flags", debug)
  return remaining


def _config_file_flags() -> set[str]:
  return {name for name in flags.FLAGS if hasattr(type(flags.FLAGS[name]), 'config_filename')}


def _config_flag_problem(args: list[str]) -> str | None:
  """What the command line gets wrong about a run config, checked against the schema before ml_collections sees it
  (which fails on a missing file or an unknown key with a traceback): a `--config=PATH` that is no file, or a
  `--config.KEY=VALUE` whose KEY the run config does not have."""
  names = _config_file_flags()
  for arg in itertools.takewhile(lambda arg: arg != '--', args):
    flag, has_value, value = arg.lstrip('-').partition('=')
    name, _, key = flag.partition('.')
    if key and name not in names and name.startswith('no'):  # --noconfig.KEY sets a bool key to False
      name = name[2:]
    if not arg.startswith('-') or name not in names:
      continue
    path = value.split(':', 1)[0]  # --config=FILE:ARGUMENT passes ARGUMENT to the file's get_config
    if not key and has_value and not os.path.isfile(path):
      return f'--{name}: cannot load the config file (no file {path!r}); give one such as configs/tiny.py'
    if key and key not in defaults.KEYS:
      return _unknown_key(key)
  return None


def _unknown_key(key: str, where: str = '') -> str:
  """`KEY: unknown config key (did you mean ...?)`, suggesting a section where KEY's is none of the run config's,
  else a key of its section (of any section for a KEY without one: a config file's error names no section)."""
  split = [name.rpartition('.') for name in defaults.KEYS]
  section, _, leaf = key.rpartition('.')
  sections = {s for s, _, _ in split}
  wrong, candidates = ((section, sections) if section and section not in sections else
                       (leaf, [name for s, _, name in split if s == section or not section]))
  close = difflib.get_close_matches(wrong, candidates, 1, 0.75)
  suggestion = f' (did you mean {close[0]}?)' if close else ''
  return f'{key}: unknown config key{where}{suggestion}; see the config keys in README.md'


def _help() -> str:
  """What the running command does, its own flags, and, for one that takes a run config, every config key with its
  default and what it does."""
  main = sys.modules['__main__']
  parts = [(main.__doc__ or '').strip(), flags.FLAGS.main_module_help().strip(), flags.FLAGS.module_help(__name__)]
  if 'config' in _config_file_flags():
    width = max(map(len, defaults.KEYS))
    parts.append('config keys, set as --config.KEY=VALUE (defaults of diffjax/run/defaults.py; a config file may '
                 'change them):\n' + '\n'.join(f'  {name:<{width}}  {key.default!r}\n      {key.doc}'
                                                for name, key in defaults.KEYS.items()))
  return '\n\n'.join(part for part in parts if part)


def _flag_error(error: Exception) -> str:
  text = str(error)
  # A config file that sets a key the locked base config lacks: ml_collections names the key in its message only.
  locked = re.search(r'Key "(\w+)" does not exist and cannot be added since the config is locked', text)
  if locked:
    return _unknown_key(locked[1], ' set in the config file')
  # absl's message starts with the flag; a config file that raised ends with the exception.
  lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
  summary = lines[0] + (f' ... {lines[-1]}' if len(lines) > 1 else '')
  if isinstance(error, flags.Error):
    return f'{summary}; see --helpfull for the flags'
  return f'the config file failed to load: {type(error).__name__}: {summary}; fix it (--debug shows where)'


def config_value(config_flag) -> ml_collections.ConfigDict:
  """The value of a DEFINE_config_file flag; a file that raised OSError as it loaded fails here, as a ConfigError."""
  config = config_flag.value
  try:
    config.keys()  # ml_collections defers such a file's error to the first use, chaining the error it had
  except OSError as error:
    reason = [line.strip() for line in str(error.__cause__ or error).splitlines() if line.strip()][-1]
    raise ConfigError(f'--{config_flag.name}: cannot load the config file ({reason}); give one such as '
                      'configs/tiny.py') from None
  return config


# -- what the commands write ------------------------------------------------------------------------------------

def output_folder(folder: str, flag: str) -> str:
  """`folder`, made if missing and found writable, so a command refuses it before its work rather than after."""
  with writing(folder, flag):
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      pass
  return folder


@contextlib.contextmanager
def writing(path: str, flag: str):
  """Turns a failure to write `path` (a read-only folder, a full disk, a folder in the way) into one line."""
  try:
    yield
  except OSError as error:
    raise ConfigError(f'{flag}: cannot write {path} ({error.strerror or error}); give a folder you can write to '
                      f'with {flag}=DIR') from None


def required(flag_holder, what: str):
  """The flag's value, or a ConfigError saying what to give where it is unset or empty."""
  if not flag_holder.value:
    raise ConfigError(f'--{flag_holder.name} is required: {what}')
  return flag_holder.value


def compare_runs(workdirs: list[str], out: str, stem: str, report: dict, measure, plot, tables):
  """What the commands that compare runs share: each run's `measure(workdir, cfg, params, tokenizer)` (a dict)
  joins report['runs'] beside the run's name, then OUT/STEM.json and, through `plot(report, path)`, OUT/STEM.png are
  written and `tables(report)` printed with their paths."""
  for workdir in map(os.path.abspath, workdirs):
    cfg, params, tokenizer, step = load.open_run(workdir)
    report['runs'].append({'workdir': workdir, 'variant': cfg.variant, 'step': step,
                           'label': f'{os.path.basename(workdir)} ({cfg.variant}, step {step})',
                           **measure(workdir, cfg, params, tokenizer)})
  json_path, png_path = os.path.join(out, f'{stem}.json'), os.path.join(out, f'{stem}.png')
  with writing(json_path, '--out'), open(json_path, 'w') as f:
    json.dump(report, f, indent=2)
  with writing(png_path, '--out'):
    plot(report, png_path)
  print(tables(report))
  print(f'\n{json_path}\n{png_path}')
