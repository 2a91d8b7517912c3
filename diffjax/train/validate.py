"""Checks a whole run config before anything is compiled or read, so each mistake costs one line of reading."""

import os
import tempfile

import flax.linen as nn
import jax
import ml_collections

from diffjax.data import pipeline as data_lib
from diffjax.errors import ConfigError
from diffjax.model import attention, sharding
from diffjax.model import transformer as model_lib
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import preflight


def check_config(config: ml_collections.ConfigDict, workdir: str | None = None):
  """Raises ConfigError (one line: the key and the fix) for the first problem found: a value its key does not
  allow (`defaults.SCHEMA`, ModelConfig and the data pipeline check their own), then the checks that weigh keys
  against each other, the devices or the disk."""
  defaults.check_values(config)
  data_lib.validate_data_config(config.data)
  tc = config.train
  if tc.warmup_steps >= tc.steps:
    raise ConfigError(f'train.warmup_steps: {tc.warmup_steps} warmup steps do not fit in train.steps={tc.steps}; '
                      'make warmup shorter than training')
  if tc.decay_steps and tc.decay_steps <= tc.warmup_steps:
    raise ConfigError(f'train.decay_steps: the decay must end after the {tc.warmup_steps} warmup steps, got '
                      f'{tc.decay_steps}; or 0 to decay until train.steps')

  # The tokenizer is not built yet, but its vocabulary size is known from the config.
  vocab_size = data_lib.tokenizer_vocab_size(config.data)
  cfg = defaults.model_config(config, vocab_size)
  if tc.seq_len > cfg.max_len:
    raise ConfigError(f'train.seq_len: {tc.seq_len} is above model.max_len={cfg.max_len}; shorten the sequences '
                      'or raise model.max_len')
  impl = attention.resolve_impl(cfg)

  mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(config.mesh, jax.device_count())))
  data_parallel = mesh['data'] * mesh['fsdp']
  if tc.global_batch_size % (data_parallel * tc.microbatches) or tc.global_batch_size % jax.process_count():
    raise ConfigError(f'train.global_batch_size: {tc.global_batch_size} sequences cannot be split over '
                      f'{data_parallel} data-parallel shards (mesh.data*mesh.fsdp) x {tc.microbatches} microbatches; '
                      f'use a multiple of {data_parallel * tc.microbatches}')

  if cfg.vocab_size < vocab_size:  # token ids past the embedding would be read as garbage
    raise ConfigError(f'model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer\'s {vocab_size} tokens; '
                      'set at least that, or 0 for the tokenizer\'s size rounded up to a multiple of 128')
  # Before the workdir is written or the data prepared: a run that cannot fit costs one line, not minutes.
  preflight.check(config, cfg, impl, mesh)
  if config.checkpoint.init_from:
    if not os.path.exists(config.checkpoint.init_from):
      raise ConfigError(f'checkpoint.init_from: {config.checkpoint.init_from} does not exist; give a workdir or '
                        'checkpoint directory of an earlier run')
    params = nn.meta.unbox(model_lib.abstract_params(cfg)['params'])
    checkpoint_lib.check_init_from(config.checkpoint.init_from, params)
  if workdir is not None:
    _check_writable(workdir)


def _check_writable(workdir: str):
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=workdir):
      pass
  except OSError as error:
    raise ConfigError(f'--workdir: cannot write to {workdir} ({error.strerror}); choose a writable directory') from None
