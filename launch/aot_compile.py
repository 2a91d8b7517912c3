"""Compiles a config's train step for a TPU slice on a machine without a TPU, and prints its memory per chip.

  pip install libtpu   # the TPU compiler; not a diffjax dependency (a separate folder on PYTHONPATH also works)
  python launch/aot_compile.py --config=configs/paper_1_4b.py --topology=v5p-8 [--config.KEY=VALUE ...]

libtpu describes the slice (`jax.experimental.topologies`); the train step is lowered with the run's mesh,
shardings and batch, and compiled by the TPU compiler. Nothing runs, so no TPU is needed. Prints one JSON line:
bytes per chip of arguments (parameters, optimizer state, batch), outputs, temporaries and code, and their sum.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Only compiling: a second compile on this machine (or a TPU job's libtpu) may hold libtpu's lock file.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffjax import cli  # noqa: E402
from diffjax.data import pipeline as data  # noqa: E402
from diffjax.errors import ConfigError  # noqa: E402
from diffjax.model import attention, sharding  # noqa: E402
from diffjax.run import defaults  # noqa: E402
from diffjax.train import preflight  # noqa: E402

CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file, e.g. configs/paper_1_4b.py.',
                                         lock_config=True)
TOPOLOGY = flags.DEFINE_string('topology', 'v5p-8', 'A TPU slice: v5p-8, v6e-8, ... (chips per slice as Cloud TPU '
                               'names them), or libtpu\'s own name such as v5p:2x2x1.')
HBM_GIB = {'v4': 32, 'v5p': 95, 'v5e': 16, 'v5litepod': 16, 'v6e': 32}
# Cloud TPU's slice name -> (libtpu's chip name, cores per chip in the name's count, chip grid).
SLICES = {'v4-8': 'v4:2x2x1', 'v5p-8': 'v5p:2x2x1', 'v5p-16': 'v5p:2x2x2', 'v5p-32': 'v5p:2x2x4',
          'v5e-4': 'v5e:2x2', 'v5e-8': 'v5e:2x4', 'v6e-4': 'v6e:2x2', 'v6e-8': 'v6e:2x4', 'v6e-16': 'v6e:4x4'}


def topology_devices(name: str):
  from jax.experimental import topologies
  libtpu_name = SLICES.get(name, name)
  if ':' not in libtpu_name:
    raise ConfigError(f'--topology: unknown slice {name!r}; use one of {", ".join(SLICES)} or a libtpu name such '
                      'as v5p:2x2x1')
  try:
    return libtpu_name, topologies.get_topology_desc(platform='tpu', topology_name=libtpu_name).devices
  except Exception as error:  # no libtpu, or a name it does not know
    raise ConfigError(f'--topology: libtpu cannot describe {libtpu_name} ({type(error).__name__}: '
                      f'{str(error).strip().splitlines()[0][:200] if str(error).strip() else ""}); install it with '
                      '`pip install libtpu` (or into a folder on PYTHONPATH)') from None


def describe_attention(cfg, seq_len: int) -> str:
  with attention.compiling_for('tpu'):
    return attention.describe_impl(cfg, seq_len)


def compile_for(config, topology: str) -> dict:
  libtpu_name, devices = topology_devices(topology)
  vocab = data.tokenizer_vocab_size(config.data)
  cfg = defaults.model_config(config, vocab)
  tc = config.train
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  try:
    with attention.compiling_for('tpu'):  # the TPU's kernels, although this machine's backend is the CPU
      parts = preflight.compiled_memory(config, cfg, mesh)
  except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses a program that cannot fit
    if 'RESOURCE_EXHAUSTED' not in str(error):
      raise
    reason = str(error).split('RESOURCE_EXHAUSTED:')[-1].strip().splitlines()[0]
    raise ConfigError(f'--topology: the train step does not fit on {topology} ({reason}); raise '
                      'train.microbatches, shard more (mesh.fsdp, mesh.tensor), turn on model.remat, or take a '
                      'larger slice') from None
  total = parts.pop('total')
  chip = libtpu_name.split(':')[0]
  result = {'topology': topology, 'libtpu_topology': libtpu_name, 'chips': len(devices),
            'device_kind': devices[0].device_kind, 'mesh': dict(mesh.shape), 'variant': cfg.variant,
            'attention_impl': cfg.attention_impl, 'attention': describe_attention(cfg, tc.seq_len),
            'global_batch': tc.global_batch_size, 'seq_len': tc.seq_len,
            'microbatches': tc.microbatches, **{f'{k}_gib_per_chip': v / 2**30 for k, v in parts.items()},
            'total_gib_per_chip': total / 2**30}
  if chip in HBM_GIB:
    result['hbm_gib_per_chip'] = HBM_GIB[chip]
    result['fits'] = total / 2**30 <= HBM_GIB[chip]
  return result


@cli.report_errors
def main(argv):
  del argv
  if CONFIG.value is None:
    raise ConfigError('--config is required, e.g. --config=configs/paper_1_4b.py --topology=v5p-8')
  print(json.dumps(compile_for(cli.config_value(CONFIG), TOPOLOGY.value)))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
