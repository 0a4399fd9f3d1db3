"""The committed tutorial notebooks hold exactly the cells `nbs/make_notebooks.py` writes (which ruff lints)."""

import sys
from pathlib import Path

import nbformat
import pytest

NBS = Path(__file__).parent.parent / 'nbs'
sys.path.insert(0, str(NBS))
import make_notebooks  # noqa: E402


@pytest.mark.parametrize('name', sorted(make_notebooks.NOTEBOOKS))
def test_committed_notebook_matches_its_source(name):
    committed = nbformat.read(NBS / f'{name}.ipynb', as_version=4).cells
    source = make_notebooks.NOTEBOOKS[name]
    assert [(c.cell_type, c.source) for c in committed] == [(c.cell_type, c.source) for c in source]
