"""Execute notebooks/06_diffusers_interop.ipynb top to bottom; any cell that raises fails the test."""

import pytest

from .conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "06_diffusers_interop.ipynb"


def test_the_diffusers_interop_notebook_runs():
    pytest.importorskip("diffusers", reason='diffusers is not installed: pip install "cpcbm-blocks[interop]"')
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "finite: True" in outputs and "conditioned sample (2, 1, 4, 16, 16) finite: True" in outputs
