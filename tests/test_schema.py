"""The run config's schema (`diffjax.run.defaults.SCHEMA`) is the one place a key is declared: the base config, the
checks of single values, the run's identity and `diffjax train --help` all follow from it."""

import subprocess
import sys

import ml_collections
import pytest

from diffjax.errors import ConfigError
from diffjax.keys import Key
from diffjax.run import checkpoint, defaults
from diffjax.train import validate
from helpers_training import REPO, cli_env, load_config


def test_every_key_of_the_base_config_is_declared_with_one_line_of_doc():
  base = defaults.flatten(defaults.base_config().to_dict())
  assert set(base) == set(defaults.KEYS)
  for name, key in defaults.KEYS.items():
    assert isinstance(key, Key) and base[name] == key.default, name
    assert key.doc.strip() and '\n' not in key.doc, name


def test_every_default_is_a_value_its_key_allows():
  for name, key in defaults.KEYS.items():
    key.check(name, key.default)


@pytest.mark.parametrize('key,value', [
    ('train.steps', 'ten'),  # a wrong type
    ('train.steps', 2.5),
    ('train.check_memory', 'yes'),
    ('log.eval_batches', 0),  # out of range
    ('train.b1', 1.0),
    ('train.learning_rate', float('nan')),
    ('data.validation_fraction', 1.0),
    ('model.n_layers', -1),
    ('train.decay', 'step'),  # a bad choice
    ('model.rope_pairing', 'neox'),
    ('data.source', 'hdfs'),
])
def test_a_value_its_key_does_not_allow_is_one_line_naming_the_key(key, value, tmp_path):
  with pytest.raises(ConfigError) as error:
    defaults.KEYS[key].check(key, value)
  message = str(error.value)
  assert message.startswith(f'{key}: ') and '\n' not in message and repr(value) in message, message
  # A ConfigDict made from a dict holds any value: the check, not the ConfigDict's own type check, must catch it.
  values = load_config({}).to_dict()
  section, name = key.rsplit('.', 1)
  values[section][name] = value
  config = ml_collections.ConfigDict(values)
  with pytest.raises(ConfigError) as error:
    validate.check_config(config, str(tmp_path))
  assert str(error.value) == message


def test_the_identity_is_the_keys_whose_change_makes_another_run():
  """Each key changed on its own: the checkpoint's same-run check reports it exactly when the schema says that the
  key is part of the run's identity."""
  base = defaults.base_config().to_dict()
  reported = set()
  for name, key in defaults.KEYS.items():
    changed = defaults.base_config().to_dict()
    section, _, leaf = name.rpartition('.')
    target = changed[section] if section else changed
    value = target[leaf]
    target[leaf] = (not value if isinstance(value, bool) else value + 1 if isinstance(value, (int, float)) else
                    f'{value or ""}x')
    if checkpoint.config_differences(base, changed):
      reported.add(name)
  assert reported == defaults.IDENTITY
  assert 'train.seq_len' in reported and 'data.read_threads' not in reported and 'model.remat' not in reported


def test_train_help_lists_every_key_with_its_default_and_doc():
  result = subprocess.run([sys.executable, '-m', 'diffjax.train', '--help'], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  for name, key in defaults.KEYS.items():
    at = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
    assert lines[at].split(maxsplit=1)[1] == repr(key.default), lines[at]
    assert lines[at + 1].strip() == key.doc, lines[at + 1]
