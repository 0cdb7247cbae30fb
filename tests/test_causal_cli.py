"""`python -m interp compare|patch|steer|explain` on a run with tiny students: output, artifacts, one-line errors
with exit status 2 and nothing written."""

from __future__ import annotations

import pytest

from interp.cli import main
from test_app import write_tiny_adapter
from interp.views.synthetic import write_synthetic_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = write_synthetic_run(tmp_path_factory.mktemp("runs") / "facts", with_layers=False)
    for student in ("unreg", "reg"):
        write_tiny_adapter(folder / student)
    return folder


def test_the_four_commands_print_and_save(run, capsys):
    from interp.causal.artifacts import load_all

    assert main(["compare", str(run), "--student", "unreg", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "absorbed" in text and "overshoot" in text and "mean overshoot" in text
    assert main(["patch", str(run), "--student", "unreg", "--device", "cpu", "--backend", "torch"]) == 0
    text = capsys.readouterr().out
    assert "context_rec" in text and "repair_rec" in text and "reference tokens:" in text
    assert main(["patch", str(run), "--student", "unreg", "--device", "cpu", "--backend", "torch", "--sweep", "repair",
                 "--site", "attn", "--heads", "--layers", "2,3"]) == 0
    capsys.readouterr()
    assert main(["steer", str(run), "--student", "unreg", "--device", "cpu", "--alpha", "0", "--layer", "2",
                 "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "base+v" in text and "student-v" in text
    assert main(["explain", str(run), "--student", "unreg", "--device", "cpu", "--example", "0", "--backend", "torch"]) == 0
    text = capsys.readouterr().out
    assert "they part at response token" in text and "[" in text
    saved = load_all(run, "unreg")
    assert saved["comparison"] is not None and saved["comparison"].num_layers == 4
    assert set(saved["patch"]) == {"context_resid", "repair_resid", "repair_attn_heads"}
    assert saved["patch"]["repair_attn_heads"].recovery.shape == (4, 4)
    assert saved["steer"].results["base+v"][2]["responses"] == saved["steer"].baseline["base+v"]["responses"]
    assert 0 in saved["explain"]


@pytest.mark.parametrize("args, message", [
    (["compare", "--student", "nobody"], "has no student named 'nobody'; it has: unreg, reg"),
    (["patch", "--student", "unreg", "--layers", "9"], "layer 9 is out of range"),
    (["patch", "--student", "unreg", "--layers", "two"], "--layers takes comma-separated whole numbers"),
    (["patch", "--student", "unreg", "--site", "mixer"], "unknown site 'mixer'"),
    (["patch", "--student", "unreg", "--sweep", "sideways"], "unknown sweep 'sideways'"),
    (["steer", "--student", "unreg", "--alpha", "nan"], "--alpha must be a finite number"),
    (["steer", "--student", "unreg", "--alpha", "inf"], "--alpha must be a finite number"),
    (["steer", "--student", "unreg", "--layer", "0,7"], "layer 7 is out of range"),
    (["explain", "--student", "unreg", "--example", "99"], "has no example 99"),
    (["compare", "--student", "unreg", "--backend", "nope"], "unknown backend 'nope'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message, capsys):
    folder = write_synthetic_run(tmp_path / "facts", with_layers=False)
    write_tiny_adapter(folder / "unreg")
    write_tiny_adapter(folder / "reg")
    command, rest = args[0], args[1:]
    assert main([command, str(folder), *rest, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (folder / "causal").exists()


def test_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nowhere"), "--student", "unreg"]) == 2
    assert "is not a folder" in capsys.readouterr().err
