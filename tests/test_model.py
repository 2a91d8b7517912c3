"""The decoder against the float64 reference, its causality and gradients, config validation and sharding."""

import dataclasses
import re
import functools
import json

from absl.testing import parameterized
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import assert_close, jit, lambda_of, param_shapes, random_params, set_lambda, tiny_config, to_float64
from diffjax.errors import ConfigError
from diffjax.model import attention, kernels, sharding
from diffjax.model import transformer as model
from diffjax.model.attention import DiffAttentionV1, DiffAttentionV2, MultiHeadAttention
from diffjax.model.config import ModelConfig
from diffjax.run import checkpoint, defaults
import reference

pytestmark = pytest.mark.usefixtures('full_precision_matmuls')

VARIANTS = ('diff_v1', 'diff_v2', 'baseline')
BATCH, SEQ = 2, 8


def _tokens(cfg, seed=0):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(BATCH, SEQ)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  """A jitted `params, tokens -> logits`, one compilation per config shared by the tests."""
  transformer = model.Transformer(cfg)
  return transformer, jit(lambda params, tokens: transformer.apply({'params': params}, tokens))


def _model_params(cfg, seed=0):
  transformer, _ = _forward(cfg)
  params = random_params(transformer, _tokens(cfg), seed=seed)
  if cfg.variant == 'diff_v1':
    # λ near 1 nearly cancels A1 V - λ A2 V, and the norm after it would magnify float32 rounding.
    for layer in range(cfg.n_layers):
      attn = params[f'block_{layer}']['attn']
      if abs(lambda_of(attn, layer) - 1.0) < 0.2:
        params[f'block_{layer}']['attn'] = set_lambda(attn, 0.5, layer, seed)
  return params


# Each variant in two layers (so λ_init differs between blocks), with and without GQA, both RoPE pairings and
# both output heads.
FORWARD_CASES = [
    dict(variant='diff_v1', n_kv_heads=2, rope_pairing='interleaved', tie_embeddings=False),
    dict(variant='diff_v1', n_kv_heads=4, rope_pairing='half', tie_embeddings=True),
    dict(variant='diff_v2', n_kv_heads=2, rope_pairing='half', tie_embeddings=False),
    dict(variant='baseline', n_kv_heads=2, rope_pairing='interleaved', tie_embeddings=True),
]
CASE_IDS = [f'{c["variant"]}-kv{c["n_kv_heads"]}-{c["rope_pairing"]}-tied{c["tie_embeddings"]}' for c in FORWARD_CASES]


@pytest.mark.parametrize('overrides', FORWARD_CASES, ids=CASE_IDS)
def test_decoder_matches_float64_reference(overrides):
  cfg = tiny_config(**overrides)
  _, forward = _forward(cfg)
  tokens = _tokens(cfg, seed=1)
  params = _model_params(cfg, seed=1)
  expected = reference.decoder(to_float64(params), tokens, variant=cfg.variant, n_layers=cfg.n_layers,
                               n_heads=cfg.n_heads, n_kv_heads=cfg.kv_heads, theta=cfg.rope_theta,
                               pairing=cfg.rope_pairing, tie_embeddings=cfg.tie_embeddings)
  assert_close(forward(params, tokens), expected)


@pytest.mark.parametrize('ablation', [dict(diff_head_norm=False), dict(lambda_init=0.5, lambda_init_drop=0.0),
                                      dict(lambda_init=0.9, lambda_init_drop=0.6, lambda_init_rate=0.1)])
def test_decoder_with_an_ablation_matches_float64_reference(ablation):
  cfg = tiny_config(n_layers=3, **ablation)
  _, forward = _forward(cfg)
  tokens = _tokens(cfg, seed=6)
  params = random_params(model.Transformer(cfg), tokens, seed=6)
  expected = reference.decoder(to_float64(params), tokens, variant='diff_v1', n_layers=3, n_heads=cfg.n_heads,
                               n_kv_heads=cfg.kv_heads, head_norm=cfg.diff_head_norm, schedule=cfg.lambda_init_schedule)
  assert_close(forward(params, tokens), expected)


