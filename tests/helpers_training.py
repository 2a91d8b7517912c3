"""Shared pieces of the training-system tests: tiny configs, a synthetic corpus and a CLI runner."""

import importlib.util
import json
import os
import pathlib
import random
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from diffjax.model import sharding
from diffjax.model import transformer as model_lib
from diffjax.model.config import ModelConfig
from diffjax.run import defaults
from diffjax.train import step as train_step

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / 'configs' / 'tiny.py'

# Common English words, most frequent first: a Zipf draw over them gives text with English-like byte statistics,
# so a byte-level model has something to learn within a few dozen steps.
_WORDS = """the of and to a in is it you that he was for on are with as his they be at one have this from or had
by word but what some we can out other were all there when up use your how said an each she which do their time if
will way about many then them write would like so these her long make thing see him two has look more day could go
come did number sound no most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every good me give our under name
very through just form sentence great think say help low line differ turn cause much mean before move right boy old
too same tell does set three want air well also play small end put home read hand port large spell add even land here
must big high such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow study still
learn plant cover food sun four between state keep eye never last let thought city tree cross farm hard start might
story saw far sea draw left late run while press close night real life few north""".split()


def english_like_text(num_chars: int, seed: int) -> str:
  """Deterministic paragraphs of Zipf-distributed words, capitalised sentences and punctuation."""
  rng = random.Random(seed)
  weights = [1.0 / (rank + 1) for rank in range(len(_WORDS))]
  paragraphs, length = [], 0
  while length < num_chars:
    sentences = []
    for _ in range(rng.randint(2, 6)):
      words = rng.choices(_WORDS, weights, k=rng.randint(4, 14))
      if rng.random() < 0.3:
        words[rng.randrange(len(words))] += ','
      sentences.append(' '.join(words).capitalize() + rng.choice('...?!'))
    paragraphs.append(' '.join(sentences))
    length += len(paragraphs[-1]) + 2
  return '\n\n'.join(paragraphs)[:num_chars] + '\n'


def write_corpus(folder: pathlib.Path, num_docs: int = 8, chars_per_doc: int = 30_000) -> pathlib.Path:
  """`num_docs` .txt files of English-like text in `folder` (a corpus for data.source='local')."""
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(num_docs):
    (folder / f'doc{i:02d}.txt').write_text(english_like_text(chars_per_doc, seed=i), encoding='utf-8')
  return folder


# A model that trains 40 steps in seconds on a CPU and still has every parameter kind of DIFF V1.
TINY_MODEL = {'model.d_model': 64, 'model.n_layers': 2, 'model.n_heads': 4, 'model.d_ff': 128,
              'model.max_len': 64, 'model.dtype': 'float32', 'model.attention_impl': 'xla'}


def run_overrides(corpus: pathlib.Path, data_dir: pathlib.Path, **overrides) -> dict:
  """Dotted-key overrides of configs/tiny.py for a seconds-long CLI run on `corpus`.

  Keyword names use `__` for the dot (`train__steps=40`); the same dict drives `load_config` and `cli_flags`.
  """
  values = {
      **TINY_MODEL,
      'data.source': 'local', 'data.text_glob': str(corpus), 'data.data_dir': str(data_dir),
      'train.seq_len': 64, 'train.global_batch_size': 8, 'train.steps': 40, 'train.warmup_steps': 5,
      'checkpoint.every_steps': 10, 'log.every_steps': 1, 'log.eval_every_steps': 20, 'log.eval_batches': 2,
      'log.progress_bar': False, 'log.sample_tokens': 24,
  }
  values.update({key.replace('__', '.'): value for key, value in overrides.items()})
  return values


def load_config_file(path: pathlib.Path) -> ml_collections.ConfigDict:
  """The config a file in configs/ returns."""
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def load_config(overrides: dict) -> ml_collections.ConfigDict:
  """configs/tiny.py with dotted-key overrides applied, as the CLI would build it."""
  config = load_config_file(TINY_CONFIG)
  for dotted, value in overrides.items():
    *parents, key = dotted.split('.')
    section = config
    for parent in parents:
      section = section[parent]
    section[key] = value
  return config


def cli_flags(overrides: dict) -> list[str]:
  return [f'--config.{key}={value}' for key, value in overrides.items()]


def cli_command(workdir: pathlib.Path, overrides: dict) -> list[str]:
  """`python -m diffjax.train --config=configs/tiny.py --workdir=... --config.KEY=VALUE...`."""
  return [sys.executable, '-m', 'diffjax.train', f'--config={TINY_CONFIG}', f'--workdir={workdir}',
          *cli_flags(overrides)]


def cli_env(compilation_cache: pathlib.Path | None = None) -> dict:
  """The environment of a CLI run: one CPU device, and optionally a persistent compilation cache.

  Runs of the same model compile the same programs; sharing the cache skips all but the first compilation.
  """
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  if compilation_cache is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  with open(workdir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f if line.strip()]


def train_losses(records: list[dict]) -> dict[int, float]:
  """{step: loss} of the training records (evaluation records have no `loss`)."""
  return {r['step']: r['loss'] for r in records if 'loss' in r}


def tiny_model(**overrides) -> ModelConfig:
  """A float32 DIFF V1 model on the XLA attention path, the smallest that keeps every axis shardable by 2."""
  values = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32, dtype='float32',
                attention_impl='xla')
  values.update(overrides)
  return ModelConfig(**values).validated()


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The `train` section of the defaults with overrides."""
  train_cfg = defaults.base_config().train
  train_cfg.update(overrides)
  return train_cfg


def single_device_mesh():
  return sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """NumPy parameters of the model's real tree, drawn so that every kind of parameter matters.

  Cheaper than the model's initialiser, which takes seconds to compile on a CPU. Kernels are N(0, 1/fan_in),
  norm scales U(0.5, 1.5) and λ vectors N(0, 0.3), so no scale or λ sits at a value that could hide its use.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'kernel':
      value = rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0])
    elif name == 'embedding':
      value = rng.normal(size=leaf.shape)
    elif name == 'scale':
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    elif name.startswith('lambda_'):
      value = rng.normal(size=leaf.shape) * 0.3
    else:
      raise AssertionError(f'no rule for parameter {jax.tree_util.keystr(path)}')
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(model_lib.abstract_params(cfg)['params']))


def sharded_state(cfg: ModelConfig, tx, mesh, params) -> dict:
  """A fresh train state holding `params`, placed with the shardings the compiled step expects."""
  state = {'step': np.int32(0), 'params': params, 'opt_state': tx.init(params), 'nonfinite_steps': np.int32(0),
           'first_nonfinite_step': np.int32(-1)}
  # The same tree as the library's own initial state, or this helper has fallen behind it.
  expected = jax.tree.structure(train_step.abstract_state(cfg, tx, mesh))
  assert jax.tree.structure(state) == expected, 'the train state changed shape; update sharded_state'
  return jax.device_put(state, train_step.state_shardings(cfg, tx, mesh))
