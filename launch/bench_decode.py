"""Times KV-cache generation of a config for each variant: decode tokens/s at each batch size, and the prefill.

  python launch/bench_decode.py --config configs/seed.py --batches 1,64 --prompt_len 128 --tokens 512
  python launch/bench_decode.py --config configs/tiny.py --prompt_len 16 --tokens 32     # a CPU check

Random prompts and random parameters (or a trained run's, `--workdir`), sampling at temperature 1 with no EOS, so
every row decodes all `--tokens` tokens through `diffjax.generate`, the path `python -m diffjax.sample` uses.
Compilation is excluded; each setting runs once to warm up, then `--repeats` times, and the best run counts.
Prints a table and writes JSON (`--out`).
"""

import argparse
import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import data, defaults, generate, inference, model


def load_config(path):
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def vocab_size_of(config) -> int:
  return data.tokenizer_vocab_size(config.data)


def random_params(cfg):
  init = jax.jit(lambda key: nn.meta.unbox(model.Transformer(cfg).init(key, jnp.zeros((1, 8), jnp.int32))))
  return init(jax.random.key(0))['params']


def bench(cfg, params, batch: int, prompt_len: int, tokens: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, min(cfg.vocab_size, 256), (batch, prompt_len)).tolist()
  run = lambda seed: generate.generate(cfg, params, prompts, tokens, temperature=1.0, seed=seed)
  run(0)  # compiles
  best = min((run(seed) for seed in range(1, repeats + 1)), key=lambda result: result.decode_s)
  return {'variant': cfg.variant, 'batch': batch, 'prompt_len': prompt_len, 'tokens': tokens,
          'decode_tokens_per_s': best.tokens_per_s, 'decode_ms_per_step': 1e3 * best.decode_s / (tokens - 1),
          'prefill_s': best.prefill_s, 'prefill_tokens_per_s': batch * prompt_len / max(best.prefill_s, 1e-9)}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/seed.py')
  parser.add_argument('--workdir', default='', help='time this trained run\'s model instead (its variant only)')
  parser.add_argument('--variants', default='diff_v1,diff_v2,baseline')
  parser.add_argument('--batches', default='1,64', help='comma-separated batch sizes')
  parser.add_argument('--prompt_len', type=int, default=128)
  parser.add_argument('--tokens', type=int, default=512, help='new tokens per row (prompt_len + tokens <= max_len)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='bench_decode.json')
  args = parser.parse_args()
  if args.workdir:
    cfg, params, _, _ = inference.open_run(args.workdir)
    models = [(cfg, params)]
  else:
    config = load_config(args.config)
    models = []
    for variant in args.variants.split(','):
      config.model.variant = variant
      cfg = defaults.model_config(config, vocab_size_of(config))
      models.append((cfg, random_params(cfg)))
  generate.check_length(models[0][0], args.prompt_len, args.tokens)
  results = [bench(cfg, params, int(batch), args.prompt_len, args.tokens, args.repeats)
             for cfg, params in models for batch in args.batches.split(',')]
  print(f'{jax.devices()[0].device_kind}, {models[0][0].n_layers} layers, width {models[0][0].d_model}, '
        f'{models[0][0].dtype}, prompt {args.prompt_len}, {args.tokens} new tokens')
  print(f'{"variant":<10} {"batch":>6} {"decode tok/s":>14} {"ms/step":>9} {"prefill s":>10}')
  for r in results:
    print(f'{r["variant"]:<10} {r["batch"]:>6} {r["decode_tokens_per_s"]:>14,.0f} {r["decode_ms_per_step"]:>9.2f} '
          f'{r["prefill_s"]:>10.4f}')
  with open(args.out, 'w') as f:
    json.dump({'device': jax.devices()[0].device_kind, 'config': args.config if not args.workdir else args.workdir,
               'results': results}, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
