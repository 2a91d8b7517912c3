"""The quickstart notebook runs top to bottom under nbclient, as Jupyter runs it, from the repository root and from
notebooks/: its Colab-only cell does nothing outside Colab, it finds the repository from its working folder, and it
prints readable values rather than raw dicts and arrays."""

import pathlib
import sys

import pytest

import helpers_training as ht

nbclient = pytest.importorskip('nbclient')
nbformat = pytest.importorskip('nbformat')
kernelspec = pytest.importorskip('ipykernel.kernelspec')

NOTEBOOK = ht.REPO / 'notebooks' / 'quickstart.ipynb'
STEPS = 4


@pytest.fixture(scope='module')
def jupyter_path(tmp_path_factory) -> str:
  """A Jupyter data folder whose `python3` kernel is this interpreter, so the notebook sees this environment (and
  not whichever `python3` kernel the machine has registered elsewhere). JUPYTER_PATH is searched first."""
  folder = tmp_path_factory.mktemp('jupyter')
  kernelspec.write_kernel_spec(folder / 'kernels' / 'python3')
  return str(folder)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> pathlib.Path:
  """Prepared data shared by both runs: the first prepares the standard library corpus, the second reuses it."""
  return tmp_path_factory.mktemp('notebook_data')


def _text(cell) -> str:
  return ''.join(output.get('text', '') for output in cell['outputs'] if output['output_type'] == 'stream')


@pytest.mark.slow
@pytest.mark.parametrize('folder', ['.', 'notebooks'])
def test_the_notebook_runs_top_to_bottom(folder, tmp_path, monkeypatch, jupyter_path, data_dir):
  workdir = tmp_path / 'run'
  for name, value in {'JUPYTER_PATH': jupyter_path, 'DIFFJAX_NOTEBOOK_STEPS': str(STEPS),
                      'DIFFJAX_NOTEBOOK_WORKDIR': str(workdir), 'DIFFJAX_DATA_DIR': str(data_dir),
                      'JAX_PLATFORMS': 'cpu'}.items():
    monkeypatch.setenv(name, value)  # the kernel inherits this process's environment
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  notebook.cells.append(nbformat.v4.new_code_cell('import sys\nprint(sys.executable)'))
  nbclient.NotebookClient(notebook, kernel_name='python3', timeout=600,
                          resources={'metadata': {'path': str(ht.REPO / folder)}}).execute()

  code = [cell for cell in notebook.cells if cell['cell_type'] == 'code']
  colab, settings, train, sample = code[:4]
  assert colab['outputs'] == []  # outside Colab: no clone, no install, no error
  assert _text(settings) == f'repository {ht.REPO}; the run goes to {workdir}\n'
  assert f'trained to step {STEPS}, training loss ' in _text(train)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == [str(STEPS)]
  lambdas = _text(sample).rsplit('λ per layer: ', 1)[1].split(', ')
  assert len(lambdas) == 4 and all(0 < float(value) < 1 for value in lambdas)  # tiny.py: 4 layers
  outputs = [output for cell in code for output in cell['outputs']]
  assert not [output for output in outputs if output['output_type'] == 'execute_result']  # no raw dicts or arrays
  assert 'Array(' not in ''.join(_text(cell) for cell in code)
  assert sum('image/png' in output.get('data', {}) for output in outputs) == 3  # loss, λ and attention maps
  assert _text(code[-1]).strip() == sys.executable
