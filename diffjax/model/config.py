"""The model's hyper-parameters as one frozen dataclass, checked before anything is compiled."""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.errors import ConfigError
from diffjax.keys import Key, check_section

VARIANTS = ('diff_v1', 'diff_v2', 'baseline')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'pallas', 'splash', 'tokamax')
ROPE_PAIRINGS = ('interleaved', 'half')
# The forward primitives of the fused attention kernels: cuDNN's, and Pallas kernels (tokamax, splash, diffjax's own).
FLASH_ATTENTION_FORWARDS = ('dot_product_attention_fwd_wrapper', 'pallas_call')


def _saves_flash_attention(primitive, *_, **__) -> bool:
  """Keeps a fused attention kernel's outputs (its result and softmax statistics, which are what its backward pass
  needs from the forward), so that the backward pass does not run the kernel's forward again."""
  return primitive.name in FLASH_ATTENTION_FORWARDS


# What a rematerialised block saves for its backward pass, by `model.remat_policy`: (the weight matmuls' outputs,
# the fused attention kernel's outputs). Weight matmuls have no batch dimensions; attention's score and value
# products (batched over heads) do, so keeping matmuls keeps the projections' outputs but not the (T, T) attention
# maps. The xla attention path has no kernel whose outputs could be kept: there 'attention' saves nothing more.
REMAT_KEEPS = {'nothing': (False, False), 'dots': (True, False), 'attention': (False, True),
               'dots_attention': (True, True)}


@functools.cache  # one policy object per name, as `jax.checkpoint`'s trace cache compares it by identity
def remat_policy(name: str):
  """The `jax.checkpoint` policy of `REMAT_KEEPS[name]` (None: nothing, as `jax.checkpoint` does by default)."""
  matmuls, attention = REMAT_KEEPS[name]
  dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if matmuls and attention:
    return jax.checkpoint_policies.save_from_both_policies(dots, _saves_flash_attention)
  return dots if matmuls else _saves_flash_attention if attention else None


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# (deep, drop, rate) of DIFF V1's λ_init schedule (below): the paper's 0.8 - 0.6 exp(-0.3 l).
PAPER_LAMBDA_INIT = (0.8, 0.6, 0.3)


def lambda_init_for(layer, schedule=PAPER_LAMBDA_INIT):
  """DIFF V1's λ_init = deep - drop * exp(-rate * layer) for the 0-based `layer` (a Python int, or a traced index
  under scan), with (deep, drop, rate) = `schedule` (`ModelConfig.lambda_init_schedule`)."""
  deep, drop, rate = schedule
  return deep - drop * (math.exp(-rate * layer) if isinstance(layer, int) else jnp.exp(-rate * layer))


