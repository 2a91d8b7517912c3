"""Beyond one device on a CPU: real multi-process training, restores onto other meshes, and what is refused.

* Two processes on this machine, joined by `jax.distributed` through a coordinator on localhost, train the tiny
  config with `--multihost` on their own data shards, save, and a second pair resumes. Each process reads every
  second row (`shard=(i, 2)`) in its own permutation, so their global batch is not the one a single process reads
  by construction; the reference is one process on two fake devices fed exactly that global batch (shard 0's
  half-batch, then shard 1's), and the losses of both runs must be equal.
* A train state saved on 8 fake devices (fsdp 2 x tensor 4) restores through `Checkpointer.restore_latest` onto
  1 device and onto fsdp 4 x tensor 2, bit for bit, and the next step's loss is the same on every mesh.
* A workdir or data_dir that is a URL (gs://, s3://) is refused before anything starts; the TFDS error names the
  way without TensorFlow.

XLA reads the fake device count once, before JAX starts, so the runs with several devices are this file run as a
script in a subprocess (`python test_scale_out.py MODE ARGS_JSON`), which prints one JSON document.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from helpers_training import REPO, cli_command, load_config, read_metrics, run_overrides, train_losses, write_corpus

pytestmark = pytest.mark.slow  # end-to-end runs: the quick subset (pytest -m "not slow") leaves them out

HERE = pathlib.Path(__file__).resolve().parent
# Tiny graphs: LLVM's optimisations would cost more time than the steps they speed up.
FAST_XLA = '--xla_backend_optimization_level=0'
FIRST_STEPS, ALL_STEPS = 3, 6
GLOBAL_BATCH = 4
# A constant learning rate after warm-up: the run of FIRST_STEPS steps and its continuation to ALL_STEPS follow
# the schedule of one run of ALL_STEPS steps.


def _overrides(corpus, data_dir, steps) -> dict:
  return run_overrides(corpus, data_dir, train__seq_len=32, train__global_batch_size=GLOBAL_BATCH,
                       train__steps=steps, train__warmup_steps=1, train__decay='constant',
                       checkpoint__every_steps=FIRST_STEPS, log__eval_every_steps=100, log__eval_batches=1,
                       log__sample_tokens=2)


def _env(devices: int = 1) -> dict:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': FAST_XLA + (
      f' --xla_force_host_platform_device_count={devices}' if devices > 1 else '')}
  for name in ('JAX_COORDINATOR_ADDRESS', 'DIFFJAX_NUM_PROCESSES', 'DIFFJAX_PROCESS_ID', 'DIFFJAX_DATA_DIR'):
    env.pop(name, None)
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _script(mode: str, args: dict, devices: int) -> dict:
  proc = subprocess.run([sys.executable, __file__, mode, json.dumps(args)], env=_env(devices), capture_output=True,
                        text=True, timeout=300, cwd=HERE)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _two_processes(workdir, overrides, logs: pathlib.Path) -> list[str]:
  """Runs `diffjax.train --multihost` as processes 0 and 1 of one job; returns their outputs.

  A process that fails leaves its peer waiting in a collective (and itself in JAX's shutdown barrier) for
  minutes, so both are stopped as soon as either prints its one-line error.
  """
  port = _free_port()
  logs.mkdir(parents=True, exist_ok=True)
  files = [open(logs / f'process{i}.txt', 'w+') for i in range(2)]
  procs = [subprocess.Popen([*cli_command(workdir, overrides), '--multihost', f'--coordinator_address=localhost:{port}',
                             '--num_processes=2', f'--process_id={i}'], env=_env(), cwd=REPO, stdout=f,
                            stderr=subprocess.STDOUT, text=True) for i, f in enumerate(files)]
  outputs = ['', '']
  try:
    deadline = time.monotonic() + 240
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
      outputs = [(logs / f'process{i}.txt').read_text() for i in range(2)]
      errors = [line for out in outputs for line in out.splitlines() if line.startswith('error: ')]
      if errors:
        break
      time.sleep(0.2)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
      proc.wait()
    for f in files:
      f.close()
  outputs = [(logs / f'process{i}.txt').read_text() for i in range(2)]
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f'process {i} (exit {proc.returncode}):\n{out[-3000:]}'
  return outputs


# -- two processes -------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def multiprocess(tmp_path_factory):
  root = tmp_path_factory.mktemp('multiprocess')
  corpus, data_dir, workdir = write_corpus(root / 'corpus', num_docs=4, chars_per_doc=8000), root / 'data', root / 'w'
  first = _two_processes(workdir, _overrides(corpus, data_dir, FIRST_STEPS), root / 'logs_first')
  first_metrics = read_metrics(workdir)
  resumed = _two_processes(workdir, _overrides(corpus, data_dir, ALL_STEPS), root / 'logs')
  reference = _script('reference', {'overrides': _overrides(corpus, data_dir, ALL_STEPS),
                                    'workdir': str(root / 'reference')}, devices=2)
  return types.SimpleNamespace(workdir=workdir, first=first, resumed=resumed, first_metrics=first_metrics,
                               metrics=read_metrics(workdir), reference=reference, steps=ALL_STEPS)


def test_two_processes_train_and_save(multiprocess):
  assert 'mesh {\'data\': 2' in multiprocess.first[0]  # one device in each process, one mesh over both
  assert sorted(train_losses(multiprocess.first_metrics)) == list(range(1, FIRST_STEPS + 1))
  data_state = json.loads((multiprocess.workdir / 'checkpoints' / str(FIRST_STEPS) / 'data' / 'metadata').read_text())
  assert data_state['next_batch'] == FIRST_STEPS


def test_two_processes_resume(multiprocess):
  # Process 0 saves the input position and process 1 restores it, so it must not name process 0's shard.
  assert f'resumed from step {FIRST_STEPS}' in multiprocess.resumed[0]
  assert sorted(int(p.name) for p in (multiprocess.workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [
      FIRST_STEPS, ALL_STEPS]
  data_state = json.loads((multiprocess.workdir / 'checkpoints' / str(ALL_STEPS) / 'data' / 'metadata').read_text())
  assert data_state['next_batch'] == ALL_STEPS
  # Only process 0 writes the workdir's records: each step once.
  steps = [r['step'] for r in multiprocess.metrics if 'loss' in r]
  assert steps == list(range(1, ALL_STEPS + 1))


def test_two_processes_equal_one_process_on_the_same_global_batch(multiprocess):
  losses = train_losses(multiprocess.metrics)
  got = [losses[step] for step in range(1, multiprocess.steps + 1)]
  assert got == multiprocess.reference['losses'], (got, multiprocess.reference['losses'])
  assert len(set(got)) == multiprocess.steps  # the losses move, so equal runs cannot be equal by being constant
  # The shards are different rows: had both processes read the same shard, the reference could not match.
  assert multiprocess.reference['shards_differ']


def reference(args: dict) -> dict:
  """One process, two fake devices: the two processes' global batches (shard 0's rows, then shard 1's)."""
  import jax
  from diffjax.data import corpus as corpus_lib
  from diffjax.data import pipeline as data_lib
  from diffjax.train import loop as trainer
  from diffjax.train import step as train_step

  assert jax.device_count() == 2, jax.devices()
  config = load_config(args['overrides'])
  os.makedirs(args['workdir'], exist_ok=True)
  run = trainer.Run(config, args['workdir'])
  corpus = corpus_lib.open_corpus(config.data)
  half = config.train.global_batch_size // 2
  shards = [data_lib.InputPipeline(run.pipeline.folder, corpus=corpus, tokenizer=run.pipeline.tokenizer,
                                   seq_len=config.train.seq_len, batch_size=half, seed=config.seed,
                                   shard=(i, 2)).train_batches() for i in range(2)]
  state = train_step.init_state(run.cfg, run.tx, run.mesh, config.seed)
  losses = []
  for k in range(config.train.steps):
    parts = [shard[k] for shard in shards]
    batch = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    state, metrics = run.train_fn(state, run._to_device(batch))
    losses.append(float(metrics['loss']))
  return {'losses': losses, 'shards_differ': not np.array_equal(shards[0][0]['inputs'], shards[1][0]['inputs'])}


# -- other meshes --------------------------------------------------------------------------------------------------

# (data, fsdp, tensor): saved on the first, restored onto the others.
SAVED_MESH = (1, 2, 4)
RESTORE_MESHES = {'one_device': (1, 1, 1), 'fsdp4_tensor2': (1, 4, 2), 'data4_fsdp2': (4, 2, 1)}


def restore_meshes(args: dict) -> dict:
  import jax
  from diffjax.model import sharding
  from diffjax.run import checkpoint as checkpoint_lib
  from diffjax.train import optim
  from diffjax.train import step as train_step
  from helpers_training import random_params, sharded_state, tiny_model, train_config

  assert jax.device_count() == 8, jax.devices()
  # Every sharded dimension is a multiple of 4.
  cfg = tiny_model(vocab_size=64, d_model=32, d_ff=64, n_heads=4, max_len=16)
  train_cfg = train_config(learning_rate=1e-2, warmup_steps=1, steps=100, decay='constant')
  tx, schedule = optim.make_optimizer(train_cfg), optim.learning_rate_schedule(train_cfg)
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(3):
    tokens = rng.integers(0, cfg.vocab_size, size=(8, 17), dtype=np.int32)
    batches.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': np.ones((8, 16), np.float32)})

  def mesh_of(shape):
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices=jax.devices()[:int(np.prod(shape))])

  mesh = mesh_of(SAVED_MESH)
  train, _ = train_step.compile_steps(cfg, tx, schedule, train_cfg, mesh)
  state = sharded_state(cfg, tx, mesh, random_params(cfg))
  for batch in batches[:2]:  # Adam's moments and count are no longer their initial values
    state, _ = train(state, batch)
  checkpoints = checkpoint_lib.Checkpointer(args['directory'], keep=2, async_save=False)
  checkpoints.save(2, state, {'corpus': 'test', 'next_batch': 2}, {'model': {}})
  checkpoints.wait()
  saved = jax.device_get(state)
  sharded_leaves = sum(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
                       for leaf in jax.tree.leaves(state))
  _, next_metrics = train(state, batches[2])
  out = {'saved_next_loss': float(next_metrics['loss']), 'saved_sharded_leaves': int(sharded_leaves), 'meshes': {}}
  reader = checkpoint_lib.Checkpointer(args['directory'], keep=2, async_save=False, read_only=True)
  for name, shape in RESTORE_MESHES.items():
    target = mesh_of(shape)
    abstract = train_step.abstract_state(cfg, tx, target)
    step, restored, data_state = reader.restore_latest(abstract)
    same_shardings = all(leaf.sharding == want.sharding for leaf, want in
                         zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)))
    mismatched = [jax.tree_util.keystr(path) for (path, a), b in
                  zip(jax.tree_util.tree_flatten_with_path(jax.device_get(restored))[0], jax.tree.leaves(saved))
                  if not (a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b))]
    restored_train, _ = train_step.compile_steps(cfg, tx, schedule, train_cfg, target)
    _, metrics = restored_train(restored, batches[2])
    out['meshes'][name] = {'step': step, 'data_state': data_state, 'same_shardings': same_shardings,
                           'mismatched': mismatched, 'devices': len(jax.tree.leaves(restored)[0].sharding.device_set),
                           'next_loss': float(metrics['loss'])}
  return out


