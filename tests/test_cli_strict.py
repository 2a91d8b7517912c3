"""Strict command lines: every command that parses its flags through `cli.parse_flags` refuses a stray positional
argument in one line, where it used to ignore it (`--prompt=def main` sampled from 'def' and dropped 'main')."""

import concurrent.futures
import os
import subprocess
import sys

import pytest

import reliability_helpers as rh

# Each command with flags that would otherwise let it start, so that the stray word is the only mistake.
COMMANDS = {
    'train': ['-m', 'diffjax.train', '--config=configs/tiny.py', '--workdir={workdir}'],
    'prepare': ['-m', 'diffjax.prepare', '--config=configs/tiny.py'],
    'evaluate': ['-m', 'diffjax.evaluate', '--workdir={workdir}'],
    'sample': ['-m', 'diffjax.sample', '--workdir={workdir}', '--prompt=def'],
    'attention_maps': ['-m', 'diffjax.attention_maps', '--workdir={workdir}', '--prompt=def'],
    'needles': ['-m', 'diffjax.needles', '--workdir={workdir}', '--text_glob=*.txt'],
    'aot_compile': ['launch/aot_compile.py', '--config=configs/tiny.py', '--topology=v5p-8'],
}
# (where the stray word goes, the word)
STRAY = {'train': (-1, 'extra'), 'prepare': (-1, 'extra'), 'evaluate': (-1, '--'), 'sample': (-1, 'main'),
         'attention_maps': (2, 'extra'), 'needles': (-1, 'extra'), 'aot_compile': (-1, 'extra')}


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  folder = tmp_path_factory.mktemp('strict')

  def run(name):
    args = [arg.format(workdir=folder / name) for arg in COMMANDS[name]]
    where, word = STRAY[name]
    args.insert(where if where >= 0 else len(args), word)
    if word == '--':  # absl takes what follows `--` as positional arguments too
      args.append('--batches=1')
    return subprocess.run([sys.executable, *args], cwd=rh.REPO, env=rh.env(str(folder / f'cache_{name}')),
                          capture_output=True, text=True, timeout=240)

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return dict(zip(COMMANDS, pool.map(run, COMMANDS))), folder


@pytest.mark.slow
@pytest.mark.parametrize('name', COMMANDS)
def test_a_stray_argument_is_refused_in_one_line(name, results):
  result, folder = results[0][name], results[1]
  word = STRAY[name][1] if STRAY[name][1] != '--' else '--batches=1'
  assert result.returncode == 1, (result.stdout, result.stderr)
  assert rh.nonempty_lines(result.stderr) == [
      f'error: {word}: unexpected argument; this command takes --name=value flags only (quote a value that holds '
      "spaces, e.g. --prompt='def main'); see --helpfull for the flags"], result.stderr
  assert not os.path.exists(folder / name)  # nothing was started