def _key(default, doc: str, **allowed):
  """A field of ModelConfig declared as the run config's `model.*` key of the same name."""
  return dataclasses.field(default=default, metadata={'key': Key(default, doc, **allowed)})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only language model.

  Heads are counted as the baseline Transformer's, so the three variants share width, head width and
  (up to the small λ and norm vectors) parameter count:
    baseline: `n_heads` heads of width `head_dim = d_model // n_heads`;
    diff_v1:  `n_heads // 2` differential heads, each two q/k sub-heads of `head_dim` and a value of 2*head_dim;
    diff_v2:  `2 * n_heads` query heads paired into `n_heads` differential heads, `n_kv_heads` k/v heads.
  Each field is a key of the run config's `model` section; `identity=False` marks those that change how the model
  is computed, not what it computes.
  """
  vocab_size: int = _key(258, 'vocabulary size, the width of the output layer', at_least=1)
  d_model: int = _key(512, 'width E', at_least=1)
  n_layers: int = _key(8, 'depth', at_least=1)
  n_heads: int = _key(8, "heads counted as the baseline's: head width d = d_model / n_heads", at_least=1)
  n_kv_heads: int | None = _key(None, "kv heads counted as the baseline's (GQA when fewer than n_heads); None: n_heads",
                                kind=int, optional=True, at_least=1)
  d_ff: int = _key(1792, 'SwiGLU hidden width', at_least=1)
  max_len: int = _key(2048, 'the longest sequence the model accepts', at_least=1)
  variant: str = _key('diff_v1', 'DIFF V1, DIFF V2 or the standard Transformer baseline', choices=VARIANTS)
  attention_impl: str = _key('auto', "attention kernel; 'auto' takes splash on a TPU, cudnn on a GPU where it can "
                             'run, else xla', choices=ATTENTION_IMPLS, identity=False)
  rope_theta: float = _key(10000.0, 'RoPE base', above=0)
  rope_pairing: str = _key('interleaved', 'RoPE rotates channels (0,1),(2,3)... (interleaved) or (i, i + d/2) (half)',
                           choices=ROPE_PAIRINGS)
  tie_embeddings: bool = _key(False, 'share the input embedding with the output projection')
  dtype: str = _key('bfloat16', 'compute dtype; parameters, softmax, λ and the residual stream stay float32',
                    choices=tuple(DTYPES))
  norm_eps: float = _key(1e-5, 'RMSNorm epsilon', above=0)
  remat: bool = _key(False, 'recompute each block in the backward pass, for less activation memory', identity=False)
  remat_policy: str = _key('nothing', "with remat, what a block keeps: nothing, dots (its weight matmuls' outputs), "
                           "attention (the fused attention kernel's outputs) or dots_attention (both)",
                           choices=tuple(REMAT_KEEPS), identity=False)
  # Parameters then carry a leading `layers` axis, so a checkpoint holds one layout or the other.
  scan_layers: bool = _key(False, 'trace one block and loop it over stacked layers, so compile time stops growing '
                           'with depth')
  scale_residual_init: bool = _key(True, 'attention out_proj and FFN down_proj start at N(0, 0.02/sqrt(2 n_layers)) '
                                   '(GPT-2); False: N(0, 0.02) (Llama)')
  residual_init_gain: float = _key(1.0, 'a factor on the residual branches\' init; 0 starts each at zero output',
                                   at_least=0)
  embed_init_std: float = _key(0.02, 'token embeddings (and tied outputs) start at N(0, this)', above=0)
  subln_scale: bool = _key(True, "DIFF V1's per-head RMSNorm has a learnable scale (the official code); False: none "
                           '(Hugging Face)')
  document_mask: bool = _key(False, 'attention stays inside each document of a packed row (documents end at EOS)')
  diff_head_norm: bool = _key(True, "DIFF V1's per-head RMSNorm and its (1 - λ_init) scale; False: neither (the "
                              "paper's w/o GroupNorm)")
  # λ_init(l) = lambda_init - lambda_init_drop * exp(-lambda_init_rate * l). Three numbers rather than one tuple:
  # JSON turns a tuple into a list, and a resumed run's saved config would then differ from its own.
  lambda_init: float = _key(PAPER_LAMBDA_INIT[0], "DIFF V1's λ_init in deep layers: λ_init(l) = lambda_init - "
                            'lambda_init_drop * exp(-lambda_init_rate * l)')
  lambda_init_drop: float = _key(PAPER_LAMBDA_INIT[1], 'how far below lambda_init layer 0 starts; 0: lambda_init in '
                                 'every layer')
  lambda_init_rate: float = _key(PAPER_LAMBDA_INIT[2], 'how fast, per layer, the drop fades', at_least=0)

  @property
  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def lambda_init_schedule(self) -> tuple[float, float, float]:
    """(deep, drop, rate) of DIFF V1's λ_init(l) = deep - drop * exp(-rate * l)."""
    return self.lambda_init, self.lambda_init_drop, self.lambda_init_rate

  @classmethod
  def from_dict(cls, values) -> 'ModelConfig':
    unknown = sorted(set(values) - set(MODEL_KEYS))
    if unknown:
      raise ConfigError(f'model.{unknown[0]}: unknown key; known keys are {", ".join(sorted(MODEL_KEYS))}')
    return cls(**dict(values)).validated()

  def validated(self) -> 'ModelConfig':
    """Returns self, or raises ConfigError naming the first bad key and its fix."""
    check_section('model', MODEL_KEYS, self)
    diff_v1 = self.variant == 'diff_v1'
    schedule = [lambda_init_for(layer, self.lambda_init_schedule) for layer in range(self.n_layers)]
    highest = max(range(self.n_layers), key=schedule.__getitem__)
    for failed, key, message in (
        (self.d_model % self.n_heads, 'd_model',
         f'{self.d_model} is not divisible by model.n_heads={self.n_heads}; pick a multiple of n_heads'),
        (self.n_heads % self.kv_heads, 'n_kv_heads',
         f'{self.kv_heads} does not divide model.n_heads={self.n_heads}; use a divisor of n_heads'),
        (diff_v1 and self.n_heads % 2, 'n_heads',
         f'diff_v1 pairs the baseline heads into n_heads/2 differential heads, so n_heads={self.n_heads} must be even'),
        (diff_v1 and self.kv_heads % 2, 'n_kv_heads',
         f'diff_v1 pairs kv heads too, so n_kv_heads={self.kv_heads} must be even'),
        (self.head_dim % 2, 'd_model', f'head width d_model/n_heads={self.d_model}/{self.n_heads} is odd; RoPE '
         'rotates pairs of channels, so make it even'),
        (diff_v1 and self.diff_head_norm and schedule[highest] >= 1.0, 'lambda_init',
         f'λ_init reaches {schedule[highest]:.4g} at layer {highest}, where the output scale (1 - λ_init) would be '
         'zero or negative; keep λ_init below 1 in every layer')):
      if failed:
        raise ConfigError(f'model.{key}: {message}')
    return self


# The `model.*` keys of the run config, declared on ModelConfig's fields.
MODEL_KEYS = {field.name: field.metadata['key'] for field in dataclasses.fields(ModelConfig)}
