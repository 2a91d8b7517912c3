"""Trains a model: `python -m diffjax.train --config=configs/tiny.py --workdir=DIR [--config.KEY=VALUE ...]`.

Running the same command again resumes from the newest checkpoint in DIR.

Several processes (`--multihost`): on TPU VMs and under SLURM JAX finds its peers by itself. Elsewhere (several
processes on one machine, or hosts without a cluster manager) start one process per host with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (I = 0..N-1; HOST is process 0's machine);
the environment variables JAX_COORDINATOR_ADDRESS, DIFFJAX_NUM_PROCESSES and DIFFJAX_PROCESS_ID do the same.
"""

import os
import signal
import time

LAUNCHED = time.perf_counter()  # before the heavy imports below: `startup_s` counts from here


def _stop_while_starting(signum, frame):
  """SIGTERM or Ctrl-C during the imports: nothing is open or written yet, so the process just ends, in one line
  rather than a KeyboardInterrupt traceback or a silent death. `main` puts its own watcher in place of this."""
  del frame
  os.write(1, f'stopped on request ({signal.Signals(signum).name}); there was nothing to save\n'.encode())
  os._exit(0)


for _signal in (signal.SIGTERM, signal.SIGINT):
  signal.signal(_signal, _stop_while_starting)

import glob  # noqa: E402
import shutil  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffjax import cli  # noqa: E402
from diffjax.data import prepare  # noqa: E402
from diffjax.errors import ConfigError  # noqa: E402
from diffjax.infer import generate  # noqa: E402
from diffjax.train import loop, metrics, preflight  # noqa: E402
from diffjax.train import workdir as workdir_lib  # noqa: E402

CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/tiny.py.', lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the tokenizer.')
MULTIHOST = flags.DEFINE_bool('multihost', False, 'One process per host of a TPU pod slice or GPU cluster: join '
                              'the others (JAX finds them on TPU VMs and under SLURM; elsewhere give '
                              '--coordinator_address, --num_processes and --process_id).')
COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'With --multihost: HOST:PORT of process 0, where '
                                  'the others join (default: $JAX_COORDINATOR_ADDRESS, else found by JAX on TPU VMs '
                                  'and under SLURM).')
NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'With --multihost: how many processes take part '
                                     '(default: $DIFFJAX_NUM_PROCESSES, else found by JAX).')
PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --multihost: this process\'s index, 0..num_processes-1 '
                                  '(default: $DIFFJAX_PROCESS_ID, else found by JAX).')


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f'${name}: must be an integer, got {value!r}') from None


def join_processes():
  """jax.distributed.initialize with the coordinator given by flags or environment, if any."""
  address = COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS') or None
  count = NUM_PROCESSES.value if NUM_PROCESSES.value is not None else _int_env('DIFFJAX_NUM_PROCESSES')
  index = PROCESS_ID.value if PROCESS_ID.value is not None else _int_env('DIFFJAX_PROCESS_ID')
  given = {'--coordinator_address': address, '--num_processes': count, '--process_id': index}
  if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
    missing = ', '.join(k for k, v in given.items() if v is None)
    raise ConfigError(f'--multihost: {missing} unset; outside TPU VMs and SLURM give all three of '
                      '--coordinator_address, --num_processes and --process_id (or none, to let JAX find them)')
  if count is not None and not 0 <= index < count:
    raise ConfigError(f'--process_id: must be between 0 and --num_processes - 1 = {count - 1}, got {index}')
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
  except ValueError as error:  # nothing given and no TPU VM or SLURM job to find the others from
    if address is not None:
      raise
    raise ConfigError(f'--multihost: JAX found no cluster to join ({error}); outside TPU VMs and SLURM give '
                      '--coordinator_address=HOST:PORT --num_processes=N --process_id=I') from None


def remove_partial_data(data_cfg):
  """An exit on a signal skips the clean-up of data preparation, which writes FOLDER.partial-PID (diffjax.data.prepare)
  and renames it when complete: no run ever reads that folder, but it would take its space for good."""
  for folder in glob.glob(os.path.join(prepare.data_root(data_cfg), '*', f'*.partial-{os.getpid()}')):
    shutil.rmtree(folder, ignore_errors=True)


@cli.report_errors
def main(argv):
  del argv
  os.environ.update(preflight.memory_env(1))  # before JAX first reaches the accelerator, which reads it then
  if MULTIHOST.value:  # signals stay as JAX's preemption service (SIGTERM) and Python (Ctrl-C) set them up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
  # First of all: a signal at any moment from here on ends the run within seconds, or saves it once it trains.
  watcher = loop.PreemptionWatcher(signals=() if MULTIHOST.value else (signal.SIGTERM, signal.SIGINT),
                                      saving=False)
  try:
    train(watcher)
  finally:
    watcher.close()


def train(watcher: loop.PreemptionWatcher):
  if CONFIG.value is None or not WORKDIR.value:  # an empty --workdir would mean the current directory
    raise ConfigError('--config and --workdir are required, e.g. --config=configs/tiny.py --workdir=/tmp/run')
  workdir_lib.check_local(WORKDIR.value, '--workdir')
  config = cli.config_value(CONFIG)
  workdir_lib.check_local(config.data.data_dir, 'data.data_dir')
  if not config.data.data_dir:
    workdir_lib.check_local(os.environ.get('DIFFJAX_DATA_DIR'), '$DIFFJAX_DATA_DIR (data.data_dir)')
  workdir = os.path.abspath(WORKDIR.value)
  if MULTIHOST.value:
    join_processes()
  elif COORDINATOR.value or NUM_PROCESSES.value is not None or PROCESS_ID.value is not None:
    raise ConfigError('--coordinator_address, --num_processes and --process_id need --multihost')
  watcher.cleanups.append(lambda: remove_partial_data(config.data))
  run = loop.Run(config, workdir, launched=LAUNCHED)
  summary = run.train(watcher)
  if summary['preempted']:  # the grace period after SIGTERM is short: no sample, no plots
    return
  text = sample(run, config.log.sample_prompt, config.log.sample_tokens, config.log.sample_temperature)
  curves = metrics.plot_curves(workdir)
  loop.say(f'\nsample after step {summary["step"]}:\n{text}\n')
  loop.say(f'checkpoints: {run.checkpoints.directory}\nmetrics: {os.path.join(workdir, "metrics.jsonl")}'
           + (f'\ncurves: {curves}' if curves else ''))


def sample(run: loop.Run, prompt: str, num_tokens: int, temperature: float) -> str:
  """The prompt and its continuation by the trained model, up to `num_tokens` tokens or EOS."""
  tokenizer = run.pipeline.tokenizer
  # The sample closes a finished run, so it fits itself into max_len rather than failing after the training.
  ids = (tokenizer.encode(prompt) or [tokenizer.eos_id])[-(run.cfg.max_len - 1):]
  result = generate.generate(run.cfg, run.state['params'], [ids], min(num_tokens, run.cfg.max_len - len(ids)),
                             temperature=temperature, seed=run.config.seed, eos_id=tokenizer.eos_id)
  return prompt + tokenizer.decode(result.tokens[0])


def run():
  app.run(main, flags_parser=cli.parse_flags)


if __name__ == '__main__':
  run()
