"""notebooks/06_diffusers_interop.ipynb shows diffusers' schedulers driving the UNet; check what it prints.

The notebook is executed once per session with the others (tests/docs/conftest.py); this test reads
the executed copy instead of running it a second time.
"""

import nbformat
import pytest

NOTEBOOK = "06_diffusers_interop.ipynb"


def test_the_diffusers_interop_notebook_trains_and_samples_with_finite_results(executed_notebooks):
    pytest.importorskip("diffusers", reason='diffusers is not installed: pip install "cpcbm-blocks[interop]"')
    run = executed_notebooks[NOTEBOOK]
    assert run.error is None, run.error
    notebook = nbformat.read(run.executed, as_version=4)
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "finite: True" in outputs and "conditioned sample (2, 1, 4, 16, 16) finite: True" in outputs