@pytest.mark.parametrize('overrides', FORWARD_CASES, ids=CASE_IDS)
def test_future_tokens_do_not_change_past_logits(overrides):
  cfg = tiny_config(**overrides)
  _, forward = _forward(cfg)
  params = _model_params(cfg, seed=2)
  tokens = _tokens(cfg, seed=2)
  t = 4
  changed = tokens.copy()
  changed[:, t + 1:] = (changed[:, t + 1:] + 1) % cfg.vocab_size
  before, after = np.asarray(forward(params, tokens)), np.asarray(forward(params, changed))
  np.testing.assert_allclose(after[:, :t + 1], before[:, :t + 1], rtol=0, atol=1e-6)
  assert np.all(np.abs(after[:, t + 1:] - before[:, t + 1:]).max(axis=-1) > 1e-3)


def test_lambdas_reports_each_layer():
  cfg = tiny_config(n_layers=3)
  params = random_params(model.Transformer(cfg), _tokens(cfg), seed=3)
  got = model.lambdas(cfg, params)
  expected = [lambda_of(params[f'block_{layer}']['attn'], layer) for layer in range(3)]
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
  for variant in ('diff_v2', 'baseline'):
    assert model.lambdas(tiny_config(variant=variant), {}) is None


def test_lambdas_follow_the_configured_lambda_init():
  # Zero λ vectors give λ = λ_init exactly: the configured schedule's values, the same in every layer when constant.
  for overrides, expected in ((dict(lambda_init=0.5, lambda_init_drop=0.0), [0.5] * 4),
                              (dict(lambda_init=0.9, lambda_init_drop=0.6, lambda_init_rate=0.1),
                               [reference.lambda_init(layer, (0.9, 0.6, 0.1)) for layer in range(4)])):
    cfg = tiny_config(n_layers=4, **overrides)
    params = random_params(model.Transformer(cfg), _tokens(cfg), seed=3)
    for layer in range(4):
      params[f'block_{layer}']['attn'].update(
          {n: np.zeros_like(params[f'block_{layer}']['attn'][n]) for n in attention.LAMBDA_VECTORS})
    np.testing.assert_allclose(np.asarray(model.lambdas(cfg, params)), expected, rtol=1e-6)


# --- Gradients: finite and non-zero for every parameter; zero from the future. ---------------------------------

GRAD_CASES = [
    dict(variant='diff_v1'),
    dict(variant='diff_v2'),
    dict(variant='baseline', tie_embeddings=True, remat=True),
]
GRAD_IDS = [c['variant'] for c in GRAD_CASES]


@functools.lru_cache(maxsize=None)
def _grads(cfg):
  """Jitted gradients of a random projection of the logits at position t, with respect to the parameters and to
  a perturbation added to the token embeddings (the model's input)."""
  transformer = model.Transformer(cfg)
  direction = np.random.default_rng(4).normal(size=cfg.vocab_size).astype(np.float32)

  def add_to_embeddings(delta):
    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Embed) and context.method_name == '__call__':
        out = out + delta.astype(out.dtype)
      return out
    return interceptor

  def loss(params, delta, tokens, t):
    with nn.intercept_methods(add_to_embeddings(delta)):
      logits = transformer.apply({'params': params}, tokens)
    return jnp.sum(logits[:, t] @ direction)

  return transformer, jit(jax.grad(loss, argnums=(0, 1)))


def _grad_setup(overrides):
  cfg = tiny_config(n_layers=1, **overrides)
  transformer, grads = _grads(cfg)
  tokens = _tokens(cfg, seed=5)
  params = random_params(transformer, tokens, seed=5)
  delta = np.zeros((BATCH, SEQ, cfg.d_model), np.float32)
  return params, lambda t: grads(params, delta, tokens, t)


