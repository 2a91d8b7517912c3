"""Prints continuations of a prompt from a run's newest checkpoint, with a KV cache:
`python -m diffjax.sample --workdir=DIR --prompt='def main' --tokens=200 [--temperature=0.8 --top_k=0 --top_p=1.0
--seed=0 --num_samples=1]`.

Generation stops at the model's EOS token or after --tokens tokens; the prompt and the new tokens must fit in the
model's max_len. Timings go to stderr, so stdout holds only the text.
"""

import math
import sys

from absl import app, flags

from diffjax import cli
from diffjax.infer import generate, load

WORKDIR = flags.DEFINE_string('workdir', None, 'The workdir of a training run.')
PROMPT = flags.DEFINE_string('prompt', 'def ', 'Text to continue; empty: the start of a document.')
TOKENS = flags.DEFINE_integer('tokens', 200, 'Tokens to generate at most (stops earlier at EOS).', lower_bound=0)
TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.', lower_bound=0.0)
TOP_K = flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens only; 0: all.', lower_bound=0)
TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sample among the most likely tokens holding this probability; 1: all.')
SEED = flags.DEFINE_integer('seed', 0, 'Random seed of the sampling.')
NUM_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'Continuations of the prompt, generated as one batch.',
                                   lower_bound=1)
flags.register_validator('temperature', math.isfinite, message='must be a finite number')
flags.register_validator('top_p', lambda value: 0 < value <= 1, message='must be in (0, 1]')


@cli.report_errors
def main(argv):
  del argv
  cfg, params, tokenizer, step = load.open_run(WORKDIR.value)
  # An empty prompt starts a new document, which in training follows an EOS token.
  prompt_ids = tokenizer.encode(PROMPT.value) or [tokenizer.eos_id]
  result = generate.generate(cfg, params, [prompt_ids] * NUM_SAMPLES.value, TOKENS.value,
                             temperature=TEMPERATURE.value, top_k=TOP_K.value, top_p=TOP_P.value, seed=SEED.value,
                             eos_id=tokenizer.eos_id)
  for i, ids in enumerate(result.tokens):
    if i:
      print('-' * 40)
    print(PROMPT.value + tokenizer.decode(ids))
  print(f'step {step}: prefill {len(prompt_ids)} x {NUM_SAMPLES.value} tokens in {result.prefill_s:.3f} s; '
        f'decoded {result.decoded} tokens in {result.decode_s:.3f} s ({result.tokens_per_s:,.0f} tokens/s)',
        file=sys.stderr)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
