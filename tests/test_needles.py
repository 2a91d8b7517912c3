"""Multi-needle retrieval: prompts hold their needles where asked, the scorer and the attention masses are exact,
and the command runs end to end on a trained run; the Colab notebook runs on that run too."""

import json
import re

import matplotlib
import numpy as np
import pytest

import helpers_training as ht
import reliability_helpers as rh
from diffjax.data import tokenizers
from diffjax.errors import ConfigError
from diffjax.infer import generate
from diffjax.infer import needles
from diffjax.train import loop as trainer

NOTEBOOK = ht.REPO / 'notebooks' / 'quickstart.ipynb'
TOKENIZER = tokenizers.ByteTokenizer()
FILLER_IDS = np.asarray(TOKENIZER.encode(ht.english_like_text(2_000, seed=0)))


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, overrides) of a DIFF V1 run trained 10 steps, its max_len long enough for a few needles."""
  root = tmp_path_factory.mktemp('needles')
  overrides = ht.run_overrides(ht.write_corpus(root / 'corpus', num_docs=3, chars_per_doc=8_000), root / 'data',
                               train__steps=10, checkpoint__every_steps=10, checkpoint__async_save=False,
                               log__eval_every_steps=10, log__sample_tokens=0, model__max_len=320)
  workdir = root / 'run'
  workdir.mkdir()
  trainer.Run(ht.load_config(overrides), str(workdir)).train()
  return workdir, overrides


@pytest.mark.parametrize('depth', [0.0, 0.3, 1.0])
def test_needles_sit_at_their_depth_in_a_context_of_the_exact_length(depth):
  rng = np.random.default_rng(0)
  pairs = needles.draw_needles(rng, 3)
  prompts = needles.trial_prompts(TOKENIZER, FILLER_IDS, 400, [depth], pairs, queries=3, rng=rng)
  assert len(prompts) == 3
  lengths = [sum(len(TOKENIZER.encode(part)) for part in needles.needle_parts(*pair)) for pair in pairs]
  longest_question = max(len(TOKENIZER.encode(needles.question(key))) for key, _ in pairs)
  filler_len = 400 - 1 - sum(lengths) - longest_question
  start = 1 + round(depth * filler_len)  # after EOS and the filler before the depth
  for q, prompt in enumerate(prompts):
    assert len(prompt.tokens) == 400 and prompt.tokens[0] == TOKENIZER.eos_id and prompt.value == pairs[q][1]
    text = TOKENIZER.decode(prompt.tokens)
    assert text.endswith(needles.question(pairs[q][0]))
    # The queried needles follow one another from the depth's offset, in order.
    needle_start = start + sum(lengths[:q])
    before = TOKENIZER.encode(needles.needle_parts(*pairs[q])[0])
    assert prompt.tokens[needle_start:needle_start + len(before)] == before
    assert prompt.span == (needle_start + len(before), needle_start + len(before) + len(pairs[q][1]))
    assert TOKENIZER.decode(prompt.tokens[slice(*prompt.span)]) == pairs[q][1]


def test_distractors_stay_put_across_depths_and_every_needle_is_there_once():
  rng = np.random.default_rng(1)
  pairs = needles.draw_needles(rng, 6)
  prompts = needles.trial_prompts(TOKENIZER, FILLER_IDS, 600, [0.0, 0.5, 1.0], pairs, queries=2, rng=rng)
  assert [p.depth for p in prompts] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0] and {len(p.tokens) for p in prompts} == {600}
  for prompt in prompts:
    text = TOKENIZER.decode(prompt.tokens)
    assert all(text.count(''.join(needles.needle_parts(*pair))) == 1 for pair in pairs)
  # With the queried needles taken out, the prompts of every depth are one text: same filler, same distractors.
  queried = '|'.join(re.escape(''.join(needles.needle_parts(*pair))) for pair in pairs[:2])
  assert len({re.sub(queried, '', TOKENIZER.decode(p.tokens)) for p in prompts[::2]}) == 1


def fake_generation(right: bool):
  """A stand-in for generation that answers each prompt with the value of its question's needle, or a wrong one."""
  def fake(cfg, params, prompts, num_tokens, **kwargs):
    answers = []
    for prompt in prompts:
      text = TOKENIZER.decode(prompt)
      key = re.findall(r'What is the magic number of (\w+)\?', text)[-1]
      value = re.search(rf'The magic number of {key} is (\d+)\.', text)[1]
      answers.append(TOKENIZER.encode(f' {value if right else "0" + value[1:]}.\n'))
    return generate.Generation(answers, 0.0, 0.0, 0)
  return fake


