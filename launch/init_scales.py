"""How large each block's attention and FFN outputs are at initialisation, against the token embeddings they join.

  python launch/init_scales.py --config configs/seed.py --text 'PATH/TO/corpus_en/*.txt.gz' --out init_scales.json

For each variant and each init of the residual-branch output projections (`model.scale_residual_init`), one forward
pass at the config's shape over real text (bytes) at initialisation gives, per layer, the RMS of the attention and
FFN branch outputs, and at the end how much of the residual stream is still the current token's embedding: the
mean cosine between the final residual stream and the token's embedding row. DIFF V1's per-head RMSNorm sets its
attention output to RMS (1 - λ_init) before W_o whatever the attention maps are, while the baseline's output is an
average of values, small when the maps are near uniform; so at the same init DIFF adds much more to the residual
stream, and the embeddings (N(0, 0.02)) are a smaller part of what the output layer sees. No accelerator needed.
"""

import argparse
import glob
import gzip
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import defaults, model as model_lib, tokenizers
import bench_train


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/seed.py')
  parser.add_argument('--text', required=True, help='a glob of .txt or .txt.gz files')
  parser.add_argument('--variants', default='diff_v1,baseline')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--seq', type=int, default=0, help='sequence length (0: the config\'s)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE')
  parser.add_argument('--out', default='init_scales.json')
  args = parser.parse_args()
  config = bench_train.load_config(args.config)
  bench_train.apply_overrides(config, args.set)
  config.model.dtype, config.model.attention_impl = 'float32', 'xla'
  tokens = text_batch(args.text, args.batch, args.seq or config.train.seq_len)
  rows = []
  for variant in args.variants.split(','):
    for scaled in (True, False):
      config.model.variant, config.model.scale_residual_init = variant, scaled
      cfg = defaults.model_config(config, tokenizers.ByteTokenizer.vocab_size)
      rows.append({'variant': variant, 'scale_residual_init': scaled, **measure(cfg, tokens, args.seed)})
  print(f'{args.config}, {args.batch} x {tokens.shape[1]} bytes of {args.text}, seed {args.seed}, at initialisation')
  print(f'{"variant":<10} {"init":<11} {"embed RMS":>10} {"attn RMS by layer":<44} {"ffn RMS (mean)":>14} '
        f'{"final RMS":>10} {"cos(final, embed)":>18}')
  for r in rows:
    attn = ' '.join(f'{layer["attn_rms"]:.3f}' for layer in r['layers'])
    ffn = np.mean([layer['ffn_rms'] for layer in r['layers']])
    init = '0.02/√(2L)' if r['scale_residual_init'] else '0.02'
    print(f'{r["variant"]:<10} {init:<11} {r["embedding_rms"]:>10.4f} {attn:<44} {ffn:>14.4f} {r["final_rms"]:>10.4f} '
          f'{r["final_cosine_with_token_embedding"]:>18.3f}')
  with open(args.out, 'w') as f:
    json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
