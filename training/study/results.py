"""A study's results: study.json, study.csv, summary.md, rows.jsonl.gz and frontier.html under results/<study>/,
gathered from the cells' evaluations (judged by each suite entry's verifiers)."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from interp.core.runs import RUN_FILE, TRAIN_CONFIG_FILE
from interp.core.studies import STUDY_ROWS_FILE, calibration_line, format_stat, write_study_rows
from interp.core.store import atomic_write_json, atomic_write_text, read_json
from training import stats
from training.study import calibration, records
from training.study.plan import Cell, Study, check_results, suite_settings
from training.study.seed_level import COMPARED, compare, holm_family, measure_model, measure_setting

# The rates the study summarizes over seeds (docs/measures.md#evaluation).
SUMMARY = ("acc_noctx", "acc_ctx", "harm", "ctx_drop", "degenerate_noctx", "degenerate_ctx", "truncated_ctx", "len_ratio",
           "follow_cf", "drift")


# --- results ---------------------------------------------------------------------------------------------------------


def collect(study: Study) -> dict:
    """study.json: per cell the student's scores and intervals; per (suite, student) mean ± sd over seeds; the base
    model and teacher per suite; paired comparisons with the first student."""
    cells: list[dict[str, Any]] = []
    for c in study.cells():
        ev = c.evaluation()
        if ev is None:
            continue
        cells.append({"suite": c.suite, "seed": c.seed, "student": c.student.name, "lam": c.student.lam,
                      "settings": c.student.settings, "scores": ev.scores, "intervals": ev.intervals})
    references: list[dict[str, Any]] = []
    for suite in study.suites:
        for seed in study.seeds:
            base = study.base_evaluation(suite, seed)
            if base is None:
                continue
            for name in ("base", "teacher"):
                references.append({"suite": suite, "seed": seed, "model": name, "scores": base.scores, "intervals": base.intervals})
    summary = []
    for suite in study.suites:
        for student in study.students:
            mine = [c for c in cells if c.get("suite") == suite and c["student"] == student.name]
            if mine:
                summary.append({"suite": suite, "student": student.name, "lam": student.lam, "settings": student.settings,
                                "seeds": [c["seed"] for c in mine], **_over_seeds([c["scores"] for c in mine])})
        refs = [r for r in references if r["suite"] == suite and r["model"] == "base"]
        if refs:
            for name in ("base", "teacher"):
                summary.append({"suite": suite, "student": name, "lam": None, "settings": {}, "seeds": [r["seed"] for r in refs],
                                **_over_seeds([_as_teacher(r["scores"]) if name == "teacher" else r["scores"] for r in refs])})
    settings, comparisons = seed_level(study)
    data = {**study.fingerprint(), "role": study.role, "suites": study.suites, "suite_settings": suite_settings(study), "seeds": study.seeds,
            "steps": study.steps, "train": study.train,
            "eval": asdict(study.eval), "budgets": study.eval.cuts, "n_test": study.n_test, "health_margin": study.health_margin,
            "students": [{"name": s.name, "settings": s.settings, "seeds": s.seeds} for s in study.students],
            "cells": cells, "references": references, "summary": summary, "paired": _paired(study),
            "settings": settings, "comparisons": comparisons}
    if study.role == "calibration":
        pick, passes, _ = calibration.choose(data)
    else:  # only a calibration chooses; a study's gate reports whether any setting passes
        pick, passes = None, bool(calibration.passing(data))
    planned = len(study.cells())
    data["gate"] = {"choice": pick, "passes": passes, "absorb_share": calibration.ABSORB_SHARE,
                    "cells": [len(cells), planned], "complete": len(cells) == planned}
    if study.calibration is not None:
        data["calibrated_by"] = study.calibration
    return data


def _rows(study: Study) -> tuple[dict, dict, dict]:
    """The evaluated rows: students[(suite, name)][seed], base[suite][seed], and each student cell's drift."""
    students: dict = {}
    drift: dict = {}
    for c in study.cells():
        ev = c.evaluation()
        if ev is not None:
            students.setdefault((c.suite, c.student.name), {})[c.seed] = ev.rows
            drift.setdefault((c.suite, c.student.name), {})[c.seed] = ev.scores.get("drift")
    base: dict = {}
    for suite in study.suites:
        for seed in study.seeds:
            ev = study.base_evaluation(suite, seed)
            if ev is not None:
                base.setdefault(suite, {})[seed] = ev.rows
    return students, base, drift


