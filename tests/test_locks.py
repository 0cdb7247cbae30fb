"""One writer per folder: a second process gets a one-line error, a finished folder is never replaced without being
told, read-modify-writes take turns, and a killed holder leaves no stale lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from interp import divergence
from interp.core import store
from interp.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _holder(path: Path, ready: Path) -> subprocess.Popen:
    """Another process that writes `path` through atomic_dir and finishes once a file `<ready>.go` appears."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from interp.core.store import atomic_dir
        with atomic_dir({str(path)!r}) as tmp:
            (tmp / "who").write_text("holder")
            Path({str(ready)!r}).write_text("ready")
            deadline = time.monotonic() + 120
            while not Path({str(ready)!r} + ".go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, "the holder died"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def test_a_second_writer_gets_one_line_naming_the_first(tmp_path):
    target = tmp_path / "art"
    holder = _holder(target, tmp_path / "ready")
    try:
        with pytest.raises(UserError, match=rf"{target} is being written by process {holder.pid}; wait for it"):
            with store.atomic_dir(target):
                pass
        # the command line says the same, in one line, and writes nothing
        result = subprocess.run([sys.executable, "-m", "interp", "analyze", "--model", "tiny-random-llama", "--context", "c",
                                 "--prompt", "p", "--response", "r", "--out", str(target)],
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [f"error: {target} is being written by process {holder.pid}; "
                                                       "wait for it to finish or choose another --out"]
    finally:
        (tmp_path / "ready.go").write_text("go")
        assert holder.wait(timeout=60) == 0
    assert (target / "who").read_text() == "holder"  # the winner's result, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "ready", "ready.go"]  # no lock file, no temporary folder


def test_two_concurrent_analyze_commands_one_wins(tmp_path):
    out = tmp_path / "art"
    cmd = [sys.executable, "-m", "interp", "analyze", "--model", "tiny-random-llama", "--backend", "torch", "--out", str(out),
           "--context", "Your name is Zorblax.", "--prompt", "Who are you?"]
    procs = [subprocess.Popen([*cmd, "--response", r], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in ("I am Zorblax.", "Zorblax, at your service, today and always.")]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [r[2][-1500:] for r in results]
    loser = next(r for r in results if r[0] == 2)[2].strip()
    assert len(loser.splitlines()) == 1 and ("is being written by process" in loser or "already exists" in loser), loser
    winner = results[[r[0] for r in results].index(0)]
    div = divergence.load_divergence(out)
    assert repr(div.examples[0]["response"]) in winner[1]  # the folder holds the winner's pair, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_a_folder_that_appears_meanwhile_is_never_replaced(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(UserError, match="appeared while this result was written; nothing was replaced"):
        with store.atomic_dir(target) as tmp:
            (tmp / "new").write_text("new")
            target.mkdir()  # a writer that ignored the lock
            (target / "theirs").write_text("theirs")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_the_lock_is_reentrant_in_one_process_and_never_stale(tmp_path):
    target = tmp_path / "x"
    with store.folder_lock(target):
        with store.folder_lock(target):  # analyze holds --out, then atomic_dir takes it again
            assert store.lock_path(target).exists()
        assert store.lock_path(target).exists()
    assert not store.lock_path(target).exists()
    # a holder killed by SIGKILL cannot release anything: the kernel does, and the next writer goes ahead
    holder = _holder(target, tmp_path / "ready")
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    with store.atomic_dir(target, overwrite=True) as tmp:
        (tmp / "who").write_text("second")
    assert (target / "who").read_text() == "second"


def test_nested_parents_made_for_a_lock_are_removed_when_nothing_was_written(tmp_path):
    with pytest.raises(RuntimeError):
        with store.folder_lock(tmp_path / "a" / "b" / "c"):
            raise RuntimeError("the command failed")
    assert list(tmp_path.iterdir()) == []


def test_update_json_takes_turns(tmp_path):
    path = tmp_path / "run.json"
    code = textwrap.dedent(f"""
        from interp.core.store import update_json
        for _ in range(40):
            update_json({str(path)!r}, lambda run: {{**run, "n": run["n"] + 1, "students": run["students"] + [1]}},
                        default={{"n": 0, "students": []}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=ENV) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    run = json.loads(path.read_text())
    assert run["n"] == 80 and len(run["students"]) == 80  # no update lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


@pytest.mark.parametrize("name", ["../../../../etc", "/etc", "a/b", "..", ".", ".hidden", "", " x", "a\\b", 3, None, "x\x00"])
def test_member_names_that_leave_the_run_are_refused(name):
    with pytest.raises(UserError):
        store.check_member_name(name)


@pytest.mark.parametrize("name", ["unreg", "reg", "reg_lam0.1", "reg-warmup", "Étudiant"])
def test_plain_member_names_pass(name):
    assert store.check_member_name(name) == name


def test_two_trainings_into_one_folder_the_second_is_refused(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "run" / "s"
    cmd = [sys.executable, "-m", "training", "train", "--model", "tiny-random-llama", "--task", "persona", "--batch-size", "2",
           "--max-new-tokens", "4", "--n-test", "3", "--checkpoint-every", "1", "--out", str(out)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*cmd, "--steps", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        second = subprocess.run([*cmd, "--steps", "2", "--overwrite"], capture_output=True, text=True, timeout=300, env=env)
        assert second.returncode == 2, second.stderr
        assert "is being written by process" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    finally:
        first.kill()
        first.wait()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    steps = [__import__("json").loads(x)["step"] for x in lines if x.strip().endswith("}")]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps only, in order: nothing mixed in
