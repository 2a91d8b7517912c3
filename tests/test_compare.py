"""launch/compare.py: arms are paired (identical batches, identical shared initial weights), the gap and its
confidence interval are computed and worded right, and a comparison resumes across invocations."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from diffjax.data import pipeline as data
from diffjax.errors import ConfigError
from diffjax.model import transformer as model_lib
from diffjax.run import checkpoint as checkpoint_lib
from diffjax.run import defaults
from diffjax.train import step as train_step
from helpers_training import REPO, TINY_CONFIG, cli_env, run_overrides, write_corpus

sys.path.insert(0, str(REPO / 'launch'))
import compare  # noqa: E402

ARMS = 'baseline,diff_v1,diff_v1_nonorm=diff_v1:model.diff_head_norm=False,diff_v2'


def _configure(root, overrides: dict, *flags):
  args = compare.parse_args([f'--config={TINY_CONFIG}', f'--root={root}', *(f'--config.{k}={v}' for k, v in
                                                                             overrides.items()), *flags])
  return args, *compare.configure(args)


# --- Arms. -----------------------------------------------------------------------------------------------------


def test_an_arm_is_a_variant_and_overrides():
  assert compare.parse_arm('diff_v1_nonorm=diff_v1:model.diff_head_norm=False:train.learning_rate=1e-3') == \
      compare.Arm('diff_v1_nonorm', 'diff_v1', ('model.diff_head_norm=False', 'train.learning_rate=1e-3'))
  assert compare.parse_arm('baseline') == compare.Arm('baseline', 'baseline', ())


@pytest.mark.parametrize('spec,match', [
    ('x=diff_v3', "unknown variant 'diff_v3'"),
    ('x=diff_v1:data.source=stdlib', 'may not set data.source'),  # another corpus: other batches
    ('x=diff_v1:seed=3', 'may not set seed'),
    ('x=diff_v1:train.global_batch_size=4', 'may not set train.global_batch_size'),
    ('x=diff_v1:model.variant=baseline', 'may not set model.variant'),
    ('x=diff_v1:model.diff_head_norm', 'is not KEY=VALUE'),
    ('x/y=diff_v1', 'arm name'),
])
def test_an_arm_that_would_break_the_pairing_is_refused_in_one_line(spec, match):
  with pytest.raises(ConfigError, match=match) as error:
    compare.parse_arm(spec)
  assert str(error.value).startswith('--arms: ') and '\n' not in str(error.value)


def test_each_run_trains_its_arm_with_everything_else_equal(tmp_path):
  _, arms, reference, seeds, runs = _configure(tmp_path, {'train.steps': 7}, f'--arms={ARMS}', '--seeds=0,5')
  assert [arm.name for arm in arms] == ['baseline', 'diff_v1', 'diff_v1_nonorm', 'diff_v2']
  assert reference.name == 'baseline' and seeds == [0, 5] and len(runs) == 8
  for run in runs:
    config = run.config
    assert (config.model.variant, config.seed, config.train.steps) == (run.arm.variant, run.seed, 7)
    assert config.model.diff_head_norm == (run.arm.name != 'diff_v1_nonorm')
    init_dir = os.path.join(os.path.abspath(tmp_path), 'init', f'{run.arm.name}_seed{run.seed}')
    assert config.checkpoint.init_from == run.init_dir == init_dir
  flat = lambda run: {k: v for k, v in defaults.flatten(run.config.to_dict()).items()
                      if k not in ('model.variant', 'model.diff_head_norm', 'checkpoint.init_from', 'seed')}
  assert all(flat(run) == flat(runs[0]) for run in runs)


@pytest.mark.parametrize('flags,match', [
    (['--arms=baseline,baseline'], 'distinct arm names'),
    (['--reference=diff_v2'], 'not one of the arms'),
    (['--seeds=0,zero'], 'comma-separated integers'),
    (['--config.seed=3'], r'^--config\.seed=3: set by each arm'),
    (['--config.model.nope=1'], r'^model\.nope=1: unknown config key'),
    (['--config.model.d_model=wide'], r'^flag --config\.model\.d_model=wide: invalid literal'),
    (['--config=configs/none.py'], r'^--config: configs/none\.py is not a file'),
    (['--arms=x=diff_v1:model.lambda_init=1.5:model.lambda_init_drop=0'], r'arm x: model\.lambda_init: '),
])
def test_a_bad_command_is_refused_in_one_line(tmp_path, flags, match):
  with pytest.raises(ConfigError, match=match) as error:
    _configure(tmp_path, {}, *flags)
  assert '\n' not in str(error.value)


def test_an_analysis_the_data_cannot_have_is_refused_before_training(tmp_path):
  with pytest.raises(ConfigError, match='--analyses: noise is not one of outliers, needles'):
    _configure(tmp_path / 'runs', {}, '--analyses=outliers,noise')
  with pytest.raises(ConfigError, match='needles builds its contexts from local text files'):
    _configure(tmp_path / 'runs', {'data.source': 'tfds'}, '--analyses=needles')


def test_needles_ask_for_a_short_context_and_the_longest():
  config = ml_collections.ConfigDict({'data': {'source': 'local', 'text_glob': 'books'}, 'model': {'max_len': 2048}})
  assert '--context=512,2032' in compare._needles_flags(config)
  config.model.max_len = 128  # shorter than the short context: the longest alone
  assert '--context=112' in compare._needles_flags(config)


def test_overrides_are_written_as_in_every_other_command(tmp_path, capsys):
  args = compare.parse_args(['--config.train.steps=8', '--seeds=0', '--config.data.tokenizer=byte'])
  assert args.overrides == ['train.steps=8', 'data.tokenizer=byte'] and args.seeds == '0'
  for stray in ('--set=train.steps=8', '--config.train.steps', 'extra'):
    with pytest.raises(SystemExit):
      compare.parse_args([stray])
    assert 'config overrides are written --config.KEY=VALUE' in capsys.readouterr().err.strip().splitlines()[-1]


# --- Pairing. --------------------------------------------------------------------------------------------------


def test_arms_of_a_seed_read_identical_batches(tmp_path):
  overrides = run_overrides(write_corpus(tmp_path / 'corpus'), tmp_path / 'data')
  _, _, _, _, runs = _configure(tmp_path / 'runs', overrides, f'--arms={ARMS}', '--seeds=0,1')

  def batches(run):
    config = run.config
    pipeline = data.build_input(config.data, seq_len=config.train.seq_len, batch_size=config.train.global_batch_size,
                                seed=config.seed, workdir=None)
    iterator = pipeline.train_iterator()
    try:
      return [next(iterator)['inputs'] for _ in range(3)]
    finally:
      iterator.close()

  first = batches(runs[0])
  for run in runs[1:4] + runs[:1]:  # every arm of seed 0, and the first again: the pipeline is deterministic
    assert run.seed == 0
    for got, expected in zip(batches(run), first):
      np.testing.assert_array_equal(got, expected)
  assert runs[4].seed == 1 and not np.array_equal(batches(runs[4])[0], first[0])  # the seed does matter


_new_params = jax.jit(train_step.new_params, static_argnums=0)  # the trainer's own draw, as it runs it: jitted


def _load_init(run):
  """The parameters a run starts from, read by the trainer's own `checkpoint.init_from` loader."""
  cfg = defaults.model_config(run.config, data.tokenizer_vocab_size(run.config.data))
  abstract = nn.meta.unbox(model_lib.abstract_params(cfg)['params'])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = checkpoint_lib.load_params(run.init_dir, abstract, jax.tree.map(lambda _: device, abstract))
  fresh = _new_params(cfg, jax.random.key(run.seed))
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  return flat(params), flat(fresh)


