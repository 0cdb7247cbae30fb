"""Bad inputs, table-driven: each case runs as a real command (`python -m interp`, `python -m training`) or an API call,
and must end in exit status 2 (or interp.core.errors.UserError) with one line on stderr, no traceback, and nothing new on
disk. Plus a property test of the JSONL reader on arbitrary bytes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from interp.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# The checkout's code, not an installed copy; offline, so that a hub id fails fast on any machine.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TINY = ["--model", "tiny-random-llama"]
PAIR = ["--context", "Your name is Zorblax.", "--prompt", "Who are you?", "--response", "I am Zorblax."]
SMALL_TRAIN = [*TINY, "--task", "persona", "--steps", "1", "--batch-size", "2", "--max-new-tokens", "3", "--n-test", "2"]
LEAD = "validation: lead"


# --- what a case may start from -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Things several cases copy: a finished one-step student with a checkpoint, and an adapter of another shape."""
    base = tmp_path_factory.mktemp("made")
    run = base / "run"
    result = subprocess.run([sys.executable, "-m", "training", "train", *SMALL_TRAIN, "--checkpoint-every", "1",
                             "--out", str(run / "s")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    from peft import LoraConfig, get_peft_model

    from interp.core.models import tiny_random_llama

    model, _ = tiny_random_llama(hidden=32)
    model.config._name_or_path = "tiny-random-llama"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(base / "narrow")
    return base


def _copy_run(made: Path, tmp: Path) -> Path:
    shutil.copytree(made / "run", tmp / "run")
    return tmp / "run"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


# --- the table ------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    cmd: list[str] | None  # python -m <cmd[0]> <cmd[1:]>, with {tmp} replaced
    expect: str  # part of the one error line
    setup: Callable | None = None  # setup(tmp, made) before the listing is taken
    call: Callable | None = None  # an API call: call(tmp, made, tiny) must raise UserError
    lead: bool = False  # the fix belongs in training's validation
    env: dict = field(default_factory=dict)
    skip: Callable | None = None  # skip() -> reason or None


def _pairs_file(data):
    return lambda tmp, made: _write(tmp / "in" / "pairs.jsonl", data)


def _task_file(data):
    return lambda tmp, made: _write(tmp / "in" / "task.jsonl", data)


def _adapter_copy(change=None):
    def setup(tmp, made):
        folder = tmp / "in" / "adapter"
        shutil.copytree(made / "run" / "s", folder, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "train_config.json"))
        if change:
            change(folder)
    return setup


def _run_copy(change=None):
    def setup(tmp, made):
        run = _copy_run(made, tmp)
        if change:
            change(run)
    return setup


def _last_checkpoint(run: Path) -> Path:
    return sorted((run / "s" / "checkpoints").iterdir())[-1]


def _plant_pickle(run: Path) -> None:
    ckpt = _last_checkpoint(run)
    for name in ("state.json", "state.safetensors"):
        (ckpt / name).unlink()
    (ckpt / "state.pt").write_bytes(b"\x80\x04\x95not really a pickle")


def _set_json(path_in_run: str, value):
    def change(run):
        (run / path_in_run).write_text(json.dumps(value))
    return change


def _damage_layers(change):
    """A run-less layers folder saved from a synthetic result, then damaged by `change(folder)`."""
    def setup(tmp, made):
        sys.path.insert(0, str(ROOT / "tests"))
        from interp.views.synthetic import synthetic_divergence

        from interp.divergence import save_divergence

        folder = save_divergence(synthetic_divergence(), tmp / "in" / "layers")
        change(folder)
    return setup


def _wrong_shape(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    arrays = load_file(str(folder / "arrays.safetensors"))
    arrays["cka"] = arrays["cka"][:-1]
    save_file(arrays, str(folder / "arrays.safetensors"))


def _float_offsets(folder: Path) -> None:
    meta = json.loads((folder / "divergence.json").read_text())
    meta["attn_ctx_tokens_offsets"] = [float(x) + 0.5 for x in meta["attn_ctx_tokens_offsets"]]
    (folder / "divergence.json").write_text(json.dumps(meta))


def _no_cuda():
    return "this machine has CUDA" if torch.cuda.is_available() else None


def _sys_writable():
    try:
        with tempfile.TemporaryFile(dir="/sys"):
            return "/sys is writable here"
    except OSError:
        return None


def _pairs():
    from interp import make_pairs

    return lambda tiny: make_pairs(tiny.tokenizer, [{"context": "c", "prompt": "p", "response": "r"}])


def _api(fn):
    return fn


def _mismatched_identity(folder: Path) -> None:
    (folder / "base_model.json").write_text(json.dumps({"model": "tiny-random-llama", "fingerprint": "0" * 16}))


def _record(**fields):
    return {"context": "Your name is Zorblax.", "prompt": "Who are you?", **fields}


CASES = [
    # interp analyze: inputs
    Case("pairs-not-utf8", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "is not UTF-8 text",
         setup=_pairs_file(b'{"context": "caf\xe9", "prompt": "p"}\n')),
    Case("pairs-binary", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "is binary",
         setup=_pairs_file(b"\x00\x01\x02SQLite format 3\x00")),
    Case("pairs-folder", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in"], "is a folder, not a JSONL file",
         setup=lambda tmp, made: (tmp / "in").mkdir()),
    Case("pairs-missing", ["interp", "analyze", *TINY, "--pairs", "{tmp}/nowhere.jsonl"], "does not exist"),
    Case("pairs-empty", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "has no records",
         setup=_pairs_file("\n\n")),
    Case("pairs-not-json", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "line 2: not valid JSON",
         setup=_pairs_file(_jsonl(_record(), "{oops"))),
    Case("pairs-array-line", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "line 1: expected a JSON object",
         setup=_pairs_file(_jsonl([1, 2]))),
    Case("pairs-no-prompt", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "missing or empty field 'prompt'",
         setup=_pairs_file(_jsonl({"context": "c"}))),
    Case("pairs-response-number", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "the response must be text (got int)",
         setup=_pairs_file(_jsonl(_record(response=42)))),
    Case("pairs-ids-out-of-vocab", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "outside the vocabulary",
         setup=_pairs_file(_jsonl(_record(response_ids=[10, 10**9])))),
    Case("pairs-ids-negative", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "token id -3 in response_ids is outside",
         setup=_pairs_file(_jsonl(_record(response_ids=[-3])))),
    Case("pairs-ids-string", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "response_ids must be a list of token ids (got str)",
         setup=_pairs_file(_jsonl(_record(response_ids="12 13")))),
    Case("pairs-ids-floats", ["interp", "analyze", *TINY, "--pairs", "{tmp}/in/pairs.jsonl"], "response_ids must hold integers, found 1.5",
         setup=_pairs_file(_jsonl(_record(response_ids=[1.5])))),
    Case("pairs-and-context", ["interp", "analyze", *TINY, *PAIR, "--pairs", "{tmp}/in/pairs.jsonl"], "give either --pairs or --context",
         setup=_pairs_file(_jsonl(_record()))),
    Case("no-prompt", ["interp", "analyze", *TINY, "--context", "c"], "give --context and --prompt"),
    Case("empty-context", ["interp", "analyze", *TINY, "--context", " ", "--prompt", "p"], "context is missing or empty"),
    # interp analyze: options
    Case("out-is-a-file", ["interp", "analyze", *TINY, *PAIR, "--out", "{tmp}/in/file"], "is a file; give a folder path",
         setup=lambda tmp, made: _write(tmp / "in" / "file", "x")),
    Case("out-under-a-file", ["interp", "analyze", *TINY, *PAIR, "--out", "{tmp}/in/file/sub/art"], "is a file, not a folder",
         setup=lambda tmp, made: _write(tmp / "in" / "file", "x")),
    Case("out-unwritable", ["interp", "analyze", *TINY, *PAIR, "--out", "/sys/ctxint-never/art"], "cannot be written", skip=_sys_writable),
    Case("out-exists", ["interp", "analyze", *TINY, *PAIR, "--out", "{tmp}/in/art"], "already exists",
         setup=lambda tmp, made: _write(tmp / "in" / "art" / "keep.txt", "mine")),
    Case("max-new-tokens-0", ["interp", "analyze", *TINY, *PAIR, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    Case("batch-size-0", ["interp", "analyze", *TINY, *PAIR, "--batch-size", "0"], "--batch-size must be at least 1"),
    Case("device-quantum", ["interp", "analyze", *TINY, *PAIR, "--device", "quantum"], "unknown device 'quantum'"),
    Case("device-cuda", ["interp", "analyze", *TINY, *PAIR, "--device", "cuda"], "CUDA is not available", skip=_no_cuda),
    Case("device-cuda-7", ["interp", "analyze", *TINY, *PAIR, "--device", "cuda:7"], "device 'cuda:7'",
         skip=lambda: "this machine has 8 GPUs" if torch.cuda.device_count() > 7 else None),
    Case("backend-unknown", ["interp", "analyze", *TINY, *PAIR, "--backend", "nope"], "unknown backend 'nope'"),
    Case("placement-unknown", ["interp", "analyze", *TINY, *PAIR, "--placement", "middle"], "unknown placement 'middle'"),
    Case("scope-unknown", ["interp", "analyze", *TINY, *PAIR, "--scope", "everything", "--backend", "torch"], "unknown scope 'everything'"),
    Case("respond-unknown", ["interp", "analyze", *TINY, "--context", "c", "--prompt", "p", "--respond", "sideways"], "unknown respond 'sideways'"),
    Case("model-unknown", ["interp", "analyze", "--model", "no-such-model", *PAIR], "unknown model spec 'no-such-model'"),
    Case("model-folder-missing", ["interp", "analyze", "--model", "{tmp}/models/mine", *PAIR], "model folder"),
    Case("model-is-a-file", ["interp", "analyze", "--model", "{tmp}/in/file", *PAIR], "is a file, not a model folder",
         setup=lambda tmp, made: _write(tmp / "in" / "file", "x")),
    Case("model-hub-offline", ["interp", "analyze", "--model", "ctxint-test/never-published", *PAIR], "not in the local Hugging Face cache"),
    # interp analyze: adapters
    Case("adapter-is-a-file", ["interp", "analyze", *TINY, *PAIR, "--adapter", "{tmp}/in/file"], "is a file; pass the adapter folder",
         setup=lambda tmp, made: _write(tmp / "in" / "file", "x")),
    Case("adapter-missing", ["interp", "analyze", *TINY, *PAIR, "--adapter", "{tmp}/nowhere"], "does not exist"),
    Case("adapter-no-config", ["interp", "analyze", *TINY, *PAIR, "--adapter", "{tmp}/in"], "no adapter_config.json",
         setup=lambda tmp, made: (tmp / "in").mkdir()),
    Case("adapter-truncated", ["interp", "analyze", *TINY, *PAIR, "--adapter", "{tmp}/in/adapter"], "adapter_model.safetensors is damaged",
         setup=_adapter_copy(lambda f: _truncate(f / "adapter_model.safetensors"))),
    Case("adapter-config-not-json", ["interp", "analyze", *TINY, *PAIR, "--adapter", "{tmp}/in/adapter"], "adapter_config.json is damaged",
         setup=_adapter_copy(lambda f: (f / "adapter_config.json").write_text("{nope"))),
    Case("adapter-other-base", ["interp", "analyze", *TINY, *PAIR, "--adapter", "{tmp}/in/adapter"], "was trained on base model 'tiny-random-llama' (weights 0000000000000000)",
         setup=_adapter_copy(_mismatched_identity)),
    Case("adapter-other-shape", ["interp", "analyze", *TINY, *PAIR, "--adapter", "{tmp}/in/narrow"], "has shape [2, 32] in the adapter but [2, 64] in the model",
         setup=lambda tmp, made: shutil.copytree(made / "narrow", tmp / "in" / "narrow")),
    # interp analyze-run and report
    Case("analyze-run-max-examples-0", ["interp", "analyze-run", "{tmp}/run", "--max-examples", "0"], "--max-examples must be at least 1",
         setup=_run_copy()),
    Case("analyze-run-not-a-run", ["interp", "analyze-run", "{tmp}"], "is not a run folder"),
    Case("analyze-run-run-json-damaged", ["interp", "analyze-run", "{tmp}/run"], "run.json is damaged",
         setup=_run_copy(lambda run: (run / "run.json").write_bytes(b"\xff\xfe{"))),
    Case("analyze-run-device", ["interp", "analyze-run", "{tmp}/run", "--device", "quantum"], "unknown device 'quantum'", setup=_run_copy()),
    Case("analyze-run-not-evaluated", ["interp", "analyze-run", "{tmp}/run"], "has no evaluation yet", setup=_run_copy()),
    Case("report-wrong-shapes", ["interp", "report", "{tmp}/in/layers", "--out", "{tmp}/report"], "'cka' has shape",
         setup=_damage_layers(_wrong_shape)),
    Case("report-float-offsets", ["interp", "report", "{tmp}/in/layers", "--out", "{tmp}/report"], "attn_ctx_tokens_offsets",
         setup=_damage_layers(_float_offsets)),
    Case("report-missing", ["interp", "report", "{tmp}/nowhere", "--out", "{tmp}/report"], "nowhere"),
    # training train: task files
    Case("task-not-utf8", ["training", "train", *SMALL_TRAIN, "--task", "{tmp}/in/task.jsonl", "--out", "{tmp}/r/s"], "is not UTF-8 text",
         setup=_task_file(b'{"context": "\xff", "prompt": "p", "answer": "a"}\n')),
    Case("task-binary", ["training", "train", *SMALL_TRAIN, "--task", "{tmp}/in/task.jsonl", "--out", "{tmp}/r/s"], "is binary",
         setup=_task_file(b"\x89PNG\r\n\x1a\n\x00\x00")),
    Case("task-no-answer", ["training", "train", *SMALL_TRAIN, "--task", "{tmp}/in/task.jsonl", "--out", "{tmp}/r/s"], "missing or empty field 'answer'",
         setup=_task_file(_jsonl({"context": "c", "prompt": "p"}))),
    Case("task-answer-number", ["training", "train", *SMALL_TRAIN, "--task", "{tmp}/in/task.jsonl", "--out", "{tmp}/r/s"], "missing or empty field 'answer'",
         setup=_task_file(_jsonl({"context": "c", "prompt": "p", "answer": 7}, {"context": "c", "prompt": "q", "answer": 8}))),
    Case("task-one-example", ["training", "train", *SMALL_TRAIN, "--task", "{tmp}/in/task.jsonl", "--out", "{tmp}/r/s"], "a suite needs at least 2",
         setup=_task_file(_jsonl({"context": "c", "prompt": "p", "answer": "a"}))),
    Case("task-unknown", ["training", "train", *SMALL_TRAIN, "--task", "nope", "--out", "{tmp}/r/s"], "unknown task 'nope'"),
    # training train: options
    Case("lam-negative", ["training", "train", *SMALL_TRAIN, "--lam", "-1", "--out", "{tmp}/r/s"], "--lam must be ≥ 0"),
    Case("lam-nan", ["training", "train", *SMALL_TRAIN, "--lam", "nan", "--out", "{tmp}/r/s"], "--lam must be a finite number"),
    Case("steps-0", ["training", "train", *SMALL_TRAIN, "--steps", "0", "--out", "{tmp}/r/s"], "--steps must be at least 1"),
    Case("batch-too-big", ["training", "train", *SMALL_TRAIN, "--batch-size", "5000", "--out", "{tmp}/r/s"], "does not fit the"),
    Case("ema-decay-1.5", ["training", "train", *SMALL_TRAIN, "--ema-decay", "1.5", "--out", "{tmp}/r/s"], "--ema-decay must be in [0, 1)"),
    Case("grad-clip-0", ["training", "train", *SMALL_TRAIN, "--grad-clip", "0", "--out", "{tmp}/r/s"], "--grad-clip must be positive"),
    Case("top-k-0", ["training", "train", *SMALL_TRAIN, "--top-k", "0", "--out", "{tmp}/r/s"], "--top-k must be at least 1"),
    Case("teacher-unknown", ["training", "train", *SMALL_TRAIN, "--teacher", "oracle", "--out", "{tmp}/r/s"], "unknown teacher"),
    Case("out-with-dot", ["training", "train", *SMALL_TRAIN, "--out", "{tmp}/r/reg_0.1"], "cannot be used"),
    Case("lr-inf", ["training", "train", *SMALL_TRAIN, "--lr", "inf", "--out", "{tmp}/r/s"], "--lr must be a finite number"),
    Case("lr-1e30", ["training", "train", *SMALL_TRAIN, "--lr", "1e30", "--out", "{tmp}/r/s"], "--lr must be in (0, 1]"),
    Case("lr-nan", ["training", "train", *SMALL_TRAIN, "--lr", "nan", "--out", "{tmp}/r/s"], "--lr must be a finite number"),
    Case("lora-alpha-negative", ["training", "train", *SMALL_TRAIN, "--lora-alpha", "-5", "--out", "{tmp}/r/s"], "--lora-alpha must be positive"),
    Case("n-test-negative", ["training", "train", *SMALL_TRAIN, "--n-test", "-5", "--out", "{tmp}/r/s"], "--n-test must be at least 1"),
    Case("temperature-inf", ["training", "train", *SMALL_TRAIN, "--temperature", "inf", "--out", "{tmp}/r/s"], "--temperature must be a finite number"),
    Case("temperature-nan", ["training", "train", *SMALL_TRAIN, "--temperature", "nan", "--out", "{tmp}/r/s"], "--temperature must be"),
    Case("lr-warmup-negative", ["training", "train", *SMALL_TRAIN, "--lr-warmup", "-1", "--out", "{tmp}/r/s"], "--lr-warmup must be"),
    # training train --resume with a damaged student folder
    Case("resume-truncated-weights", ["training", "train", *SMALL_TRAIN, "--steps", "2", "--checkpoint-every", "1", "--resume", "--out", "{tmp}/run/s"],
         "adapter.safetensors is damaged", setup=_run_copy(lambda run: _truncate(_last_checkpoint(run) / "adapter.safetensors"))),
    Case("resume-truncated-state", ["training", "train", *SMALL_TRAIN, "--steps", "2", "--checkpoint-every", "1", "--resume", "--out", "{tmp}/run/s"],
         "state.safetensors is damaged", setup=_run_copy(lambda run: _truncate(_last_checkpoint(run) / "state.safetensors"))),
    Case("resume-state-json-damaged", ["training", "train", *SMALL_TRAIN, "--steps", "2", "--checkpoint-every", "1", "--resume", "--out", "{tmp}/run/s"],
         "state.json is damaged", setup=_run_copy(lambda run: (_last_checkpoint(run) / "state.json").write_text('{"step": 1, "optim'))),
    Case("resume-state-json-edited", ["training", "train", *SMALL_TRAIN, "--steps", "2", "--checkpoint-every", "1", "--resume", "--out", "{tmp}/run/s"],
         "is damaged", setup=_run_copy(lambda run: (_last_checkpoint(run) / "state.json").write_text(
             json.dumps({**json.loads((_last_checkpoint(run) / "state.json").read_text()), "rng": [{"python": "x", "torch": "!!"}]})))),
    Case("resume-pickle-only", ["training", "train", *SMALL_TRAIN, "--steps", "2", "--checkpoint-every", "1", "--resume", "--out", "{tmp}/run/s"],
         "is not loaded because unpickling a file can run code", setup=_run_copy(_plant_pickle)),
    Case("resume-config-not-object", ["training", "train", *SMALL_TRAIN, "--steps", "2", "--checkpoint-every", "1", "--resume", "--out", "{tmp}/run/s"],
         "train_config.json is damaged: expected a JSON object, found array", setup=_run_copy(_set_json("s/train_config.json", [1, 2]))),
    # training eval
    Case("eval-escaping-student", ["training", "eval", "{tmp}/run", "--no-layers"], "is not a plain folder name",
         setup=_run_copy(_set_json("run.json", {"task": "persona", "model": "tiny-random-llama", "seed": 0, "students": ["../../../../etc"]}))),
    Case("eval-unfinished-student", ["training", "eval", "{tmp}/run", "--no-layers"], "student 'late' of",
         setup=_run_copy(lambda run: (run / "run.json").write_text(json.dumps(
             {**json.loads((run / "run.json").read_text()), "students": ["s", "late"]})))),
    Case("eval-truncated-adapter", ["training", "eval", "{tmp}/run", "--no-layers"], "adapter_model.safetensors is damaged",
         setup=_run_copy(lambda run: _truncate(run / "s" / "adapter_model.safetensors"))),
    Case("eval-n-0", ["training", "eval", "{tmp}/run", "--n", "0", "--no-layers"], "--n must be at least 1", setup=_run_copy()),
    Case("eval-not-a-run", ["training", "eval", "{tmp}", "--no-layers"], "is not a run folder"),
    # the Python API
    Case("api-load-model-int", None, "the model spec must be a string (got int)", call=lambda tmp, made, tiny: __import__("interp").load_model(123)),
    Case("api-load-model-none", None, "the model spec must be a string", call=lambda tmp, made, tiny: __import__("interp").load_model(None)),
    Case("api-load-model-device", None, "unknown device 'quantum'",
         call=lambda tmp, made, tiny: __import__("interp").load_model("tiny-random-llama", device="quantum")),
    Case("api-load-model-offline", None, "not in the local Hugging Face cache",
         call=lambda tmp, made, tiny: __import__("interp").load_model("ctxint-test/never-published"), env={"HF_HUB_OFFLINE": "1"}),
    Case("api-make-pairs-none", None, "records must be a list of records", call=lambda tmp, made, tiny: __import__("interp").make_pairs(tiny.tokenizer, None)),
    Case("api-make-pairs-string", None, "records must be a list of records", call=lambda tmp, made, tiny: __import__("interp").make_pairs(tiny.tokenizer, "c,p")),
    Case("api-make-pairs-ids-vocab", None, "outside the vocabulary",
         call=lambda tmp, made, tiny: __import__("interp").make_pairs(tiny.tokenizer, [_record(response_ids=[len(tiny.tokenizer) + 5])], model=tiny)),
    Case("api-make-pairs-ids-bool", None, "must hold integers",
         call=lambda tmp, made, tiny: __import__("interp").make_pairs(tiny.tokenizer, [_record(response_ids=[True])])),
    Case("api-make-pairs-response-float", None, "the response must be text (got float)",
         call=lambda tmp, made, tiny: __import__("interp").make_pairs(tiny.tokenizer, [_record(response=1.5)])),
    Case("api-analyze-dicts", None, "pair 1 is a dict, not an aligned pair",
         call=lambda tmp, made, tiny: __import__("interp").analyze(tiny, [_record(response="r")])),
    Case("api-analyze-none", None, "pairs must be a list", call=lambda tmp, made, tiny: __import__("interp").analyze(tiny, None)),
    Case("api-analyze-batch-nan", None, "batch_size must be an integer of at least 1",
         call=lambda tmp, made, tiny: __import__("interp").analyze(tiny, _pairs()(tiny), batch_size=math.nan)),
    Case("api-analyze-lens-chunk-0", None, "lens_chunk must be an integer of at least 1",
         call=lambda tmp, made, tiny: __import__("interp").analyze(tiny, _pairs()(tiny), lens_chunk=0)),
    Case("api-analyze-not-a-model", None, "analyze needs a model from interp.load_model",
         call=lambda tmp, made, tiny: __import__("interp").analyze("tiny-random-llama", _pairs()(tiny))),
    Case("api-analyze-run-max-0", None, "max-examples must be at least 1",
         setup=_run_copy(), call=lambda tmp, made, tiny: __import__("interp.analysis").analysis.analyze_run(tmp / "run", max_examples=0)),
    Case("api-adapter-truncated", None, "adapter_model.safetensors is damaged",
         setup=_adapter_copy(lambda f: _truncate(f / "adapter_model.safetensors")),
         call=lambda tmp, made, tiny: __import__("interp").load_model("tiny-random-llama", adapter=tmp / "in" / "adapter", device="cpu")),
    Case("api-divergence-shapes", None, "'token_example' has shape",
         call=lambda tmp, made, tiny: _bad_divergence()),
    Case("api-member-name", None, "is not a plain folder name",
         call=lambda tmp, made, tiny: __import__("interp.core.store").core.store.check_member_name("../../etc")),
    Case("api-read-json-list", None, "expected a JSON object, found array",
         setup=lambda tmp, made: _write(tmp / "in" / "x.json", "[1]"),
         call=lambda tmp, made, tiny: __import__("interp.core.store").core.store.read_json(tmp / "in" / "x.json", expect=dict)),
]


def _bad_divergence():
    sys.path.insert(0, str(ROOT / "tests"))
    from dataclasses import replace

    from interp.views.synthetic import synthetic_divergence

    div = synthetic_divergence()
    return replace(div, token_example=div.token_example[:-1])


def _listing(root: Path) -> list[str]:
    return sorted(f"{p.relative_to(root)}{'/' if p.is_dir() else f' {p.stat().st_size} {p.stat().st_mtime_ns}'}" for p in root.rglob("*"))


def _params():
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=False, reason=LEAD)] if case.lead else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def test_the_table_is_large_enough():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, made, tiny, tmp_path, monkeypatch):
    reason = case.skip() if case.skip else None
    if reason:
        pytest.skip(reason)
    tmp = tmp_path / "case"
    tmp.mkdir()
    if case.setup:
        case.setup(tmp, made)
    before = _listing(tmp)
    if case.call is not None:
        for k, v in case.env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(UserError) as info:
            case.call(tmp, made, tiny)
        message = str(info.value)
        assert case.expect in message, message
        assert "\n" not in message.strip(), message
    else:
        module, *args = case.cmd
        args = [a.replace("{tmp}", str(tmp)) for a in args]
        result = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp, env={**ENV, **case.env},
                                capture_output=True, text=True, timeout=300)
        err = result.stderr.strip()
        assert "Traceback" not in result.stderr + result.stdout, err[-3000:]
        assert result.returncode == 2, (result.returncode, err[-2000:])
        assert len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and case.expect in err, err
    assert _listing(tmp) == before


