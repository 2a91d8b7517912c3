"""Resource estimates before a run starts: does one training step fit each device's memory, and the input
pipeline's batches the host's?

`check` runs before anything is written to the workdir or any data is prepared, so a run that cannot fit fails in
one line naming the key to change (and a value that fits), not minutes later with an out-of-memory traceback.
`train.check_memory=False` skips it.

Per device, in bytes, with E = model.d_model, F = model.d_ff, L = model.n_layers, T = train.seq_len, V the
vocabulary, c the bytes of model.dtype, t = mesh.tensor and `tokens` = the tokens one device computes at once,
train.global_batch_size / (mesh.data * mesh.fsdp) / train.microbatches * T:

  state        the train state's shard on this device (parameters, optimizer moments): jax.eval_shape of the
               state, placed on the mesh as training places it
  gradients    the float32 parameters' shard, twice with train.microbatches > 1: the gradient, and the sum it is
               added into (the 1.4B step on one H100 keeps 4.9 GiB more with 8 microbatches than with one)
  layer        (8*E + 4*F) * c / t + 4*E   what one block keeps per token for its backward pass: the projections'
               and the FFN's outputs in the compute dtype, and the float32 residual stream
  maps         heads * T * 6 / t   on the `xla` attention path only (cuDNN and Pallas keep no maps): a float32
               probability and its compute-dtype copy for each of the T keys of each head (DIFF V1 counts its two
               maps per differential head, i.e. model.n_heads maps; DIFF V2 has 2 * model.n_heads)
  kept         model.remat off: L * (layer + maps), twice that with model.scan_layers (the scan stacks its
               residuals in new buffers)
               model.remat, policy `nothing`: L * 4*E + layer + maps (each block's input, and one block
               recomputed at a time); policy `dots` adds L * (5*E + 2*F) * c / t (the kept matmul outputs),
               `attention` on a kernel path L * A * c / t (the kernel's outputs: A = E for the baseline, 2*E for
               DIFF, whose two maps each give E values before they are combined), `dots_attention` both
  logits       train.loss_chunk_tokens = 0: tokens * V * 4 / t  (the float32 logits; since `losses.cross_entropy`
               picks the target's logit by index, the compiled step keeps no second buffer of their size)
               N > 0: min(N, tokens) * V * 6 / t  (one chunk's float32 logits and compute-dtype product)
  activations  tokens * kept + logits
  batches      (data.prefetch_batches + 1) batches of 16 bytes a token (int32 inputs, targets and segment ids,
               float32 mask) put on the device ahead of the step

and on the host, 2 * data.read_threads + 2 batches read ahead by the input pipeline.

The coefficients come from the compiled train step's memory (XLA's memory analysis, launch/bench_train.py and
launch/aot_compile.py; README and launch/results/): the seed model (E 512, F 1792, 8 layers, bfloat16, cuDNN) at
64 x 2048 tokens keeps 24.1 GiB of temporaries (gradients and activations) with vocabulary 384, where the formula
gives 24.3; 26.9 with vocabulary 32,000 and 16,384-token loss chunks (27.2); 38.4 with vocabulary 32,000 unchunked
(39.9). The paper's 1.4B and 3B models (remat, scanned, `xla` attention, fsdp over 4 or 8 TPU chips, 8 to 128
microbatches) keep 3.84 to 42.3 GiB per chip, which the formula gives to within 8%. What the remat policies add is
within 5% of the 1.4B step compiled on one H100 (tests/test_preflight.py; DIFF V1 under `attention` alone keeps a
third more than counted). The `xla` path on CPUs keeps about three times the maps counted here.

The formula cannot follow every compiler's schedule: the GPU's frees the logits before it recomputes a block, the
TPU's does not. So where the estimate lands within `COMPILE_NEAR` of an accelerator's memory, either side, the train
step is compiled for the run's shapes (nothing runs) and XLA's own count decides. The 1.4B config as it trains (8
microbatches of 16, `dots_attention`, cuDNN) is estimated at 74.3 GiB and compiled at 68.4 with scanned layers on one
H100, whose pool holds 71.3.

A device's memory is what JAX may allocate on it (`bytes_limit` of the device's memory stats) on GPUs and TPUs;
CPU devices share the host's memory with the input pipeline.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from diffjax.errors import ConfigError
from diffjax.model import sharding
from diffjax.model.config import REMAT_KEEPS, ModelConfig
from diffjax.train import optim
from diffjax.train import step as train_step

GIB = 2**30
BATCH_BYTES_PER_TOKEN = 16  # int32 inputs, targets and segment ids, float32 mask
MAP_BYTES = 6  # per attention-map entry on the xla path: float32 probability and its compute-dtype copy
SUGGESTED_CHUNK_TOKENS = 8192  # docs/performance.md: about 1 GiB of logits at a 32k vocabulary


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes per device (state, gradients, activations, batches) and on the host (the input pipeline's batches)."""
  state: int
  gradients: int
  activations: int
  batches: int
  host: int
  compiled: int | None = None  # the compiled step's bytes with the batches read ahead, where it was compiled

  @property
  def device(self) -> int:
    if self.compiled is not None:
      return self.compiled
    return self.state + self.gradients + self.activations + self.batches

  def parts(self) -> str:
    if self.compiled is not None:
      return 'the train step as XLA compiled it, and the batches read ahead'
    return (f'parameters and optimizer state {self.state / GIB:.1f}, gradients {self.gradients / GIB:.1f}, '
            f'activations {self.activations / GIB:.1f}, batches {self.batches / GIB:.1f}')


