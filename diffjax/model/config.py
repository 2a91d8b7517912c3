"""The model's hyper-parameters as one frozen dataclass, checked before anything is compiled."""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from diffjax.errors import ConfigError

VARIANTS = ('diff_v1', 'diff_v2', 'baseline')
ATTENTION_IMPLS = ('auto', 'xla', 'cudnn', 'pallas', 'splash')
ROPE_PAIRINGS = ('interleaved', 'half')
# What a rematerialised block saves for its backward pass (None: nothing, as `jax.checkpoint` does by default).
# Weight matmuls have no batch dimensions; attention's score and value products (batched over heads) do, so 'dots'
# keeps the projections' outputs but not the (T, T) attention maps.
REMAT_POLICIES = {'nothing': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# (deep, drop, rate) of DIFF V1's λ_init schedule (below): the paper's 0.8 - 0.6 exp(-0.3 l).
PAPER_LAMBDA_INIT = (0.8, 0.6, 0.3)


def lambda_init_for(layer, schedule=PAPER_LAMBDA_INIT):
  """DIFF V1's λ_init = deep - drop * exp(-rate * layer) for the 0-based `layer` (a Python int, or a traced index
  under scan), with (deep, drop, rate) = `schedule` (`ModelConfig.lambda_init_schedule`)."""
  deep, drop, rate = schedule
  return deep - drop * (math.exp(-rate * layer) if isinstance(layer, int) else jnp.exp(-rate * layer))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only language model.

  Heads are counted as the baseline Transformer's, so the three variants share width, head width and
  (up to the small λ and norm vectors) parameter count:
    baseline: `n_heads` heads of width `head_dim = d_model // n_heads`;
    diff_v1:  `n_heads // 2` differential heads, each two q/k sub-heads of `head_dim` and a value of 2*head_dim;
    diff_v2:  `2 * n_heads` query heads paired into `n_heads` differential heads, `n_kv_heads` k/v heads.
  """
  vocab_size: int = 258
  d_model: int = 512
  n_layers: int = 8
  n_heads: int = 8
  n_kv_heads: int | None = None  # None: as many as n_heads (no GQA)
  d_ff: int = 1792
  max_len: int = 2048
  variant: str = 'diff_v1'
  attention_impl: str = 'auto'
  rope_theta: float = 10000.0
  rope_pairing: str = 'interleaved'
  tie_embeddings: bool = False
  dtype: str = 'bfloat16'  # compute dtype; parameters, softmax and λ stay float32
  norm_eps: float = 1e-5
  remat: bool = False  # recompute each block in the backward pass to save activation memory
  # What a rematerialised block keeps from its forward pass: 'nothing' (all of it is recomputed) or 'dots' (the
  # outputs of its weight matmuls, so the backward recomputes only norms, RoPE, attention and activations).
  remat_policy: str = 'nothing'
  # One block traced once and run by a loop over stacked per-layer parameters (`nn.scan`): compile time and the
  # compiled program stop growing with depth. Parameters then carry a leading `layers` axis.
  scan_layers: bool = False
  # Residual-branch output projections (attention out_proj, FFN down_proj) start at N(0, 0.02/sqrt(2 n_layers))
  # (GPT-2, Megatron) if True, at N(0, 0.02) like every other matrix (Hugging Face Llama and DiffLlama) if False.
  scale_residual_init: bool = True
  # A factor on that init: 0 starts every residual branch at exactly zero output, so at initialisation the stream is
  # the token embeddings alone (the branches' projections still learn from the first step).
  residual_init_gain: float = 1.0
  # Token embeddings start at N(0, embed_init_std); with tie_embeddings the output layer shares them.
  embed_init_std: float = 0.02
  # DIFF V1's per-head RMSNorm has a learnable scale (the official code) if True, none (Hugging Face) if False.
  subln_scale: bool = True
  # Attention stays inside each document of a packed row: the train and eval steps pass the batch's segment ids
  # (a new segment at each EOS) and a token attends only to earlier tokens of its own document. False: plain
  # causal attention over the whole row, documents separated by EOS alone.
  document_mask: bool = False
  # DIFF V1's ablations (the paper's Table 6). False: no per-head RMSNorm, and so no (1 - λ_init) factor either,
  # which the paper gives as that norm's fixed scale (the row "w/o GroupNorm").
  diff_head_norm: bool = True
  # λ_init(l) = lambda_init - lambda_init_drop * exp(-lambda_init_rate * l). Three numbers rather than one tuple:
  # JSON turns a tuple into a list, and a resumed run's saved config would then differ from its own.
  lambda_init: float = PAPER_LAMBDA_INIT[0]  # the value deep layers approach
  lambda_init_drop: float = PAPER_LAMBDA_INIT[1]  # how far below it layer 0 starts; 0: lambda_init in every layer
  lambda_init_rate: float = PAPER_LAMBDA_INIT[2]  # how fast, per layer, the drop fades

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
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f'model.{unknown[0]}: unknown key; known keys are {", ".join(sorted(known))}')
    return cls(**dict(values)).validated()

  def validated(self) -> 'ModelConfig':
    """Returns self, or raises ConfigError naming the first bad key and its fix."""
    def need(ok, key, message):
      if not ok:
        raise ConfigError(f'model.{key}: {message}')

    need(self.variant in VARIANTS, 'variant', f'unknown variant {self.variant!r}; use one of {", ".join(VARIANTS)}')
    need(self.attention_impl in ATTENTION_IMPLS, 'attention_impl',
         f'unknown implementation {self.attention_impl!r}; use one of {", ".join(ATTENTION_IMPLS)}')
    need(self.rope_pairing in ROPE_PAIRINGS, 'rope_pairing',
         f'unknown pairing {self.rope_pairing!r}; use one of {", ".join(ROPE_PAIRINGS)}')
    need(self.remat_policy in REMAT_POLICIES, 'remat_policy',
         f'unknown policy {self.remat_policy!r}; use one of {", ".join(REMAT_POLICIES)}')
    need(self.dtype in DTYPES, 'dtype', f'unknown dtype {self.dtype!r}; use one of {", ".join(DTYPES)}')
    for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'd_ff', 'max_len'):
      need(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key,
           f'must be a positive integer, got {getattr(self, key)!r}')
    need(self.kv_heads > 0, 'n_kv_heads', f'must be a positive integer, got {self.n_kv_heads!r}')
    need(self.rope_theta > 0, 'rope_theta', f'must be positive, got {self.rope_theta}')
    need(self.norm_eps > 0, 'norm_eps', f'must be positive, got {self.norm_eps}')
    need(self.embed_init_std > 0, 'embed_init_std', f'must be positive, got {self.embed_init_std}')
    need(self.residual_init_gain >= 0, 'residual_init_gain', f'must be zero or positive, got {self.residual_init_gain}')
    need(self.d_model % self.n_heads == 0, 'd_model',
         f'{self.d_model} is not divisible by model.n_heads={self.n_heads}; pick a multiple of n_heads')
    need(self.n_heads % self.kv_heads == 0, 'n_kv_heads',
         f'{self.kv_heads} does not divide model.n_heads={self.n_heads}; use a divisor of n_heads')
    if self.variant == 'diff_v1':
      need(self.n_heads % 2 == 0, 'n_heads',
           f'diff_v1 pairs the baseline heads into n_heads/2 differential heads, so n_heads={self.n_heads} '
           'must be even')
      need(self.kv_heads % 2 == 0, 'n_kv_heads',
           f'diff_v1 pairs kv heads too, so n_kv_heads={self.kv_heads} must be even')
    need(self.head_dim % 2 == 0, 'd_model',
         f'head width d_model/n_heads={self.d_model}/{self.n_heads} is odd; RoPE rotates pairs of channels, '
         'so make it even')
    need(isinstance(self.diff_head_norm, bool), 'diff_head_norm', f'must be True or False, got {self.diff_head_norm!r}')
    for key in ('lambda_init', 'lambda_init_drop', 'lambda_init_rate'):
      value = getattr(self, key)
      need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key,
           f'must be a finite number, got {value!r}')
    need(self.lambda_init_rate >= 0, 'lambda_init_rate',
         f'must be zero or positive (a negative rate makes λ_init fall without bound with depth), '
         f'got {self.lambda_init_rate}')
    if self.variant == 'diff_v1' and self.diff_head_norm:
      highest = max(range(self.n_layers), key=lambda layer: lambda_init_for(layer, self.lambda_init_schedule))
      value = lambda_init_for(highest, self.lambda_init_schedule)
      need(value < 1.0, 'lambda_init', f'λ_init reaches {value:.4g} at layer {highest}, where the output scale '
           '(1 - λ_init) would be zero or negative; keep λ_init below 1 in every layer')
    return self
