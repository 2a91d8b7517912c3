"""Times KV-cache generation of a config for each variant: decode tokens/s at each batch size, and the prefill.

  python launch/bench_decode.py --config=configs/seed.py --batches=1,64 --prompt_len=128 --tokens=512 --hf=1
  python launch/bench_decode.py --config=configs/tiny.py --prompt_len=16 --tokens=32     # a CPU check

Random prompts and random parameters (or a trained run's, `--workdir`), greedy with no EOS, so every row decodes all
`--tokens` tokens through `diffjax.infer.generate`, the path `python -m diffjax.sample` uses. Compilation is
excluded; each setting runs once to warm up, then `--repeats` times, and the best run counts. With `--hf 1` the same
weights and prompts also go through Hugging Face `generate` (PyTorch, bfloat16, SDPA, a static cache, with which
`generate` compiles its forward pass, as its docs advise for fast decoding; DiffLlama for DIFF V1, Llama for the
baseline; DIFF V2 has no Hugging Face counterpart). `--config.KEY=VALUE` sets any key of the config. Each row is
printed as soon as it is measured; the table at the end and the JSON (`--out`) hold all of them.
"""

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffjax import cli
from diffjax.data import pipeline as data
from diffjax.infer import generate, hf, load
from diffjax.model import transformer as model
from diffjax.run import defaults

CONFIG = config_flags.DEFINE_config_file('config', 'configs/seed.py', 'A config file; --config.KEY=VALUE sets any key.',
                                          lock_config=True)
WORKDIR = flags.DEFINE_string('workdir', '', "Time this trained run's model instead (its variant only).")
VARIANTS = flags.DEFINE_list('variants', ['diff_v1', 'diff_v2', 'baseline'], 'model.variant of each model.')
BATCHES = flags.DEFINE_list('batches', ['1', '64'], 'Batch sizes.')
PROMPT_LEN = flags.DEFINE_integer('prompt_len', 128, 'Tokens per prompt.')
TOKENS = flags.DEFINE_integer('tokens', 512, 'New tokens per row (prompt_len + tokens <= max_len).')
REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs of each setting; the best counts.')
HF = flags.DEFINE_bool('hf', False, 'Time Hugging Face generate beside (needs torch and transformers).')
OUT = flags.DEFINE_string('out', 'bench_decode.json', 'Where the JSON rows go.')


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
  # With a static cache, `generate` compiles the decoding forward itself (CUDA graphs included) and marks each
  # step for them; compiling `model.forward` by hand as well fails on reused graph outputs in transformers 5.
  model.generation_config.cache_implementation = 'static'
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


def main(argv):
  del argv
  if WORKDIR.value:
    cfg, params, _, _ = load.open_run(WORKDIR.value)
    models = [(cfg, params)]
  else:
    config = CONFIG.value
    models = []
    for variant in VARIANTS.value:
      config.model.variant = variant
      cfg = defaults.model_config(config, vocab_size_of(config))
      models.append((cfg, random_params(cfg)))
  generate.check_length(models[0][0], PROMPT_LEN.value, TOKENS.value)
  title = (f'{jax.devices()[0].device_kind}, {models[0][0].n_layers} layers, width {models[0][0].d_model}, '
           f'{models[0][0].dtype}, prompt {PROMPT_LEN.value}, {TOKENS.value} new tokens, greedy')
  header = f'{"engine":<8} {"variant":<10} {"batch":>6} {"decode tok/s":>14} {"ms/step":>9} {"prefill tok/s":>16}'
  print(title + '\n' + header, flush=True)
  results = []
  for cfg, params in models:
    for batch in BATCHES.value:
      engines = [bench] + ([bench_hf] if HF.value and cfg.variant in HF_MODELS else [])
      for engine in engines:
        results.append(engine(cfg, params, int(batch), PROMPT_LEN.value, TOKENS.value, REPEATS.value))
        print(row_text(results[-1]), flush=True)
  print('\n' + title + '\n' + header + '\n' + '\n'.join(row_text(r) for r in results))
  config = WORKDIR.value or config_flags.get_config_filename(flags.FLAGS['config'])
  with open(OUT.value, 'w') as f:
    json.dump({'device': jax.devices()[0].device_kind, 'config': config, 'results': results}, f, indent=1)
  print(f'wrote {OUT.value}')


if __name__ == '__main__':
  app.run(cli.report_errors(main), flags_parser=cli.parse_flags)