@pytest.mark.parametrize('right', [True, False])
def test_the_scorer_counts_exact_answers(monkeypatch, right):
  monkeypatch.setattr(generate, 'generate', fake_generation(right))
  prompts = needles.build_prompts(TOKENIZER, FILLER_IDS, 500, [0.0, 1.0], 4, 2, trials=3, seed=0)
  assert len(prompts) == 3 * 2 * 2
  assert needles.retrieval(None, None, TOKENIZER, prompts, batch_size=5) == [right] * len(prompts)


def test_exact_match_needs_the_whole_number():
  assert needles.is_right(' 1234567.', '1234567') and needles.is_right('1234567', '1234567')
  assert not needles.is_right(' 12345678', '1234567') and not needles.is_right(' 123456', '1234567')
  assert not needles.is_right('x 1234567', '1234567')


def test_answer_and_noise_masses_are_sums_of_the_map_entries():
  # Two prompts, two heads, five positions; the second map is differential, with negative entries.
  rows_BxHxT = np.array([[[0.1, 0.2, 0.3, 0.4, 0.0], [0.5, 0.0, 0.0, 0.5, 0.0]],
                         [[0.2, -0.1, 0.5, 0.1, 0.0], [0.0, 0.4, -0.2, 0.3, 0.2]]])
  answer_B, noise_B = needles.span_masses(rows_BxHxT, [(1, 3), (2, 4)])
  np.testing.assert_allclose(answer_B, [(0.5 + 0.0) / 2, (0.6 + 0.1) / 2])
  np.testing.assert_allclose(noise_B, [(0.5 + 1.0) / 2, (0.1 + 0.6) / 2])


@pytest.mark.parametrize('call, message', [
    (lambda: needles.build_prompts(TOKENIZER, FILLER_IDS, 500, [0.5], 2, 3, 1, 0), '^--queries: give 1 to'),
    (lambda: needles.build_prompts(TOKENIZER, FILLER_IDS, 60, [0.5], 2, 1, 1, 0), '^--context: 60 tokens cannot'),
    (lambda: needles.draw_needles(np.random.default_rng(0), 100), '^--needles: give 1 to'),
    (lambda: needles.parse_list('depths', '0,half', float), '^--depths: .* is not a comma-separated list'),
    (lambda: needles.check_arguments([100], [1.5], 1, 1), r'^--depths: depths are fractions in \[0, 1\]'),
    (lambda: needles.filler_tokens(TOKENIZER, '/no/such/folder', 100), "^--text_glob: '/no/such/folder' does not"),
])
def test_bad_arguments_are_one_line_errors(call, message):
  with pytest.raises(ConfigError, match=message) as error:
    call()
  assert '\n' not in str(error.value)


def cli(*args):
  return rh.run_command('needles', *args)


