"""The package's folders import only downward. Checked on the source with `ast`, so nothing is imported or run.

  errors.py                 the bottom: imports nothing of the package
  keys.py                   the declaration of a config key: errors only
  model/, data/             each imports itself, keys and errors only (neither knows the other)
  run/                      model, data, keys, errors
  train/, infer/            run, model, data, keys, errors (neither imports the other)
  cli.py                    what the commands share: anything but a command
  commands                  the other top-level modules and train/__main__.py: anything but another command
  __init__.py               the public API (`diffjax.from_hf`, ...): anything but cli and the commands

Nothing imports a command (`diffjax <command>` runs them as programs, by name), and only commands import cli. Every
import counts, relative ones and those inside functions included.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'diffjax'
FOLDERS = ('model', 'data', 'run', 'train', 'infer')
LIBRARY = {'errors', 'keys', *FOLDERS}
# layer -> the layers its modules may import
ALLOWED = {
    'errors': set(),
    'keys': {'errors'},
    'model': {'model', 'keys', 'errors'},
    'data': {'data', 'keys', 'errors'},
    'run': {'run', 'model', 'data', 'keys', 'errors'},
    'train': {'train', 'run', 'model', 'data', 'keys', 'errors'},
    'infer': {'infer', 'run', 'model', 'data', 'keys', 'errors'},
    'cli': LIBRARY,
    'command': LIBRARY | {'cli'},
    'api': LIBRARY,
}


def modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of the package (a folder's __init__.py names the folder)."""
  found = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = ('diffjax', *path.relative_to(PACKAGE).with_suffix('').parts)
    found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return found


def layer(module: str) -> str:
  parts = module.split('.')
  if module == 'diffjax':
    return 'api'
  if parts[-1] == '__main__':  # `python -m diffjax.train` runs the train command, which lives in its folder
    return 'command'
  if parts[1] in FOLDERS or parts[1] in ('errors', 'keys'):
    return parts[1]
  return 'cli' if parts[1] == 'cli' else 'command'


