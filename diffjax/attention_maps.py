"""Plots what a trained model attends to: `python -m diffjax.attention_maps --workdir=DIR --prompt='...'`.

For DIFF V1 it draws, for one layer and head, the two softmax maps A1 and A2 and the differential map
A1 − λ·A2 that the layer actually applies; for the baseline, its single softmax map. Writes
attention_layer{L}_head{H}.png into --out, by default the workdir.
"""

import os

import jax.numpy as jnp
from absl import app, flags

from diffjax import cli
from diffjax.errors import ConfigError
from diffjax.infer import attention_maps, load
from diffjax.train import workdir as workdir_lib

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
PROMPT = flags.DEFINE_string('prompt', 'def attention(query, key, value):\n    return', 'Text to look at.')
LAYER = flags.DEFINE_integer('layer', -1, 'Layer (0-based; negative counts from the last).')
HEAD = flags.DEFINE_integer('head', 0, 'Differential head (DIFF V1) or head (baseline).', lower_bound=0)
OUT = flags.DEFINE_string('out', None, 'Folder for the PNG; default: the workdir.')


@cli.report_errors
def main(argv):
  del argv
  cfg, params, tokenizer, step = load.open_run(WORKDIR.value)
  ids = tokenizer.encode(PROMPT.value)
  if not 0 < len(ids) <= cfg.max_len:
    raise ConfigError(f'--prompt: it is {len(ids)} tokens long; give 1 to {cfg.max_len} (the model\'s max_len)')
  if not -cfg.n_layers <= LAYER.value < cfg.n_layers:
    raise ConfigError(f'--layer: {LAYER.value} is out of range; this model has {cfg.n_layers} layers: give 0 to '
                      f'{cfg.n_layers - 1}, or -1 to -{cfg.n_layers} to count from the last')
  layer = LAYER.value % cfg.n_layers
  path = os.path.join(cli.output_folder(OUT.value or WORKDIR.value, '--out'),
                      f'attention_layer{layer}_head{HEAD.value}.png')
  if not OUT.value:
    workdir_lib.check_no_link_out(WORKDIR.value, path)  # the one file a reader writes in the workdir
  maps = attention_maps.layer_maps(cfg, params, jnp.asarray([ids], jnp.int32), layer)
  heads = maps['a' if 'a' in maps else 'a1'].shape[0]
  if HEAD.value >= heads:
    raise ConfigError(f'--head: {HEAD.value} is out of range; this layer has {heads} heads (0..{heads - 1})')
  labels = [repr(tokenizer.decode([i]))[1:-1] or '·' for i in ids]
  with cli.writing(path, '--out'):
    attention_maps.plot(maps, labels, f'{cfg.variant}, step {step}, layer {layer}, head {HEAD.value}', path,
                        HEAD.value)
  print(path)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