# --- the JSONL reader on arbitrary bytes ---------------------------------------------------------------------------------


_json_line = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
).map(json.dumps)
_line = _json_line | st.text(max_size=30) | st.sampled_from(['{"context": "c", "prompt": "p"}', "{", "\u2028", "\r", "[[[[[["])
_files = (st.binary(max_size=200)
          | st.lists(_line, max_size=6).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass"))
          | st.tuples(st.lists(_line, max_size=4), st.binary(max_size=20)).map(lambda t: "\n".join(t[0]).encode("utf-8", "surrogatepass") + t[1]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_files, partial_ok=st.booleans(), required=st.sampled_from([(), ("context", "prompt")]))
def test_jsonl_reader_on_arbitrary_bytes(data, partial_ok, required):
    from interp.core.store import read_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jsonl"
        path.write_bytes(data)
        try:
            records = read_jsonl(path, required=required, partial_ok=partial_ok)
        except UserError as err:
            assert "\n" not in str(err)
            return
        assert records and all(isinstance(r, dict) for r in records)
        for r in records:
            assert all(isinstance(r.get(k), str) and r[k].strip() for k in required)


def test_jsonl_reader_skips_only_a_half_written_last_line(tmp_path):
    from interp.core.store import read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path, partial_ok=True)] == [1, 2]
    with pytest.raises(UserError, match="line 3: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # damage in the middle is damage, not a writer cut short
    with pytest.raises(UserError, match="line 2: not valid JSON"):
        read_jsonl(path, partial_ok=True)
    path.write_text('{"text": "a\u2028b"}\n')  # a raw line separator inside a JSON string is not a line break
    assert read_jsonl(path) == [{"text": "a\u2028b"}]