def seed_level(study: Study) -> tuple[list[dict], list[dict]]:
    """Per suite, model and budget every measure over seeds (training.study.seed_level); the base and the teacher (the
    base read with the context) as references; each student compared with the first student, pooled over seeds,
    at the full budget, with Holm's correction across all the study's comparisons."""
    students, base, drift = _rows(study)
    full = study.eval.max_new_tokens
    out: list[dict] = []
    for suite in study.suites:
        b = base.get(suite)
        if not b:
            continue
        for budget in study.eval.cuts:
            out.append({"suite": suite, "model": "base", "lam": None, "budget": budget, "seeds": sorted(b),
                        **measure_model(b, budget, full)})
            for s in study.students:
                mine = students.get((suite, s.name))
                if mine:
                    out.append({"suite": suite, "model": s.name, "lam": s.lam, "settings": s.settings, "budget": budget,
                                **measure_setting(mine, b, budget, full, margin=study.health_margin,
                                                  drift=drift.get((suite, s.name)))})
    comparisons: list[dict] = []
    ref = study.students[0]
    for suite in study.suites:
        a_ref = students.get((suite, ref.name))
        for s in study.students[1:]:
            mine = students.get((suite, s.name))
            if not mine or not a_ref:
                continue
            for key in COMPARED:
                better_high = key != "degenerate_ctx"
                comparisons.append({"suite": suite, "model": s.name, "vs": ref.name,
                                    **compare(mine, a_ref, key, full, full, higher_is_better=better_high)})
    holm_family(comparisons)
    return out, comparisons


def _as_teacher(scores: dict) -> dict:
    """The teacher is the base model read with the context, always: both of its columns are the base's with-context
    answers (acc, loops, truncation), so it has no harm to report (nothing to lose by adding a context it has)."""
    return {**scores, "acc_noctx": scores.get("acc_ctx"), "degenerate_noctx": scores.get("degenerate_ctx"),
            "truncated_noctx": scores.get("truncated_ctx"), "harm": None, "ctx_drop": 0.0, "len_ratio": 1.0}


def _over_seeds(scores: list[dict]) -> dict:
    out = {}
    for k in SUMMARY:
        m, sd, n = stats.mean_sd([s.get(k) for s in scores])
        out[k] = {"mean": m, "sd": sd, "n": n}
    return out


def _paired(study: Study) -> list[dict]:
    """Each student against the first one on the same examples (with the context), per suite and seed."""
    out = []
    ref = study.students[0]
    for c in study.cells():
        a = None if c.student is ref else c.evaluation()
        if a is None:
            continue
        b = Cell(study, c.suite, c.seed, ref).evaluation()  # the same checks as the student's: settings, current adapter
        if b is None or len(a.rows) != len(b.rows):
            continue
        out.append({"suite": c.suite, "seed": c.seed, "student": c.student.name, "vs": ref.name,
                    **stats.paired([r.correct_ctx for r in a.rows], [r.correct_ctx for r in b.rows])})
    return out


CSV_COLUMNS = ["suite", "student", "lam", "seeds"] + [f"{k}_{p}" for k in SUMMARY for p in ("mean", "sd")]


def write_results(study: Study) -> dict:
    """results/<study>/study.json, study.csv (one row per suite and student, mean and sd over seeds), summary.md (the
    same as markdown tables, with the gate and the comparisons), rows.jsonl.gz (every answer) and cells/ (each
    finished cell's record, training.study.records). The figures are the
    views' (interp.views.plots.write_study_figures), written by the study command after each of these."""
    folder = check_results(study)
    write_records(study)  # first: each finished cell kept beside the results, for a resume on another machine
    data = collect(study)
    atomic_write_json(folder / "study.json", data)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for row in data["summary"]:
        flat = {"suite": row["suite"], "student": row["student"], "lam": row["lam"], "seeds": " ".join(map(str, row["seeds"]))}
        for k in SUMMARY:
            flat[f"{k}_mean"] = _fmt(row[k]["mean"])
            flat[f"{k}_sd"] = _fmt(row[k]["sd"])
        writer.writerow(flat)
    atomic_write_text(folder / "study.csv", buf.getvalue())
    atomic_write_text(folder / "summary.md", markdown(data))
    write_study_rows(folder / STUDY_ROWS_FILE, study_rows_records(study))
    return data


