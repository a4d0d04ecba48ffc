"""CI smoke test of the notebooks: each jupytext percent-format ``notebooks/*.py`` is converted and
executed top to bottom with nbclient at reduced size (``QDRIFT_NOTEBOOK_SMALL=1``) in a temporary
working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
EXPECTED = {"runs_needed.py", "noise_accumulation.py", "diagnostics_tour.py"}


def _python3_kernel() -> str | None:
    """Make sure a ``python3`` kernel is registered (for this interpreter); None if it is, else why not."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
        return None
    except NoSuchKernel:
        pass
    proc = subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return (
            f"no 'python3' Jupyter kernel and 'python -m ipykernel install --user' failed: {proc.stderr.strip()[-200:]}"
        )
    return None


@pytest.fixture(scope="module")
def kernel():
    reason = _python3_kernel()
    if reason:
        pytest.skip(reason)
    return "python3"


def test_the_three_notebooks_are_there():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_reduced_size(path, kernel, tmp_path, monkeypatch):
    notebook = jupytext.read(path)
    assert notebook.cells and any(c.cell_type == "markdown" for c in notebook.cells)
    monkeypatch.setenv("QDRIFT_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend renders the figures
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' own files land under tmp_path too
    client = nbclient.NotebookClient(
        notebook, kernel_name=kernel, timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook shows no figure"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert text.strip(), "the notebook prints nothing a reader can check"
