"""The train step on 8 fake CPU devices: every mesh computes the one-device result, with parameters sharded.

XLA reads the fake device count once, before JAX starts, and the rest of the suite runs on one device. So the
test runs this file as a script in a subprocess with XLA_FLAGS set; the script prints one JSON document.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from diffjax.model import sharding
from diffjax.train import optim
from diffjax.train import step as train_step
from helpers_training import random_params, sharded_state, tiny_model, train_config

pytestmark = pytest.mark.slow  # end-to-end runs: the quick subset (pytest -m "not slow") leaves them out

NUM_DEVICES = 8
# name: ((data, fsdp, tensor), microbatches, train.loss_chunk_tokens). The chunk of 25 divides neither the 128
# tokens nor its own share of the 4 batch shards, so the padded last chunk and uneven shards are both exercised.
MESHES = {'one_device': ((1, 1, 1), 1, 0), 'data8': ((8, 1, 1), 1, 0), 'data2_fsdp2_tensor2': ((2, 2, 2), 1, 0),
          'data2_fsdp2_tensor2_accumulating': ((2, 2, 2), 2, 0), 'data2_fsdp2_tensor2_chunked_loss': ((2, 2, 2), 1, 25)}
STEPS = 3
LEARNING_RATE = 1e-2
# Parameters named as in the model, with the logical axes they are created with.
EXPECTED_SPECS = {
    'embed/embedding': ['tensor', 'fsdp'],  # (vocab, embed)
    'lm_head/kernel': ['fsdp', 'tensor'],  # (embed, vocab)
    'block_0/attn/q_proj/kernel': ['fsdp', 'tensor'],  # (embed, heads)
    'block_0/attn/k_proj/kernel': ['fsdp', 'tensor'],  # (embed, kv)
    'block_1/attn/v_proj/kernel': ['fsdp', 'tensor'],  # (embed, kv)
    'block_1/attn/out_proj/kernel': ['tensor', 'fsdp'],  # (heads, embed)
    'block_0/ffn/gate_proj/kernel': ['fsdp', 'tensor'],  # (embed, mlp)
    'block_0/ffn/down_proj/kernel': ['tensor', 'fsdp'],  # (mlp, embed)
    'block_0/attn_norm/scale': [None],
    'block_1/attn/subln/scale': [None],
    'final_norm/scale': [None],
    'block_0/attn/lambda_q1': [None],
}


def run_meshes() -> dict:
  """Runs in the subprocess: the same steps from the same state on each mesh; returns what the test checks."""
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  # Every sharded dimension is a multiple of 2; vocab 64 and d_ff 96 keep the shard shapes of each axis distinct.
  cfg = tiny_model(vocab_size=64, d_model=32, d_ff=96, n_heads=4, max_len=16)
  optimizer_cfg = dict(learning_rate=LEARNING_RATE, warmup_steps=1, steps=100, decay='constant')
  tx = optim.make_optimizer(train_config(**optimizer_cfg))
  schedule = optim.learning_rate_schedule(train_config(**optimizer_cfg))
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(STEPS):
    tokens = rng.integers(0, cfg.vocab_size, size=(8, 17), dtype=np.int32)
    mask = np.ones((8, 16), np.float32)
    mask[3, 10:] = mask[6, 2:] = 0  # uneven padding, so the data shards hold different token counts
    batches.append({'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'mask': mask})

  def name(path):
    return '/'.join(str(getattr(key, 'key', key)) for key in path)

  out = {'losses': {}, 'grad_norms': {}, 'params': {}}
  for mesh_name, (shape, microbatches, chunk) in MESHES.items():
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), devices=devices)
    step_cfg = train_config(microbatches=microbatches, loss_chunk_tokens=chunk, **optimizer_cfg)
    train, _ = train_step.compile_steps(cfg, tx, schedule, step_cfg, mesh)
    state = sharded_state(cfg, tx, mesh, random_params(cfg))
    losses, norms = [], []
    for batch in batches:
      state, metrics = train(state, batch)
      losses.append(float(metrics['loss']))
      norms.append(float(metrics['grad_norm']))
    out['losses'][mesh_name], out['grad_norms'][mesh_name] = losses, norms
    flat = jax.tree_util.tree_flatten_with_path(state['params'])[0]
    out['params'][mesh_name] = {name(path): np.asarray(leaf).tolist() for path, leaf in flat}
    if mesh_name == 'data2_fsdp2_tensor2':
      # The model's logical activation constraints reach the compiled program (under the legacy `with mesh:`
      # Flax saw no mesh and dropped every one of them).
      text = train.lower(state, batches[0]).as_text()
      out['constraints'] = len(re.findall(r'sharding_constraint|@Sharding', text))
      out['specs'] = {name(path): list(leaf.sharding.spec) + [None] * (leaf.ndim - len(leaf.sharding.spec))
                      for path, leaf in flat}
      out['global_shapes'] = {name(path): list(leaf.shape) for path, leaf in flat}
      out['shard_shapes'] = {name(path): sorted({tuple(s.data.shape) for s in leaf.addressable_shards})
                             for path, leaf in flat}
      out['shards_per_leaf'] = {name(path): len(leaf.addressable_shards) for path, leaf in flat}
      mu = jax.tree_util.tree_flatten_with_path(optax.tree_utils.tree_get(state['opt_state'], 'mu'))[0]
      out['mu_specs'] = {name(path): list(leaf.sharding.spec) + [None] * (leaf.ndim - len(leaf.sharding.spec))
                         for path, leaf in mu}
  return out


@pytest.fixture(scope='module')
def result():
  # Five meshes of eight devices take most of a minute to compile; LLVM's optimisations would add half again,
  # for steps that run in milliseconds either way.
  flags = f'--xla_force_host_platform_device_count={NUM_DEVICES} --xla_backend_optimization_level=0'
  env = {**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(os.path.abspath(__file__)))
  assert proc.returncode == 0, proc.stderr[-5000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('mesh_name', [name for name in MESHES if name != 'one_device'])
def test_every_mesh_computes_the_one_device_step(result, mesh_name):
  np.testing.assert_allclose(result['losses'][mesh_name], result['losses']['one_device'], rtol=1e-5)
  np.testing.assert_allclose(result['grad_norms'][mesh_name], result['grad_norms']['one_device'], rtol=1e-4)
  # Step 1 runs at learning rate 0; the parameters after steps 2 and 3 show the updates agree as well. Adam
  # divides by sqrt(v): where a gradient is near zero, float32 noise moves a parameter by up to a fraction of the
  # learning rate, while a wrong update would move it by the learning rate itself.
  for leaf, expected in result['params']['one_device'].items():
    np.testing.assert_allclose(result['params'][mesh_name][leaf], expected, rtol=1e-5, atol=0.02 * LEARNING_RATE,
                               err_msg=leaf)


def test_losses_change_between_steps(result):
  # Otherwise equal losses across meshes could be equal by being constant.
  assert len(set(result['losses']['one_device'])) == STEPS


def test_activation_constraints_reach_the_program(result):
  # Each of the two blocks constrains its input and its output to the batch sharding.
  assert result['constraints'] >= 4, result['constraints']


def test_parameters_are_sharded_by_the_rules(result):
  for leaf, spec in EXPECTED_SPECS.items():
    assert result['specs'][leaf] == spec, leaf
  # Every parameter is either replicated or split over both fsdp and tensor: nothing falls through the rules.
  for leaf, spec in result['specs'].items():
    assert spec in ([None], ['fsdp', 'tensor'], ['tensor', 'fsdp']), (leaf, spec)
  # Adam's moments live in the same shards as their parameters.
  assert result['mu_specs'] == result['specs']


def test_each_device_holds_its_shard(result):
  """On the 2x2x2 mesh a sharded matrix is cut in half along each of its two axes, a vector not at all."""
  for leaf, spec in result['specs'].items():
    global_shape = result['global_shapes'][leaf]
    want = [size // 2 if axis else size for size, axis in zip(global_shape, spec)]
    assert result['shard_shapes'][leaf] == [want], leaf
    assert result['shards_per_leaf'][leaf] == NUM_DEVICES, leaf
  assert result['shard_shapes']['embed/embedding'] == [[32, 16]]
  assert result['shard_shapes']['block_0/ffn/down_proj/kernel'] == [[48, 16]]


if __name__ == '__main__':
  print(json.dumps(run_meshes()))
