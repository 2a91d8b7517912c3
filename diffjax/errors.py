"""One exception type for input a user can fix, reported as one line by the command-line entry points."""


class ConfigError(ValueError):
  """A bad config value, missing data or an incompatible checkpoint.

  The message is one line: it names the key (or path) at fault and says what to change.
  """