@pytest.fixture(scope='module')
def meshes(tmp_path_factory):
  return _script('restore_meshes', {'directory': str(tmp_path_factory.mktemp('meshes') / 'checkpoints')}, devices=8)


def test_the_saved_state_was_sharded_over_all_eight_devices(meshes):
  assert meshes['saved_sharded_leaves'] > 10


@pytest.mark.parametrize('name', list(RESTORE_MESHES))
def test_a_checkpoint_restores_exactly_onto_another_mesh(meshes, name):
  result = meshes['meshes'][name]
  assert result['step'] == 2 and result['data_state'] == {'corpus': 'test', 'next_batch': 2}
  assert result['devices'] == int(np.prod(RESTORE_MESHES[name]))
  assert result['same_shardings']  # laid out for the new mesh, not the saved one
  assert result['mismatched'] == []  # every parameter and optimizer leaf bit for bit
  # The same step on another mesh adds its partial sums in another order: equal to float32 rounding.
  np.testing.assert_allclose(result['next_loss'], meshes['saved_next_loss'], rtol=1e-6)


# -- what is refused -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('flag, message', [
    ('--workdir=gs://bucket/run', 'error: --workdir: gs://bucket/run is a gs:// URL'),
    ('--config.data.data_dir=s3://bucket/data', 'error: data.data_dir: s3://bucket/data is a s3:// URL'),
])
def test_a_url_workdir_or_data_dir_is_refused_up_front(tmp_path, flag, message):
  command = [sys.executable, '-m', 'diffjax.train', f'--config={REPO / "configs" / "tiny.py"}',
             f'--workdir={tmp_path / "run"}', flag]
  proc = subprocess.run(command, env={**_env(), 'PYTHONPATH': str(REPO)}, capture_output=True, text=True,
                        timeout=120, cwd=tmp_path)
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message) and 'gcsfuse' in lines[0], proc.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, not even a local 'gs:' folder


