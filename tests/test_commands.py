"""The `diffjax` command: its help, each command's help (exit 0, what it does, its flags), and bad commands."""

import subprocess
import sys

import pytest

from diffjax import commands
from helpers_training import REPO, cli_env


def diffjax(*arguments) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'diffjax.commands', *arguments], cwd=REPO, env=cli_env(),
                        capture_output=True, text=True, timeout=300)


def test_help_lists_every_command():
  result = diffjax('--help')
  assert result.returncode == 0, result.stderr
  for name in commands.COMMANDS:
    assert f'  {name} ' in result.stdout and commands.summary(name) in result.stdout


# command -> a flag its help must show
FLAGS = {'train': '--workdir', 'prepare': '--config', 'sample': '--temperature', 'evaluate': '--text_glob',
         'needles': '--out', 'outliers': '--windows', 'attention-maps': '--layer', 'export': '--out',
         'import': '--hf_dir', 'compare': '--arms'}


@pytest.mark.parametrize('command', sorted(commands.COMMANDS))
def test_each_command_explains_itself_and_exits_0(command):
  result = diffjax(command, '--help')
  assert result.returncode == 0, result.stderr[-2000:]
  assert FLAGS[command] in result.stdout
  assert commands.summary(command).split(',')[0] in ' '.join(result.stdout.split())


def test_train_help_lists_the_config_keys_with_their_defaults():
  result = diffjax('train', '--help')
  assert result.returncode == 0
  lines = result.stdout.splitlines()
  assert any(line.split() == ['train.decay_steps', '0'] for line in lines)
  assert any(line.split() == ['model.variant', "'diff_v1'"] for line in lines)


def test_an_unknown_command_is_one_line():
  result = diffjax('trian')
  assert result.returncode == 1 and result.stdout == ''
  assert result.stderr.strip().splitlines() == [
      f'error: trian: unknown command; use one of {", ".join(commands.COMMANDS)} (diffjax --help)']
