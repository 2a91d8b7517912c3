"""The memory preflight: its estimate against the compiled step's measured memory, the documented configs on the
hardware they name, one-line refusals that name a key and a value that fits, and nothing touched before them."""

import dataclasses
import functools
import importlib.util
import os
import subprocess

import jax
import pytest

import reliability_helpers as rh
from diffjax.data import pipeline as data
from diffjax.errors import ConfigError
from diffjax.model import sharding
from diffjax.run import defaults
from diffjax.train import preflight

GIB = 2**30
ONE_DEVICE = {'data': 1, 'fsdp': 1, 'tensor': 1}
# What JAX may allocate on one card by default: 75% of its memory (an H100 80GB reports 79.6 GiB in all).
H100 = preflight.Budget(device=int(0.75 * 79.6 * GIB), host=128 * GIB, local_devices=1)
TPU_V5P, TPU_V6E = (preflight.Budget(device=gib * GIB, host=400 * GIB, local_devices=4) for gib in (95, 32))
LAPTOP = preflight.Budget(device=None, host=8 * GIB, local_devices=1)


def config_file(name: str, **overrides):
  spec = importlib.util.spec_from_file_location(name, rh.REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict({key.replace('__', '.'): value for key, value in overrides.items()})
  return config


def seed_at_64x2048(vocab: int, **overrides):
  """The seed model at the batch of the README's real runs: 64 x 2048 tokens in one microbatch."""
  return config_file('seed', **{'model__vocab_size': vocab, 'train__global_batch_size': 64, 'train__microbatches': 1,
                                **overrides})


def model_config(config):
  return defaults.model_config(config, data.tokenizer_vocab_size(config.data))


def estimate(config, impl: str, mesh=ONE_DEVICE) -> preflight.Estimate:
  cfg = model_config(config)
  return preflight.estimate(cfg, config.train.to_dict(), config.data, impl, mesh,
                            preflight.state_bytes(cfg, config.train, mesh))


def check(config, impl: str, budget: preflight.Budget, mesh=ONE_DEVICE, compiled=None):
  preflight.check(config, model_config(config), impl, mesh, budget, compiled)


# (config, attention path, mesh, GiB of temporaries the compiled step was measured to need: launch/results/; the TPU
# rows are `launch/aot_compile.py --config.model.attention_impl=xla`, tpu_aot_memory_per_chip_xla_attention.jsonl,
# compiled when the 1.4B config recomputed every block)
NOTHING = {'model__remat_policy': 'nothing'}
MEASURED = {
    'seed, bytes, H100': (lambda: seed_at_64x2048(384), 'cudnn', ONE_DEVICE, 24.14),
    'seed, 32k chunked, H100': (lambda: seed_at_64x2048(32000, train__loss_chunk_tokens=16384), 'cudnn', ONE_DEVICE,
                                26.94),
    'seed, 32k, H100': (lambda: seed_at_64x2048(32000), 'cudnn', ONE_DEVICE, 38.39),
    '1.4B on v5p-8': (lambda: config_file('paper_1_4b', **NOTHING), 'xla', {'data': 1, 'fsdp': 4, 'tensor': 1},
                      7.01),
    '1.4B on v6e-8': (lambda: config_file('paper_1_4b', **NOTHING), 'xla', {'data': 1, 'fsdp': 8, 'tensor': 1},
                      3.84),
    '3B on v5p-8': (lambda: config_file('paper_3b'), 'xla', {'data': 1, 'fsdp': 4, 'tensor': 1}, 16.49),
    '3B, 32 microbatches, on v5p-8': (lambda: config_file('paper_3b', train__microbatches=32), 'xla',
                                      {'data': 1, 'fsdp': 4, 'tensor': 1}, 42.30),
    '3B, 32 microbatches, on v6e-8': (lambda: config_file('paper_3b', train__microbatches=32), 'xla',
                                      {'data': 1, 'fsdp': 8, 'tensor': 1}, 22.65),
}


@pytest.mark.parametrize('case', MEASURED)
def test_estimate_is_within_ten_percent_of_the_measured_temporaries(case):
  make, impl, mesh, measured_gib = MEASURED[case]
  need = estimate(make(), impl, mesh)
  assert abs((need.gradients + need.activations) / GIB / measured_gib - 1) < 0.1


# What each remat policy keeps beyond `nothing`, in GiB of temporaries, as the 1.4B step compiled on one H100 kept
# it at 16 x 2048 tokens (launch/results/remat_1_4b_h100/pool92_*.json). DIFF V1 under `attention` alone keeps 8.0
# GiB where the formula counts its kernel outputs as 6.0; with the matmul outputs beside them the two agree again.
POLICY_INCREMENTS = {('dots', 'diff_v1'): 29.47, ('dots', 'baseline'): 29.51, ('attention', 'baseline'): 3.00,
                     ('dots_attention', 'diff_v1'): 35.55, ('dots_attention', 'baseline'): 32.62}


@pytest.mark.parametrize('policy, variant', POLICY_INCREMENTS)
def test_what_a_remat_policy_keeps_is_within_ten_percent_of_the_compiled_step(policy, variant):
  one_microbatch = dict(train__global_batch_size=16, train__microbatches=1, model__variant=variant)
  kept = lambda policy: estimate(config_file('paper_1_4b', model__remat_policy=policy, **one_microbatch),
                                 'cudnn').activations / GIB
  assert abs((kept(policy) - kept('nothing')) / POLICY_INCREMENTS[policy, variant] - 1) < 0.1


def test_parameters_and_optimizer_state_match_the_compiled_arguments():
  """The state term is the sharded train state itself: 9.42 GiB per v5p chip for the 3B model (README)."""
  assert estimate(config_file('paper_3b'), 'xla', {'data': 1, 'fsdp': 4, 'tensor': 1}).state / GIB == pytest.approx(
      9.42, abs=0.02)


# (config, attention path, mesh, the hardware the config or README names)
DOCUMENTED = {
    'tiny on a laptop CPU': (lambda: config_file('tiny'), 'xla', ONE_DEVICE, LAPTOP),
    'seed as committed on one 80 GB GPU': (lambda: config_file('seed'), 'cudnn', ONE_DEVICE, H100),
    'seed at 64x2048, bytes, on one 80 GB GPU': (lambda: seed_at_64x2048(384), 'cudnn', ONE_DEVICE, H100),
    'seed at 64x2048, 32k, on one 80 GB GPU': (lambda: seed_at_64x2048(32000), 'cudnn', ONE_DEVICE, H100),
    '1.4B on v5p-8': (lambda: config_file('paper_1_4b'), 'xla', {'data': 1, 'fsdp': 4, 'tensor': 1}, TPU_V5P),
    '1.4B on v6e-8': (lambda: config_file('paper_1_4b'), 'xla', {'data': 1, 'fsdp': 8, 'tensor': 1}, TPU_V6E),
    '3B on v5p-8': (lambda: config_file('paper_3b'), 'xla', {'data': 1, 'fsdp': 4, 'tensor': 1}, TPU_V5P),
    '3B on v6e-8': (lambda: config_file('paper_3b'), 'xla', {'data': 1, 'fsdp': 8, 'tensor': 1}, TPU_V6E),
    '3B, 32 microbatches, on v6e-8': (lambda: config_file('paper_3b', train__microbatches=32), 'xla',
                                      {'data': 1, 'fsdp': 8, 'tensor': 1}, TPU_V6E),
}


@pytest.mark.parametrize('case', DOCUMENTED)
def test_documented_configs_fit_the_hardware_they_name(case):
  make, impl, mesh, budget = DOCUMENTED[case]
  check(make(), impl, budget, mesh)


# (config, budget, the key the refusal names, the value it suggests)
REFUSED = {
    'logits of a large vocabulary': (lambda: seed_at_64x2048(32000), preflight.Budget(40 * GIB, 128 * GIB, 1),
                                     'train.loss_chunk_tokens', 8192),
    'activations of a large batch': (lambda: seed_at_64x2048(384), preflight.Budget(16 * GIB, 128 * GIB, 1),
                                     'train.microbatches', 2),
    'one sequence too many activations': (lambda: config_file('seed', train__global_batch_size=1,
                                                              train__microbatches=1, model__vocab_size=384),
                                          preflight.Budget(int(0.8 * GIB), 128 * GIB, 1), 'model.remat', True),
    'batches the host cannot read ahead': (lambda: seed_at_64x2048(384, train__global_batch_size=8192,
                                                                   train__microbatches=128),
                                           preflight.Budget(80 * GIB, 4 * GIB, 1), 'train.global_batch_size', 7168),
}


@pytest.mark.parametrize('case', REFUSED)
def test_refusal_names_the_key_and_a_value_that_fits(case):
  make, budget, key, value = REFUSED[case]
  config = make()
  with pytest.raises(ConfigError) as error:
    check(config, 'cudnn', budget)
  message = str(error.value)
  assert '\n' not in message and message.startswith(f'{key}: this run needs about '), message
  assert f'set {key}={value} (about ' in message and message.endswith(
      'or set train.check_memory=False to start anyway (diffjax/train/preflight.py explains the estimate)'), message
  config.update_from_flattened_dict({key: value})
  check(config, 'cudnn', budget)  # the suggestion fits


def test_a_model_that_fits_nowhere_names_the_model():
  config = config_file('tiny', model__d_model=1048576)
  with pytest.raises(ConfigError) as error:
    check(config, 'xla', LAPTOP)
  assert str(error.value).startswith('model: this run needs about ')
  assert 'use a smaller model (model.d_model, model.n_layers, model.d_ff)' in str(error.value)


def test_check_memory_false_lets_the_run_start():
  check(config_file('tiny', model__d_model=1048576, train__check_memory=False), 'xla', LAPTOP)


def test_a_cpu_host_counts_every_local_device():
  """CPU devices share the host's memory, so eight of them need eight times one's estimate."""
  config = seed_at_64x2048(384)
  need = estimate(config, 'cudnn')
  fits_one = preflight.Budget(None, need.device + need.host + GIB, 1)
  check(config, 'cudnn', fits_one)
  with pytest.raises(ConfigError):
    check(config, 'cudnn', dataclasses.replace(fits_one, local_devices=8))


@pytest.mark.parametrize('override, key', [('--config.model.d_model=1048576', 'model'),
                                           ('--config.train.global_batch_size=1048576', 'train.')])
def test_cli_refuses_before_touching_the_workdir_or_the_data(tmp_path, override, key):
  """The probe's two runs: a model that cannot fit wrote config.json and checkpoints/ and died out of memory; a
  batch that cannot fit sat silent for minutes. Now both end in one line, with no workdir and no data prepared."""
  corpus = rh.make_corpus(tmp_path)
  workdir = tmp_path / 'run'
  result = subprocess.run(rh.command(workdir, rh.flags(corpus, rh.STEPS) + [override]), cwd=rh.REPO,
                          env=rh.env(str(tmp_path / 'cache')), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  [line] = rh.nonempty_lines(result.stderr)
  assert line.startswith(f'error: {key}') and 'this run needs about' in line, line
  assert not workdir.exists()
  assert not os.path.exists(corpus[1])  # data.data_dir: nothing prepared
  assert not (tmp_path / 'cache').exists() or not os.listdir(tmp_path / 'cache')  # nothing compiled


def test_trainings_sharing_a_device_split_its_memory_and_allocate_in_stream_order():
  env = preflight.memory_env(2, {'PATH': '/bin'})
  assert env == {'PATH': '/bin', 'XLA_CLIENT_MEM_FRACTION': '0.45', 'XLA_PYTHON_CLIENT_ALLOCATOR': 'cuda_async'}
  assert preflight.memory_env(3, {})['XLA_CLIENT_MEM_FRACTION'] == '0.30'
  # A run alone keeps JAX's allocator and takes the whole share.
  assert preflight.memory_env(1, {'PATH': '/bin'}) == {'PATH': '/bin', 'XLA_CLIENT_MEM_FRACTION': '0.90'}


@pytest.mark.parametrize('name', ['XLA_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_MEM_FRACTION'])
def test_a_sharing_setting_the_user_made_wins(name):
  # JAX refuses both names of the fraction at once, so a user's old-named one must not gain a new-named twin.
  env = preflight.memory_env(2, {name: '0.3', 'XLA_PYTHON_CLIENT_ALLOCATOR': 'platform'})
  assert env == {name: '0.3', 'XLA_PYTHON_CLIENT_ALLOCATOR': 'platform'}


# The 1.4B config as it trains, on one H100 80GB: the pool JAX may fill (90% of the card) and the step as XLA compiled
# it there, arguments and temporaries (launch/results/remat_1_4b_h100/config_dots_attention.json: 68.36 GiB peak).
H100_POOL = preflight.Budget(device=int(71.26 * GIB), host=128 * GIB, local_devices=1)
COMPILED_1_4B_ON_H100 = int(68.36 * GIB)


def test_an_estimate_near_the_limit_is_settled_by_the_compiled_step():
  config = config_file('paper_1_4b')  # dots_attention, 8 microbatches of 16
  assert estimate(config, 'cudnn').device > H100_POOL.device  # the formula alone would refuse it
  asked = []

  def compiled(config, cfg, total=COMPILED_1_4B_ON_H100):
    asked.append(cfg.remat_policy)
    return total

  check(config, 'cudnn', H100_POOL, compiled=compiled)
  assert asked == ['dots_attention']
  with pytest.raises(ConfigError) as error:
    check(config, 'cudnn', H100_POOL, compiled=functools.partial(compiled, total=H100_POOL.device + GIB))
  message = str(error.value)
  assert message.startswith('model.remat_policy: this run needs about 72.3 GiB per device (the train step as XLA '
                            'compiled it, and the batches read ahead), but a device has 71.3 GiB; set '
                            'model.remat_policy=nothing (about '), message


def test_an_estimate_far_from_the_limit_compiles_nothing():
  def compiled(config, cfg):
    raise AssertionError('compiled a step whose estimate was far from the limit')

  check(config_file('paper_1_4b'), 'cudnn', preflight.Budget(200 * GIB, 128 * GIB, 1), compiled=compiled)
  with pytest.raises(ConfigError):
    check(config_file('paper_1_4b'), 'cudnn', preflight.Budget(40 * GIB, 128 * GIB, 1), compiled=compiled)


def test_compiled_memory_counts_the_donated_state_once():
  """The tiny step compiled on the CPU: its arguments hold the state, whose updated copy (the outputs) reuses them."""
  config = config_file('tiny')
  cfg = model_config(config)
  parts = preflight.compiled_memory(config, cfg, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  state, _ = preflight.state_bytes(cfg, config.train, ONE_DEVICE)
  assert parts['argument'] >= state and parts['alias'] >= state  # the donated state is aliased by its update
  counted_twice = parts['argument'] + parts['output'] + parts['temp'] + parts['generated_code']
  assert parts['argument'] + parts['temp'] <= parts['total'] <= counted_twice - state


def test_a_step_its_compiler_cannot_fit_leaves_the_estimate_to_refuse_it():
  with pytest.raises(ConfigError) as error:
    check(config_file('paper_1_4b'), 'cudnn', H100_POOL, compiled=lambda config, cfg: None)
  assert 'per device (parameters and optimizer state ' in str(error.value)
