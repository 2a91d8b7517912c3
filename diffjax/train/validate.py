"""Checks a whole run config before anything is compiled or read, so each mistake costs one line of reading."""

import math
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

CHOICES = {'train.decay': ('cosine', 'linear', 'constant'), 'train.on_nonfinite': ('stop', 'skip'),
           'train.opt_moments_dtype': ('float32', 'bfloat16')}
POSITIVE = ('train.seq_len', 'train.global_batch_size', 'train.microbatches', 'train.steps', 'train.learning_rate',
            'train.eps', 'checkpoint.every_steps', 'checkpoint.keep', 'log.every_steps', 'log.eval_every_steps',
            'log.eval_batches', 'log.profile_steps')
NON_NEGATIVE = ('train.warmup_steps', 'train.weight_decay', 'train.grad_clip', 'train.z_loss', 'train.end_lr_ratio',
                'train.b1', 'train.b2', 'log.sample_tokens', 'log.sample_temperature', 'log.peak_flops_per_device',
                'log.profile_start_step', 'train.decay_steps')


def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value


def check_config(config: ml_collections.ConfigDict, workdir: str | None = None):
  """Raises ConfigError (one line: the key and the fix) for the first problem found."""
  for keys, lowest, wording in ((POSITIVE, 'positive', 'a positive number'),
                                (NON_NEGATIVE, 'zero', 'zero or positive')):
    for key in keys:
      value = _get(config, key)
      number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
      if not number or value < 0 or (lowest == 'positive' and value == 0):
        raise ConfigError(f'{key}: must be {wording}, got {value!r}')
  for key, choices in CHOICES.items():
    if _get(config, key) not in choices:
      raise ConfigError(f'{key}: unknown value {_get(config, key)!r}; use one of {", ".join(choices)}')
  tc = config.train
  chunk = tc.loss_chunk_tokens
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0:
    raise ConfigError(f'train.loss_chunk_tokens: must be a whole number of tokens, or 0 for the full-logits loss, '
                      f'got {chunk!r}')
  for key in ('b1', 'b2'):
    if not tc[key] < 1.0:
      raise ConfigError(f'train.{key}: must be below 1, got {tc[key]}')
  if tc.end_lr_ratio > 1.0:
    raise ConfigError(f'train.end_lr_ratio: the final learning rate is this fraction of the peak, so it must be at '
                      f'most 1, got {tc.end_lr_ratio}')
  if tc.warmup_steps >= tc.steps:
    raise ConfigError(f'train.warmup_steps: {tc.warmup_steps} warmup steps do not fit in train.steps={tc.steps}; '
                      'make warmup shorter than training')
  if tc.decay_steps and tc.decay_steps <= tc.warmup_steps:
    raise ConfigError(f'train.decay_steps: the decay must end after the {tc.warmup_steps} warmup steps, got '
                      f'{tc.decay_steps}; or 0 to decay until train.steps')

  cfg = defaults.model_config(config, vocab_size=256)
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

  data_lib.validate_data_config(config.data)
  # The tokenizer is not built yet, but its vocabulary size is known from the config.
  vocab_size = data_lib.tokenizer_vocab_size(config.data)
  if 0 < config.model.vocab_size < vocab_size:  # token ids past the embedding would be read as garbage
    raise ConfigError(f'model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer\'s {vocab_size} '
                      'tokens; set at least that, or 0 for the tokenizer\'s size rounded up to a multiple of 128')
  run_cfg = defaults.model_config(config, vocab_size)
  # Before the workdir is written or the data prepared: a run that cannot fit costs one line, not minutes.
  preflight.check(config, run_cfg, impl, mesh)
  if config.checkpoint.init_from:
    if not os.path.exists(config.checkpoint.init_from):
      raise ConfigError(f'checkpoint.init_from: {config.checkpoint.init_from} does not exist; give a workdir or '
                        'checkpoint directory of an earlier run')
    params = nn.meta.unbox(model_lib.abstract_params(run_cfg)['params'])
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