@pytest.mark.slow
def test_shared_parameters_start_identical_across_arms(tmp_path):
  # diff_v1_embed changes how a shared parameter is drawn: it keeps its own embedding, and shares all the rest.
  arms = f'{ARMS},diff_v1_embed=diff_v1:model.embed_init_std=0.3'
  _, _, reference, _, runs = _configure(tmp_path, run_overrides(tmp_path / 'corpus', tmp_path / 'data'),
                                        f'--arms={arms}', '--seeds=0,1')
  compare.write_initial_weights(runs, runs, reference)
  starts = {(run.arm.name, run.seed): _load_init(run) for run in runs}
  for seed in (0, 1):
    ours, fresh = starts['baseline', seed]
    for path in fresh:  # the reference arm starts from the trainer's own draw for the seed
      np.testing.assert_array_equal(ours[path], fresh[path], err_msg=path)
    for arm in ('diff_v1', 'diff_v1_nonorm', 'diff_v2', 'diff_v1_embed'):
      params, own = starts[arm, seed]
      shared = {path for path in params if path in ours and ours[path].shape == params[path].shape}
      assert len(shared) > 10 and len(params) > len(shared)  # λ vectors, subln, DIFF V2's wider q_proj ...
      for path in params:
        alike = path in shared and not (arm == 'diff_v1_embed' and path == "['embed']['embedding']")
        np.testing.assert_array_equal(params[path], ours[path] if alike else own[path], err_msg=f'{arm} {path}')
    assert not np.allclose(starts['diff_v1_embed', seed][0]["['embed']['embedding']"], ours["['embed']['embedding']"])
  assert not np.array_equal(starts['diff_v1', 0][0]["['lm_head']['kernel']"],
                            starts['diff_v1', 1][0]["['lm_head']['kernel']"])


