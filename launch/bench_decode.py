"""Times KV-cache generation of a config for each variant: decode tokens/s at each batch size, and the prefill.

  python launch/bench_decode.py --config configs/seed.py --batches 1,64 --prompt_len 128 --tokens 512 --hf 1
  python launch/bench_decode.py --config configs/tiny.py --prompt_len 16 --tokens 32     # a CPU check

Random prompts and random parameters (or a trained run's, `--workdir`), greedy with no EOS, so every row decodes
all `--tokens` tokens through `diffjax.generate`, the path `python -m diffjax.sample` uses. Compilation is
excluded; each setting runs once to warm up, then `--repeats` times, and the best run counts. With `--hf 1` the same
weights and prompts also go through Hugging Face `generate` (PyTorch, bfloat16, SDPA, a static cache and
`torch.compile`, as its docs advise for fast decoding; DiffLlama for DIFF V1, Llama for the baseline; DIFF V2 has no
Hugging Face counterpart). Each row is printed as soon as it is measured; the table at the end and the JSON
(`--out`) hold all of them.
"""

import argparse
import importlib.util
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import data, defaults, generate, hf, inference, model


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


HF_MODELS = {'diff_v1': 'DiffLlama', 'baseline': 'Llama'}


def random_prompts(cfg, batch: int, prompt_len: int) -> list[list[int]]:
  rng = np.random.default_rng(0)
  return rng.integers(0, min(cfg.vocab_size, 256), (batch, prompt_len)).tolist()


def result(engine, cfg, batch, prompt_len, tokens, prefill_s, decode_s) -> dict:
  """One row: the first new token of each prompt comes with the prefill, the other `tokens - 1` from decode steps."""
  return {'engine': engine, 'variant': cfg.variant, 'batch': batch, 'prompt_len': prompt_len, 'tokens': tokens,
          'decode_tokens_per_s': batch * (tokens - 1) / max(decode_s, 1e-9),
          'decode_ms_per_step': 1e3 * decode_s / (tokens - 1), 'prefill_s': prefill_s,
          'prefill_tokens_per_s': batch * prompt_len / max(prefill_s, 1e-9)}


def bench(cfg, params, batch: int, prompt_len: int, tokens: int, repeats: int) -> dict:
  prompts = random_prompts(cfg, batch, prompt_len)
  run = lambda: generate.generate(cfg, params, prompts, tokens, temperature=0.0)
  run()  # compiles
  best = min((run() for _ in range(repeats)), key=lambda generation: generation.decode_s)
  return result('diffjax', cfg, batch, prompt_len, tokens, best.prefill_s, best.decode_s)


def bench_hf(cfg, params, batch: int, prompt_len: int, tokens: int, repeats: int) -> dict:
  """The same weights and prompts through Hugging Face `generate`; the prefill is timed as a one-token generate."""
  import torch  # pylint: disable=import-outside-toplevel  (only --hf needs PyTorch)
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  model = hf.hf_model(cfg, params, attn_implementation='sdpa').to(device, torch.bfloat16).eval()
  model.generation_config.cache_implementation = 'static'
  model.forward = torch.compile(model.forward, mode='reduce-overhead', fullgraph=True)
  ids = torch.tensor(random_prompts(cfg, batch, prompt_len), device=device)

  def seconds(new_tokens: int) -> float:
    if device == 'cuda':
      torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
      model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                     do_sample=False, eos_token_id=None, pad_token_id=0)
    if device == 'cuda':
      torch.cuda.synchronize()
    return time.perf_counter() - start

  seconds(tokens), seconds(1)  # compile both cache shapes' graphs
  prefill_s = min(seconds(1) for _ in range(repeats))
  total_s = min(seconds(tokens) for _ in range(repeats))
  return result('hf', cfg, batch, prompt_len, tokens, prefill_s, total_s - prefill_s)


def row_text(r) -> str:
  return (f'{r["engine"]:<8} {r["variant"]:<10} {r["batch"]:>6} {r["decode_tokens_per_s"]:>14,.0f} '
          f'{r["decode_ms_per_step"]:>9.2f} {r["prefill_tokens_per_s"]:>16,.0f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/seed.py')
  parser.add_argument('--workdir', default='', help='time this trained run\'s model instead (its variant only)')
  parser.add_argument('--variants', default='diff_v1,diff_v2,baseline')
  parser.add_argument('--batches', default='1,64', help='comma-separated batch sizes')
  parser.add_argument('--prompt_len', type=int, default=128)
  parser.add_argument('--tokens', type=int, default=512, help='new tokens per row (prompt_len + tokens <= max_len)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--hf', type=int, default=0, help='1: time Hugging Face generate beside (needs torch)')
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
  title = (f'{jax.devices()[0].device_kind}, {models[0][0].n_layers} layers, width {models[0][0].d_model}, '
           f'{models[0][0].dtype}, prompt {args.prompt_len}, {args.tokens} new tokens, greedy')
  header = f'{"engine":<8} {"variant":<10} {"batch":>6} {"decode tok/s":>14} {"ms/step":>9} {"prefill tok/s":>16}'
  print(title + '\n' + header, flush=True)
  results = []
  for cfg, params in models:
    for batch in args.batches.split(','):
      engines = [bench] + ([bench_hf] if args.hf and cfg.variant in HF_MODELS else [])
      for engine in engines:
        results.append(engine(cfg, params, int(batch), args.prompt_len, args.tokens, args.repeats))
        print(row_text(results[-1]), flush=True)
  print('\n' + title + '\n' + header + '\n' + '\n'.join(row_text(r) for r in results))
  with open(args.out, 'w') as f:
    json.dump({'device': jax.devices()[0].device_kind, 'config': args.config if not args.workdir else args.workdir,
               'results': results}, f, indent=1)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
