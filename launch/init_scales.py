"""How large each block's attention and FFN outputs are at initialisation, against the token embeddings they join.

  python launch/init_scales.py --config=configs/seed.py --text='PATH/TO/corpus_en/*.txt.gz' --out=init_scales.json

For each variant and each init of the residual-branch output projections (`model.scale_residual_init`), one forward
pass at the config's shape over real text (bytes) at initialisation gives, per layer, the RMS of the attention and
FFN branch outputs, and at the end how much of the residual stream is still the current token's embedding: the
mean cosine between the final residual stream and the token's embedding row. DIFF V1's per-head RMSNorm sets its
attention output to RMS (1 - λ_init) before W_o whatever the attention maps are, while the baseline's output is an
average of values, small when the maps are near uniform; so at the same init DIFF adds much more to the residual
stream, and the embeddings (N(0, 0.02)) are a smaller part of what the output layer sees. No accelerator needed.
`--config.KEY=VALUE` sets any key of the config.
"""

import glob
import gzip
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffjax import cli
from diffjax.data import tokenizers
from diffjax.model import transformer as model_lib
from diffjax.run import defaults


def text_batch(pattern: str, batch: int, seq_len: int, seed: int = 0) -> np.ndarray:
  """`batch` random windows of seq_len bytes from the files of `pattern` (.txt or .txt.gz)."""
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise SystemExit(f'error: --text {pattern!r} matches no file')
  data = b''.join((gzip.open(p).read() if p.endswith('.gz') else open(p, 'rb').read()) for p in paths[:8])
  stream = np.frombuffer(data, np.uint8).astype(np.int32)
  starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len, batch)
  return np.stack([stream[s:s + seq_len] for s in starts])


def measure(cfg, tokens_BxT: np.ndarray, seed: int) -> dict:
  module = model_lib.Transformer(cfg)
  init = jax.jit(lambda key: nn.meta.unbox(module.init(key, jnp.zeros((1, 8), jnp.int32))['params']))
  params = init(jax.random.key(seed))

  @jax.jit
  def forward(params, tokens):
    _, state = module.apply({'params': params}, tokens, capture_intermediates=True, mutable=['intermediates'])
    return state['intermediates']

  captured = forward(params, tokens_BxT)
  rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32)))))
  embeddings = params['embed']['embedding'][tokens_BxT]
  layers = []
  for layer in range(cfg.n_layers):
    block = captured[f'block_{layer}']
    layers.append({'attn_rms': rms(block['attn']['__call__'][0]), 'ffn_rms': rms(block['ffn']['__call__'][0])})
  final = captured[f'block_{cfg.n_layers - 1}']['__call__'][0]
  cosine = jnp.sum(final * embeddings, -1) / (jnp.linalg.norm(final, axis=-1) * jnp.linalg.norm(embeddings, axis=-1))
  return {'embedding_rms': rms(embeddings), 'layers': layers, 'final_rms': rms(final),
          'final_cosine_with_token_embedding': float(jnp.mean(cosine))}


def define_flags() -> dict:
  """The command line's flags; defined only when run as a program, since the tests import this module beside others
  that define a --config of their own."""
  return {
      'config': config_flags.DEFINE_config_file('config', 'configs/seed.py', 'A config file; --config.KEY=VALUE sets '
                                                'any key.', lock_config=True),
      'text': flags.DEFINE_string('text', None, 'A glob of .txt or .txt.gz files.', required=True),
      'variants': flags.DEFINE_list('variants', ['diff_v1', 'baseline'], 'model.variant of each row.'),
      'batch': flags.DEFINE_integer('batch', 2, 'Windows of text.'),
      'seq': flags.DEFINE_integer('seq', 0, "Window length in bytes (0: the config's sequence length)."),
      'seed': flags.DEFINE_integer('seed', 0, 'Seed of the initialisation.'),
      'out': flags.DEFINE_string('out', 'init_scales.json', 'Where the JSON rows go.'),
  }


def main(argv, defined: dict):
  del argv
  args = {name: flag.value for name, flag in defined.items()}
  config = args['config']
  config.model.dtype, config.model.attention_impl = 'float32', 'xla'
  tokens = text_batch(args['text'], args['batch'], args['seq'] or config.train.seq_len)
  rows = []
  for variant in args['variants']:
    for scaled in (True, False):
      config.model.variant, config.model.scale_residual_init = variant, scaled
      cfg = defaults.model_config(config, tokenizers.ByteTokenizer.vocab_size)
      rows.append({'variant': variant, 'scale_residual_init': scaled, **measure(cfg, tokens, args['seed'])})
  print(f'{config_flags.get_config_filename(flags.FLAGS["config"])}, {args["batch"]} x {tokens.shape[1]} bytes of '
        f'{args["text"]}, seed {args["seed"]}, at initialisation')
  print(f'{"variant":<10} {"init":<11} {"embed RMS":>10} {"attn RMS by layer":<44} {"ffn RMS (mean)":>14} '
        f'{"final RMS":>10} {"cos(final, embed)":>18}')
  for r in rows:
    attn = ' '.join(f'{layer["attn_rms"]:.3f}' for layer in r['layers'])
    ffn = np.mean([layer['ffn_rms'] for layer in r['layers']])
    init = '0.02/√(2L)' if r['scale_residual_init'] else '0.02'
    print(f'{r["variant"]:<10} {init:<11} {r["embedding_rms"]:>10.4f} {attn:<44} {ffn:>14.4f} {r["final_rms"]:>10.4f} '
          f'{r["final_cosine_with_token_embedding"]:>18.3f}')
  with open(args['out'], 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  FLAGS = define_flags()
  app.run(cli.report_errors(lambda argv: main(argv, FLAGS)), flags_parser=cli.parse_flags)