def test_local_paths_pass_and_every_scheme_is_refused():
  from diffjax.errors import ConfigError
  from diffjax.train import workdir as workdir_lib
  for path in ('/tmp/run', 'runs/a', 'C:relative', None, ''):
    workdir_lib.check_local(path, '--workdir')
  for path in ('gs://b/run', 's3://b/run', 'hdfs://nn/run', 'file:///tmp/run', 'az://c/run'):
    with pytest.raises(ConfigError, match='URL'):
      workdir_lib.check_local(path, '--workdir')


def test_the_tfds_error_names_the_way_without_tensorflow(monkeypatch):
  import tensorflow_datasets as tfds
  from diffjax.data import corpus as corpus_lib
  from diffjax.errors import ConfigError

  class Builder:
    data_dir_root = '/nowhere'

    def is_prepared(self):
      return False

    def download_and_prepare(self, **kwargs):
      raise ModuleNotFoundError("No module named 'tensorflow'")

  monkeypatch.setattr(tfds, 'builder', lambda name, data_dir=None: Builder())
  config = load_config({'data.source': 'tfds', 'data.tfds_name': 'c4/en:3.1.0'})
  with pytest.raises(ConfigError) as error:
    corpus_lib.open_corpus(config.data)
  message = str(error.value)
  assert '--config.data.source=local' in message and 'text_glob' in message and 'python -m diffjax.prepare' in message
  assert 'Recipe data' in message and '\n' not in message


