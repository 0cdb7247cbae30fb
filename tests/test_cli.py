"""`python -m interp`: output, artifacts, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import pytest

from interp.cli import main
from interp.divergence import load_divergence

TINY = ["--model", "tiny-random-llama", "--device", "cpu"]


def test_analyze_one_pair_prints_a_table_and_saves(tmp_path, capsys):
    out = tmp_path / "art"
    code = main(["analyze", *TINY, "--context", "Your name is Zorblax.", "--prompt", "Who are you?",
                 "--response", "I am Zorblax.", "--backend", "torch", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "layer" in text and "cka" in text and f"saved to {out}" in text
    div = load_divergence(out)
    assert div.meta["backend"] == "torch" and div.num_layers == 4
    # The printed layer-0 row shows the exact 1.0 that alignment guarantees.
    assert "    0   1.0000   1.0000" in text


def test_analyze_jsonl_and_json_output(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"context": "Be terse.", "prompt": "Hi", "response": "Hello."},
        {"context": "Be kind.", "prompt": "Hello there", "response": "Hi, friend!"},
    ]) + "\n")
    assert main(["analyze", *TINY, "--pairs", str(path), "--json", "--backend", "torch"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["layer"] == [0, 1, 2, 3] and table["cos"][0] == pytest.approx(1.0)


@pytest.mark.parametrize("args, message", [
    (["--context", "", "--prompt", "p"], "context is missing or empty"),
    (["--prompt", "p"], "give --context and --prompt"),
    (["--context", "c", "--prompt", "p", "--backend", "nope"], "unknown backend 'nope'"),
    (["--context", "c", "--prompt", "p", "--placement", "middle"], "unknown placement 'middle'"),
    (["--context", "c", "--prompt", "p", "--adapter", "/no/such/adapter"], "adapter folder /no/such/adapter does not exist"),
])
def test_user_errors_are_one_line(args, message, capsys):
    assert main(["analyze", *TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_jsonl_line_is_named(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"context": "c", "prompt": "p"}\n{"context": "c"}\n')
    assert main(["analyze", *TINY, "--pairs", str(path)]) == 2
    assert "line 2: missing or empty field 'prompt'" in capsys.readouterr().err
    path.write_text('{"context": "c", "prompt": "p"}\nnot json\n')
    assert main(["analyze", *TINY, "--pairs", str(path)]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


def test_existing_out_is_not_touched(tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["analyze", *TINY, "--context", "c", "--prompt", "p", "--response", "r", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_module_help_runs():
    result = subprocess.run([sys.executable, "-m", "interp", "analyze", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for option in ("--context", "--pairs", "--adapter", "--backend", "--placement", "--scope", "--out"):
        assert option in result.stdout