def write_records(study: Study) -> int:
    """Record every cell the run folders hold evaluated, and each run folder's base model (training.study.records);
    returns how many records were written or rewritten. Called with the results, so records follow each cell."""
    written = 0
    bases: set[Path] = set()
    for c in study.cells():
        if c.run_dir in bases or not (c.run_dir / RUN_FILE).exists():
            continue
        ev = study.local_base(c.suite, c.seed)
        if ev is not None:
            bases.add(c.run_dir)
            written += records.write_record(study.record_path(c.suite, c.seed, "base"), "base", c.run_dir, ev)
    cells = study.cells()
    for i in study.trained_cells():
        c = cells[i]
        ev = c.local_evaluation()
        if ev is not None:
            config = read_json(c.out / TRAIN_CONFIG_FILE, expect=dict)
            written += records.write_record(c.record_path(), c.student.name, c.run_dir, ev, config)
    return written


def study_rows_records(study: Study) -> list[dict]:
    """Every evaluated answer of the study (students and the base, per suite and seed), for rows.jsonl.gz."""
    students, base, _ = _rows(study)
    records = []
    for suite in study.suites:
        for seed, rows in sorted((base.get(suite) or {}).items()):
            records += [{"suite": suite, "seed": seed, **asdict(r)} for r in rows]
        for s in study.students:
            for seed, rows in sorted((students.get((suite, s.name)) or {}).items()):
                records += [{"suite": suite, "seed": seed, **asdict(r)} for r in rows]
    return records


def _fmt(v):
    """A CSV cell: empty for a statistic no example defines, "NaN" for one that is not a number."""
    if v is None:
        return ""
    return str(v) if isinstance(v, float) and not math.isfinite(v) else round(v, 4)


MARKDOWN = ("acc_noctx", "acc_ctx", "harm", "degenerate_noctx", "degenerate_ctx", "truncated_ctx", "follow_cf", "ctx_drop", "drift")


def _num(v, digits: int = 2) -> str:
    """A number as the tables show it: "–" undefined (no example defines it), "NaN" a value that is not a number."""
    if v is None:
        return "–"
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return f"{v:+.{digits}f}" if digits < 0 else f"{v:.{digits}f}"


def _ci(stat: dict | None, signed: bool = False) -> str:
    """"0.23 [0.10, 0.35]": a mean over seeds with its hierarchical bootstrap interval; "–" undefined."""
    if not stat or stat.get("value") is None:
        return "–"
    v = stat["value"]
    text = (f"{v:+.2f}" if signed else f"{v:.2f}") if not (isinstance(v, float) and math.isnan(v)) else "NaN"
    ci = stat.get("ci")
    return text + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _mean_sd(stat: dict) -> str:
    """"0.19 ± 0.06" over seeds; one seed has no sd; a rate no example defines (harm when none was right) is "–", one
    that is not a number "NaN"."""
    return format_stat(stat["mean"], stat["sd"])


def _health(row: dict) -> str:
    h = row.get("health")
    if not h:
        return "(reference)"
    loops = h["loops"]
    verdict = h.get("verdict") or "–"
    return f"{'**unhealthy**' if verdict == 'unhealthy' else verdict} ({_ci(loops, signed=True)})"


def _harm(row: dict) -> str:
    h = row.get("harm")
    if not h or not h.get("n"):
        return "– (0/0)"
    return f"{h['pooled']:.2f} ({h['k']}/{h['n']})"


