"""Shared helpers: tiny configs, random parameter trees, λ control and float64 conversion.

Test modules import these functions (`from conftest import ...`) because chex.TestCase classes cannot take
pytest fixtures.
"""

import functools
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from diffjax.model.config import ModelConfig
import reference

# The reference comparisons hold float32 to 1e-5; keep JAX's default dtypes 32-bit whatever the environment says.
jax.config.update('jax_enable_x64', False)

# The test graphs are tiny, so compiling them costs far more than running them, and most of the compile time
# goes to LLVM's optimisation passes; skipping those halves the suite's time. (chex's with_jit variants still
# compile the default way.)
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0,
                                                   'xla_llvm_disable_expensive_passes': True})


def tiny_config(**overrides) -> ModelConfig:
  """A validated config small enough to compile in well under a second, float32 on the XLA path."""
  values = dict(vocab_size=23, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=64,
                dtype='float32', attention_impl='xla')
  values.update(overrides)
  return ModelConfig(**values).validated()


def param_shapes(module, *args):
  """The module's unboxed `params` tree of ShapeDtypeStructs, without running its initialisers."""
  variables = jax.eval_shape(module.init, jax.random.key(0), *args)
  return nn.meta.unbox(variables)['params']


def random_params(module, *args, seed=0, qk_gain=1.5, lambda_std=0.3):
  """float32 NumPy parameters drawn so that every term of the layer matters numerically.

  Kernels are N(0, 1/fan_in) (q and k a little larger, so the attention maps are far from uniform and a wrong
  scale or mask shows), norm scales U(0.5, 1.5) and λ vectors N(0, lambda_std): none keeps its init value, so a
  formula that ignores a scale or uses the wrong λ cannot agree by accident.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    names = [str(getattr(k, 'key', k)) for k in path]
    if names[-1] == 'kernel':
      gain = qk_gain if names[-2] in ('q_proj', 'k_proj') else 1.0
      value = rng.normal(size=leaf.shape) * gain / math.sqrt(leaf.shape[0])
    elif names[-1] == 'scale':
      value = rng.uniform(0.5, 1.5, size=leaf.shape)
    elif names[-1].startswith('lambda_'):
      value = rng.normal(size=leaf.shape) * lambda_std
    elif names[-1] == 'embedding':
      value = rng.normal(size=leaf.shape)
    else:
      raise AssertionError(f'no rule for parameter {"/".join(names)}')
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, param_shapes(module, *args))


def lambda_of(attn_params, layer):
  """λ of one DIFF V1 layer, in float64."""
  dot = lambda a, b: float(np.dot(np.asarray(attn_params[a], np.float64), np.asarray(attn_params[b], np.float64)))
  return (math.exp(dot('lambda_q1', 'lambda_k1')) - math.exp(dot('lambda_q2', 'lambda_k2'))
          + reference.lambda_init(layer))


def set_lambda(attn_params, value, layer, seed=0):
  """A copy of DIFF V1 layer parameters whose λ vectors give λ = value (up to float32 rounding).

  λq2, λk2 and λk1 stay random; λq1 is λk1 scaled so that exp(λq1·λk1) = value - λ_init + exp(λq2·λk2).
  """
  rng = np.random.default_rng(seed)
  params = dict(attn_params)
  d = np.shape(attn_params['lambda_q1'])[0]
  lq2, lk2, lk1 = (rng.normal(size=d) * 0.3 for _ in range(3))
  target = value - reference.lambda_init(layer) + math.exp(np.dot(lq2, lk2))
  assert target > 0, f'λ = {value} is out of reach of the re-parameterisation'
  lq1 = lk1 * math.log(target) / np.dot(lk1, lk1)
  params.update(lambda_q1=lq1, lambda_k1=lk1, lambda_q2=lq2, lambda_k2=lk2)
  return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def to_float64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def random_input(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_close(actual, expected, tol=1e-5):
  """Elementwise |actual - expected| <= tol * (|expected| + max|expected|): relative, with an absolute floor
  at the output's own scale so that entries near zero are not held to an impossible relative error."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale)


def relative_error(actual, expected):
  """max |actual - expected| / max |expected|."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture
def full_precision_matmuls():
  """float32 matmuls in full float32 (GPUs may use TF32 by default), for the comparisons with float64."""
  with jax.default_matmul_precision('float32'):
    yield


def lower_for_cuda(traced):
  """`traced` lowered for CUDA on this host, which may have no GPU. From JAX 0.11 on, Pallas's Triton lowering asks
  the attached GPU for its compute capability, so without one the check cannot run there and is skipped."""
  try:
    return traced.lower(lowering_platforms=('cuda',))
  except RuntimeError as error:
    if 'No supported GPU devices found' not in str(error):
      raise
    pytest.skip(f'JAX {jax.__version__} lowers Pallas Triton kernels only with a GPU attached')