@dataclasses.dataclass(frozen=True)
class Budget:
  """What a run may use: `device` bytes on each device (None where devices use host memory, as CPUs do) and `host`
  bytes of host memory, which `local_devices` CPU devices then share with the input pipeline."""
  device: int | None
  host: int
  local_devices: int

  def holds(self, need: Estimate) -> bool:
    if self.device is None:
      return need.device * self.local_devices + need.host <= self.host
    return need.device <= self.device and need.host <= self.host

  def describe(self, need: Estimate) -> str:
    """What does not fit, in words."""
    host = f'{self.host / GIB:.1f} GiB of host memory'
    if self.device is None:
      devices = f'{self.local_devices} CPU devices' if self.local_devices > 1 else 'the CPU device'
      return (f'{need.device / GIB:.1f} GiB per device ({need.parts()}) on {devices} and {need.host / GIB:.1f} GiB '
              f'of read-ahead batches, but this host has {host}')
    if need.device > self.device:
      return (f'{need.device / GIB:.1f} GiB per device ({need.parts()}), but a device has '
              f'{self.device / GIB:.1f} GiB')
    return f'{need.host / GIB:.1f} GiB of read-ahead batches on the host, which has {host}'


# The part of an accelerator's memory that diffjax's trainings on it take together, against JAX's default 75%. At
# 75% of an H100 the 1.4B step that keeps its matmul outputs (`remat_policy=dots`, 59.3 GiB) filled the pool and ran
# no faster than recomputing them; with the pool at 92% it ran 8-9% faster (docs/performance.md, "The 1.4B step").
MEMORY_SHARE = 0.9
# How close to a device's memory, as a fraction of it, an estimate is checked against the compiled step (the module
# docstring). The formula's temporaries land from 11% below to 22% above every compiled step measured (the 1.4B
# step on one H100 included), and the state it adds is exact, so an estimate further off settles the question.
COMPILE_NEAR = 0.2


def memory_env(processes: int, env: dict[str, str] | None = None) -> dict[str, str]:
  """The environment for each of `processes` trainings on one accelerator: a copy of `env` (default: this
  process's) where each gets an equal part of `MEMORY_SHARE`, and, where several share it, XLA's stream-ordered
  allocator (`cuda_async`, read on NVIDIA GPUs only). Two byte-level DIFF V1 runs of the seed config with 23.1 GiB
  steps, each under 45% of an H100 (35.6 GiB), stop out of memory asking for their second step's 23.1 GiB under the
  default BFC pool, though it reports 35.3 GiB free in one block after the first; with `cuda_async` both train at
  their 23.5 GiB peak (docs/performance.md, "Real runs against the step"). Values already set in `env` win."""
  env = dict(os.environ if env is None else env)
  if 'XLA_CLIENT_MEM_FRACTION' not in env and 'XLA_PYTHON_CLIENT_MEM_FRACTION' not in env:  # JAX refuses both
    env['XLA_CLIENT_MEM_FRACTION'] = f'{MEMORY_SHARE / processes:.2f}'
  if processes > 1:
    env.setdefault('XLA_PYTHON_CLIENT_ALLOCATOR', 'cuda_async')
  return env


