"""`Key`, the declaration of one run-config key: its default, the values it allows and one line of doc, and the check
of a value against it. The model and data layers declare their keys with it and the run config gathers them, so this
module imports nothing of the package but `diffjax.errors`."""

import dataclasses
import math
import operator
from typing import Any

from ml_collections import config_dict

from diffjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: its default, the values it allows, whether it names the run, and one line saying what it does.

  The type is the default's (`kind` where the default is None); an int is a number where a float is declared.
  Numbers are finite and within the bounds given (`at_least`, `above`, `at_most`, `below`); strings are non-empty
  unless `optional`, which also allows None: unset. `identity` is False for keys that say how a run is computed or
  read rather than what it computes or reads: a run resumed with another value of them is the same run.
  """
  default: Any
  doc: str
  choices: tuple = ()
  at_least: float | None = None
  above: float | None = None
  at_most: float | None = None
  below: float | None = None
  optional: bool = False
  identity: bool = True
  kind: type | None = None

  @property
  def type(self) -> type:
    return self.kind or type(self.default)

  def initial(self):
    """The default as a ConfigDict holds it: None becomes a typed placeholder, so `--config.KEY=VALUE` can parse."""
    return config_dict.placeholder(self.type) if self.default is None else self.default

  def check(self, name: str, value) -> None:
    """Raises ConfigError `NAME: what is wrong; what to use` unless `value` is one this key allows."""
    if self.choices:
      if value not in self.choices:
        raise ConfigError(f'{name}: unknown {name.rsplit(".", 1)[-1]} {value!r}; use one of '
                          f'{", ".join(map(str, self.choices))}')
    elif self.optional and value in (None, ''):
      return
    elif not self._allows(value):
      raise ConfigError(f'{name}: must be {self.wanted()}, got {value!r}')

  def _allows(self, value) -> bool:
    if self.type is bool or self.type is str:
      return isinstance(value, self.type) and (self.type is bool or value != '')
    numbers = (int,) if self.type is int else (int, float)
    if not isinstance(value, numbers) or isinstance(value, bool) or not math.isfinite(value):
      return False
    return all(bound is None or holds(value, bound) for bound, holds in (
        (self.at_least, operator.ge), (self.above, operator.gt), (self.at_most, operator.le),
        (self.below, operator.lt)))

  def wanted(self) -> str:
    """What the key allows, as the end of `must be ...`."""
    if self.type is bool:
      return 'True or False'
    if self.type is str:
      return 'a non-empty string'
    bounds = [f'{sign} {bound:g}' for sign, bound in (('>=', self.at_least), ('>', self.above),
                                                      ('<=', self.at_most), ('<', self.below)) if bound is not None]
    noun = 'an integer' if self.type is int else 'a finite number'
    named = {('>= 1',): f'a positive {"integer" if self.type is int else "number"}', ('> 0',): 'a positive number',
             ('>= 0',): 'zero or positive', ('>= 0', '<= 1'): 'a fraction between 0 and 1',
             ('> 0', '< 1'): 'a fraction between 0 and 1, both excluded'}
    return named.get(tuple(bounds)) or ' '.join([noun, ' and '.join(bounds)]).strip()


def config_section(keys: dict[str, Key]):
  """A ConfigDict of the keys' defaults."""
  return config_dict.ConfigDict({name: key.initial() for name, key in keys.items()})


def check_section(section: str, keys: dict[str, Key], values) -> None:
  """Checks every declared key of one section (a ConfigDict, dict or dataclass) against its declaration."""
  for name, key in keys.items():
    key.check(f'{section}.{name}', values[name] if isinstance(values, dict) else getattr(values, name))
