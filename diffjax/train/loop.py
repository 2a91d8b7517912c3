"""The training loop: config -> data -> mesh -> sharded state -> compiled step -> checkpoints and metrics."""

import json
import math
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
from tqdm import tqdm

from diffjax.data import pipeline as data_lib
from diffjax.errors import ConfigError, NonFiniteError
from diffjax.model import attention, sharding
from diffjax.model import transformer as model_lib
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import metrics as metrics_lib
from diffjax.train import optim
from diffjax.train import step as train_step
from diffjax.train import validate
from diffjax.train import workdir as workdir_lib


class StepProfiler:
  """A jax.profiler trace of steps [start, start + count) into WORKDIR/profile, on the chief host only.

  The trace ends once the last traced step has finished on the device, so its device work is all inside.
  """

  def __init__(self, log_cfg, workdir: str):
    self.start, self.stop = log_cfg.profile_start_step, log_cfg.profile_start_step + log_cfg.profile_steps
    self.folder, self.tracing = os.path.join(workdir, 'profile'), False
    self.enabled = bool(log_cfg.profile_start_step) and jax.process_index() == 0

  def before_step(self, step: int):
    """`step` is the number of the step about to run (1-based)."""
    if self.enabled and step == self.start and not self.tracing:
      jax.profiler.start_trace(self.folder)
      self.tracing = True

  def after_step(self, step: int, outputs) -> bool:
    """True when the trace has just ended (the step's timing then includes waiting for the device)."""
    if not (self.tracing and step == self.stop - 1):
      return False
    jax.block_until_ready(outputs)
    self.close()
    say(f'profile of steps {self.start}-{self.stop - 1} in {self.folder} (python launch/profile_summary.py '
        f'{self.folder} prints the top device ops)')
    return True

  def close(self):
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


class PreemptionWatcher:
  """Turns SIGTERM (how TPU VMs and SLURM announce preemption) and Ctrl-C into a stop, at any moment of a run.

  While the loop trains (`saving`), a signal is a request: the loop saves the step it is on and stops
  (`should_stop`). Otherwise there is nothing to save (start-up, or training over and saved), and a signal ends
  the process within moments: the workdir's lock released, one line, exit status 0. Python runs signal handlers only
  between bytecodes of the main thread, which may sit in C++ for minutes (compiling the step); but Python's C-level
  handler writes each signal to the wakeup fd whatever the main thread does, and that wakes a thread of ours, which
  ends the process with os._exit.

  With several hosts, JAX's preemption service catches SIGTERM and picks the step at which all hosts save; a
  Python handler would replace the service's, so none is installed there (`signals` empty).
  """

  def __init__(self, signals=None, saving: bool = True):
    """`signals`: those to handle, by default SIGTERM and SIGINT on one host (so it asks jax.process_count, which a
    run that is still to join its peers must not: it passes them); `saving`: whether the loop is training."""
    if signals is None:
      signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else ()
    self.requested, self.saving = threading.Event(), saving
    self.note = 'there was nothing to save'  # the end of the line an exit prints
    self.cleanups = []  # called before an exit: what a skipped clean-up would otherwise leave behind
    self._exiting, self.previous, self._wakeup, self._signum = threading.Lock(), {}, None, signal.SIGTERM
    if signals and threading.current_thread() is threading.main_thread():
      read, write = os.pipe()
      os.set_blocking(write, False)  # Python's C handler must never block
      self._wakeup = (write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
      threading.Thread(target=self._watch, args=(read,), name='diffjax-signals', daemon=True).start()
      for sig in signals:
        self.previous[sig] = signal.signal(sig, self._request)

  def _request(self, signum, frame):
    del frame
    self._signum = signum
    self.requested.set()

  def _watch(self, read: int):
    try:
      while signal_byte := os.read(read, 1):  # empty once `close` has closed the write end
        if not self.saving and signal_byte[0] in self.previous:  # other handlers' signals come here too
          self._exit(signal_byte[0])
    finally:
      os.close(read)

  def _exit(self, signum: int):
    with self._exiting:  # the watching thread and the main thread may both get here; the first one exits
      try:
        workdir_lib.release()
        for cleanup in self.cleanups:
          cleanup()
        for stream in (sys.stdout, sys.stderr):
          stream.flush()
        os.write(sys.stdout.fileno(), f'stopped on request ({signal.Signals(signum).name}); {self.note}\n'.encode())
      finally:
        os._exit(0)

  def start_saving(self):
    """The loop trains: a signal from now on asks it to save and stop."""
    self.saving = True

  def stop_saving(self, note: str):
    """Nothing is left to save (`note` says why): a signal from now on ends the process, and one that came while
    the loop was ending does so now."""
    self.note, self.saving = note, False
    if self.requested.is_set():
      self._exit(self._signum)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:  # every host must agree on the step at which all of them save
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested.is_set()

  def close(self):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)
    self.previous = {}
    if self._wakeup:
      write, previous_fd = self._wakeup
      signal.set_wakeup_fd(previous_fd)
      os.close(write)  # the watching thread reads the end and stops
      self._wakeup = None


