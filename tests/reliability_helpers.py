"""What the reliability tests share: the crash harness's tiny run, started through the real CLI in a subprocess."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location('crash_harness', REPO / 'launch' / 'crash_harness.py')
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)

STEPS = harness.STEPS  # the harness's run length: tests of the same length reuse its compiled steps
# Shared by every test run (and test session): the tiny model compiles once, later starts take seconds.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), 'diffjax-test-compile-cache')


def env(compile_cache: str = COMPILE_CACHE) -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=compile_cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def make_corpus(folder: pathlib.Path) -> tuple[str, str]:
  """(text_glob, data_dir) of the harness's synthetic corpus, written under `folder`."""
  harness.write_corpus(str(folder / 'corpus'))
  return str(folder / 'corpus'), str(folder / 'tfds')


def flags(corpus: tuple[str, str], steps: int, **overrides) -> list[str]:
  """The harness's tiny run for `steps` steps; `overrides` use `__` for the dot (checkpoint__every_steps=2)."""
  extra = [f'--config.{key.replace("__", ".")}={value}' for key, value in overrides.items()]
  return harness.overrides(steps, *corpus) + extra


def command(workdir, run_flags: list[str]) -> list[str]:
  return harness.command(str(workdir), run_flags)


def train(workdir, run_flags: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, run_flags), cwd=REPO, env=env(), capture_output=True, text=True,
                        timeout=timeout)


def records(workdir) -> list[dict]:
  """metrics.jsonl's complete lines (a running process may be writing the last one)."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().split('\n')[:-1]] if path.exists() else []


def losses(workdir) -> dict[int, float]:
  """Step -> logged loss; a step logged twice must have the same loss both times."""
  by_step = {}
  for record in records(workdir):
    if 'loss' in record:
      assert by_step.setdefault(record['step'], record['loss']) == record['loss'], record
  return by_step


def steps(workdir) -> list[int]:
  folder = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def nonempty_lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


def run_command(module: str, *args, timeout: float = 240) -> tuple[subprocess.CompletedProcess, list[str]]:
  """`python -m diffjax.MODULE ARGS` from the repository root: the finished process and its non-empty stderr lines."""
  result = subprocess.run([sys.executable, '-m', f'diffjax.{module}', *args], cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout)
  return result, nonempty_lines(result.stderr)


def reader():
  return harness.CheckpointReader()
