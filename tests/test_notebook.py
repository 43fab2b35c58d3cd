"""examples/soundnet.ipynb runs from the first cell to the last, from examples/ as a user would
open it, and is committed with its outputs so it renders on a code host."""
import nbformat
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = ROOT / "examples" / "soundnet.ipynb"


def test_notebook_is_committed_with_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "run every cell before committing"
    outputs = [output for cell in code for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs)
    assert not any(output.output_type == "error" for output in outputs)
    # Running it must not rewrite README's picture: that is an explicit choice in its first cell.
    assert "SAVE_FIGURE = False" in code[0].source


def test_notebook_runs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, naming the cell and the exception, if any cell fails; the last
    # cell fails if the notebook's two lines do not give the arrays extract_feats.py writes.
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
