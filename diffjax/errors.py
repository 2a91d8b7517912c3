"""The exceptions the command-line entry points report in one line. Every layer raises them, so this module imports
nothing of the package."""


class ConfigError(ValueError):
  """A bad config value, missing data or an incompatible checkpoint.

  The message is one line: it names the key (or path) at fault and says what to change.
  """


class SaveError(ConfigError):
  """A checkpoint could not be written (a full disk, a missing folder). The run ends at once: Orbax's threads of a
  failed asynchronous save may wait forever, so the program exits without waiting for them."""


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss or gradient and `train.on_nonfinite` is 'stop'."""


def first_line(error: BaseException | str) -> str:
  """An exception's message (or a text) cut to its first line of at most 200 characters, for a one-line error."""
  lines = str(error).strip().splitlines()
  return lines[0][:200] if lines else type(error).__name__