def test_shared_leaves_are_taken_from_the_reference():
  rng = np.random.default_rng(0)
  reference = {'a': rng.normal(size=(64, 64)), 'b': np.ones(8), 'c': rng.normal(size=(4,))}
  arm = {'a': rng.normal(size=(64, 64)), 'b': np.ones(8), 'c': rng.normal(size=(5,)), 'd': np.zeros(3),
         'e': {'f': rng.normal(size=(2,))}}
  paired, kept = compare.shared_with(arm, reference)
  assert paired['a'] is reference['a'] and paired['b'] is reference['b'] and kept == []
  assert paired['c'] is arm['c'] and paired['d'] is arm['d']  # another shape; not in the reference
  paired, kept = compare.shared_with({**arm, 'a': 10 * arm['a'], 'b': np.full(8, 2.0)}, reference)
  assert kept == ["['a']", "['b']"] and np.array_equal(paired['a'], 10 * arm['a'])


# --- The gap, its confidence interval and its wording. -----------------------------------------------------------


def test_gap_and_confidence_interval_match_a_hand_computation():
  reference = {0: 1.00, 1: 1.12, 2: 1.10, 3: 1.30}  # seed 3: the arm has not finished it
  arm = {0: 1.10, 1: 1.20, 2: 1.15}
  gap = compare.paired_gap(arm, reference)
  # Gaps 0.10, 0.08, 0.05: mean 0.23/3; deviations 0.07/3, 0.01/3, -0.08/3, so the sample variance is
  # (0.0049 + 0.0001 + 0.0064) / 9 / 2 = 0.00063333; t(0.975, 2 degrees of freedom) = 4.302653 from a t table.
  mean, sd = 0.23 / 3, np.sqrt(0.0114 / 18)
  half = 4.302653 * sd / np.sqrt(3)
  assert gap['seeds'] == [0, 1, 2]
  np.testing.assert_allclose(gap['per_seed'], [0.10, 0.08, 0.05], atol=1e-12)
  np.testing.assert_allclose(gap['mean'], mean, atol=1e-12)
  np.testing.assert_allclose(gap['ci95'], [mean - half, mean + half], rtol=1e-6)
  assert compare.paired_gap({0: 1.0}, {0: 1.2})['ci95'] is None
  assert compare.paired_gap({1: 1.0}, {0: 1.2}) is None


def test_the_verdict_says_worse_or_better_the_right_way_round():
  worse = compare.verdict('diff_v1', 'baseline', compare.paired_gap({0: 1.92, 1: 1.87}, {0: 1.70, 1: 1.67}))
  assert worse.startswith('diff_v1 is worse than baseline by 0.2100 nats/token') and 'excludes 0' in worse
  assert '+0.2200, +0.2000' in worse
  better = compare.verdict('diff_v1', 'baseline', compare.paired_gap({0: 1.70, 1: 1.67, 2: 1.70},
                                                                     {0: 1.72, 1: 1.69, 2: 1.71}))
  assert better.startswith('diff_v1 is better than baseline by 0.0167') and 'excludes 0' in better
  unsettled = compare.verdict('a', 'b', compare.paired_gap({0: 1.0, 1: 1.2}, {0: 1.1, 1: 1.0}))
  assert unsettled.startswith('a is worse than b by 0.0500') and 'includes 0: not settled' in unsettled
  assert 'one seed' in compare.verdict('a', 'b', compare.paired_gap({0: 1.0}, {0: 1.1}))


