"""The notebooks run top to bottom on the tiny model, and are stored without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    names = {p.stem for p in NOTEBOOKS}
    assert {"01_layer_divergence", "02_logit_lens", "03_attention_to_context"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: strip the outputs before committing"


def _execute(path: Path, tmp_path: Path):
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # The kernel's working folder is a temporary one, so nothing a notebook writes lands in the repository.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_on_the_tiny_model(path, monkeypatch, tmp_path):
    monkeypatch.setenv("CTXINT_NOTEBOOK_MODEL", "tiny-random-llama")
    monkeypatch.setenv("CTXINT_NOTEBOOK_MAX_NEW_TOKENS", "8")
    monkeypatch.delenv("CTXINT_NOTEBOOK_RUN", raising=False)
    _execute(path, tmp_path)


def test_layer_divergence_notebook_compares_a_runs_students(monkeypatch, tmp_path):
    from test_app import write_tiny_adapter
    from interp.views.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "runs" / "facts", with_layers=False)
    for student in ("unreg", "reg"):
        write_tiny_adapter(run / student)
    monkeypatch.setenv("CTXINT_NOTEBOOK_MODEL", "tiny-random-llama")
    monkeypatch.setenv("CTXINT_NOTEBOOK_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("CTXINT_NOTEBOOK_RUN", str(run))
    nb = _execute(next(p for p in NOTEBOOKS if p.stem == "01_layer_divergence"), tmp_path)
    text = "".join(str(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert str(run / "unreg") in text  # the run's adapters, not stand-ins
