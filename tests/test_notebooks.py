"""The example notebooks (examples/*.ipynb): stored without outputs, and every cell runs.

They run headless with nbclient on an IPython kernel of this very interpreter, described by a
kernel spec in a temporary folder (nothing is installed into the user's Jupyter folders), with
CNNLAB_NOTEBOOK_QUICK=1, which the notebooks read to train briefly. Any cell error fails the test.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from .conftest import needs_mnist

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
SRC = Path(__file__).resolve().parents[1] / "src"


def test_the_examples_are_there():
    assert [p.name for p in NOTEBOOKS] == ["01-cnn-tutorial.ipynb", "02-your-own-images.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_stored_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for number, cell in enumerate(code, start=1):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: code cell {number} has outputs"


def run_notebook(path: Path, workdir: Path, monkeypatch) -> object:
    """Execute `path` in `workdir` on a kernel running this interpreter; returns the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    jupyter = workdir / "jupyter"
    spec = jupyter / "kernels" / "cnnlab-tests"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cnnlab tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter / "runtime"))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(jupyter / "config"))
    monkeypatch.setenv("IPYTHONDIR", str(workdir / "ipython"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("CNNLAB_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("CNNLAB_EXAMPLES", str(workdir / "examples"))  # the folder the notebooks write into
    # the kernel imports this checkout's cnnlab, installed or not
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH")) if p))
    notebook = nbformat.read(path, as_version=4)
    run_dir = workdir / "cwd"
    run_dir.mkdir()
    client = nbclient.NotebookClient(notebook, kernel_name="cnnlab-tests", timeout=900,
                                     resources={"metadata": {"path": str(run_dir)}})
    try:
        client.execute()  # a cell that raises fails here, with its traceback
    finally:
        nbformat.write(notebook, workdir / path.name)  # what ran, outputs included, for a look after a failure
    return notebook


def _outputs(notebook, mime: str) -> int:
    return sum(mime in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


@pytest.mark.slow
@needs_mnist
def test_the_tutorial_notebook_runs(tmp_path, monkeypatch):
    notebook = run_notebook(EXAMPLES / "01-cnn-tutorial.ipynb", tmp_path, monkeypatch)
    assert _outputs(notebook, "image/png") >= 7  # the figures show inline
    assert _outputs(notebook, "text/html") >= 4  # summaries, the model and predictions as tables
    assert (tmp_path / "examples" / "runs" / "tutorial" / "model.safetensors").is_file()
    assert not (tmp_path / "cwd" / "runs").exists()  # nothing lands where Jupyter was started
    assert any("a smoke test" in output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
               for output in cell.outputs)


@pytest.mark.slow
def test_the_own_images_notebook_runs(tmp_path, monkeypatch):
    """With the shared CIFAR-10 JPEGs when CNNLAB_DATA holds them, else on a generated folder."""
    notebook = run_notebook(EXAMPLES / "02-your-own-images.ipynb", tmp_path, monkeypatch)
    assert _outputs(notebook, "image/png") >= 3
    assert _outputs(notebook, "text/html") >= 3
    assert (tmp_path / "examples" / "runs" / "your-images" / "model.onnx").is_file()
    assert not (tmp_path / "cwd" / "runs").exists() and not (tmp_path / "cwd" / "data").exists()
    images = sorted((tmp_path / "examples" / "data" / "images").rglob("*.*"))
    assert images  # kept in the named folder: a second run reuses them
