"""Bad input fails fast: before anything is compiled, exit status 1 and one `error:` line on stderr that names the
key and the fix, no traceback. Most kinds are checked in-process through `validate.check_config` (what every
`loop.Run` calls first); a set of them, and those found only while the data is opened, through the CLI itself."""

import concurrent.futures
import importlib.util
import os
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

import reliability_helpers as rh
from diffjax.errors import ConfigError
from diffjax.model import kernels as pallas_attention
from diffjax.model import sharding
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import optim
from diffjax.train import step as train_step
from diffjax.train import validate


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """configs/tiny.py with the harness's tiny model; `overrides` use `__` for the dot."""
  spec = importlib.util.spec_from_file_location('tiny_config', rh.REPO / 'configs' / 'tiny.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict({'model.d_model': 64, 'model.n_layers': 2, 'model.n_heads': 4,
                                     'model.d_ff': 128, 'model.max_len': 64, 'train.seq_len': 64,
                                     'train.global_batch_size': 8, 'train.steps': 60, 'train.warmup_steps': 5})
  config.update_from_flattened_dict({key.replace('__', '.'): value for key, value in overrides.items()})
  return config


@pytest.fixture(scope='module')
def other_shape_checkpoint(tmp_path_factory) -> str:
  """A workdir whose checkpoint holds a model of width 32 (the tests' model has width 64)."""
  workdir = tmp_path_factory.mktemp('width32')
  config = tiny_config(model__d_model=32)
  tx = optim.make_optimizer(config.train)
  abstract = train_step.abstract_state(defaults.model_config(config, 258), tx, sharding.make_mesh(config.mesh))
  state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)
  checkpoints = checkpoint_lib.Checkpointer(str(workdir / 'checkpoints'), keep=1, async_save=False)
  checkpoints.save(1, state, {}, config.to_dict())
  checkpoints.close()
  return str(workdir)


# kind: (overrides, the key the message must start with)
IN_PROCESS = {
    'width not divisible by the heads': ({'model__d_model': 100, 'model__n_heads': 8}, 'model.d_model'),
    'odd head count for DIFF V1': ({'model__d_model': 96, 'model__n_heads': 3}, 'model.n_heads'),
    'kv heads not dividing heads': ({'model__n_kv_heads': 3}, 'model.n_kv_heads'),
    'odd head width with RoPE': ({'model__d_model': 36, 'model__n_heads': 4}, 'model.d_model'),
    'unknown variant': ({'model__variant': 'diff_v3'}, 'model.variant'),
    'unknown attention implementation': ({'model__attention_impl': 'flash'}, 'model.attention_impl'),
    'cuDNN without a GPU': ({'model__attention_impl': 'cudnn'}, 'model.attention_impl'),
    'unknown dtype': ({'model__dtype': 'float8'}, 'model.dtype'),
    'unknown data source': ({'data__source': 's3'}, 'data.source'),
    'unknown tokenizer': ({'data__tokenizer': 'bpe'}, 'data.tokenizer'),
    'TFDS source without a dataset': ({'data__source': 'tfds'}, 'data.tfds_name'),
    'local source without a glob': ({'data__source': 'local'}, 'data.text_glob'),
    'missing data directory': ({'data__source': 'local', 'data__text_glob': '/no/such/folder'}, 'data.text_glob'),
    'glob in a missing folder': ({'data__source': 'local', 'data__text_glob': '/no/such/*.txt'}, 'data.text_glob'),
    'validation fraction out of range': ({'data__validation_fraction': 1.5}, 'data.validation_fraction'),
    'decay ending within the warmup': ({'train__decay_steps': 3}, 'train.decay_steps'),
    'SentencePiece vocabulary too small': ({'data__tokenizer': 'sentencepiece', 'data__sp_vocab_size': 10},
                                           'data.sp_vocab_size'),
    'sequence longer than the model maximum': ({'train__seq_len': 128}, 'train.seq_len'),
    'batch not divisible by shards x microbatches': ({'train__global_batch_size': 6, 'train__microbatches': 4},
                                                     'train.global_batch_size'),
    'mesh not matching the device count': ({'mesh__data': 2}, 'mesh'),
    'two mesh axes set to -1': ({'mesh__fsdp': -1}, 'mesh'),
    'zero learning rate': ({'train__learning_rate': 0.0}, 'train.learning_rate'),
    'negative learning rate': ({'train__learning_rate': -1e-3}, 'train.learning_rate'),
    'NaN learning rate': ({'train__learning_rate': float('nan')}, 'train.learning_rate'),
    'infinite weight decay': ({'train__weight_decay': float('inf')}, 'train.weight_decay'),
    'zero steps': ({'train__steps': 0}, 'train.steps'),
    'negative warmup': ({'train__warmup_steps': -5}, 'train.warmup_steps'),
    'warmup longer than training': ({'train__warmup_steps': 100}, 'train.warmup_steps'),
    'unknown schedule': ({'train__decay': 'step'}, 'train.decay'),
    'unknown non-finite mode': ({'train__on_nonfinite': 'ignore'}, 'train.on_nonfinite'),
    'negative loss chunk': ({'train__loss_chunk_tokens': -8192}, 'train.loss_chunk_tokens'),
    'unknown optimizer moments dtype': ({'train__opt_moments_dtype': 'float16'}, 'train.opt_moments_dtype'),
    'unknown remat policy': ({'model__remat': True, 'model__remat_policy': 'everything'}, 'model.remat_policy'),
    'beta of 1 or more': ({'train__b2': 1.0}, 'train.b2'),
    'final learning rate above the peak': ({'train__end_lr_ratio': 1.5}, 'train.end_lr_ratio'),
    'negative weight decay': ({'train__weight_decay': -0.1}, 'train.weight_decay'),
    'zero checkpoint interval': ({'checkpoint__every_steps': 0}, 'checkpoint.every_steps'),
    'vocabulary smaller than the tokenizer\'s': ({'model__vocab_size': 200}, 'model.vocab_size'),
    'missing init_from': ({'checkpoint__init_from': '/no/such/run'}, 'checkpoint.init_from'),
}