def memory_budget() -> Budget:
  stats = jax.local_devices()[0].memory_stats() or {}  # None on CPUs
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return Budget(stats.get('bytes_limit'), host, jax.local_device_count())


def state_bytes(cfg: ModelConfig, train_cfg, mesh_shape: dict[str, int]) -> tuple[int, int]:
  """(train state, float32 parameters) bytes per device: every leaf's shard on a mesh of this shape."""
  mesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape), axis_types=(AxisType.Auto,) * len(mesh_shape))
  tx = optim.make_optimizer(train_cfg)
  placed = {}

  def state():
    # Traced, never run: making the key, and optax's initialisation on placeholders that yields the shardings,
    # would each compile a small program, and nothing is compiled before a run starts.
    placed.update(train_step.state_shardings(cfg, tx, mesh))
    return train_step.new_state(cfg, tx, jax.random.key(0))

  shapes = jax.eval_shape(state)
  elements = jax.tree.map(lambda x, sharding: int(np.prod(sharding.shard_shape(x.shape))), shapes, placed)
  return (sum(n * x.dtype.itemsize for n, x in zip(jax.tree.leaves(elements), jax.tree.leaves(shapes))),
          4 * sum(jax.tree.leaves(elements['params'])))


def estimate(cfg: ModelConfig, train: dict, data_cfg, impl: str, mesh_shape: dict[str, int],
             state: tuple[int, int], processes: int = 1) -> Estimate:
  """The module docstring's formula. `train` holds the train.* values; `state` is `state_bytes(...)`."""
  E, F, L, T, V = cfg.d_model, cfg.d_ff, cfg.n_layers, train['seq_len'], cfg.vocab_size
  c, t = jnp.dtype(cfg.compute_dtype).itemsize, mesh_shape['tensor']
  sequences = train['global_batch_size'] // (mesh_shape['data'] * mesh_shape['fsdp'])
  tokens = sequences // train['microbatches'] * T
  layer = (8 * E + 4 * F) * c / t + 4 * E
  heads = cfg.n_heads * (2 if cfg.variant == 'diff_v2' else 1)
  maps = heads * T * MAP_BYTES / t if impl == 'xla' else 0
  if not cfg.remat:
    kept = L * (layer + maps) * (2 if cfg.scan_layers else 1)
  else:
    matmuls, attention = REMAT_KEEPS[cfg.remat_policy]
    saved = 4 * E
    if matmuls:
      saved += (5 * E + 2 * F) * c / t
    if attention and impl != 'xla':
      saved += (E if cfg.variant == 'baseline' else 2 * E) * c / t
    kept = L * saved + layer + maps
  chunk = train['loss_chunk_tokens']
  logits = (tokens * 4 if not chunk else min(chunk, tokens) * 6) * V / t
  batch = BATCH_BYTES_PER_TOKEN * T
  gradients = (1 if train['microbatches'] == 1 else 2) * state[1]
  return Estimate(state=state[0], gradients=gradients, activations=int(tokens * kept + logits),
                  batches=(data_cfg.prefetch_batches + 1) * sequences * batch,
                  host=(2 * data_cfg.read_threads + 2) * train['global_batch_size'] // processes * batch)


def compiled_memory(config, cfg: ModelConfig, mesh) -> dict[str, int]:
  """Bytes per device of the train step compiled for the run's shapes on `mesh` (nothing runs): XLA's arguments
  (state and batch), outputs, temporaries and code, and their `total`, where the donated state's outputs reuse its
  arguments' buffers."""
  tc = config.train
  tx, schedule = optim.make_optimizer(tc), optim.learning_rate_schedule(tc)
  train, _ = train_step.compile_steps(cfg, tx, schedule, tc, mesh)
  batch = train_step.batch_spec(tc.global_batch_size, tc.seq_len, train_step.batch_sharding(mesh))
  memory = train.lower(train_step.abstract_state(cfg, tx, mesh), batch).compile().memory_analysis()
  parts = {key: int(getattr(memory, f'{key}_size_in_bytes')) for key in ('argument', 'output', 'temp',
                                                                          'generated_code', 'alias')}
  total = parts['argument'] + parts['output'] + parts['temp'] + parts['generated_code'] - parts['alias']
  return {**parts, 'total': total}


def compiled_need(config, cfg: ModelConfig) -> int | None:
  """`compiled_memory`'s total on this process's devices; None where the compiler itself finds that it cannot fit
  (the TPU's does), which leaves the estimate to speak."""
  if jax.process_index() == 0:
    print('memory: the estimate is near the device\'s limit; compiling the train step to measure it', flush=True)
  try:
    return compiled_memory(config, cfg, sharding.make_mesh(config.mesh))['total']
  except jax.errors.JaxRuntimeError as error:
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    return None


def check(config, cfg: ModelConfig, impl: str, mesh_shape: dict[str, int], budget: Budget | None = None,
          compiled=None):
  """Raises ConfigError (one line: the key to change and a value that fits) if the run does not fit.

  `compiled(config, cfg)`: the compiled step's bytes per device (or None: unknown), asked for where the estimate
  lands within `COMPILE_NEAR` of a device's memory; by default `compiled_need` on this process's accelerators, and
  never on CPUs or against a given `budget`.
  """
  if not config.train.check_memory:
    return
  if budget is None:
    budget = memory_budget()
    compiled = compiled or (compiled_need if budget.device is not None else None)
  state = state_bytes(cfg, config.train, mesh_shape)
  train = config.train.to_dict()
  measure = lambda cfg, train: estimate(cfg, train, config.data, impl, mesh_shape, state, jax.process_count())
  need = measure(cfg, train)
  if compiled and abs(need.device / budget.device - 1) <= COMPILE_NEAR:
    step = compiled(config, cfg)
    if step is not None:
      need = dataclasses.replace(need, compiled=step + need.batches)
  if budget.holds(need):
    return
  for key, value, changed_cfg, changed_train in _changes(cfg, train, mesh_shape, lambda *a: budget.holds(measure(*a))):
    after = measure(changed_cfg, changed_train)
    if budget.holds(after):
      fix = f'set {key}={value} (about {after.device / GIB:.1f} GiB per device)'
      break
  else:
    key = 'model'
    fix = ('use a smaller model (model.d_model, model.n_layers, model.d_ff), a shorter train.seq_len, or more '
           'devices to shard it over (mesh.fsdp)')
  raise ConfigError(f'{key}: this run needs about {budget.describe(need)}; {fix}, or set train.check_memory=False '
                    'to start anyway (diffjax/train/preflight.py explains the estimate)')


def _changes(cfg: ModelConfig, train: dict, mesh_shape: dict[str, int], fits):
  """(key, value, cfg, train) of single changes that lower the estimate, cheapest first: the chunked loss,
  recomputing every block's insides, more microbatches, rematerialisation, then the largest global batch that
  `fits(cfg, train)`."""
  if not train['loss_chunk_tokens']:
    yield 'train.loss_chunk_tokens', SUGGESTED_CHUNK_TOKENS, cfg, {**train, 'loss_chunk_tokens': SUGGESTED_CHUNK_TOKENS}
  if cfg.remat and cfg.remat_policy != 'nothing':
    yield 'model.remat_policy', 'nothing', dataclasses.replace(cfg, remat_policy='nothing'), train
  sequences = train['global_batch_size'] // (mesh_shape['data'] * mesh_shape['fsdp'])
  for microbatches in range(train['microbatches'] + 1, sequences + 1):
    if sequences % microbatches == 0:
      yield 'train.microbatches', microbatches, cfg, {**train, 'microbatches': microbatches}
  if not cfg.remat:
    yield 'model.remat', True, dataclasses.replace(cfg, remat=True), train
  # Global batches stay multiples of the data-parallel shards times the microbatches; the largest that fits wins.
  step = train['global_batch_size'] // sequences * train['microbatches']
  low, high = 0, train['global_batch_size'] // step - 1
  while low < high:
    middle = (low + high + 1) // 2
    low, high = (middle, high) if fits(cfg, {**train, 'global_batch_size': middle * step}) else (low, middle - 1)
  if low:
    yield 'train.global_batch_size', low * step, cfg, {**train, 'global_batch_size': low * step}
