"""A calibration study's verdict: which training setting the main study uses, by the rule fixed before it ran.

For each student setting and suite, at the full budget, from the study's seed-level rows (study.json → settings):
  healthy  its no-card loops exceed the base's by at most the study's margin (the health verdict);
  absorbs  its no-card accuracy is at least `ABSORB_SHARE` of the teacher's (the base with the card).
A setting passes when it is healthy and absorbs on every suite. The choice is the passing setting with the smallest
worst-suite excess of loops (the healthiest); when none passes, the healthiest setting of all, marked as failing
the gate, and that is the finding (docs/training-and-study.md#calibration).
"""

from __future__ import annotations

from dataclasses import dataclass

ABSORB_SHARE = 0.5


@dataclass
class Verdict:
    student: str
    suite: str
    excess_loops: float | None  # no-card loops minus the base's, mean over seeds
    excess_ci: list | None
    acc_noctx: float | None
    teacher_acc_ctx: float | None
    healthy: bool
    absorbs: bool
    seeds: int


def verdicts(data: dict) -> list[Verdict]:
    """One verdict per (student, suite) at the study's full budget."""
    full = data["eval"]["max_new_tokens"]
    rows = [r for r in data.get("settings", []) if r.get("budget") == full]
    base = {r["suite"]: r for r in rows if r["model"] == "base"}
    out = []
    for r in rows:
        if r["model"] == "base" or r["suite"] not in base:
            continue
        h = r["health"]["loops"]
        acc = (r.get("acc_noctx") or {}).get("value")
        teacher = (base[r["suite"]].get("acc_ctx") or {}).get("value")
        absorbs = acc is not None and teacher is not None and acc >= ABSORB_SHARE * teacher
        out.append(Verdict(r["model"], r["suite"], h["value"], h["ci"], acc, teacher, r["health"]["verdict"] == "healthy",
                           absorbs, len(r.get("seeds") or [])))
    return out


def choose(data: dict) -> tuple[str | None, bool, list[Verdict]]:
    """(the chosen student setting, whether it passes the gate, every verdict); (None, False, []) with no rows."""
    vs = verdicts(data)
    students = list(dict.fromkeys(v.student for v in vs))
    if not students:
        return None, False, vs
    good = passing(data, vs)
    return (good[0] if good else min(students, key=lambda s: _worst(vs, s))), bool(good), vs


def passing(data: dict, vs: list[Verdict] | None = None) -> list[str]:
    """Every student setting that is healthy and absorbs on every suite, healthiest (smallest worst-suite excess of
    loops) first."""
    vs = verdicts(data) if vs is None else vs
    suites = set(data.get("suites") or [])

    def passes(student: str) -> bool:
        mine = [v for v in vs if v.student == student]
        return {v.suite for v in mine} >= suites and all(v.healthy and v.absorbs for v in mine)

    return sorted((s for s in dict.fromkeys(v.student for v in vs) if passes(s)), key=lambda s: _worst(vs, s))


def _worst(vs: list[Verdict], student: str) -> float:
    excess = [v.excess_loops for v in vs if v.student == student]
    return max((e for e in excess if e is not None), default=float("inf"))


def markdown(data: dict) -> str:
    pick, ok, vs = choose(data)
    lines = ["| setting | suite | no-card loops − base's [95% CI] | healthy | acc_noctx | teacher acc_ctx | absorbs | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda x: "–" if x is None else f"{x:+.2f}"  # noqa: E731
    g = lambda x: "–" if x is None else f"{x:.2f}"  # noqa: E731
    for v in vs:
        ci = f" [{v.excess_ci[0]:+.2f}, {v.excess_ci[1]:+.2f}]" if v.excess_ci else ""
        lines.append(f"| {v.student} | {v.suite} | {f(v.excess_loops)}{ci} | {'yes' if v.healthy else '**no**'} | "
                     f"{g(v.acc_noctx)} | {g(v.teacher_acc_ctx)} | {'yes' if v.absorbs else '**no**'} | {v.seeds} |")
    gate = data.get("gate") or {}
    # Only a calibration (role = "calibration" in its study file) chooses; any other study, one that takes its regime
    # from a calibration (`calibrated_by`) among them, only reports the gate.
    main = data.get("role") != "calibration"
    if pick is not None and gate.get("complete") is False:
        done, planned = gate["cells"]
        lines.append(f"\n**Partial: {done} of {planned} cells evaluated.**" + ("" if main else
                     " The choice below can change until every cell is; a main study refuses a partial calibration "
                     "(`calibrated_by`)."))
    if pick is None:
        lines.append("\nNo evaluated cell yet.")
    elif main:
        good = passing(data, vs)
        why = ("This study's regime was fixed by its calibration" if data.get("calibrated_by") else
               "This study is not a calibration (no role = \"calibration\" in its file)")
        lines.append("\nHealthy and absorbing on every suite: " + (", ".join(f"**{s}**" for s in good) if good else "**none**")
                     + f". {why}; the gate here is a report, not a choice.")
    elif ok:
        lines.append(f"\nChosen: **{pick}**, healthy and absorbing on every suite, the smallest worst-suite excess of loops.")
    else:
        lines.append(f"\nNo setting passes the gate on every suite. The healthiest: **{pick}** (the main study runs at it, "
                     f"with the gate's verdict shown).")
    return "\n".join(lines)
