"""Opening a finished (or still training) run for generation, evaluation and inspection, without the trainer.

`open_run(workdir)` reads the run's config.json, its tokenizer (WORKDIR/tokenizer.model for SentencePiece) and the
parameters alone of its newest readable checkpoint: no corpus is opened or prepared, nothing is compiled, no
optimizer state is read, and nothing in the workdir is written, moved or locked, since a run may be training there.
Parameters come back unboxed (plain arrays, as `flax.linen.meta.unbox` gives), on one device, ready for
`Transformer(cfg).apply({'params': params}, tokens_BxT)`.
"""

import json
import os

import flax.linen as nn
import jax
import ml_collections

from diffjax.data import pipeline as data_lib
from diffjax.data import tokenizers
from diffjax.errors import ConfigError
from diffjax.model import transformer as model_lib
from diffjax.model.config import ModelConfig
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's saved config over today's defaults, so keys added since it was written get their defaults (and
  keys removed since are dropped)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise ConfigError(f'--workdir: {workdir} holds no diffjax run (no config.json); give the workdir of a training run')
  try:
    with open(path) as f:
      saved = defaults.flatten(ml_collections.ConfigDict(json.load(f)).to_dict())
  except (OSError, ValueError, AttributeError) as error:  # unreadable, not UTF-8, not JSON, JSON but no object
    raise ConfigError(f'--workdir: {path} is damaged ({checkpoint_lib.first_line(error)}); restore it from a copy '
                      '(every checkpoint keeps one, in checkpoints/STEP/config/metadata)') from None
  config = defaults.base_config()
  config.update_from_flattened_dict({key: value for key, value in saved.items() if key in defaults.KEYS})
  return config


def run_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> tokenizers.Tokenizer:
  """The tokenizer the run trained with: bytes, or the SentencePiece model it saved in its workdir."""
  if config.data.tokenizer == 'byte':
    return tokenizers.ByteTokenizer()
  path = os.path.join(workdir, data_lib.TOKENIZER_FILE)
  if not os.path.exists(path):
    raise ConfigError(f'--workdir: {path} is missing; a SentencePiece run keeps its tokenizer there, so give the '
                      'workdir of a run that has started training')
  # Only the tokenizer a run trained with makes sense of its checkpoints, so there is nothing to fall back on.
  return tokenizers.SentencePieceTokenizer.load(path, key='--workdir', remedy='restore it from a copy (training '
                                                'keeps one in data.data_dir, as CORPUS/sentencepiece_*.model)')


def open_run(workdir: str | None) -> tuple[ModelConfig, dict, tokenizers.Tokenizer, int]:
  """(model config, unboxed parameters, tokenizer, step) of the newest readable checkpoint in `workdir`. Steps whose
  parameters cannot be read (or no longer match their checksums) are skipped with a one-line warning each; raises
  ConfigError if the workdir holds no run, no checkpoint yet, or no readable one."""
  if not workdir:
    raise ConfigError('--workdir is required: the workdir of a training run')
  workdir = os.path.abspath(workdir)
  config = run_config(workdir)
  tokenizer = run_tokenizer(config, workdir)
  cfg = defaults.model_config(config, tokenizer.vocab_size)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nn.meta.unbox(model_lib.abstract_params(cfg)['params']))
  restored = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1, async_save=False,
                                         read_only=True).restore_params(target)
  if restored is None:
    raise ConfigError(f'--workdir: {workdir} has no checkpoint yet; train first or give another workdir')
  step, params = restored
  # Generation, maps and export index layers by name; the unscanned layout computes the same function.
  return (*model_lib.unscanned(cfg, params), tokenizer, step)
