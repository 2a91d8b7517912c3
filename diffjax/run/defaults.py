"""Every config key with its default. Files in `configs/` start from `base_config()` and change what they need."""

import dataclasses

import ml_collections

from diffjax.model.config import ModelConfig


def base_config() -> ml_collections.ConfigDict:
  from diffjax.data.pipeline import default_data_config  # the data pipeline owns its keys
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
  c.model.vocab_size = 0  # 0: the tokenizer's vocabulary, rounded up to a multiple of 128
  c.model.n_kv_heads = 0  # 0: as many as n_heads (no GQA)

  c.data = default_data_config()

  c.train = ml_collections.ConfigDict()
  c.train.seq_len = 2048
  c.train.global_batch_size = 8  # sequences per optimizer step, over all devices
  c.train.microbatches = 1  # gradient accumulation: the batch is split into this many sequential pieces
  c.train.steps = 10_000
  c.train.learning_rate = 6e-4
  c.train.warmup_steps = 120
  c.train.decay = 'cosine'  # cosine | linear | constant
  c.train.end_lr_ratio = 0.1  # final learning rate as a fraction of the peak
  # The step by which the decay ends; the learning rate then holds at its final value. 0: train.steps. Extending a
  # run past its train.steps keeps its schedule only with this set to the old train.steps.
  c.train.decay_steps = 0
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0  # global-norm clipping; 0 turns it off
  c.train.z_loss = 0.0  # weight of the log(Z)^2 auxiliary loss
  # 0: the loss from full logits; N: from N tokens' logits at a time (diffjax.model.losses)
  c.train.loss_chunk_tokens = 0
  c.train.opt_moments_dtype = 'float32'  # float32 | bfloat16: how Adam's first moment is stored between steps
  c.train.on_nonfinite = 'stop'  # stop | skip: what a non-finite loss or gradient does
  c.train.check_memory = True  # refuse a run whose estimated memory does not fit (diffjax.train.preflight)

  c.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})  # -1: the remaining devices

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True
  c.checkpoint.init_from = ''  # a checkpoint directory (or a workdir) whose parameters start this run
  c.checkpoint.allow_config_change = False  # resume even if the workdir's run had another model/data config

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10
  c.log.eval_every_steps = 500
  c.log.eval_batches = 16
  c.log.progress_bar = True
  c.log.peak_flops_per_device = 0.0  # 0: looked up from the device kind (for MFU)
  # A jax.profiler trace of steps [profile_start_step, profile_start_step + profile_steps) goes to WORKDIR/profile
  # (TensorBoard's profile plugin and Perfetto read it; launch/profile_summary.py prints the top device ops).
  c.log.profile_start_step = 0  # 0: no trace
  c.log.profile_steps = 5
  c.log.wandb_project = ''  # a Weights & Biases project to log to as well (pip install -e ".[wandb]"); '': none
  c.log.sample_prompt = 'def '
  c.log.sample_tokens = 200
  c.log.sample_temperature = 0.8
  c.lock()  # a config file that sets a key diffjax does not have fails as it loads, naming the key
  return c


def flatten(tree: dict, prefix: str = '') -> dict:
  """A nested config dict as {'section.key': value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The validated ModelConfig of a run, with the 0 placeholders resolved."""
  values = config.model.to_dict()
  values['vocab_size'] = values['vocab_size'] or -(-vocab_size // 128) * 128
  values['n_kv_heads'] = values['n_kv_heads'] or None
  return ModelConfig.from_dict(values)


# The paper's scaling runs (layers, width, DIFF heads; the baseline has twice the heads). The facts sheet gives no
# FFN width for them: 8/3 of the width rounded to a multiple of 64 is used. Shared settings: sequence 2048,
# 0.25M-token batch, AdamW betas (0.9, 0.98), warmup 375, weight decay 0.05.
SCALING_RUNS = {'830m': (24, 1536, 8), '1.4b': (24, 2048, 8), '2.8b': (32, 2560, 10), '6.8b': (32, 4096, 16),
                '13.1b': (40, 5120, 20)}


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
  c.model.update(n_layers=layers, d_model=width, n_heads=2 * diff_heads, d_ff=round(width * 8 / 3 / 64) * 64,
                 max_len=2048, remat=True, scan_layers=True)
  c.train.update(seq_len=2048, global_batch_size=128, microbatches=8, steps=40_000, learning_rate=3.2e-4,
                 warmup_steps=375, b1=0.9, b2=0.98, weight_decay=0.05)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.checkpoint.every_steps = 1000
  c.log.eval_every_steps = 1000
  return c
