"""Weights of the reference PyTorch `MultiheadDiffAttn` <-> parameters of `DiffAttentionV1`.

The reference lays out q/k sub-heads and width-2d value heads exactly as diffjax does, so conversion is only
PyTorch's (out, in) Linear weights transposed to Flax's (in, out) kernels, and the λ and norm vectors renamed.
"""

from collections.abc import Mapping

import numpy as np

from diffjax.errors import ConfigError
from diffjax.model.attention import LAMBDA_VECTORS

_PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'out_proj')
REFERENCE_KEYS = tuple(f'{n}.weight' for n in _PROJECTIONS) + LAMBDA_VECTORS + ('subln.weight',)


def from_reference(state_dict: Mapping[str, np.ndarray]) -> dict:
  """A reference state_dict (names -> arrays) -> the `params` of one DiffAttentionV1 layer."""
  missing = [k for k in REFERENCE_KEYS if k not in state_dict]
  if missing:
    raise ConfigError(f'state_dict: missing {", ".join(missing)}; expected the keys of MultiheadDiffAttn: '
                      f'{", ".join(REFERENCE_KEYS)}')
  array = lambda key: np.asarray(state_dict[key], dtype=np.float32)
  return {**{n: {'kernel': array(f'{n}.weight').T.copy()} for n in _PROJECTIONS},
          **{n: array(n).copy() for n in LAMBDA_VECTORS}, 'subln': {'scale': array('subln.weight').copy()}}


def to_reference(params: Mapping) -> dict[str, np.ndarray]:
  """The `params` of one DiffAttentionV1 layer -> a reference state_dict of float32 NumPy arrays."""
  out = {f'{n}.weight': np.asarray(params[n]['kernel'], dtype=np.float32).T.copy() for n in _PROJECTIONS}
  out.update({n: np.asarray(params[n], dtype=np.float32).copy() for n in LAMBDA_VECTORS})
  out['subln.weight'] = np.asarray(params['subln']['scale'], dtype=np.float32).copy()
  return out