def imports_of(module: str, source: str, is_package: bool, known: set[str]) -> set[str]:
  """The package's modules that `module` imports, each as the longest known module its import names."""
  def known_prefix(name: str) -> str | None:
    parts = name.split('.')
    for end in range(len(parts), 0, -1):
      if '.'.join(parts[:end]) in known:
        return '.'.join(parts[:end])
    return None

  targets = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      targets.update(known_prefix(alias.name) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the module's package, one folder up per dot after the first
        package = module.split('.') if is_package else module.split('.')[:-1]
        base = '.'.join(package[:len(package) - node.level + 1])
        source_module = f'{base}.{node.module}' if node.module else base
      else:
        source_module = node.module
      for alias in node.names:  # `from diffjax import model` imports the folder, `from diffjax import errors` a module
        submodule = f'{source_module}.{alias.name}'
        targets.add(submodule if submodule in known else known_prefix(source_module))
  return {target for target in targets if target is not None and target != module}


def import_graph() -> dict[str, set[str]]:
  found = modules()
  return {module: imports_of(module, path.read_text(), path.name == '__init__.py', set(found))
          for module, path in found.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
  """`A imports B (layer -> layer)` for every import the layers forbid."""
  return [f'{module} imports {target} ({layer(module)} -> {layer(target)})'
          for module, targets in sorted(graph.items()) for target in sorted(targets)
          if layer(target) not in ALLOWED[layer(module)]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Import cycles between modules, each as a path that returns to its start."""
  found, state = [], {}

  def visit(module, path):
    state[module] = 'open'
    for target in sorted(graph.get(module, ())):
      if state.get(target) == 'open':
        found.append(path[path.index(target):] + [target])
      elif target not in state:
        visit(target, path + [target])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  return found


# -- the package ----------------------------------------------------------------------------------------------------

def test_every_import_points_down():
  assert violations(import_graph()) == []


def test_no_import_cycles():
  assert cycles(import_graph()) == []


def test_the_graph_is_the_package():
  """The checks above hold for the package's real imports, not for an empty graph that a parsing slip would give."""
  graph = import_graph()
  assert {layer(module) for module in graph} == {'api', 'errors', 'keys', 'cli', 'command', *FOLDERS}
  assert 'diffjax.run.checkpoint' in graph['diffjax.train.loop']
  assert 'diffjax.infer.load' in graph['diffjax.sample'] and 'diffjax.cli' in graph['diffjax.sample']
  assert 'diffjax.data.pipeline' in graph['diffjax.run.defaults']  # an import inside a function counts
  assert 'diffjax.infer.hf' in graph['diffjax']


def test_each_folder_says_its_job_and_what_it_may_import():
  for folder in FOLDERS:
    doc = ast.get_docstring(ast.parse((PACKAGE / folder / '__init__.py').read_text()))
    assert doc and 'import' in doc.lower(), folder


# -- the checker ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('edge', [
    ('diffjax.model.attention', 'diffjax.train.step'),  # the model knows no training
    ('diffjax.model.transformer', 'diffjax.data.pipeline'),  # nor the data
    ('diffjax.data.pipeline', 'diffjax.run.defaults'),  # the data knows no run
    ('diffjax.run.checkpoint', 'diffjax.train.workdir'),  # runs sit below training
    ('diffjax.infer.load', 'diffjax.train.step'),  # reading a run builds no trainer
    ('diffjax.train.loop', 'diffjax.infer.generate'),  # nor does training read runs through inference
    ('diffjax.infer.load', 'diffjax.cli'),  # only commands use the command-line support
    ('diffjax.infer.needles', 'diffjax.needles'),  # nothing imports a command
    ('diffjax.sample', 'diffjax.train.__main__'),  # not even another command
    ('diffjax', 'diffjax.commands'),  # nor the public API
    ('diffjax.errors', 'diffjax.model.config'),  # the bottom imports nothing
    ('diffjax.errors', 'diffjax.keys'),  # not even the key declarations above it
    ('diffjax.keys', 'diffjax.model.config'),  # which know no model
])
def test_the_checker_flags_a_forbidden_import(edge):
  module, target = edge
  assert violations({module: {target}}) == [f'{module} imports {target} ({layer(module)} -> {layer(target)})']


@pytest.mark.parametrize('edge', [
    ('diffjax.train.loop', 'diffjax.run.checkpoint'), ('diffjax.infer.load', 'diffjax.model.transformer'),
    ('diffjax.run.defaults', 'diffjax.data.pipeline'), ('diffjax.sample', 'diffjax.cli'),
    ('diffjax.train.__main__', 'diffjax.infer.generate'), ('diffjax', 'diffjax.infer.hf'),
])
def test_the_checker_allows_a_downward_import(edge):
  module, target = edge
  assert violations({module: {target}}) == []


def test_relative_and_nested_imports_are_resolved():
  known = set(modules())
  source = ('from ..train import step\n'
            'from . import generate\n'
            'from .hf import save_hf\n'
            'import diffjax.model.config\n'
            'def later():\n'
            '  from diffjax import cli, errors\n')
  graph = {'diffjax.infer.load': imports_of('diffjax.infer.load', source, False, known)}
  assert graph['diffjax.infer.load'] == {'diffjax.train.step', 'diffjax.infer.generate', 'diffjax.infer.hf',
                                         'diffjax.model.config', 'diffjax.cli', 'diffjax.errors'}
  assert violations(graph) == ['diffjax.infer.load imports diffjax.cli (infer -> cli)',
                               'diffjax.infer.load imports diffjax.train.step (infer -> train)']
  # In a folder's __init__.py one dot is the folder itself.
  assert imports_of('diffjax.model', 'from . import layers\nfrom .. import errors\n', True, known) == {
      'diffjax.model.layers', 'diffjax.errors'}


def test_the_checker_finds_a_cycle():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c', 'a']]
