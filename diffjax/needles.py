"""Multi-needle retrieval in long contexts, and where the model's attention goes while it retrieves:
`python -m diffjax.needles --workdir=DIFF_RUN --workdir=BASELINE_RUN --text_glob='books/*.txt' --context=4096
--depths=0,0.25,0.5,0.75,1 --needles=6 --queries=2 --trials=10 --seed=0 --out=FOLDER`.

Each trial draws N needles, key-value facts "The magic number of <city> is <7 digits>." with distinct cities and
numbers from a seeded RNG, and one window of filler tokens from the text files. For each depth d and each of the
Q queried needles, the prompt is exactly --context tokens: EOS, the filler with the Q queried needles inserted
(in order, each on a line of its own) after round(d·F) of its F tokens and the N − Q others at offsets drawn once
per trial, then the question "What is the magic number of <city>? The magic number of <city> is". A trial's filler
and needles are the same at every depth, so depth is all that changes along a row. Filler shorter than a window is
repeated; a question shorter than the longest of its trial is preceded by as much more filler.

Retrieval: the greedy continuation (`generate.generate`, temperature 0) is right when, after leading whitespace, it
starts with the value and no further digit follows. Accuracy is over trials × queries, per run, context and depth.

Attention to the needle (the paper's analysis): at the prompt's last position, the one whose output predicts the
answer's first token, each layer's attention row is split into the mass on the queried needle's value tokens (the
answer span) and the mass on every other position (the noise context), averaged over heads and prompts. For DIFF V1
the row is the differential map A1 − λ·A2 that the layer applies, and both masses are plain sums of its entries,
as in the paper: negative entries subtract from their side, and answer + noise = 1 − λ (1 for the baseline's
softmax). DIFF V2's λ is per token and has no such map, so its runs report retrieval only.

Runs are scored one after another on prompts built with the same seed, so runs sharing a tokenizer see the same
prompts. Writes FOLDER/needles.json and FOLDER/needles.png (accuracy per run and depth, one panel per context).
"""

from absl import app, flags

from diffjax import cli
from diffjax.infer import needles

WORKDIR = flags.DEFINE_multi_string('workdir', None, 'A training run\'s workdir; repeat to compare runs.')
TEXT_GLOB = flags.DEFINE_string('text_glob', None, 'Filler text: a folder, file or glob of .txt / .txt.gz files.')
CONTEXT = flags.DEFINE_string('context', '1024', 'Prompt lengths in tokens, comma-separated.')
DEPTHS = flags.DEFINE_string('depths', '0,0.25,0.5,0.75,1', 'Where the queried needles go, as fractions of the '
                             'filler, comma-separated.')
NEEDLES = flags.DEFINE_integer('needles', 6, 'Needles per context.')
QUERIES = flags.DEFINE_integer('queries', 2, 'Needles asked for per context (one prompt each).')
TRIALS = flags.DEFINE_integer('trials', 10, 'Contexts per depth and context length.')
SEED = flags.DEFINE_integer('seed', 0, 'Seed of the needles and filler windows.', lower_bound=0)
BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Prompts per generation batch.')
OUT = flags.DEFINE_string('out', None, 'Folder for needles.json and needles.png.')


@cli.report_errors
def main(argv):
  del argv
  workdirs = cli.required(WORKDIR, 'the workdir of a training run (repeat it to compare runs)')
  text_glob = cli.required(TEXT_GLOB, '.txt or .txt.gz files to build the contexts from')
  cli.required(OUT, 'a folder for needles.json and needles.png')
  contexts = needles.parse_list('context', CONTEXT.value, int)
  depths = needles.parse_list('depths', DEPTHS.value, float)
  needles.check_arguments(contexts, depths, TRIALS.value, BATCH_SIZE.value)
  out = cli.output_folder(OUT.value, '--out')
  report = {'text_glob': text_glob, 'contexts': contexts, 'depths': depths, 'needles': NEEDLES.value,
            'queries': QUERIES.value, 'trials': TRIALS.value, 'seed': SEED.value, 'runs': []}

  def measure(workdir, cfg, params, tokenizer):
    del workdir
    # Filler for windows that differ between trials: a few times the longest context.
    filler_ids = needles.filler_tokens(tokenizer, text_glob, 4 * max(contexts))
    return {'results': needles.evaluate_run(cfg, params, tokenizer, filler_ids, contexts, depths, NEEDLES.value,
                                            QUERIES.value, TRIALS.value, SEED.value, BATCH_SIZE.value)}

  cli.compare_runs(workdirs, out, 'needles', report, measure, needles.plot, needles.tables)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