@pytest.mark.parametrize('kind', IN_PROCESS)
def test_check_config_names_the_key(kind, tmp_path):
  overrides, key = IN_PROCESS[kind]
  if kind == 'cuDNN without a GPU' and jax.default_backend() == 'gpu':
    pytest.skip('there is a GPU')
  with pytest.raises(ConfigError) as error:
    validate.check_config(tiny_config(**overrides), str(tmp_path))
  assert_one_line_naming(str(error.value), key)


@pytest.mark.parametrize('variant', ['baseline', 'diff_v2'])
def test_a_kernel_the_variant_lacks_is_refused_before_any_data(variant, tmp_path, monkeypatch):
  # With the interpret mode allowed, no GPU is needed: only the variant can make the choice impossible.
  monkeypatch.setenv(pallas_attention.INTERPRET_ENV, '1')
  data_dir = tmp_path / 'data'
  config = tiny_config(model__variant=variant, model__attention_impl='pallas', data__data_dir=str(data_dir))
  with pytest.raises(ConfigError) as error:
    validate.check_config(config, str(tmp_path / 'run'))
  assert_one_line_naming(str(error.value), 'model.attention_impl')
  assert 'diff_v1 only' in str(error.value) and not data_dir.exists()


def test_a_run_built_from_python_is_checked_before_its_workdir_or_data(tmp_path):
  # A notebook builds `loop.Run` itself, without the train command: the same one-line refusal, nothing written.
  from diffjax.train import loop
  config = tiny_config(train__warmup_steps=60, data__data_dir=str(tmp_path / 'data'))
  with pytest.raises(ConfigError) as error:
    loop.Run(config, str(tmp_path / 'run'))
  assert_one_line_naming(str(error.value), 'train.warmup_steps')
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'data').exists()


def test_zero_warmup_is_allowed(tmp_path):
  validate.check_config(tiny_config(train__warmup_steps=0), str(tmp_path))


def test_init_from_a_model_of_another_shape(tmp_path, other_shape_checkpoint):
  with pytest.raises(ConfigError) as error:
    validate.check_config(tiny_config(checkpoint__init_from=other_shape_checkpoint), str(tmp_path))
  assert_one_line_naming(str(error.value), 'checkpoint.init_from')
  assert 'has shape (32, 32) saved but the model needs (64, 64)' in str(error.value)