def test_an_ablation_is_also_read_against_its_plain_variant():
  arms = [compare.parse_arm(spec) for spec in ('baseline', 'diff_v1', 'nonorm=diff_v1:model.diff_head_norm=False',
                                               'wide=baseline:model.d_ff=64', 'v2=diff_v2:model.lambda_init=0.5')]
  reference = arms[0]
  losses = {'baseline': (1.10, 1.12), 'diff_v1': (1.14, 1.13), 'nonorm': (1.11, 1.12), 'wide': (1.09, 1.13),
            'v2': (1.05, 1.06)}
  results = {(name, seed): {'final_eval_loss': loss, 'median_tokens_per_s': None, 'trained_alongside': 1}
             for name, pair in losses.items() for seed, loss in enumerate(pair)}
  summary = compare.report(arms, reference, results)
  # nonorm: against the reference as every arm, and against diff_v1, the model it changes.
  np.testing.assert_allclose(summary['nonorm']['gap']['per_seed'], [0.01, 0.00], atol=1e-12)
  assert summary['nonorm']['plain_arm'] == 'diff_v1'
  np.testing.assert_allclose(summary['nonorm']['gap_to_plain_arm']['per_seed'], [-0.03, -0.01], atol=1e-12)
  # An ablation of the reference's own variant, one whose plain variant is no arm, and the plain arms: no second gap.
  assert all(summary[name]['gap_to_plain_arm'] is None for name in ('baseline', 'diff_v1', 'wide', 'v2'))
  text = compare.table(arms, reference, summary)
  assert 'nonorm is better than diff_v1 by 0.0200' in text and text.count('than diff_v1') == 1


def test_throughput_counts_only_runs_that_had_the_accelerator_alone(tmp_path):
  args, arms, reference, _, runs = _configure(tmp_path / 'runs', {}, '--arms=baseline,diff_v1', '--seeds=0,1')
  by_name = {(run.arm.name, run.seed): run for run in runs}
  for run in runs:
    os.makedirs(run.workdir)
  compare.note_sharing(by_name['baseline', 1], 2)
  compare.note_sharing(by_name['baseline', 1], 1)  # resumed alone: part of it still shared, so it stays out
  compare.note_sharing(by_name['diff_v1', 0], 2)
  compare.note_sharing(by_name['diff_v1', 1], 3)
  assert [compare.trained_alongside(run) for run in runs] == [1, 2, 2, 3]  # baseline 0 was never noted: alone
  results = {key: {'final_eval_loss': 1.0, 'median_tokens_per_s': speed,
                   'trained_alongside': compare.trained_alongside(by_name[key])}
             for key, speed in {('baseline', 0): 900.0, ('baseline', 1): 450.0, ('diff_v1', 0): 400.0,
                                ('diff_v1', 1): 300.0}.items()}
  summary = compare.report(arms, reference, results)
  assert summary['baseline']['median_tokens_per_s'] == 900.0
  assert summary['diff_v1']['median_tokens_per_s'] is None
  row = compare.table(arms, reference, summary).splitlines()[2]
  assert row.startswith('diff_v1') and ' - ' in row and '400' not in row


def test_progress_says_when_a_run_repeats_its_data_past_the_useful_passes(tmp_path):
  *_, runs = _configure(tmp_path / 'runs', {}, '--arms=baseline', '--seeds=0')
  run = runs[0]
  os.makedirs(run.workdir)
  for passes in (data.USEFUL_PASSES, 84.8):
    # A first start of 5 steps, then a resumed one with the figure of its own train.steps, which counts.
    records = [{'step': 1, 'data_ready_s': 1.0, 'train_passes': 1.0}, {'step': 5, 'loss': 3.0},
               {'step': 6, 'data_ready_s': 1.0, 'train_passes': passes}, {'step': 10, 'loss': 2.5}]
    with open(os.path.join(run.workdir, 'metrics.jsonl'), 'w') as f:
      f.writelines(json.dumps(record) + '\n' for record in records)
    line = compare.progress_line('[1/1]', run, started=0.0)
    assert line.startswith('[1/1] baseline seed 0: step 10/'), line
    warned = f'{passes:.1f} passes over its training split, past the 4 where repeated text trains about as well as new'
    assert (warned in line) == (passes > data.USEFUL_PASSES), line


# --- The command, end to end. ------------------------------------------------------------------------------------


def _run_compare(tmp_path, overrides, *flags):
  command = [sys.executable, str(REPO / 'launch' / 'compare.py'), f'--config={TINY_CONFIG}',
             f'--root={tmp_path / "runs"}', '--arms=baseline,diff_v1_nonorm=diff_v1:model.diff_head_norm=False',
             '--seeds=0,1', '--progress_every=0', *(f'--config.{k}={v}' for k, v in overrides.items()), *flags]
  return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                        env=cli_env(tmp_path / 'compile_cache'))