@pytest.mark.slow
def test_the_command_writes_accuracy_and_attention_and_refuses_contexts_past_max_len(run, tmp_path):
  workdir, overrides = run
  text_glob = overrides['data.text_glob']
  result, _ = cli(f'--workdir={workdir}', f'--text_glob={text_glob}', '--context=250,300', '--depths=0,0.5,1',
                  '--needles=2', '--queries=1', '--trials=2', f'--out={tmp_path}', '--batch_size=6')
  assert result.returncode == 0, result.stderr
  report = json.loads((tmp_path / 'needles.json').read_text())
  assert (tmp_path / 'needles.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert report['contexts'] == [250, 300] and report['depths'] == [0, 0.5, 1]
  [entry] = report['runs']
  assert entry['variant'] == 'diff_v1' and entry['step'] == 10
  for result_at in entry['results']:
    assert all(0 <= a <= 1 for a in result_at['accuracy'])
    attention = result_at['attention']
    assert attention['map'] == 'A1 - lambda*A2' and len(attention['answer']) == len(attention['noise']) == 2
    assert all(0 < a < 1 and 0 < n < 1 for a, n in zip(attention['answer'], attention['noise']))
  assert 'answer span / noise context, per layer' in result.stdout
  result, lines = cli(f'--workdir={workdir}', f'--text_glob={text_glob}', '--context=320', f'--out={tmp_path}')
  assert result.returncode == 1 and lines == [
      "error: --context: 320 tokens and 9 answer tokens exceed the model's max_len of 320; give at most 311"]


@pytest.mark.slow
def test_an_unwritable_out_or_a_negative_seed_is_one_line_before_any_run_is_opened(tmp_path):
  (tmp_path / 'a_file').write_text('not a folder')
  missing_run = f'--workdir={tmp_path / "no_run"}'  # opened only after the arguments are checked
  result, lines = cli(missing_run, f'--text_glob={tmp_path}', f'--out={tmp_path / "a_file" / "out"}')
  assert result.returncode == 1 and lines == [
      f'error: --out: cannot write {tmp_path / "a_file" / "out"} (Not a directory); give a folder you can write to '
      'with --out=DIR'], result.stderr
  result, lines = cli(missing_run, f'--text_glob={tmp_path}', f'--out={tmp_path / "out"}', '--seed=-1')
  assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: flag --seed=-1: '), result.stderr


@pytest.mark.slow
def test_a_file_in_the_way_of_the_report_is_one_line(run, tmp_path):
  workdir, overrides = run
  (tmp_path / 'needles.png').mkdir()
  result, lines = cli(f'--workdir={workdir}', f'--text_glob={overrides["data.text_glob"]}', '--context=250',
                      '--depths=0', '--needles=1', '--queries=1', '--trials=1', f'--out={tmp_path}')
  assert result.returncode == 1 and lines == [
      f'error: --out: cannot write {tmp_path / "needles.png"} (Is a directory); give a folder you can write to '
      'with --out=DIR'], result.stderr


def notebook_cells() -> list[dict]:
  notebook = json.loads(NOTEBOOK.read_text())
  assert notebook['nbformat'] == 4 and notebook['cells']
  for cell in notebook['cells']:
    assert cell['cell_type'] in ('markdown', 'code') and isinstance(cell['source'], list)
    if cell['cell_type'] == 'code':
      assert cell['outputs'] == [] and cell['execution_count'] is None  # stored without outputs
  return notebook['cells']


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_on_a_trained_run(run, monkeypatch):
  workdir, overrides = run
  monkeypatch.chdir(ht.REPO)
  matplotlib.use('Agg')
  namespace = {}
  code = [''.join(cell['source']) for cell in notebook_cells() if cell['cell_type'] == 'code']
  assert code[0].startswith('# colab-only') and re.search(r'pip install .*-e \.$', code[0], re.M)
  for source in code[1:]:
    assert not source.startswith('# colab-only')
    exec(compile(source, str(NOTEBOOK), 'exec'), namespace)
    if source.startswith('# Settings'):  # point the notebook at the trained run: its training cell only resumes it
      namespace.update(WORKDIR=str(workdir), STEPS=10, OVERRIDES=overrides)
  assert namespace['step'] == 10 and len(namespace['out'].tokens) == 2
  assert set(namespace['maps']) == {'a1', 'a2', 'diff', 'lambda'}