def test_unwritable_workdir(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(ConfigError) as error:
    validate.check_config(tiny_config(), str(tmp_path / 'file' / 'run'))  # even root cannot write under a file
  assert_one_line_naming(str(error.value), '--workdir')


def assert_one_line_naming(message: str, key: str):
  assert '\n' not in message, message
  assert message.startswith(f'{key}:') or message.startswith(f'{key} '), message


# -- through the command line ---------------------------------------------------------------------------------------

# kind: (what to pass besides the tiny run's flags, or instead of them for '--config'; the key the line names)
CLI = {
    'unknown --config key': (['--config.train.stepz=10'], 'train.stepz: unknown config key (did you mean steps?)'),
    'unknown key in a config file': (['--config={misspelt}'], 'stepz: unknown config key set in the config file '
                                     '(did you mean steps?); see the config keys in README.md'),
    'value of the wrong type': (['--config.train.steps=ten'], 'flag --config.train.steps=ten'),
    'missing config file': (['--config=configs/no_such_config.py'], '--config:'),
    'unknown TFDS dataset': (['--config.data.source=tfds', '--config.data.tfds_name=no_such_dataset'],
                             'data.tfds_name:'),
    'empty data directory': (['--config.data.text_glob={empty}'], 'data.text_glob:'),
    'corpus smaller than one sequence': (['--config.data.text_glob={small}'], 'data.text_glob:'),
    'init_from of another shape': (['--config.checkpoint.init_from={width32}'], 'checkpoint.init_from:'),
    'unwritable workdir': (['--workdir={file}/run'], '--workdir:'),
    'width not divisible by the heads': (['--config.model.n_heads=3'], 'model.d_model:'),
    'cuDNN without a GPU': (['--config.model.attention_impl=cudnn'], 'model.attention_impl:'),
    'negative learning rate': (['--config.train.learning_rate=-0.001'], 'train.learning_rate:'),
}


@pytest.fixture(scope='module')
def cli_results(tmp_path_factory, other_shape_checkpoint):
  """Every CLI case, two at a time (each is mostly Python start-up), each with its own empty compilation cache:
  a cache that stays empty proves that nothing was compiled."""
  folder = tmp_path_factory.mktemp('cli')
  corpus = rh.make_corpus(folder)
  (folder / 'empty').mkdir()
  (folder / 'small').mkdir()
  for name in ('a', 'b'):
    (folder / 'small' / f'{name}.txt').write_text('too short\n')
  (folder / 'file').write_text('')
  (folder / 'misspelt.py').write_text('from diffjax.run.defaults import base_config\n\n\ndef get_config():\n'
                                      '  c = base_config()\n  c.train.stepz = 10\n  return c\n')
  paths = {'empty': folder / 'empty', 'small': folder / 'small', 'width32': other_shape_checkpoint,
           'file': folder / 'file', 'misspelt': folder / 'misspelt.py'}

  def run(kind):
    extra = [arg.format(**paths) for arg in CLI[kind][0]]
    config = [arg for arg in extra if arg.startswith('--config=')]
    command = rh.command(folder / kind.replace(' ', '_'), rh.flags(corpus, rh.STEPS) +
                         [arg for arg in extra if arg not in config])
    command = [config[0] if config and arg.startswith('--config=') else arg for arg in command]
    cache = folder / f'cache_{kind.replace(" ", "_")}'
    began = time.monotonic()
    result = subprocess.run(command, cwd=rh.REPO, env=rh.env(str(cache)), capture_output=True, text=True,
                            timeout=120)
    return result, time.monotonic() - began, cache

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(zip(CLI, pool.map(run, CLI)))


@pytest.mark.slow
@pytest.mark.parametrize('kind', CLI)
def test_cli_fails_fast_with_one_line(kind, cli_results):
  if kind == 'cuDNN without a GPU' and jax.default_backend() == 'gpu':
    pytest.skip('there is a GPU')
  result, seconds, cache = cli_results[kind]
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr
  lines = rh.nonempty_lines(result.stderr)
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith(f'error: {CLI[kind][1]}'), lines[0]
  assert not (os.path.isdir(cache) and os.listdir(cache)), 'something was compiled before the error'
  assert seconds < 30


def test_the_compile_detector_sees_a_compilation(tmp_path):
  """The check above relies on JAX writing every compilation into the cache; it does."""
  subprocess.run([sys.executable, '-c', 'import jax; jax.jit(lambda x: x + 1)(1)'], env=rh.env(str(tmp_path / 'cache')),
                 check=True, timeout=60)
  assert os.listdir(tmp_path / 'cache')


def test_debug_shows_the_traceback(tmp_path):
  result = subprocess.run(rh.command(tmp_path, ['--config.model.n_heads=3', '--debug']), cwd=rh.REPO, env=rh.env(),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert 'Traceback' in result.stderr
  assert rh.nonempty_lines(result.stderr)[-1].startswith('error: model.d_model: ')
