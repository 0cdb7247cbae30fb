"""The app against hostile or damaged input: run.json names that leave the run, a truncated adapter in live mode,
live mode limited to the runs folder, and the address `make app` listens on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from streamlit.testing.v1 import AppTest

from test_app import write_tiny_adapter
from interp.views.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "apps" / "layers.py")


def _app(monkeypatch, root: Path, runs_only: bool = False) -> AppTest:
    monkeypatch.setenv("LAYERS_RUNS_DIR", str(root))
    if runs_only:
        monkeypatch.setenv("LAYERS_LIVE_RUNS_ONLY", "1")
    else:
        monkeypatch.delenv("LAYERS_LIVE_RUNS_ONLY", raising=False)
    return AppTest.from_file(APP, default_timeout=120)


def _no_exception(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _live(at: AppTest, model="tiny-random-llama", adapter: Path | None = None) -> AppTest:
    at.sidebar.radio(key="mode").set_value("Live").run()
    at.text_input(key="live_model").set_value(model)
    at.text_area(key="live_response").set_value("I am Zorblax.")
    if adapter is not None:
        at.selectbox(key="live_adapter").set_value("another adapter folder…").run()
        at.text_input(key="live_adapter_path").set_value(str(adapter))
    at.button(key="live_go").click().run(timeout=300)
    _no_exception(at)
    return at


def test_make_app_listens_on_localhost_unless_asked():
    plan = subprocess.run(["make", "-n", "app"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "--server.address 127.0.0.1" in plan
    plan = subprocess.run(["make", "-n", "app", "HOST=0.0.0.0"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "--server.address 0.0.0.0" in plan


def test_students_that_leave_the_run_folder_are_refused(monkeypatch, tmp_path):
    run = write_synthetic_run(tmp_path / "runs" / "evil")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "students": ["unreg", "../../../../etc"]}))
    at = _app(monkeypatch, tmp_path / "runs").run()
    _no_exception(at)
    errors = " ".join(e.value for e in at.error)
    assert "'../../../../etc' is not a plain folder name" in errors


def test_a_truncated_adapter_in_live_mode_is_one_line(monkeypatch, tmp_path):
    adapter = write_tiny_adapter(tmp_path / "student")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    at = _live(_app(monkeypatch, tmp_path / "runs").run(), adapter=adapter)
    assert len(at.error) == 1 and "adapter_model.safetensors is damaged" in at.error[0].value
    assert "\n" not in at.error[0].value.strip()


def test_live_mode_limited_to_the_runs_folder(monkeypatch, tmp_path):
    root = tmp_path / "runs"
    write_synthetic_run(root / "facts")
    inside = write_tiny_adapter(root / "facts" / "extra")
    outside = write_tiny_adapter(tmp_path / "elsewhere")
    at = _app(monkeypatch, root, runs_only=True).run()
    _no_exception(at)
    assert at.sidebar.text_input(key="runs_dir").disabled  # the browser cannot point the app at another folder
    _live(at, model="HuggingFaceTB/SmolLM2-360M-Instruct")
    assert "is neither built in nor the model of a run" in at.error[0].value
    _live(at, adapter=outside)
    assert "is outside the runs folder" in at.error[0].value
    _live(at, adapter=inside)
    assert not at.error, [e.value for e in at.error]
    assert at.session_state["live_result"][2] == "tiny-random-llama + extra"
