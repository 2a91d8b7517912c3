"""The README's Python examples run as written."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def python_blocks():
  return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_readme_has_the_interop_example():
  assert any('from_reference' in block for block in python_blocks())


@pytest.mark.slow
def test_every_python_example_runs():
  for block in python_blocks():
    if block.startswith('# Needs '):  # a trained run or an optional extra: it must still be valid Python
      compile(block, str(README), 'exec')
      continue
    namespace = {}
    exec(compile(block, str(README), 'exec'), namespace)  # the examples are documentation: run them verbatim
    if 'from_reference' in block:
      assert namespace['y'].shape == namespace['x'].shape
      assert np.all(np.isfinite(namespace['y']))
