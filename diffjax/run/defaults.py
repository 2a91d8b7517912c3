"""The run config's schema: every key, declared once with its default, the values it allows, whether it is part of
the run's identity and one line saying what it does. The base config, the checks of single values, the identity a
resumed run must keep and the `--help` listing all derive from it. Files in `configs/` start from `base_config()`
and change what they need; cross-key checks live in `diffjax.train.validate`."""

import ml_collections

from diffjax.data.pipeline import DATA_KEYS
from diffjax.keys import Key, check_section, config_section
from diffjax.model.config import MODEL_KEYS, ModelConfig


def setting(default, doc: str, **allowed) -> Key:
  """A key that says how a run trains, saves or logs, not what model and data it is: a resumed run may change it."""
  return Key(default, doc, identity=False, **allowed)


# Two model keys are placeholders in the run config, which `resolved_model` spells out.
PLACEHOLDERS = {'vocab_size': Key(0, "0: the tokenizer's vocabulary rounded up to a multiple of 128", at_least=0),
                'n_kv_heads': Key(0, "kv heads counted as the baseline's (GQA when fewer than n_heads); 0: n_heads",
                                  at_least=0)}

SCHEMA = {
    'seed': setting(0, 'parameter init and data order'),
    'model': {**MODEL_KEYS, **PLACEHOLDERS},
    'data': DATA_KEYS,
    'train': {
        'seq_len': Key(2048, 'tokens per sequence', at_least=1),
        'global_batch_size': setting(8, 'sequences per optimizer step, over all devices', at_least=1),
        'microbatches': setting(1, 'gradient accumulation: the step runs the batch in this many sequential pieces',
                                at_least=1),
        'steps': setting(10_000, 'optimizer steps', at_least=1),
        'learning_rate': setting(6e-4, 'peak learning rate, after a linear warmup from 0', above=0),
        'warmup_steps': setting(120, 'steps of linear warmup', at_least=0),
        'decay': setting('cosine', 'how the rate decays after the warmup', choices=('cosine', 'linear', 'constant')),
        'end_lr_ratio': setting(0.1, 'the final learning rate as a fraction of the peak', at_least=0, at_most=1),
        # Extending a run past its train.steps keeps its schedule only with this set to the old train.steps.
        'decay_steps': setting(0, 'the step the decay ends at, the rate then held (0: train.steps)', at_least=0),
        'b1': setting(0.9, "AdamW's beta1", at_least=0, below=1),
        'b2': setting(0.95, "AdamW's beta2", at_least=0, below=1),
        'eps': setting(1e-8, "AdamW's epsilon", above=0),
        'weight_decay': setting(0.1, 'AdamW weight decay, of matrices only (never norm scales or λ vectors)',
                                at_least=0),
        'grad_clip': setting(1.0, 'global-norm gradient clipping (0: off)', at_least=0),
        'z_loss': setting(0.0, 'weight of the log(Z)^2 auxiliary loss', at_least=0),
        'loss_chunk_tokens': setting(0, "0: the loss from the full logits; N: N tokens' logits at a time, recomputed "
                                     'backward', at_least=0),
        'opt_moments_dtype': setting('float32', "how Adam's first moment is stored between steps (the second stays "
                                     'float32)', choices=('float32', 'bfloat16')),
        'on_nonfinite': setting('stop', 'a non-finite loss or gradient stops the run, or skips the step',
                                choices=('stop', 'skip')),
        'check_memory': setting(True, 'refuse, before anything is written, a run whose step cannot fit in memory'),
    },
    'mesh': {  # diffjax.model.sharding.mesh_shape checks the sizes against each other and the devices
        'data': setting(-1, 'data-parallel mesh axis size; -1: the remaining devices'),
        'fsdp': setting(1, 'fully sharded data-parallel mesh axis size; -1: the remaining devices'),
        'tensor': setting(1, 'tensor-parallel mesh axis size; -1: the remaining devices'),
    },
    'checkpoint': {
        'every_steps': setting(500, 'steps between checkpoints', at_least=1),
        'keep': setting(3, 'how many checkpoints to keep', at_least=1),
        'async_save': setting(True, 'save checkpoints in the background'),
        'init_from': setting('', "start from another run's parameters: its workdir, checkpoints folder or one step",
                             optional=True),
        'allow_config_change': setting(False, 'resume a workdir whose run had another model or data config'),
    },
    'log': {
        'every_steps': setting(10, 'steps between metric lines', at_least=1),
        'eval_every_steps': setting(500, 'steps between validations', at_least=1),
        'eval_batches': setting(16, 'batches per validation', at_least=1),
        'progress_bar': setting(True, 'show a progress bar with ETA'),
        'peak_flops_per_device': setting(0.0, 'peak FLOP/s of a device, for MFU; 0: looked up from the device kind',
                                         at_least=0),
        'profile_start_step': setting(0, 'the step a jax.profiler trace into WORKDIR/profile starts at; 0: none',
                                      at_least=0),
        'profile_steps': setting(5, 'how many steps the trace covers', at_least=1),
        'wandb_project': setting('', 'also log to this Weights & Biases project (pip install -e ".[wandb]")',
                                 optional=True),
        'sample_prompt': setting('def ', 'the prompt of the sample printed at the end', optional=True),
        'sample_tokens': setting(200, 'how many tokens that sample continues it by', at_least=0),
        'sample_temperature': setting(0.8, "that sample's temperature", at_least=0),
    },
}


