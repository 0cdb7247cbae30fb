"""The study-results format (results/<study>/, written by `python -m training study`): study.json with its checked
summary, the per-answer rows (rows.jsonl.gz), and how a statistic is written for people."""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

from interp.core.errors import UserError
from interp.core.runs import ExampleRow
from interp.core.store import atomic_write_bytes, jsonl_records, read_json


STUDY_FILE = "study.json"

def is_study(path: str | os.PathLike) -> bool:
    return (Path(path) / STUDY_FILE).exists()


def read_study(path: str | os.PathLike) -> dict:
    """study.json of a results folder: cells, references, the per-suite summary over seeds and paired tests. Every
    summary row is checked (names are text, each statistic a number or null), so that a reader never formats a
    string as a number."""
    file = Path(path) / STUDY_FILE
    data = read_json(file)
    if not isinstance(data, dict) or not isinstance(data.get("summary"), list) or not isinstance(data.get("cells"), list):
        raise UserError(f"{file} is damaged: expected an object with 'summary' and 'cells' lists; rerun the study to rewrite it")
    for i, row in enumerate(data["summary"]):
        problem = _summary_problem(row)
        if problem:
            raise UserError(f"{file} is damaged: summary[{i}] {problem}; rerun the study to rewrite it")
    return data


STUDY_ROWS_FILE = "rows.jsonl.gz"  # results/<study>/: every evaluated answer of the study, to recompute every number


def write_study_rows(path: str | os.PathLike, records: list[dict]) -> None:
    """Per-example rows of a study, gzip-compressed JSONL (one ExampleRow per line plus `suite` and `seed`), written
    atomically and byte-reproducibly (no time stamp in the gzip header)."""
    text = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(path, gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))


def read_study_rows(path: str | os.PathLike) -> list[tuple[str, int, ExampleRow]]:
    """The rows `write_study_rows` wrote, as (suite, seed, ExampleRow); a damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file; a study writes it beside study.json")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not a gzip-compressed UTF-8 JSONL file ({err}); run the study again to rewrite it") from None
    out = []
    for i, record in jsonl_records(text, path):
        if not isinstance(record, dict) or not isinstance(record.get("suite"), str) or not isinstance(record.get("seed"), int):
            raise UserError(f"{path}, line {i}: expected an object with suite, seed and the row's fields")
        suite, seed = record.pop("suite"), record.pop("seed")
        out.append((suite, seed, ExampleRow.from_json(record, f"{path}, line {i}")))
    return out


def _number(x) -> bool:
    return x is None or (type(x) in (int, float))


def _summary_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "is not an object"
    for key in ("suite", "student"):
        if not isinstance(row.get(key), str):
            return f"has no text '{key}'"
    if not _number(row.get("lam")):
        return "has a 'lam' that is not a number"
    if not isinstance(row.get("seeds", []), list):
        return "has 'seeds' that is not a list"
    for key, stat in row.items():
        if isinstance(stat, dict) and ("mean" in stat or "sd" in stat):
            if not _number(stat.get("mean")) or not _number(stat.get("sd")):
                return f"has a '{key}' whose mean or sd is not a number"
    return None


def format_stat(m, sd=None) -> str:
    """'0.19 ± 0.06' (sd None: just the mean); a statistic no example defines (null) is '–', one that is not a
    number (NaN, written as null with its reason) is 'NaN'."""
    if m is None:
        return "–"
    if isinstance(m, float) and not math.isfinite(m):
        return "NaN" if math.isnan(m) else ("∞" if m > 0 else "−∞")
    if sd is None:
        return f"{m:.2f}"
    if isinstance(sd, float) and not math.isfinite(sd):
        return f"{m:.2f} ± NaN" if math.isnan(sd) else f"{m:.2f} ± ∞"
    return f"{m:.2f} ± {sd:.2f}"


def calibration_line(study: dict) -> str | None:
    """The training regime a study took from a calibration (`calibrated_by` in study.json), in one sentence (Markdown):
    the calibration, its choice, whether that choice passed the gate, and the regime; None for a study without one.
    summary.md, the app's Study view and the report all show this sentence."""
    cal = study.get("calibrated_by")
    if not isinstance(cal, dict):
        return None
    regime = ", ".join(f"{k} = {v}" for k, v in sorted((cal.get("regime") or {}).items()))
    verdict = ("passes the gate" if cal.get("passes") else
               "**fails the gate**: no setting was healthy and absorbing on every suite")
    return (f"Training regime chosen by the calibration `{cal.get('name')}` ({cal.get('from')}): `{cal.get('choice')}`, "
            f"which {verdict}. Regime: {regime}, {cal.get('steps')} steps; a suite's own settings override it where it "
            "lists them.")
