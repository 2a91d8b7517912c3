"""Activation outliers and low-bit quantization of trained runs: `python -m diffjax.outliers --workdir=DIFF_RUN
--workdir=BASELINE_RUN --windows=64 --out=FOLDER`.

Two of the paper's claims, measured on the same windows for every run: the first --windows rows of seq_len tokens
of the run's validation split (the rows `evaluate` scores), or of --text_glob's files cut as `evaluate` cuts them.

Outliers: per layer and over all layers, the largest |value| and the kurtosis (Pearson's: 3 for a Gaussian) of the
attention logits, the scaled scores q·k/√d before the softmax that each query (sub-)head gives the keys it sees,
and of the residual stream each block hands on. The paper reports a top attention logit of 38.8 for DIFF against
318.0 for the Transformer.

Quantization: the loss (nats per scored token) unquantized, after quantizing the weights of every projection
(symmetric round-to-nearest, one scale per output channel; embeddings, norms and λ stay float32) to each of --bits,
and after quantizing every layer's attention logits (symmetric round-to-nearest, one scale per sequence and head)
to each of --bits with the weights left alone. Every loss comes from the einsum attention path.

Writes FOLDER/outliers.json (everything, per layer) and FOLDER/outliers.png (per layer: max |logit|, logit
kurtosis and max |hidden state| of each run; each run's loss against the bits) and prints the tables.
"""

from absl import app, flags

from diffjax import cli
from diffjax.errors import ConfigError
from diffjax.infer import load, outliers, score

WORKDIR = flags.DEFINE_multi_string('workdir', None, 'A training run\'s workdir; repeat to compare runs.')
WINDOWS = flags.DEFINE_integer('windows', 16, 'Rows of the run\'s seq_len tokens to measure on.', lower_bound=1)
BITS = flags.DEFINE_list('bits', ['8', '6', '4'], 'Bit widths to quantize to, comma-separated (2 to 16).')
TEXT_GLOB = flags.DEFINE_string('text_glob', None, 'A folder, file or glob of .txt / .txt.gz files to measure on; '
                                'unset: the run\'s validation split.')
BATCH_SIZE = flags.DEFINE_integer('batch_size', 4, 'Rows per forward pass.', lower_bound=1)
OUT = flags.DEFINE_string('out', None, 'Folder for outliers.json and outliers.png.')


def parse_bits(values: list[str]) -> list[int]:
  try:
    bits = [int(value) for value in values]
  except ValueError:
    bits = []
  if not bits or any(not 2 <= b <= 16 for b in bits):
    raise ConfigError(f'--bits: {",".join(values)!r} is not a comma-separated list of bit widths from 2 to 16')
  return bits


def windows(workdir: str, config, tokenizer, count: int, batch_size: int) -> list[dict]:
  """The batches of the first `count` rows (the rest of the last batch masked out) of the text or validation."""
  texts = None if TEXT_GLOB.value is None else score.read_texts(TEXT_GLOB.value)
  batches = score.batches(config, workdir, tokenizer, texts, min(batch_size, count), count)
  return outliers.first_windows(list(batches), count)


@cli.report_errors
def main(argv):
  del argv
  workdirs = cli.required(WORKDIR, 'the workdir of a training run (repeat it to compare runs)')
  cli.required(OUT, 'a folder for outliers.json and outliers.png')
  bits = parse_bits(BITS.value)
  out = cli.output_folder(OUT.value, '--out')
  report = {'data': TEXT_GLOB.value or 'validation', 'windows': WINDOWS.value, 'bits': bits, 'seq_len': None,
            'kurtosis': 'Pearson: E[(x - mean)^4] / var^2, 3 for a Gaussian',
            'weight_quantization': 'symmetric round-to-nearest, one scale per output channel of every projection '
                                   'kernel; embeddings, norm scales and lambda vectors unquantized',
            'logit_quantization': 'symmetric round-to-nearest, one scale per sequence and query (sub-)head from the '
                                  'largest logit its queries see',
            'runs': []}

  def measure(workdir, cfg, params, tokenizer):
    config = load.run_config(workdir)
    seq_len = config.train.seq_len
    report['seq_len'] = report['seq_len'] or seq_len
    if seq_len != report['seq_len']:
      raise ConfigError(f'--workdir: {workdir} trained on {seq_len}-token rows, the runs before it on '
                        f'{report["seq_len"]}; compare runs of one train.seq_len')
    batches = windows(workdir, config, tokenizer, WINDOWS.value, BATCH_SIZE.value)
    return {'scored_tokens': int(sum(batch['mask'].sum() for batch in batches)),
            **outliers.activation_outliers(cfg, params, batches),
            'loss': outliers.quantization_losses(cfg, params, batches, bits)}

  cli.compare_runs(workdirs, out, 'outliers', report, measure, outliers.plot, outliers.tables)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