def markdown(data: dict) -> str:
    """The study's tables, the seed the unit: per suite at the full budget, each model's health (no-card loops minus
    the base's, with the verdict against the study's margin), accuracy, pooled harm k/n, the card's own effect on
    loops, accuracy and length, and the counterfactual measures, each a mean over seeds [hierarchical bootstrap 95%
    interval]; then the same answers judged at each shorter budget; then each setting against the first student,
    pooled over seeds (exact McNemar/CMH), the seed-level direction, and Holm's correction across the study."""
    settings = data.get("settings") or []
    budgets = data.get("budgets") or [data.get("eval", {}).get("max_new_tokens")]
    full = budgets[-1]
    margin = data.get("health_margin", 0.05)
    crossed = any(r.get("shared_examples") for r in settings)
    boot = ("(seeds, then one draw of the examples for every seed, over the union of their examples: the seeds share "
            "test examples)" if crossed else "(seeds, then examples)")
    lines = [f"Budget {full} tokens (answers judged at {', '.join(map(str, budgets))}). Means over seeds with 95% "
             f"hierarchical bootstrap intervals {boot}; `seeds` counts the seeds that define the row. "
             f"Health: no-card loops minus the base's, unhealthy above {margin:.2f}. card effect: (ctx − no ctx) of the "
             "model minus the base's. harm: pooled over seeds, k/n" + (" (a count of (seed, example) pairs)" if crossed else "")
             + ".", ""]
    regime = calibration_line(data)
    if regime:
        lines += [regime, ""]
    head = ("| suite | model | seeds | health | `acc_noctx` | `acc_ctx` | `harm` | card effect: loops | card effect: acc | "
            "card effect: length | `follow_cf` clean | `loops_cf` | `stubborn_cf` | drift |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for row in (r for r in settings if r["budget"] == full):
        ce = row.get("card_effect") or {}
        drift = (row.get("health") or {}).get("drift") or {}
        lines.append(f"| {row['suite']} | {row['model']} | {len(row['seeds'])} | {_health(row)} | {_ci(row.get('acc_noctx'))} | "
                     f"{_ci(row.get('acc_ctx'))} | {_harm(row)} | {_ci(ce.get('loops'), True)} | {_ci(ce.get('acc'), True)} | "
                     f"{_ci(ce.get('len'), True)} | {_ci(row.get('follow_cf_clean'))} | {_ci(row.get('loops_cf'))} | "
                     f"{_ci(row.get('stubborn_cf'))} | {_num(drift.get('value'), 3)} |")
    if len(budgets) > 1:
        lines += ["", "The same answers at each budget (loops: either rule; short: a 1–4-word span 3×; clause: 5–40 words 2×):", "",
                  "| suite | model | budget | `acc_noctx` | `acc_ctx` | loops no ctx (short / clause) | loops ctx (short / clause) | "
                  "card effect: loops | card effect: acc |", "|---|---|---|---|---|---|---|---|---|"]
        for row in settings:
            ce = row.get("card_effect") or {}
            short = lambda k, r=row: _ci(r.get(k)).split(" [")[0]  # noqa: E731
            lines.append(f"| {row['suite']} | {row['model']} | {row['budget']} | {_ci(row.get('acc_noctx'))} | {_ci(row.get('acc_ctx'))} | "
                         f"{_ci(row.get('loops_noctx'))} ({short('loops_short_noctx')} / {short('loops_clause_noctx')}) | "
                         f"{_ci(row.get('loops_ctx'))} ({short('loops_short_ctx')} / {short('loops_clause_ctx')}) | "
                         f"{_ci(ce.get('loops'), True)} | {_ci(ce.get('acc'), True)} |")
    if any(r["model"] != "base" for r in settings):
        lines += ["", f"The gate (training.study.calibration): healthy (no-card loops at most {margin:.2f} above the base's) "
                  f"and absorbing (acc_noctx at least {calibration.ABSORB_SHARE:g} × the teacher's acc_ctx) on every suite:",
                  "", calibration.markdown(data)]
    if data.get("comparisons"):
        flip = any(c.get("test") == "sign_flip_per_example" for c in data["comparisons"])
        how = ("the exact sign-flip test with one sign per example on the sums over the seeds that have it, because the "
               "seeds share test examples and pairs of different seeds on one example are not independent" if flip else
               "exact McNemar on the pooled discordant pairs = CMH for matched pairs")
        lines += ["", f"Each setting against `{data['comparisons'][0]['vs']}` on the same examples, pooled over seeds ({how}), "
                  f"the seeds where each is ahead, and Holm's correction across all {len(data['comparisons'])} comparisons "
                  "of the study:", "",
                  "| suite | model | verdict | right/looping only for it | only for the other | p | p (Holm) | seeds ahead / behind / tied |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in data["comparisons"]:
            lines.append(f"| {c['suite']} | {c['model']} | `{c['key']}` | {c['a_only']} | {c['b_only']} | {c['p']:.3f} | "
                         f"{_num(c.get('p_holm'), 3)} | {c['a_better_seeds']} / {c['b_better_seeds']} / {c['tied_seeds']} |")
    lines += ["", "Mean ± sd over seeds of each cell's own scores (the per-adapter view):", "",
              "| suite | model | seeds | " + " | ".join(f"`{c}`" for c in MARKDOWN) + " |", "|---|---|---|" + "---|" * len(MARKDOWN)]
    for row in data["summary"]:
        lines.append(f"| {row['suite']} | {row['student']} | {len(row['seeds'])} | " + " | ".join(_mean_sd(row[c]) for c in MARKDOWN) + " |")
    return "\n".join(lines) + "\n"
