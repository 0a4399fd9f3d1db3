"""Every tutorial notebook in nbs/ executes without error (the notebooks are executed documentation)."""

from pathlib import Path

import nbformat
import pytest

NBS = sorted((Path(__file__).parent.parent / 'nbs').glob('*.ipynb'))


def test_there_are_notebooks():
    assert NBS, 'nbs/ holds no notebooks'


@pytest.mark.slow
@pytest.mark.parametrize('path', NBS, ids=[p.stem for p in NBS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv('FINETUNE_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type == 'error']
    assert not errors