@pytest.mark.parametrize('overrides', GRAD_CASES, ids=GRAD_IDS)
def test_every_parameter_gets_a_finite_nonzero_gradient(overrides):
  params, grads = _grad_setup(overrides)
  param_grads, _ = grads(SEQ - 1)  # the last position depends on every parameter
  chex.assert_trees_all_equal_shapes(param_grads, params)
  chex.assert_tree_all_finite(param_grads)
  for path, g in jax.tree_util.tree_flatten_with_path(param_grads)[0]:
    assert np.any(np.asarray(g) != 0), f'zero gradient for {jax.tree_util.keystr(path)}'
  if overrides['variant'] == 'diff_v1':
    attn = param_grads['block_0']['attn']
    assert all(np.all(np.asarray(attn[n]) != 0) for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2'))


@pytest.mark.parametrize('overrides', GRAD_CASES, ids=GRAD_IDS)
def test_model_is_causal_through_gradients(overrides):
  # The logits at t must not depend on inputs after t: their gradient there is exactly zero, and non-zero at
  # every position up to t.
  _, grads = _grad_setup(overrides)
  for t in (0, 4):
    _, input_grads = grads(t)
    input_grads = np.asarray(input_grads)
    np.testing.assert_array_equal(input_grads[:, t + 1:], 0.0)
    assert np.all(np.any(input_grads[:, :t + 1] != 0, axis=-1))


# --- Rematerialisation: the same gradients whatever each block saves, and less saved. ---------------------------

REMAT_SETTINGS = {'off': dict(remat=False), 'nothing': dict(remat=True, remat_policy='nothing'),
                  'dots': dict(remat=True, remat_policy='dots')}


def _remat_loss(cfg, tokens):
  transformer = model.Transformer(cfg)
  return lambda params: jnp.sum(jax.nn.log_softmax(transformer.apply({'params': params}, tokens))[..., 0])


@pytest.mark.parametrize('scan_layers', [False, True])
def test_remat_policies_give_the_same_gradients(scan_layers):
  cfg = tiny_config(scan_layers=scan_layers)
  tokens = _tokens(cfg, seed=7)
  params = random_params(model.Transformer(cfg), tokens, seed=7)
  grads = {name: jit(jax.grad(_remat_loss(dataclasses.replace(cfg, **setting), tokens)))(params)
           for name, setting in REMAT_SETTINGS.items()}
  for name in ('nothing', 'dots'):
    jax.tree.map(assert_close, grads[name], grads['off'])


@pytest.mark.slow
@pytest.mark.parametrize('scan_layers', [False, True])
def test_remat_policies_save_what_they_say(scan_layers):
  """The residuals the backward pass keeps (the leaves of the VJP closure): 'nothing' keeps the least, 'dots' adds
  the matmul outputs, no remat keeps every intermediate; so the policy reaches the blocks in both layouts."""
  cfg = tiny_config(scan_layers=scan_layers)
  tokens = _tokens(cfg, seed=7)
  params = random_params(model.Transformer(cfg), tokens, seed=7)

  def saved(setting):
    _, vjp = jax.vjp(_remat_loss(dataclasses.replace(cfg, **setting), tokens), params)
    return sum(leaf.size for leaf in jax.tree.leaves(vjp))

  sizes = {name: saved(setting) for name, setting in REMAT_SETTINGS.items()}
  assert sizes['nothing'] < sizes['dots'] < sizes['off'], sizes


@pytest.mark.slow
def test_dots_recomputes_no_weight_matmul():
  """In the compiled gradient, 'nothing' runs every matmul of a block's forward pass again, 'dots' only the two
  attention products (batched over heads, so not saved), and without remat none: counted in XLA's program."""
  cfg = tiny_config(scan_layers=True)  # one traced block, so each count is per block
  tokens = _tokens(cfg, seed=7)
  params = random_params(model.Transformer(cfg), tokens, seed=7)

  def matmuls(setting):
    program = jax.jit(jax.grad(_remat_loss(dataclasses.replace(cfg, **setting), tokens))).lower(params).compile()
    return len(re.findall(r'= \S+ dot\(', program.as_text()))

  counts = {name: matmuls(setting) for name, setting in REMAT_SETTINGS.items()}
  assert counts['dots'] == counts['off'] + 2 < counts['nothing'], counts


# (platform, attention_impl, what marks the kernel's forward in the lowered program)
KERNEL_FORWARDS = [('gpu', 'cudnn', '@__cudnn$fmhaSoftmax('), ('tpu', 'splash', '"splash_mqa_fwd_residuals"')]


@pytest.mark.parametrize('platform,impl,forward', KERNEL_FORWARDS)
@pytest.mark.parametrize('variant', ['diff_v1', 'baseline'])
def test_attention_policies_keep_the_kernel_forward(variant, platform, impl, forward, monkeypatch):
  """In the gradient lowered for a GPU (cuDNN) or a TPU (splash), 'nothing' and 'dots' run the attention kernel's
  forward twice (the forward pass, and again in the backward pass), 'attention' and 'dots_attention' once: counted
  in the StableHLO program."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  monkeypatch.setattr(cudnn_attention, 'check_cudnn_version', lambda: 91900)  # no GPU here: lowering only
  monkeypatch.setattr(cudnn_attention, 'check_compute_capability', lambda capability: True)
  monkeypatch.delenv(kernels.INTERPRET_ENV, raising=False)
  with attention.compiling_for(platform):
    cfg = tiny_config(variant=variant, d_model=256, n_heads=2, n_kv_heads=2, max_len=512, dtype='bfloat16',
                      attention_impl=impl, scan_layers=True)
  tokens = jnp.zeros((2, 512), jnp.int32)  # splash tiles sequences by 512
  params = jax.eval_shape(lambda: random_params(model.Transformer(dataclasses.replace(cfg, attention_impl='xla')),
                                                tokens, seed=7))

  def kernel_forwards(policy):
    loss = _remat_loss(dataclasses.replace(cfg, remat=True, remat_policy=policy), tokens)
    with attention.compiling_for(platform):
      program = jax.jit(jax.value_and_grad(loss)).trace(params).lower(
          lowering_platforms=('cuda' if platform == 'gpu' else platform,)).as_text()
    return program.count(forward)

  counts = {policy: kernel_forwards(policy) for policy in ('nothing', 'dots', 'attention', 'dots_attention')}
  assert counts['attention'] > 0, counts
  assert counts['nothing'] == counts['dots'] == 2 * counts['attention'] == 2 * counts['dots_attention'], counts


# --- Shapes and finiteness with and without jit, in the default (bfloat16) compute dtype. ------------------------


class ModelShapeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*VARIANTS)
  def test_logits_shape_and_finite(self, variant):
    cfg = tiny_config(variant=variant, dtype=ModelConfig.dtype, n_layers=1)
    assert cfg.compute_dtype == jnp.bfloat16
    transformer = model.Transformer(cfg)
    tokens = _tokens(cfg, seed=6)
    params = random_params(transformer, tokens, seed=6)
    logits = self.variant(lambda p, tokens: transformer.apply({'params': p}, tokens))(params, tokens)
    chex.assert_shape(logits, (BATCH, SEQ, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


# --- Parameter counts. --------------------------------------------------------------------------------------


def _count(module, *args):
  return model.count_params(param_shapes(module, *args))


def test_attention_parameter_counts_match_the_paper():
  # Width 1024, DIFF with 8 heads of 64 (16 in the baseline's count): the baseline's 4 E^2 plus 4d for the λ
  # vectors and 2d for the per-head norm.
  cfg = ModelConfig(d_model=1024, n_heads=16).validated()
  x = jax.ShapeDtypeStruct((1, 4, 1024), jnp.float32)
  assert _count(MultiHeadAttention(cfg, 0), x) == 4_194_304
  assert _count(DiffAttentionV1(cfg, 0), x) == 4_194_688
  # DIFF V2: W_q E -> 2E, W_k, W_v, W_o E -> E, and W_λ E -> n_heads.
  assert _count(DiffAttentionV2(cfg, 0), x) == 5 * 1024**2 + 1024 * 16


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('tie', [False, True])
def test_model_parameter_count(variant, tie):
  cfg = ModelConfig(vocab_size=300, d_model=128, n_layers=3, n_heads=8, n_kv_heads=4, d_ff=320, variant=variant,
                    tie_embeddings=tie).validated()
  e, kv_width, d = 128, 64, 16
  attn = {'baseline': 2 * e * e + 2 * e * kv_width,
          'diff_v1': 2 * e * e + 2 * e * kv_width + 6 * d,
          'diff_v2': 3 * e * e + 2 * e * kv_width + e * 8}[variant]
  block = attn + 3 * e * 320 + 2 * e
  expected = 300 * e * (1 if tie else 2) + 3 * block + e
  assert model.count_params(model.abstract_params(cfg)) == expected
  assert model.summary(cfg).splitlines()[-1].split()[-1] == f'{expected:,}'


# --- Config validation. ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('overrides,key', [
    (dict(d_model=30, n_heads=4, n_kv_heads=None), 'd_model'),  # not divisible by the heads
    (dict(d_model=48, n_heads=6, n_kv_heads=3), 'n_kv_heads'),  # DIFF V1 needs paired kv heads
    (dict(d_model=36, n_heads=3, n_kv_heads=None), 'n_heads'),  # odd heads cannot pair for DIFF V1
    (dict(n_heads=4, n_kv_heads=3), 'n_kv_heads'),  # kv heads must divide the heads
    (dict(d_model=24, n_heads=8, n_kv_heads=None), 'd_model'),  # head width 3 is odd
    (dict(d_model=12, n_heads=4, n_kv_heads=4, variant='baseline'), 'd_model'),  # odd head width, any variant
    (dict(variant='diff_v3'), 'variant'),
    (dict(attention_impl='flash'), 'attention_impl'),
    (dict(rope_pairing='neox'), 'rope_pairing'),
    (dict(dtype='float64'), 'dtype'),
    (dict(remat=True, remat_policy='everything'), 'remat_policy'),
    (dict(n_layers=0), 'n_layers'),
    (dict(diff_head_norm='no'), 'diff_head_norm'),
    (dict(lambda_init=float('nan')), 'lambda_init'),
    (dict(lambda_init_drop=None), 'lambda_init_drop'),
    (dict(lambda_init_rate=-0.3), 'lambda_init_rate'),
    (dict(lambda_init=1.0, lambda_init_drop=0.0), 'lambda_init'),  # (1 - λ_init) would silence every layer
    (dict(lambda_init=1.2, lambda_init_drop=0.5, lambda_init_rate=1.0, n_layers=3), 'lambda_init'),  # layer 2: 1.13
])
def test_invalid_config_is_a_one_line_error_naming_the_key(overrides, key):
  values = dict(vocab_size=23, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48)
  values.update(overrides)
  with pytest.raises(ConfigError) as error:
    ModelConfig(**values).validated()
  message = str(error.value)
  assert message.startswith(f'model.{key}: ') and '\n' not in message, message


def test_valid_configs_pass():
  for variant in VARIANTS:
    cfg = ModelConfig(variant=variant)
    assert cfg.validated() is cfg
  assert ModelConfig(n_heads=8, n_kv_heads=8, variant='diff_v2').validated().kv_heads == 8
  # λ_init of 1 or more matters only where it scales the normed heads.
  ModelConfig(lambda_init=1.0, lambda_init_drop=0.0, diff_head_norm=False).validated()
  ModelConfig(lambda_init=1.0, lambda_init_drop=0.0, variant='baseline').validated()


def test_default_lambda_init_is_the_papers():
  assert ModelConfig().lambda_init_schedule == (0.8, 0.6, 0.3) and ModelConfig().diff_head_norm


@pytest.mark.parametrize('ablation', [{}, dict(diff_head_norm=False, lambda_init=0.5, lambda_init_drop=0.0)])
def test_model_config_survives_the_run_config_round_trip(ablation):
  # The run config is saved as JSON (config.json, every checkpoint) and compared with the current one on resume: a
  # run with these keys, default or not, must be recognised as itself and rebuild the same ModelConfig.
  config = defaults.base_config()
  config.model.update(ablation)
  saved = json.loads(json.dumps(config.to_dict()))
  assert checkpoint.config_differences(saved, config.to_dict()) == []
  cfg = defaults.model_config(config, 258)
  assert defaults.model_config(ml_collections.ConfigDict(saved), 258) == cfg
  assert ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
  assert {key: getattr(cfg, key) for key in ablation} == ablation
  # A run saved before these keys existed is the same run as one with their defaults.
  older = json.loads(json.dumps(defaults.base_config().to_dict()))
  for key in ('diff_head_norm', 'lambda_init', 'lambda_init_drop', 'lambda_init_rate'):
    del older['model'][key]
  assert checkpoint.config_differences(older, defaults.base_config().to_dict()) == []
  if ablation:
    assert checkpoint.config_differences(saved, defaults.base_config().to_dict())


def test_from_dict_rejects_unknown_keys():
  with pytest.raises(ConfigError, match=r'^model\.n_head: unknown key'):
    ModelConfig.from_dict({'n_head': 8})
  assert ModelConfig.from_dict({'n_heads': 4, 'd_model': 64}).head_dim == 16


# --- Sharding. --------------------------------------------------------------------------------------------------

# What sharding.py documents: embed over fsdp; heads, kv, mlp and vocab over tensor; batch over data and fsdp;
# everything else replicated.
DOCUMENTED_MESH_AXIS = {'embed': 'fsdp', 'heads': 'tensor', 'kv': 'tensor', 'mlp': 'tensor', 'vocab': 'tensor',
                        'head_dim': None, 'norm': None, None: None}


def test_logical_rules_map_axes_as_documented():
  rules = sharding.LOGICAL_AXIS_RULES
  assert nn.logical_to_mesh_axes(('embed', 'heads'), rules) == P('fsdp', 'tensor')
  assert nn.logical_to_mesh_axes(('heads', 'embed'), rules) == P('tensor', 'fsdp')
  assert nn.logical_to_mesh_axes(('vocab', 'embed'), rules) == P('tensor', 'fsdp')
  assert nn.logical_to_mesh_axes(('embed', 'mlp'), rules) == P('fsdp', 'tensor')
  assert nn.logical_to_mesh_axes(('head_dim',), rules) == P(None)
  assert nn.logical_to_mesh_axes(('norm',), rules) == P(None)
  assert nn.logical_to_mesh_axes(model.ACTIVATION_AXES, rules) == P(('data', 'fsdp'), None, None)


@pytest.mark.parametrize('variant', VARIANTS)
def test_every_parameter_is_annotated_and_mapped_as_documented(variant):
  cfg = tiny_config(variant=variant)
  boxed = model.abstract_params(cfg)['params']
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), f'{name} has no logical axes'
    assert len(leaf.names) == leaf.value.ndim, name
    spec = nn.logical_to_mesh_axes(leaf.names, sharding.LOGICAL_AXIS_RULES)
    assert tuple(spec) == tuple(DOCUMENTED_MESH_AXIS[n] for n in leaf.names), name
  attn = boxed['block_0']['attn']
  assert attn['q_proj']['kernel'].names == ('embed', 'heads')
  assert attn['k_proj']['kernel'].names == attn['v_proj']['kernel'].names == ('embed', 'kv')
  assert attn['out_proj']['kernel'].names == ('heads', 'embed')


@pytest.mark.parametrize('axes,devices,expected', [
    (dict(data=-1, fsdp=2, tensor=1), 8, (4, 2, 1)),
    (dict(data=1, fsdp=-1, tensor=2), 8, (1, 4, 2)),
    (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
    (dict(data=-1, fsdp=1, tensor=1), 1, (1, 1, 1)),
])
def test_mesh_shape_resolves_the_rest(axes, devices, expected):
  assert sharding.mesh_shape(axes, devices) == expected


@pytest.mark.parametrize('axes,devices,match', [
    (dict(data=2, fsdp=2, tensor=1), 8, r'^mesh: data\*fsdp\*tensor = 2\*2\*1 = 4 but there are 8 devices'),
    (dict(data=-1, fsdp=3, tensor=1), 8, r'^mesh: the fixed axes multiply to 3'),
    (dict(data=-1, fsdp=-1, tensor=1), 8, r'^mesh: at most one'),
    (dict(data=1, fsdp=0, tensor=8), 8, r'^mesh\.fsdp: must be a positive integer or -1'),
    (dict(data=8, fsdp=1, tensor=-2), 8, r'^mesh\.tensor: '),
])
def test_mesh_shape_rejects_bad_products(axes, devices, match):
  with pytest.raises(ConfigError, match=match):
    sharding.mesh_shape(axes, devices)


def test_make_mesh_on_local_devices():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1))
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.devices.shape == (jax.device_count(), 1, 1)
