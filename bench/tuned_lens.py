"""The tuned lens on the embedded model: held-out KL(final ‖ lens_l) per layer for the logit lens and the tuned lens
(the tuned-lens paper's figure), and whether the base's lens transfers to a LoRA student.

Transfer: on the student's activations (the student reads the same held-out answers), KL(final_S ‖ lens_l) for the
logit lens, the base's tuned lens, and a tuned lens trained on the student with the same text and settings.

    python -m interp tune-lens --model smollm2-135m-instruct            # the base's lens, in the cache
    python -m training train --out runs/persona/unreg --task persona --steps 10 ...
    python bench/tuned_lens.py student --adapter runs/persona/unreg --student-lens /tmp/student-lens
    python bench/tuned_lens.py report --adapter runs/persona/unreg --student-lens /tmp/student-lens --out docs

Writes OUT/tuned_lens.md (tables), OUT/tuned_lens.html (plotly figure) and OUT/tuned_lens.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from interp.core.adapters import base_identity
from interp.core.models import EMBEDDED, load_model, quiet_known_warnings
from interp.core.store import atomic_write_json, atomic_write_text, read_jsonl
from interp.tuned_lens import (SAMPLES_FILE, TuneSettings, _pairs, heldout_kl, load_lens, model_dir, resolve_lens,
                               tune_lens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["student", "report"], help="student: train the student's own lens (it can run "
                        "while the base's trains, once the base's answers are sampled); report: measure and write")
    parser.add_argument("--model", default=EMBEDDED)
    parser.add_argument("--adapter", type=Path, help="a student adapter folder (transfer); left out: the base's table only")
    parser.add_argument("--student-label", help="how the report names the student (default: the --adapter path)")
    parser.add_argument("--student-lens", type=Path, default=Path("/tmp/student-tuned-lens"), help="where the student's own lens is trained")
    parser.add_argument("--steps", type=int, default=TuneSettings().steps, help="the student lens's steps (as the base's)")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_known_warnings()

    lm = load_model(args.model, device="cpu")
    if args.phase == "student":
        if args.adapter is None:
            raise SystemExit("the student phase needs --adapter")
        args.student_lens.mkdir(parents=True, exist_ok=True)
        cache = model_dir(base_identity(lm))
        for name in (SAMPLES_FILE, "data.json"):  # the same text as the base's lens: the student reads the same answers
            if not (args.student_lens / name).exists():
                shutil.copy(cache / name, args.student_lens / name)
        data = json.loads((cache / "data.json").read_text())  # the base's text settings, so its answers are reused
        name = lm.load_adapter(args.adapter, name="student")
        with lm.use(name):
            tune_lens(lm, TuneSettings(steps=args.steps, **data), folder=args.student_lens, progress=True)
        return
    base_lens = resolve_lens(lm, "tuned")
    assert base_lens is not None
    result: dict = {"model": args.model, "identity": base_identity(lm), "base_lens": base_lens.describe(),
                    "base": base_lens.meta["heldout"], "n_heldout_tokens": base_lens.meta.get("n_heldout_tokens"),
                    "settings": base_lens.meta.get("settings")}
    if args.adapter is not None:
        name = lm.load_adapter(args.adapter, name="student")
        student_lens = load_lens(args.student_lens / "lens", lm)
        with lm.use(name):
            samples = read_jsonl(args.student_lens / SAMPLES_FILE, allow_empty=True)
            held = _pairs(lm, [s for s in samples if s["heldout"]])
            base_on_student = heldout_kl(lm, base_lens, held)
        result["transfer"] = {"adapter": args.student_label or str(args.adapter), "logit": student_lens.meta["heldout"]["logit"],
                              "base_lens": base_on_student, "student_lens": student_lens.meta["heldout"]["tuned"],
                              "student_lens_settings": student_lens.meta["settings"]}
    write(result, args.out)


def write(result: dict, out: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    base = result["base"]
    L = len(base["logit"])
    layers = list(range(L))
    lines = [f"# The tuned lens on {result['model']}", "",
             "Held-out KL(final ‖ lens_l), nats, token mean over the answers to held-out prompts (both runs, with and "
             f"without the context; {result.get('n_heldout_tokens')} tokens). Lens: {result['base_lens'].get('steps')} steps, "
             f"{result['base_lens'].get('tokens_seen')} training tokens (`python -m interp tune-lens`, settings "
             f"{result.get('settings')}). "
             "Written by `bench/tuned_lens.py`; figure: `tuned_lens.html`.", ""]
    transfer = result.get("transfer")
    head = "| layer | logit lens | tuned lens |"
    rule = "| ---: | ---: | ---: |"
    if transfer:
        head += " student: logit lens | student: base's tuned lens | student: its own tuned lens |"
        rule += " ---: | ---: | ---: |"
    lines += [head, rule]
    for layer in layers:
        row = f"| {layer} | {base['logit'][layer]:.3f} | {base['tuned'][layer]:.3f} |"
        if transfer:
            row += f" {transfer['logit'][layer]:.3f} | {transfer['base_lens'][layer]:.3f} | {transfer['student_lens'][layer]:.3f} |"
        lines.append(row)
    mean = lambda xs: sum(xs[:-1]) / max(len(xs) - 1, 1)  # noqa: E731 - layers 0..L-2 (the last is the same for all)
    row = f"| mean 0..{L - 2} | {mean(base['logit']):.3f} | {mean(base['tuned']):.3f} |"
    if transfer:
        row += f" {mean(transfer['logit']):.3f} | {mean(transfer['base_lens']):.3f} | {mean(transfer['student_lens']):.3f} |"
    lines += [row, ""]
    lines += ["Columns: *logit lens* `KL(final ‖ unembed(final_norm(h_l)))`; *tuned lens* the same through the base's "
              "translators `h + A_l h + b_l`. The last layer is identical by construction (no translator there).", ""]
    if transfer:
        lines += ["Transfer: the same held-out answers read through a LoRA student (its activations, its own final "
                  "distribution); *base's tuned lens* is the base model's lens applied unchanged, *its own tuned lens* one "
                  "trained on the student with the same text and settings "
                  f"({transfer['student_lens_settings']['steps']} steps). Student: {transfer['adapter']}.", ""]
        gaps = [b - o for b, o in zip(transfer["base_lens"][:-1], transfer["student_lens"][:-1])]
        worst = max(range(len(gaps)), key=lambda i: abs(gaps[i]))
        lines += [f"Reading: the tuned lens lowers the held-out KL at every layer below the last (mean over layers 0..{L - 2}: "
                  f"{mean(base['logit']):.2f} → {mean(base['tuned']):.2f} nats). On the student, the base's lens reads within "
                  f"{abs(gaps[worst]):.3f} nats of the student's own lens at every layer (largest gap at layer {worst}; "
                  f"means {mean(transfer['base_lens']):.3f} and {mean(transfer['student_lens']):.3f}): one lens per base "
                  "model serves its students, as the tuned-lens paper reports for fine-tunes.", ""]
    atomic_write_text(out / "tuned_lens.md", "\n".join(lines))
    atomic_write_json(out / "tuned_lens.json", result)

    layers = layers[:-1]  # the last layer's KL is 0 by construction: nothing to draw on a log axis
    fig = make_subplots(rows=1, cols=2 if transfer else 1, subplot_titles=["base model"] + (["LoRA student"] if transfer else []))
    fig.add_trace(go.Scatter(x=layers, y=base["logit"][: L - 1], name="logit lens", line=dict(color="#d62728")), 1, 1)
    fig.add_trace(go.Scatter(x=layers, y=base["tuned"][: L - 1], name="tuned lens", line=dict(color="#1f77b4")), 1, 1)
    if transfer:
        fig.add_trace(go.Scatter(x=layers, y=transfer["logit"][: L - 1], name="student: logit lens", line=dict(color="#d62728", dash="dot")), 1, 2)
        fig.add_trace(go.Scatter(x=layers, y=transfer["base_lens"][: L - 1], name="student: base's tuned lens", line=dict(color="#1f77b4", dash="dot")), 1, 2)
        fig.add_trace(go.Scatter(x=layers, y=transfer["student_lens"][: L - 1], name="student: own tuned lens", line=dict(color="#2ca02c", dash="dash")), 1, 2)
    fig.update_yaxes(type="log", title="KL(final ‖ lens_l), nats")
    fig.update_xaxes(title=f"layer (0..{L - 2}; at {L - 1}, the last, every lens is the model: KL 0)")
    fig.update_layout(title=f"Held-out KL to the final layer: logit lens vs tuned lens ({result['model']})", height=420)
    atomic_write_text(out / "tuned_lens.html", fig.to_html(include_plotlyjs="cdn", full_html=True))


if __name__ == "__main__":
    main()
