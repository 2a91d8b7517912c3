"""Multi-needle retrieval in long contexts, and where the model's attention goes while it retrieves: the prompts
(seeded key-value needles hidden at given depths of filler text, each prompt exactly one context long), the greedy
retrieval check, each layer's attention mass on the answer span against the rest, and the report's tables and plot.
`python -m diffjax.needles` (diffjax/needles.py) runs it on trained runs and describes the protocol in full.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.data import corpus, tokenizers
from diffjax.errors import ConfigError
from diffjax.infer import attention_maps
from diffjax.infer import generate as generate_lib
from diffjax.model.config import ModelConfig

_KEYS = ('Lisbon', 'Nairobi', 'Oslo', 'Lima', 'Hanoi', 'Dakar', 'Quito', 'Riga', 'Tunis', 'Perth', 'Osaka', 'Accra',
         'Bogota', 'Cairo', 'Dublin', 'Helsinki', 'Jakarta', 'Kyiv', 'Manila', 'Montreal', 'Porto', 'Seoul', 'Sofia',
         'Tbilisi', 'Valencia', 'Zagreb', 'Ankara', 'Bergen', 'Cusco', 'Geneva', 'Havana', 'Kampala')
_VALUE_DIGITS = 7


@dataclasses.dataclass(frozen=True)
class Prompt:
  tokens: list[int]  # exactly the requested context length
  value: str  # the queried needle's number, the right answer
  span: tuple[int, int]  # [start, end) token positions of that number inside its needle: the answer span
  depth: float


def needle_parts(key: str, value: str) -> tuple[str, str, str]:
  """A needle's text around its value, so the value's tokens are known exactly."""
  return f'\nThe magic number of {key} is ', value, '.\n'


def question(key: str) -> str:
  return f'\nWhat is the magic number of {key}? The magic number of {key} is'


def draw_needles(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
  """`count` (key, value) pairs with distinct keys and distinct 7-digit values."""
  if not 1 <= count <= len(_KEYS):
    raise ConfigError(f'--needles: give 1 to {len(_KEYS)} needles, got {count}')
  keys = rng.choice(len(_KEYS), count, replace=False)
  values = rng.choice(9 * 10 ** (_VALUE_DIGITS - 1), count, replace=False) + 10 ** (_VALUE_DIGITS - 1)
  return [(_KEYS[k], str(v)) for k, v in zip(keys, values)]


def trial_prompts(tokenizer: tokenizers.Tokenizer, filler_ids: np.ndarray, context: int, depths: list[float],
                  needles: list[tuple[str, str]], queries: int, rng: np.random.Generator) -> list[Prompt]:
  """One trial's prompts of exactly `context` tokens, depth-major: for each depth, one per queried needle (the first
  `queries` of `needles`). Raises ConfigError if the needles and the question leave no room."""
  needle_ids = [[tokenizer.encode(part) for part in needle_parts(key, value)] for key, value in needles]
  question_ids = [tokenizer.encode(question(key)) for key, _ in needles[:queries]]
  fixed = 1 + sum(len(ids) for parts in needle_ids for ids in parts) + max(len(ids) for ids in question_ids)
  filler_len = context - fixed
  if filler_len < 0:
    raise ConfigError(f'--context: {context} tokens cannot hold {len(needles)} needles and a question '
                      f'({fixed} tokens); give at least {fixed}')
  # The window and the distractors' offsets are drawn once per trial, so only the queried needles move with depth.
  # The window runs on past the filler by the longest question: shorter questions take their spare room from it.
  window_len = filler_len + max(len(ids) for ids in question_ids)
  stream = np.tile(filler_ids, -(-(window_len + 1) // len(filler_ids)))
  start = int(rng.integers(0, len(stream) - window_len + 1))
  window = stream[start:start + window_len].tolist()
  filler, tail = window[:filler_len], window[filler_len:]
  distractor_offsets = sorted(rng.integers(0, filler_len + 1, len(needles) - queries).tolist())
  prompts = []
  for depth in depths:
    at = round(depth * filler_len)
    # Queried needles go before distractors at the same offset: sorting is stable on (offset, needle index).
    placed = sorted([(at, i) for i in range(queries)] +
                    [(offset, queries + j) for j, offset in enumerate(distractor_offsets)])
    tokens, spans, previous = [tokenizer.eos_id], {}, 0
    for offset, i in placed:
      tokens += filler[previous:offset]
      before, value, after = needle_ids[i]
      spans[i] = (len(tokens) + len(before), len(tokens) + len(before) + len(value))
      tokens += before + value + after
      previous = offset
    tokens += filler[previous:]
    for q in range(queries):
      pad = len(tail) - len(question_ids[q])  # so every prompt is `context` long
      prompts.append(Prompt(tokens + tail[:pad] + question_ids[q], needles[q][1], spans[q], depth))
  return prompts


def build_prompts(tokenizer: tokenizers.Tokenizer, filler_ids: np.ndarray, context: int, depths: list[float],
                  num_needles: int, queries: int, trials: int, seed: int) -> list[Prompt]:
  """All prompts of one context length, trial-major: `trials` × len(depths) × `queries`."""
  if not 1 <= queries <= num_needles:
    raise ConfigError(f'--queries: give 1 to --needles={num_needles} queried needles, got {queries}')
  rng = np.random.default_rng([seed, context])
  return [prompt for _ in range(trials) for prompt in trial_prompts(
      tokenizer, filler_ids, context, depths, draw_needles(rng, num_needles), queries, rng)]


def is_right(continuation: str, value: str) -> bool:
  """Exact match: after leading whitespace the continuation is the value, ended by anything but a digit."""
  return re.match(rf'\s*{re.escape(value)}(?!\d)', continuation) is not None


def answer_tokens(tokenizer: tokenizers.Tokenizer) -> int:
  """New tokens a greedy answer needs: a space, the value and one more to see that the number ended."""
  return len(tokenizer.encode(' ' + '9' * _VALUE_DIGITS)) + 1


def batches(prompts: list[Prompt], batch_size: int):
  """Chunks of `batch_size` prompts, the last padded with copies of its first, so one program serves them all."""
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    yield chunk, chunk + [chunk[0]] * (batch_size - len(chunk))


def retrieval(cfg: ModelConfig, params, tokenizer: tokenizers.Tokenizer, prompts: list[Prompt],
              batch_size: int) -> list[bool]:
  """Whether each prompt's greedy continuation gives its value."""
  right = []
  for chunk, padded in batches(prompts, batch_size):
    out = generate_lib.generate(cfg, params, [p.tokens for p in padded], answer_tokens(tokenizer), temperature=0.0,
                                eos_id=tokenizer.eos_id)
    right += [is_right(tokenizer.decode(ids), p.value) for p, ids in zip(chunk, out.tokens)]
  return right


