"""Runs notebooks/quickstart.ipynb top to bottom in a kernel on this test's own Python."""

import json
import os
import sys

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks")
NOTEBOOK = os.path.join(NOTEBOOK_DIR, "quickstart.ipynb")
CELL_TIMEOUT_S = 300
KERNEL = "vit-test"


def _kernel_manager(spec_root: str) -> KernelManager:
    """A kernel on sys.executable: an installed "python3" spec may name another interpreter."""
    spec_dir = os.path.join(spec_root, KERNEL)
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
                            "{connection_file}"],
                   "display_name": "vit test", "language": "python"}, f)
    specs = KernelSpecManager(kernel_dirs=[spec_root], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _text(cell) -> str:
    return "".join(out.get("text", "") + "".join(out.get("data", {}).get("text/plain", ""))
                   for out in cell.get("outputs", []))


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook after running every cell, plus a first cell that prints sys.executable."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    km = _kernel_manager(str(tmp_path_factory.mktemp("kernels")))
    NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": NOTEBOOK_DIR}}).execute()
    return nb


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_notebook_runs_on_this_python_without_errors(executed):
    assert _text(executed.cells[0]).strip() == sys.executable
    errors = [out for c in executed.cells if c.cell_type == "code" for out in c.outputs
              if out.output_type == "error"]
    assert not errors, errors
    assert all(c.execution_count for c in executed.cells if c.cell_type == "code")


def test_notebook_prints_metrics_predictions_and_plots(executed):
    text = "\n".join(_text(c) for c in executed.cells)
    assert "eval/top1:" in text
    assert "examples 256" in text and "per-class accuracy:" in text
    for i in range(3):
        assert f"test_{i}.png: " in text
    assert "attention weights: (2, 3, 2, 17, 17)" in text
    assert "rollout grid: (3, 4, 4)" in text
    assert "fine-tuned at 48px: top-1 " in text
    images = [out for c in executed.cells for out in c.get("outputs", [])
              if "image/png" in out.get("data", {})]
    assert len(images) == 1
