"""examples/soundnet.ipynb runs from the first cell to the last, from examples/ as a user would
open it, and is committed with its outputs so it renders on a code host."""
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution

import nbformat
import pytest
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


def first_cell_source():
    return next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells
                if c.cell_type == "code").source


def run_first_cell(source, cwd):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", source + "\nprint(soundnet.__file__)"], cwd=cwd,
                          env=env, capture_output=True, text=True)


def test_first_cell_outside_the_repository_says_how_to_point_it_there(tmp_path):
    try:
        distribution("soundnet-pytorch")
        pytest.skip("soundnet-pytorch is installed here: the notebook finds the clone through it")
    except PackageNotFoundError:
        pass
    lost = run_first_cell(first_cell_source(), tmp_path)
    assert lost.returncode != 0
    assert lost.stderr.strip().splitlines()[-1] == (
        'FileNotFoundError: this notebook needs the soundnet_pytorch repository (its '
        'examples/audio/ clips): set ROOT = "/path/to/soundnet_pytorch" at the top of this cell')
    pointed = first_cell_source().replace("ROOT = None", f"ROOT = {str(ROOT)!r}", 1)
    found = run_first_cell(pointed, tmp_path)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [str(ROOT / "soundnet.py")]