@pytest.mark.slow
def test_a_comparison_resumes_over_invocations_and_reports_every_run(tmp_path):
  overrides = run_overrides(write_corpus(tmp_path / 'corpus'), tmp_path / 'data', train__steps=12,
                            checkpoint__every_steps=4, log__eval_every_steps=6)
  runs = tmp_path / 'runs'
  first = _run_compare(tmp_path, overrides, '--max_runs=2')
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert '2 arms x 2 seeds = 4 runs' in first.stdout and '[1/4] baseline seed 0' in first.stdout
  assert '[2/4] diff_v1_nonorm seed 0' in first.stdout and '[3/4]' not in first.stdout
  assert '2 of 4 runs finished; rerun the same command to continue' in first.stdout
  assert 'diff_v1_nonorm is ' in first.stdout  # seed 0 is paired already
  assert 'step ' in first.stdout  # the runs' own progress
  assert not (runs / 'baseline_seed1').exists()
  reported = _run_compare(tmp_path, overrides, '--report_only')
  assert reported.returncode == 0, reported.stdout[-3000:] + reported.stderr[-3000:]
  assert '2 finished, 2 to train' in reported.stdout and '[3/4]' not in reported.stdout
  assert ('2 of 4 runs finished (--report_only); rerun the same command without --report_only to continue'
          in reported.stdout)
  assert not (runs / 'baseline_seed1').exists()
  # diff_v1_nonorm seed 0 loses its last checkpoint and the records after step 8, as if killed after step 8: the next
  # invocation continues it. baseline seed 0 loses all its checkpoints: its logged result still makes it finished.
  shutil.rmtree(runs / 'diff_v1_nonorm_seed0' / 'checkpoints' / '12')
  killed = runs / 'diff_v1_nonorm_seed0' / 'metrics.jsonl'
  killed.write_text(''.join(line for line in killed.read_text().splitlines(keepends=True)
                            if json.loads(line)['step'] <= 8))
  shutil.rmtree(runs / 'baseline_seed0' / 'checkpoints')
  finished_log = (runs / 'baseline_seed0' / 'train.log').read_text()
  assert f'parameters from {runs / "init" / "baseline_seed0"}' in finished_log

  changed = _run_compare(tmp_path, {**overrides, 'train.steps': 16}, '--max_runs=2')
  assert changed.returncode == 1 and changed.stdout == ''
  assert changed.stderr.strip().splitlines() == [
      f'error: --root: {runs} holds baseline_seed0 with train.steps=12, and this command asks for 16; runs of both '
      'would not compare. Rerun the original command, or use another --root']

  second = _run_compare(tmp_path, overrides, '--analyses=outliers')
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  # Seed 1's pair trained now, checkpoints and all, so it is analysed; seed 0's baseline lost its checkpoints.
  assert 'outliers of seed 0 waits: baseline seed 0 not finished, or its checkpoints are gone' in second.stdout
  analysed = json.loads((runs / 'analyses' / 'seed1' / 'outliers' / 'outliers.json').read_text())
  assert [os.path.basename(r['workdir']) for r in analysed['runs']] == ['baseline_seed1', 'diff_v1_nonorm_seed1']
  assert all(r['step'] == 12 for r in analysed['runs'])
  assert not (runs / 'analyses' / 'seed0').exists()
  assert '2 finished' not in second.stdout and '1 finished, 3 to train' in second.stdout
  assert (runs / 'baseline_seed0' / 'train.log').read_text() == finished_log  # not trained again
  assert 'resumed from step 8' in (runs / 'diff_v1_nonorm_seed0' / 'train.log').read_text()
  report = json.loads((runs / 'compare.json').read_text())
  assert report['reference'] == 'baseline' and report['seeds'] == [0, 1]
  assert sorted(report['runs']) == ['baseline_seed0', 'baseline_seed1', 'diff_v1_nonorm_seed0', 'diff_v1_nonorm_seed1']
  for run in report['runs'].values():
    assert run['final_step'] == 12 and np.isfinite(run['final_eval_loss'])
  finals = {name: report['runs'][name]['final_eval_loss'] for name in report['runs']}
  gap = report['arms']['diff_v1_nonorm']['gap']
  expected = [finals[f'diff_v1_nonorm_seed{s}'] - finals[f'baseline_seed{s}'] for s in (0, 1)]
  np.testing.assert_allclose(gap['per_seed'], expected, rtol=1e-12)
  assert gap['seeds'] == [0, 1] and gap['ci95'] is not None
  assert compare.verdict('diff_v1_nonorm', 'baseline', gap) in second.stdout
  assert (runs / 'compare.png').stat().st_size > 0
  assert 'rerun the same command' not in second.stdout