# -- TPU without a TPU ---------------------------------------------------------------------------------------------

def test_the_train_step_compiles_for_a_tpu_slice_without_a_tpu(tmp_path):
  """launch/aot_compile.py with libtpu's description of a v5p-8 slice; skipped where libtpu is not installed.

  libtpu may sit in a folder of its own ($DIFFJAX_LIBTPU_PATH, as .ci/run installs it), so that it stays out of the
  other tests' JAX start-up.
  """
  import importlib.util
  env, folder = _env(), os.environ.get('DIFFJAX_LIBTPU_PATH', '')
  if folder and os.path.isdir(os.path.join(folder, 'libtpu')):
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [folder, env.get('PYTHONPATH')]))
  elif importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu is not installed (pip install libtpu; it is not a diffjax dependency)')
  proc = subprocess.run([sys.executable, str(REPO / 'launch' / 'aot_compile.py'),
                         f'--config={REPO / "configs" / "tiny.py"}', '--topology=v5p-8', '--config.mesh.data=1',
                         '--config.mesh.fsdp=-1'], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['chips'] == 4 and result['mesh'] == {'data': 1, 'fsdp': 4, 'tensor': 1}
  assert 'TPU' in result['device_kind'] and result['fits']
  assert result['attention'] == 'splash'  # the TPU's kernel, chosen although this machine has none
  assert 0 < result['argument_gib_per_chip'] < result['total_gib_per_chip'] < 1


if __name__ == '__main__':
  sys.path.insert(0, str(HERE))
  print(json.dumps({'reference': reference, 'restore_meshes': restore_meshes}[sys.argv[1]](json.loads(sys.argv[2]))))