@jax.jit
def wait_for_step(outputs):
  """Blocks until the step that produced `outputs` has run (a seam for tests)."""
  jax.block_until_ready(outputs)


def memory_after_first_step() -> dict:
  """What the device's allocator holds once the first step has run, its limit, and the largest block it could still
  hand out in one piece (where the allocator reports them; {} on CPUs): a later step that fails to allocate is then
  told apart from one that simply does not fit."""
  memory = jax.local_devices()[0].memory_stats() or {}
  names = {'bytes_in_use': 'memory_in_use_gib', 'largest_free_block_bytes': 'largest_free_block_gib',
           'bytes_limit': 'memory_limit_gib'}
  return {name: memory[key] / 2**30 for key, name in names.items() if key in memory}


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.floating)]))


def say(message: str):
  if jax.process_index() == 0:
    tqdm.write(message)


class Run:
  """One training run in one workdir; `train()` resumes from the workdir's newest readable checkpoint."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, launched: float | None = None):
    """Makes this process the workdir's one writer (readers open runs with `diffjax.infer.load.open_run` instead).

    `launched`: the `time.perf_counter()` of the process's launch, from which `startup_s` counts (default: now).
    """
    self.started = time.perf_counter() if launched is None else launched
    self.config, self.workdir = config, os.path.abspath(workdir)
    # Here rather than in the train command, so a run built from Python (a notebook) is refused in one line too.
    validate.check_config(config, self.workdir)
    workdir_lib.claim(self.workdir)
    self.checkpoints = checkpoint_lib.Checkpointer(os.path.join(self.workdir, 'checkpoints'),
                                                   keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    latest = self.checkpoints.latest_config()
    if latest:  # a workdir of another run, or of parameters alone, is refused before its data is prepared
      self._check_resumable(*latest)
    tc = config.train
    # Process 0 prepares the data once; the others wait for it here, then read the same files.
    barrier = multihost_utils.sync_global_devices if jax.process_count() > 1 else lambda name: None
    self.pipeline = data_lib.build_input(config.data, seq_len=tc.seq_len,
                                         batch_size=tc.global_batch_size // jax.process_count(),
                                         seed=config.seed, workdir=self.workdir,
                                         shard=(jax.process_index(), jax.process_count()), barrier=barrier)
    self.startup = {'data_ready_s': time.perf_counter() - self.started, 'train_passes': self.pipeline.passes(tc.steps)}
    self.cfg = defaults.model_config(config, self.pipeline.tokenizer.vocab_size)
    self.mesh = sharding.make_mesh(config.mesh)
    self.tx, self.schedule = optim.make_optimizer(tc), optim.learning_rate_schedule(tc)
    self.data_sharding = train_step.batch_sharding(self.mesh)
    self.train_fn, self.eval_fn = train_step.compile_steps(self.cfg, self.tx, self.schedule, tc, self.mesh)

  # -- state -------------------------------------------------------------------------------------------------

  def _check_resumable(self, step: int, saved_config: dict):
    """At start, before the data is prepared: the newest step is a train state, not parameters alone, of this run."""
    if checkpoint_lib.holds_parameters_only(os.path.join(self.checkpoints.directory, str(step), 'state')):
      raise ConfigError(f'--workdir: {self.workdir} holds parameters alone (step {step}, as diffjax import writes '
                        'them), not a run to resume; train from them in a new --workdir with '
                        f'--config.checkpoint.init_from={self.workdir}')
    self._check_same_run(step, saved_config)

  def _check_same_run(self, step: int, saved_config: dict):
    if self.config.checkpoint.allow_config_change:
      return
    differences = checkpoint_lib.config_differences(saved_config, self.config.to_dict())
    if differences:
      raise ConfigError(f'--workdir: {self.workdir} holds another run (step {step}), whose config differs in '
                        f'{"; ".join(differences)}; use a fresh --workdir, or pass '
                        '--config.checkpoint.allow_config_change=True to continue it with this config')
    self._check_same_schedule(step, ml_collections.ConfigDict(saved_config['train']))

  def _check_same_schedule(self, step: int, saved_train):
    """A resumed run keeps its learning-rate schedule: a decay stretched over other steps would make the learning rate
    jump at the resumed step, so a longer run must say that it holds the old final rate (`train.decay_steps`)."""
    tc = self.config.train
    old_end, new_end = optim.decay_end(saved_train), optim.decay_end(tc)
    if tc.decay != 'constant' and old_end != new_end:
      raise ConfigError(f'train.steps: this run decays its learning rate until step {old_end}, and this config until '
                        f'step {new_end}, which would make the rate jump at the resumed step {step}; to train on at '
                        f'the final rate pass --config.train.decay_steps={old_end}, else keep train.steps='
                        f'{saved_train.steps} (or accept the jump with --config.checkpoint.allow_config_change=True)')

  def initial_state(self, iterator):
    """(step, state): the newest readable checkpoint's, else a fresh (or `init_from`) state."""
    abstract = train_step.abstract_state(self.cfg, self.tx, self.mesh)
    restored = self.checkpoints.restore_latest(abstract, check_config=self._check_same_run)
    if restored is not None:
      step, state, data_state = restored
      iterator.set_state(data_state)
      if self.config.train.on_nonfinite == 'stop':
        # Steps that an earlier run in mode 'skip' skipped are history, not a reason for this run to stop.
        state = {**state, 'nonfinite_steps': jnp.zeros((), jnp.int32),
                 'first_nonfinite_step': jnp.full((), -1, jnp.int32)}
      say(f'resumed from step {step} in {self.checkpoints.directory}')
      return step, state
    state = train_step.init_state(self.cfg, self.tx, self.mesh, self.config.seed)
    if self.config.checkpoint.init_from:
      params = abstract['params']
      state['params'] = checkpoint_lib.load_params(self.config.checkpoint.init_from, params,
                                                   jax.tree.map(lambda x: x.sharding, params))
      say(f'parameters from {self.config.checkpoint.init_from}')
    return 0, state

  def _save(self, step: int, state, iterator):
    """Saves a state only if it is finite: a step with finite loss and gradients can still overflow the weights."""
    self._check_finite(state)
    if not bool(_all_finite({'params': state['params'], 'opt_state': state['opt_state']})):
      raise NonFiniteError(f'the train state after step {step} holds non-finite values, so it was not saved; last '
                           f'good checkpoint: {self._last_good()}. Lower train.learning_rate')
    self.checkpoints.save(step, state, iterator.get_state(), self.config.to_dict())

  def _last_good(self) -> str:
    steps = self.checkpoints.steps()
    return f'step {steps[-1]} in {self.checkpoints.directory}' if steps else 'none'

  def _check_finite(self, counters):
    """In mode 'stop', raises once a step was non-finite: before it can be logged as normal or saved."""
    if int(counters['nonfinite_steps']) and self.config.train.on_nonfinite == 'stop':
      raise NonFiniteError(
          f'non-finite loss or gradient at step {int(counters["first_nonfinite_step"]) + 1}; last good checkpoint: '
          f'{self._last_good()}. Lower train.learning_rate, or set train.on_nonfinite=skip to skip such steps')

  # -- the loop ----------------------------------------------------------------------------------------------

  def evaluate(self, params) -> dict:
    loss_sum = tokens = 0.0
    for batch in self.pipeline.eval_batches(self.config.log.eval_batches):
      out = self.eval_fn(params, self._to_device(batch))
      loss_sum, tokens = loss_sum + float(out['loss_sum']), tokens + float(out['tokens'])
    loss = loss_sum / max(tokens, 1.0)
    return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 700.0))}

  def _to_device(self, batch):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.data_sharding, x), batch)

  def train(self, watcher: PreemptionWatcher | None = None) -> dict:
    """Trains to `train.steps`, or until a signal asks it to save and stop.

    `watcher`: the process's own, which ends the process on a signal until the first step has compiled, and again
    once the loop has ended and saved; by default one that asks the loop to save from the start.
    """
    config, tc, log = self.config, self.config.train, self.config.log
    os.makedirs(self.workdir, exist_ok=True)
    iterator = self.pipeline.train_iterator(to_device=self._to_device)
    try:
      step, state = jax.block_until_ready(self.initial_state(iterator))
    except BaseException:  # its reading threads would otherwise run on while the error is reported
      iterator.close()
      raise
    self.startup['state_ready_s'] = time.perf_counter() - self.started
    if jax.process_index() == 0:  # only now: a workdir of another run keeps its config.json
      path = os.path.join(self.workdir, 'config.json')
      with open(f'{path}.partial', 'w') as f:  # renamed when complete: an exit mid-write leaves no torn file
        json.dump(config.to_dict(), f, indent=2)
      os.replace(f'{path}.partial', path)
    writer = metrics_lib.MetricsWriter(self.workdir, print_fn=say, wandb_project=log.wandb_project,
                                       run_config=config.to_dict())
    flops_per_token = metrics_lib.flops_per_token(self.cfg, tc.seq_len)
    peak = metrics_lib.peak_flops_per_device(log.peak_flops_per_device)
    own_watcher = watcher is None
    watcher = PreemptionWatcher() if own_watcher else watcher
    profiler = StepProfiler(log, self.workdir)
    say(f'{self.cfg.variant}: {model_lib.count_params(state["params"]):,} parameters, attention '
        f'{attention.describe_impl(self.cfg, tc.seq_len)}, mesh {dict(self.mesh.shape)}, '
        f'{tc.global_batch_size} x {tc.seq_len} tokens per step')
    say(self.pipeline.reading_plan(tc.steps))
    bar = tqdm(total=tc.steps, initial=step, unit='step', dynamic_ncols=True,
               disable=not log.progress_bar or jax.process_index() != 0)
    pending, window_start, window_step, last, preempted = None, time.perf_counter(), step, {}, False
    first_step = step

    def restart_window(at_step, start=None):
      """Throughput and input wait are measured from here, so compilation, evaluation and saves stay out."""
      nonlocal window_start, window_step
      window_start = time.perf_counter() if start is None else start
      window_step, iterator.wait_seconds = at_step, 0.0

    def write_pending():
      nonlocal pending, last
      if pending is not None:
        # One window ends, and the next starts, where the logged step is seen done: the host's time spent logging
        # (the device's memory statistics, the writers) falls inside the next window instead of between the two.
        jax.block_until_ready(pending[1])
        end = time.perf_counter()
        last = self._log(writer, *pending, end - window_start, window_step, iterator, flops_per_token, peak)
        pending = None
        restart_window(last['step'], end)

    queued = None  # the outputs of the step before the one just dispatched
    try:
      while step < tc.steps:
        profiler.before_step(step + 1)
        state, step_metrics = self.train_fn(state, next(iterator))
        # The host stays at most one step ahead of the device. Further ahead (up to log.every_steps, from the log's
        # reads alone), a 46 GiB step ran out of 59 GiB of an H100 after its first step; one step ahead, the same
        # run trained at the benchmarked step's speed with a flat peak of one step's temporaries.
        if queued is not None:
          wait_for_step(queued)
        queued = step_metrics
        watcher.start_saving()  # compiled, and running: from here a stop saves this step
        step += 1
        bar.update(1)
        if profiler.after_step(step, (state, step_metrics)):
          write_pending()
          restart_window(step)  # traced steps run slower, so they stay out of the throughput
        # A failed asynchronous save ends the run before another step. The step before the next save waits for the
        # last one to end, so that however slow the disk, no step reaches the next save past a failed one.
        if (step + 1) % config.checkpoint.every_steps == 0:
          self.checkpoints.wait()
        else:
          self.checkpoints.check()
        if step == first_step + 1:  # throughput windows start after the compilation in the first step
          jax.block_until_ready(step_metrics)
          # Seconds from launch at which the data, the state and the first step (compiled and run) were ready, and
          # how many times train.steps read the training split.
          writer.write(step, {**self.startup, 'first_step_s': time.perf_counter() - window_start,
                              'startup_s': time.perf_counter() - self.started, **memory_after_first_step()})
          restart_window(step)
        # Metrics of a logging step are read one step later, so the host never waits on the device to log.
        write_pending()
        if step % log.every_steps == 0 or step == tc.steps:
          pending = (step, step_metrics)
        evaluating = step % log.eval_every_steps == 0 or step == tc.steps
        preempted = watcher.should_stop(step)
        saving = step % config.checkpoint.every_steps == 0 or step == tc.steps or preempted
        if evaluating or saving:
          # Both wait for this step anyway. Written first, a crash during them loses no record, and a stop for
          # non-finite values comes before a meaningless evaluation.
          write_pending()
          self._check_finite(state)
        if evaluating:
          writer.write(step, self.evaluate(state['params']))
        if saving:
          self._save(step, state, iterator)
        if evaluating or saving:  # their time is not training time
          restart_window(step)
        if preempted:
          self.checkpoints.wait()
          say(f'stopped at step {step} on request; checkpoint saved in {self.checkpoints.directory}/{step}')
          break
      write_pending()
      self._check_finite(state)
    finally:
      profiler.close()
      iterator.close()
      bar.close()
      if own_watcher:
        watcher.close()
      self.checkpoints.wait()
      writer.close()
    if not own_watcher and not preempted:
      watcher.stop_saving(f'training had ended; last checkpoint: {self._last_good()}')
    self.state = state
    return {**last, 'step': step, 'preempted': preempted}

  def _log(self, writer, step, step_metrics, seconds, window_step, iterator, flops_per_token, peak):
    """Writes the record of `step`, whose window began after `window_step` and lasted `seconds`."""
    values = jax.device_get(step_metrics)
    self._check_finite(values)
    steps = step - window_step
    record = {'loss': float(values['loss']), 'learning_rate': float(values['learning_rate']),
              'grad_norm': float(values['grad_norm'])}
    # A window of no steps (the step that compiled, logged as the window restarts after it) has no speed to report.
    if steps:
      record['tokens_per_s'] = steps * self.config.train.global_batch_size * self.config.train.seq_len / max(
          seconds, 1e-9)
    # Time the loop stood waiting for the next batch: near 0 when the input pipeline keeps up with the step.
    record.update(data_wait_ms=1e3 * iterator.wait_seconds / max(steps, 1),
                  skipped_steps=int(values['nonfinite_steps']))
    if peak and steps:
      record['mfu'] = record['tokens_per_s'] * flops_per_token / (jax.device_count() * peak)
    if 'lambda' in values:
      record['lambda'] = values['lambda']
    memory = jax.local_devices()[0].memory_stats()  # None on CPUs
    if memory and 'peak_bytes_in_use' in memory:
      record['peak_memory_gib'] = memory['peak_bytes_in_use'] / 2**30
    writer.write(step, record)
    return {'step': step, **record}
