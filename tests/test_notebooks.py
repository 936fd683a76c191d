"""Every notebook runs top to bottom (at small sizes) without an error."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def _execute(path: Path, monkeypatch):
    monkeypatch.setenv("JAXDEC_NB_STEPS", "60")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # quick XLA:CPU compiles: at these sizes a notebook is mostly compilation
    monkeypatch.setenv("XLA_FLAGS", FAST)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def _text(nb) -> str:
    return "".join(
        o.get("text", "") + o.get("data", {}).get("text/plain", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, monkeypatch):
    nb = _execute(path, monkeypatch)
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert _text(nb).strip(), "the notebook produced no output"
    if path.name == "quickstart.ipynb":
        assert "avg_model_acc" in _text(nb)
    if path.name == "single_merge.ipynb":
        assert "training state unchanged: True" in _text(nb)