@functools.partial(jax.jit, static_argnums=0)
def _last_rows(cfg: ModelConfig, params, tokens_BxT):
  """Per layer, the last position's attention row (B, H, T): A1 − λ·A2 for DIFF V1, softmax for the baseline."""
  key = 'diff' if cfg.variant == 'diff_v1' else 'a'
  # Only these rows leave the program, so the full maps the forward pass computes are never kept.
  return [attention_maps.maps_of(cfg, layer_sown, rows=-1)[key]
          for layer_sown in attention_maps.sown(cfg, params, tokens_BxT)[1]]


def span_masses(rows_BxHxT: np.ndarray, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
  """(answer (B,), noise (B,)): each row's summed entries inside its span and outside it, averaged over heads."""
  inside_BxT = np.zeros((rows_BxHxT.shape[0], rows_BxHxT.shape[2]), bool)
  for b, (start, end) in enumerate(spans):
    inside_BxT[b, start:end] = True
  total_BxH = rows_BxHxT.sum(-1)
  answer_BxH = np.where(inside_BxT[:, None], rows_BxHxT, 0).sum(-1)
  return answer_BxH.mean(-1), (total_BxH - answer_BxH).mean(-1)


def attention_to_needles(cfg: ModelConfig, params, prompts: list[Prompt], batch_size: int) -> tuple[np.ndarray, ...]:
  """(answer (P, L), noise (P, L)): each prompt's answer-span and noise masses per layer."""
  masses = []  # per chunk, (2, len(chunk), L): answer and noise
  for chunk, padded in batches(prompts, batch_size):
    rows = _last_rows(cfg, params, jnp.asarray([p.tokens for p in padded], jnp.int32))
    masses_Lx2xB = np.array([span_masses(np.asarray(rows_BxHxT), [p.span for p in padded]) for rows_BxHxT in rows])
    masses.append(masses_Lx2xB.transpose(1, 2, 0)[:, :len(chunk)])
  return tuple(np.concatenate(masses, axis=1))


def evaluate_run(cfg: ModelConfig, params, tokenizer: tokenizers.Tokenizer, filler_ids: np.ndarray,
                 contexts: list[int], depths: list[float], num_needles: int, queries: int, trials: int, seed: int,
                 batch_size: int) -> list[dict]:
  """Per context length: accuracy per depth and, for DIFF V1 and the baseline, answer/noise mass per layer."""
  results = []
  answer_len = answer_tokens(tokenizer)
  for context in contexts:
    if context + answer_len > cfg.max_len:
      raise ConfigError(f'--context: {context} tokens and {answer_len} answer tokens exceed the model\'s max_len of '
                        f'{cfg.max_len}; give at most {cfg.max_len - answer_len}')
    prompts = build_prompts(tokenizer, filler_ids, context, depths, num_needles, queries, trials, seed)
    right = np.array(retrieval(cfg, params, tokenizer, prompts, batch_size))
    at_depth = np.array([p.depth for p in prompts])
    result = {'context': context, 'accuracy': [float(right[at_depth == d].mean()) for d in depths],
              'mean_accuracy': float(right.mean()), 'attention': None}
    if cfg.variant != 'diff_v2':
      answer_PxL, noise_PxL = attention_to_needles(cfg, params, prompts, batch_size)
      result['attention'] = {
          'map': 'A1 - lambda*A2' if cfg.variant == 'diff_v1' else 'softmax',
          'answer': answer_PxL.mean(0).tolist(), 'noise': noise_PxL.mean(0).tolist(),
          'answer_by_depth': [answer_PxL[at_depth == d].mean(0).tolist() for d in depths],
          'noise_by_depth': [noise_PxL[at_depth == d].mean(0).tolist() for d in depths]}
    results.append(result)
  return results


def filler_tokens(tokenizer: tokenizers.Tokenizer, text_glob: str, needed: int) -> np.ndarray:
  """Token ids of the files' texts, in file order, read only until there are `needed` (or the files end)."""
  parts, count = [], 0
  for path in corpus.find_text_files(text_glob, '--text_glob'):
    parts.append(np.asarray(tokenizer.encode(corpus.read_document(path) + '\n\n'), np.int64))
    count += len(parts[-1])
    if count >= needed:
      break
  if not count:
    raise ConfigError(f'--text_glob: the files matching {text_glob!r} hold no text; give files with content')
  return np.concatenate(parts)


def parse_list(flag: str, text: str, kind):
  try:
    values = [kind(item) for item in text.split(',') if item.strip()]
  except ValueError:
    values = []
  if not values:
    raise ConfigError(f'--{flag}: {text!r} is not a comma-separated list of {kind.__name__} values')
  return values


def check_arguments(contexts: list[int], depths: list[float], trials: int, batch_size: int):
  if any(context < 1 for context in contexts):
    raise ConfigError(f'--context: lengths must be positive, got {contexts}')
  if any(not 0 <= depth <= 1 for depth in depths):
    raise ConfigError(f'--depths: depths are fractions in [0, 1], got {depths}')
  if trials < 1:
    raise ConfigError(f'--trials: give at least 1, got {trials}')
  if batch_size < 1:
    raise ConfigError(f'--batch_size: give at least 1, got {batch_size}')


def tables(report: dict) -> str:
  """The accuracy table (rows: run and context, columns: depth) and, per context, the per-layer attention table."""
  depths = report['depths']
  lines = [f'{"run":<40} {"context":>7} ' + ' '.join(f'{d:>6.2f}' for d in depths) + '    mean']
  for run in report['runs']:
    for result in run['results']:
      lines.append(f'{run["label"][:40]:<40} {result["context"]:>7} ' +
                   ' '.join(f'{a:>6.2f}' for a in result['accuracy']) + f'  {result["mean_accuracy"]:>6.2f}')
  for i, context in enumerate(report['contexts']):
    measured = [(run['label'], run['results'][i]['attention']) for run in report['runs']
                if run['results'][i]['attention']]
    if not measured:
      continue
    lines += ['', f'attention of the answer position, context {context}: answer span / noise context, per layer']
    width = max(23, *(len(label) for label, _ in measured))
    lines.append(f'{"layer":>5}  ' + '  '.join(f'{label:>{width}}' for label, _ in measured))
    for layer in range(max(len(a['answer']) for _, a in measured)):
      lines.append(f'{layer:>5}  ' + '  '.join(
          f'{a["answer"][layer]:>{width - 12}.3f} {a["noise"][layer]:>11.3f}' if layer < len(a['answer'])
          else ' ' * width for _, a in measured))
  return '\n'.join(lines)


def plot(report: dict, path: str):
  """Accuracy heatmaps, one per context length: runs down, depths across."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  contexts, depths, runs = report['contexts'], report['depths'], report['runs']
  fig, axes = plt.subplots(1, len(contexts), figsize=(1.2 * len(depths) + 4, 0.6 * len(runs) + 2.2), squeeze=False)
  for i, (ax, context) in enumerate(zip(axes[0], contexts)):
    accuracy_RxD = np.array([run['results'][i]['accuracy'] for run in runs])
    image = ax.imshow(accuracy_RxD, cmap='RdYlGn', vmin=0.0, vmax=1.0, aspect='auto')
    for (r, d), value in np.ndenumerate(accuracy_RxD):
      ax.text(d, r, f'{value:.2f}', ha='center', va='center', fontsize=8)
    ax.set_xticks(range(len(depths)), [f'{d:g}' for d in depths])
    ax.set_yticks(range(len(runs)), [run['label'] for run in runs] if i == 0 else [])
    ax.set(title=f'context {context}', xlabel='needle depth')
  fig.colorbar(image, ax=list(axes[0]), fraction=0.03, label='accuracy')
  fig.suptitle(f'{report["needles"]} needles, {report["queries"]} queried, {report["trials"]} trials')
  fig.savefig(path, dpi=110, bbox_inches='tight')
  plt.close(fig)
