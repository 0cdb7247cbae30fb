"""Notebook 04 on the tiny model: with the base as its own student (checks by construction) and with a run's student."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_where_the_context_lives.ipynb"


def _execute(tmp_path: Path) -> str:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    return "".join(str(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _checks(text: str) -> dict[str, str]:
    line = next(l for l in text.splitlines() if l.startswith("checks: "))
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_notebook_with_a_runs_student(monkeypatch, tmp_path):
    from test_app import write_tiny_adapter
    from interp.views.synthetic import write_synthetic_run

    run = write_synthetic_run(tmp_path / "runs" / "facts", with_layers=False)
    for student in ("unreg", "reg"):
        write_tiny_adapter(run / student)
    monkeypatch.setenv("CTXINT_NOTEBOOK_MODEL", "tiny-random-llama")
    monkeypatch.setenv("CTXINT_NOTEBOOK_MAX_NEW_TOKENS", "6")
    monkeypatch.setenv("CTXINT_NOTEBOOK_RUN", str(run))
    # The kernel starts in a temporary folder: make it import this checkout's interp, not another installed copy.
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]))
    text = _execute(tmp_path)
    checks = _checks(text)
    assert float(checks["recovery_last"]) == pytest.approx(1.0, abs=1e-6)
    assert float(checks["recovery_embed"]) == pytest.approx(0.0, abs=1e-6)
    assert checks["steer_alpha0_equal"] == "True"
    assert "student unreg" in text and "the answers part at token" in text