def flatten(tree: dict, prefix: str = '') -> dict:
  """A nested config dict as {'section.key': value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


# {'section.key': Key} of every key of the run config.
KEYS = flatten(SCHEMA)
# What makes a workdir's checkpoints belong to one run: its model, its data and its sequence length.
IDENTITY = frozenset(name for name, key in KEYS.items() if key.identity)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({name: config_section(keys) if isinstance(keys, dict) else keys.initial()
                                 for name, keys in SCHEMA.items()})
  c.lock()  # a config file that sets a key diffjax does not have fails as it loads, naming the key
  return c


def check_values(config: ml_collections.ConfigDict):
  """Checks each value the run owns against its key; ModelConfig and the data pipeline check the rest."""
  for name, keys in SCHEMA.items():
    if isinstance(keys, Key):
      keys.check(name, config[name])
    elif name not in ('model', 'data'):
      check_section(name, keys, config[name])
  check_section('model', PLACEHOLDERS, config.model)


def resolved_model(values: dict, vocab_size: int | None = None) -> dict:
  """`model.*` values with the placeholders spelled out: n_kv_heads 0 (or None) is n_heads, and vocab_size 0 is the
  tokenizer's `vocab_size` rounded up to a multiple of 128 (left 0 where no tokenizer is given)."""
  values = dict(values)
  if not values.get('n_kv_heads') and 'n_heads' in values:
    values['n_kv_heads'] = values['n_heads']
  if not values.get('vocab_size') and vocab_size:
    values['vocab_size'] = -(-vocab_size // 128) * 128
  return values


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The validated ModelConfig of a run whose tokenizer has `vocab_size` tokens."""
  return ModelConfig.from_dict(resolved_model(config.model.to_dict(), vocab_size))


# The paper's scaling runs (layers, width, DIFF heads; the baseline has twice the heads). The facts sheet gives no
# FFN width for them: 8/3 of the width rounded to a multiple of 64 is used. Shared settings: sequence 2048,
# 0.25M-token batch, AdamW betas (0.9, 0.98), warmup 375, weight decay 0.05.
SCALING_RUNS = {'830m': (24, 1536, 8), '1.4b': (24, 2048, 8), '2.8b': (32, 2560, 10), '6.8b': (32, 4096, 16),
                '13.1b': (40, 5120, 20)}
# The runs whose blocks keep their matmul and attention outputs for the backward pass (model.remat_policy
# dots_attention): the 1.4B step then runs 9% faster than recomputing them and still fits one 80 GB GPU at its
# 16-sequence microbatches (a peak of 70.8 GiB of the 71.3 GiB pool; docs/performance.md, "The 1.4B step"). The
# larger runs would not fit one, so they recompute every block.
KEEP_DOTS_AND_ATTENTION = ('830m', '1.4b')


def recipe_data(c: ml_collections.ConfigDict):
  """Recipes train on C4 with a 32k SentencePiece vocabulary; override data.* to use local text instead."""
  c.data.source = 'tfds'
  c.data.tfds_name = 'c4/en:3.1.0'
  c.data.tokenizer = 'sentencepiece'
  c.data.sp_vocab_size = 32_000


def scaling_config(name: str) -> ml_collections.ConfigDict:
  layers, width, diff_heads = SCALING_RUNS[name]
  c = base_config()
  recipe_data(c)
  # The layers stay unrolled (model.scan_layers False): a scanned loop adds copies in and out of its stacked arrays,
  # 57-62 ms of a 1.4B step on an H100; unrolled, the step runs 10% faster (DIFF V1 691 -> 625 ms, the baseline
  # 602 -> 535) for 28 s more compilation (docs/performance.md, "The 1.4B step"). On TPU slices the compiler keeps
  # more temporaries unrolled (3B on v6e-8: 23.1 GiB a chip against 10.8), still within the chips (README).
  c.model.update(n_layers=layers, d_model=width, n_heads=2 * diff_heads, d_ff=round(width * 8 / 3 / 64) * 64,
                 max_len=2048, remat=True,
                 remat_policy='dots_attention' if name in KEEP_DOTS_AND_ATTENTION else 'nothing')
  c.train.update(seq_len=2048, global_batch_size=128, microbatches=8, steps=40_000, learning_rate=3.2e-4,
                 warmup_steps=375, b1=0.9, b2=0.98, weight_decay=0.05)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.every_steps = 1000
  c.log.eval_every_steps = 1000
  return c
