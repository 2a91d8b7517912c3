"""The one table that maps logical axis names onto the `data / fsdp / tensor` device mesh."""

import math

import jax
from jax.sharding import AxisType, Mesh

from diffjax.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')

# Parameters shard their `embed` axis over fsdp and their head/mlp/vocab axes over tensor; batches shard over
# data and fsdp. Axes not named here (length, head_dim, norm, act_embed) are replicated.
LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv', 'tensor'),
    ('mlp', 'tensor'),
    ('vocab', 'tensor'),
    ('layers', None),  # the stacked axis of scanned layers: every device holds its slice of every layer
)


def mesh_axes(logical_axis: str):
  """The mesh axis (or axes, or None) that a logical axis shards over."""
  return dict(LOGICAL_AXIS_RULES).get(logical_axis)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  """Resolves the config's axis sizes (one of them may be -1, "the rest") against the device count."""
  sizes = [int(mesh_cfg[name]) for name in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError('mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1 ("the rest")')
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f'mesh.{name}: must be a positive integer or -1, got {size}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'mesh: the fixed axes multiply to {known}, which does not divide the {num_devices} '
                        'devices; change mesh.data/fsdp/tensor')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'mesh: data*fsdp*tensor = {"*".join(map(str, sizes))} = {math.prod(sizes)} but there are '
                      f'{num_devices} devices; make the product equal the device count or set one axis to -1')
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: the compiler propagates shardings from the parameters and the constraints at block edges.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)
