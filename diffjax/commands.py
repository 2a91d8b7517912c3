"""The `diffjax` command: `diffjax <command> [--flag=value ...]`, one entry point for every program of the package.

Each command is a module run as a program (`diffjax sample ...` is `python -m diffjax.sample ...`), imported only
when chosen: the modules define flags of the same names (--workdir, --config), which one process can define once.
`diffjax <command> --help` describes the command and its flags.
"""

import ast
import importlib.util
import os
import runpy
import sys

# command -> module; `compare` is a script of the repository, not of the installed package.
COMMANDS = {
    'train': 'diffjax.train.__main__',
    'prepare': 'diffjax.prepare',
    'sample': 'diffjax.sample',
    'evaluate': 'diffjax.evaluate',
    'needles': 'diffjax.needles',
    'outliers': 'diffjax.outliers',
    'attention-maps': 'diffjax.attention_maps',
    'export': 'diffjax.export',
    'import': 'diffjax.import_hf',
    'compare': 'launch/compare.py',
}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def summary(command: str) -> str:
  """The first line of the command's module docstring, read without importing the module."""
  target = COMMANDS[command]
  if target.endswith('.py'):
    path = os.path.join(_REPO, target)
    source = open(path).read() if os.path.exists(path) else '"""Needs a checkout of the diffjax repository."""'
  else:
    source = importlib.util.find_spec(target).loader.get_source(target)
  first_line = (ast.get_docstring(ast.parse(source)) or '').splitlines()[0]
  return first_line.split(': `')[0].rstrip(':.')  # without the `python -m ...` usage some docstrings start with


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [__doc__.splitlines()[0], '', 'commands:']
  lines += [f'  {name:<{width}}  {summary(name)}' for name in COMMANDS]
  return '\n'.join(lines + ['', 'diffjax <command> --help shows what a command takes.'])


def main():
  if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help', 'help'):
    print(usage())
    sys.exit(0)
  command, arguments = sys.argv[1], sys.argv[2:]
  if command not in COMMANDS:
    print(f'error: {command}: unknown command; use one of {", ".join(COMMANDS)} (diffjax --help)', file=sys.stderr)
    sys.exit(1)
  target = COMMANDS[command]
  sys.argv = [f'diffjax {command}', *arguments]
  if target.endswith('.py'):
    path = os.path.join(_REPO, target)
    if not os.path.exists(path):
      print(f'error: {command}: {target} is part of the repository, not of the installed package; run it from a '
            'checkout (pip install -e .)', file=sys.stderr)
      sys.exit(1)
    runpy.run_path(path, run_name='__main__')
  else:
    runpy.run_module(target, run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
