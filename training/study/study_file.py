"""The study file (TOML) read and checked before anything trains: every value against the type of the setting it
sets (interp.core.typed), every name against the name rule, every cell's settings as a TrainConfig; one-line errors."""

from __future__ import annotations

import os
import tomllib
from dataclasses import fields
from pathlib import Path

from interp.core.errors import UserError
from interp.core.models import model_window
from interp.core.runs import RESERVED_NAMES
from interp.core.store import NAME_PATTERN, NAME_RULE, check_name, is_regular, read_json, read_text_file, shown_name
from interp.core.typed import check_fields, check_value, field_types
from training.config import MAX_SEED, TrainConfig, defaults
from training.evaluate import EvalSettings
from training.study.plan import Student, Study, SuiteSpec, suite_folder
from training.study.seed_level import HEALTH_MARGIN
from training.tasks import SUITES

STUDY_KEYS = ("name", "model", "suites", "seeds", "steps", "train", "eval", "students", "runs_dir", "results_dir",
              "health_margin", "allow_longer_eval", "calibrated_by", "role")
# What a study is for: a "calibration" chooses, by its gate, the regime a main study takes (`calibrated_by`); a
# "study" (the default) answers a question, and its gate is only a report of who is healthy and absorbs.
ROLES = ("study", "calibration")
STUDENT_ONLY = ("name", "seeds")
SUITE_ONLY = ("suite", "name")
# Settings that belong to the grid (suite, seed, model, steps, where) rather than to a student.
GRID_SETTINGS = ("task", "seed", "model", "steps", "out", "n_test")
EVAL_KEYS = tuple(f.name for f in fields(EvalSettings)) + ("n_test",)


def _fail(path: Path, message: str):
    raise UserError(f"{path}: {message}")


# No list in a study file is longer: a study of more cells than this would not finish, and checking a million
# duplicate seeds one by one took minutes.
MAX_ENTRIES = 1000
MAX_CELLS = 10_000


def _unique(values: list, key: str, fold=lambda v: v) -> None:
    """Lists hold unique values: a seed or suite listed twice would run once and be counted twice."""
    seen: dict = {}
    for v in values:
        k = fold(v)
        if k in seen:
            raise UserError(f"'{key}' lists {v!r} twice" + (f" (as {seen[k]!r} and {v!r})" if seen[k] != v else "")
                            + "; list each once")
        seen[k] = v


def _list(data: dict, key: str, item_type, *, required: bool = True):
    value = check_value(data[key], list[item_type], key)
    if required and not value:
        raise UserError(f"'{key}' must be a non-empty list")
    if len(value) > MAX_ENTRIES:
        raise UserError(f"'{key}' has {len(value)} entries, more than {MAX_ENTRIES}; split the study")
    return value


def _suite_keys(entries: list[tuple[str, str | None]]) -> list[str]:
    """Each suite entry's key (its run folder and its name in the tables), checked: a .jsonl suite is a regular file;
    the key is the entry's `name`, else the built-in suite's name or the file's stem, always a name that no other
    entry and no other built-in suite has (case-insensitively, for case-insensitive file systems). Two entries with
    one key would share run folders: the second would never train and would report the first's numbers."""
    keys = []
    for suite, name in entries:
        if suite not in SUITES and (not suite.endswith(".jsonl") or not is_regular(suite)):
            raise UserError(f"suites: unknown suite '{suite[:200]}'; use one of {', '.join(SUITES)} or a .jsonl file")
        if name is not None:
            keys.append(check_name(name, f"suites: the name of '{suite[:200]}'"))
        elif suite in SUITES:
            keys.append(suite)
        else:
            try:
                keys.append(suite_folder(suite))
            except UserError as err:
                raise UserError(f"suites: {err}; its run folders are named after the file's stem, so rename the file "
                                f"or give the entry a name") from None
    listed = {suite for suite, _ in entries}
    seen: dict[str, str] = {name.lower(): name for name in SUITES if name not in listed}
    for (suite, _), key in zip(entries, keys):
        other = seen.get(key.lower())
        if other is not None:
            raise UserError(f"suites: '{suite}' and '{other}' would share the run folder '{key}'; rename one of the files "
                            f"or give the entry another name (name = \"...\")")
        seen[key.lower()] = suite
    return keys


def _suites(data: dict) -> list[SuiteSpec]:
    """`suites`: each entry a suite (a built-in name or a .jsonl file) or a table naming one, with a `name` (its
    key) and training settings that its cells add to [train] (e.g. `{suite = "persona", name = "persona_neutral",
    no_context = "neutral"}`). A suite that differs from another of the study only in its verifiers and has the same
    settings (`persona_once` beside `persona`) shares that suite's trained cells and answers, and is re-scored."""
    raw = data["suites"]
    if not isinstance(raw, list) or not raw:
        raise UserError("'suites' must be a non-empty list of suite names or tables")
    if len(raw) > MAX_ENTRIES:
        raise UserError(f"'suites' has {len(raw)} entries, more than {MAX_ENTRIES}; split the study")
    _unique([x for x in raw if isinstance(x, str)], "suites")
    entries: list[tuple[str, str | None, dict]] = []
    for i, item in enumerate(raw):
        where = f"suites[{i}]"
        if isinstance(item, str):
            entries.append((check_value(item, str, where), None, {}))
            continue
        if not isinstance(item, dict):
            raise UserError(f"{where} must be a suite name or a table {{suite = \"persona\", name = \"...\", <training "
                            f"settings>}} (got {shown_name(item)})")
        suite = item.get("suite")
        if not isinstance(suite, str):
            raise UserError(f"{where} must name its suite: {{suite = \"persona\", ...}}")
        suite = check_value(suite, str, f"{where}.suite")
        name = item.get("name")
        where = f"{where} ({suite[:64]})"
        settings = check_fields(TrainConfig, {k: v for k, v in item.items() if k not in SUITE_ONLY}, where,
                                exclude=GRID_SETTINGS)
        entries.append((suite, name, settings))
    keys = _suite_keys([(suite, name) for suite, name, _ in entries])
    specs = [SuiteSpec(key, suite, settings, key) for key, (suite, _, settings) in zip(keys, entries)]
    for spec in specs:  # a re-scored suite answers in the folder of the suite it differs from only in its verifiers
        home = next((o for o in specs if o.suite == spec.task and o.settings == spec.settings), None)
        if spec.task != spec.suite and home is not None:
            spec.folder = home.key
    return specs


def _calibration(folder: str, model: str) -> dict:
    """The regime a calibration study chose (training.study.calibration): its [train] settings with its chosen
    student's settings over them, and its steps, read from `folder`/study.json (what `python -m training study`
    wrote for the calibration). A calibration with no results, no choice or another model is a one-line error."""
    path = Path(folder) / "study.json"
    if not path.is_file():
        raise UserError(f"calibrated_by: {path} does not exist; run the calibration study first (python -m training "
                        f"study studies/<calibration>.toml), or name the folder its results are in")
    data = read_json(path, expect=dict)
    if data.get("role") != "calibration":
        said = f"role = {data['role']!r}" if isinstance(data.get("role"), str) else "no role: written before studies declared one"
        raise UserError(f"calibrated_by: {path} is not a calibration's results ({said}); name the results folder of a "
                        f"study file with role = \"calibration\", or rerun that study to rebuild its tables")
    gate = data.get("gate")
    choice = gate.get("choice") if isinstance(gate, dict) else None
    chosen = next((s for s in data.get("students") or [] if isinstance(s, dict) and s.get("name") == choice), None)
    if choice is None or chosen is None:
        raise UserError(f"calibrated_by: {path} has no chosen setting yet (no evaluated cell); finish the calibration "
                        "study first")
    if gate.get("complete") is not True:
        cells = gate.get("cells")
        done = (f"{cells[0]} of {cells[1]} cells evaluated" if isinstance(cells, list) and len(cells) == 2
                else "it does not say that every cell was evaluated")
        raise UserError(f"calibrated_by: {path} is a partial calibration ({done}); finish the calibration study "
                        "(rerun its command: it resumes) before the main study takes its choice")
    if data.get("model") != model:
        raise UserError(f"calibrated_by: the calibration trained '{data.get('model')}', this study trains '{model}'; "
                        "calibrate on the same model")
    where = f"calibrated_by ({path})"
    train = check_fields(TrainConfig, data.get("train") or {}, where, exclude=GRID_SETTINGS)
    regime = {**train, **check_fields(TrainConfig, chosen.get("settings") or {}, where, exclude=GRID_SETTINGS)}
    steps = check_value(data.get("steps"), field_types(TrainConfig)["steps"], f"{where}: steps")
    return {"from": folder, "name": data.get("name"), "choice": choice, "passes": bool(gate.get("passes")),
            "regime": regime, "steps": steps}


def _calibrated(calibration: dict, train: dict, students: list[Student], steps: int | None) -> tuple[dict, int]:
    """The study's [train] and steps under a calibration: the calibrated regime, with what the study's own [train]
    adds. The study's [train] and its students may not contradict the regime (a suite entry may depart from it, as
    the grid's design: `{suite = "persona", no_context = "default"}`; the tables show each suite's settings)."""
    regime = calibration["regime"]
    for k, v in train.items():
        if k in regime and regime[k] != v:
            raise UserError(f"[train] {k} = {v!r} contradicts the calibrated regime ({k} = {regime[k]!r}, chosen by "
                            f"{calibration['from']}); remove it")
    for student in students:
        k = next((k for k in student.settings if k in regime and student.settings[k] != regime[k]), None)
        if k is not None:
            raise UserError(f"student '{student.name}' sets {k} = {student.settings[k]!r}, which the calibration fixes "
                            f"({k} = {regime[k]!r}); remove it")
    if steps is not None and steps != calibration["steps"]:
        raise UserError(f"steps = {steps} contradicts the calibrated regime (steps = {calibration['steps']}); remove it")
    return {**regime, **train}, calibration["steps"]


def _student_name(entry: dict, where: str) -> str:
    name = entry.get("name")
    if name is None:
        raise UserError(f"{where} has no name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
        raise UserError(f"{where}: the student name {shown_name(name)} cannot be used: use {NAME_RULE} (a name, not a path), "
                        f"not one of {', '.join(RESERVED_NAMES)}")
    return name


def _parse(data: dict, runs_dir: str | os.PathLike | None, results_dir: str | os.PathLike | None, source: str) -> Study:
    """The study file's tables, every value checked against the type of the TrainConfig / EvalSettings field it
    sets (interp.core.typed), before any training starts."""
    unknown = [k for k in data if k not in STUDY_KEYS]
    if unknown:
        raise UserError(f"unknown key '{str(unknown[0])[:64]}'; a study has {', '.join(STUDY_KEYS)}")
    for key in ("name", "suites", "seeds", "steps", "students"):
        if key not in data and not (key == "steps" and "calibrated_by" in data):
            raise UserError(f"missing key '{key}'")
    types = field_types(TrainConfig)
    name = check_name(data["name"], "'name'")
    specs = _suites(data)
    seeds = _list(data, "seeds", types["seed"])
    _unique(seeds, "seeds")
    model = check_value(data.get("model", defaults()["model"]), types["model"], "model")
    if not model.strip():
        raise UserError("'model' must be a model spec, e.g. tiny-random-llama")
    calibration = _calibration(check_value(data["calibrated_by"], str, "calibrated_by"), model) if "calibrated_by" in data else None
    steps = check_value(data["steps"], types["steps"], "steps") if "steps" in data else None
    train = check_fields(TrainConfig, data.get("train", {}), "train", exclude=GRID_SETTINGS)
    ev = check_fields(EvalSettings, data.get("eval", {}), "eval", extra={"n_test": types["n_test"]})
    n_test = ev.pop("n_test", 40)
    try:
        eval_settings = EvalSettings(**ev).check()
    except (TypeError, UserError) as err:
        raise UserError(f"eval: {err}") from None
    window = model_window(model)
    if window is not None and eval_settings.max_new_tokens >= window:
        raise UserError(f"eval: max_new_tokens {eval_settings.max_new_tokens} does not fit the model's window of "
                        f"{window} tokens; use fewer")
    raw = data["students"]
    if not isinstance(raw, list) or not raw:
        raise UserError("'students' must be a list of [[students]] tables")
    if len(raw) > MAX_ENTRIES:
        raise UserError(f"'students' has {len(raw)} entries, more than {MAX_ENTRIES}; split the study")
    students = []
    for i, entry in enumerate(raw):
        where = f"students[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be a table")
        s_name = _student_name(entry, where)
        where = f"{where} ({s_name})"
        settings = check_fields(TrainConfig, {k: v for k, v in entry.items() if k not in STUDENT_ONLY}, where,
                                exclude=GRID_SETTINGS)
        s_seeds = entry.get("seeds")
        if s_seeds is not None:
            try:
                s_seeds = _list(entry, "seeds", types["seed"])
                _unique(s_seeds, "seeds")
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
            if not set(s_seeds) <= set(seeds):
                raise UserError(f"{where}: 'seeds' must be a subset of the study's seeds {seeds[:20]}")
        students.append(Student(s_name, settings, s_seeds))
    names = [s.name for s in students]
    folded = [n.lower() for n in names]  # one folder on a case-insensitive file system
    dup = next((n for n, f in zip(names, folded) if folded.count(f) > 1), None)
    if dup:
        other = next(n for n, f in zip(names, folded) if f == dup.lower() and n != dup) if names.count(dup) == 1 else dup
        raise UserError(f"two students are named '{dup}'" + (f" and '{other}' (one folder where case is ignored)" if other != dup else ""))
    in_file = {k: check_value(data.get(k, k.removesuffix("_dir")), str, k) for k in ("runs_dir", "results_dir")}
    given = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in (("runs_dir", runs_dir), ("results_dir", results_dir))}
    where_runs = check_value(given["runs_dir"] if runs_dir is not None else in_file["runs_dir"], str, "--runs-dir")
    where_results = check_value(given["results_dir"] if results_dir is not None else in_file["results_dir"], str, "--results-dir")
    if not where_runs.strip() or not where_results.strip():
        raise UserError("'runs_dir' and 'results_dir' must be folder paths")
    margin = data.get("health_margin", HEALTH_MARGIN)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (0 <= margin < 1):
        raise UserError(f"'health_margin' must be a number in [0, 1) (got {shown_name(margin)})")
    longer = data.get("allow_longer_eval", False)
    if not isinstance(longer, bool):
        raise UserError(f"'allow_longer_eval' must be true or false (got {shown_name(longer)})")
    role = data.get("role", "study")
    if role not in ROLES:
        raise UserError(f"'role' must be \"calibration\" (its gate chooses the regime a main study takes) or \"study\" "
                        f"(the default: the gate is a report); got {shown_name(role)}")
    if calibration is not None:
        train, steps = _calibrated(calibration, train, students, steps)
    assert steps is not None  # required above unless a calibration gives it
    for student in students:  # one setting, one place: a suite entry and a student both setting it is ambiguous
        for spec in specs:
            both = next((k for k in student.settings if k in spec.settings), None)
            if both is not None:
                raise UserError(f"suite '{spec.key}' and student '{student.name}' both set '{both}'; set it in one place")
    study = Study(name=name, model=model, suites=[spec.key for spec in specs], specs={spec.key: spec for spec in specs}, seeds=seeds, steps=steps, train=train, eval=eval_settings,
                  n_test=n_test, students=students, runs_dir=Path(where_runs), results_dir=Path(where_results), source=source,
                  health_margin=float(margin), allow_longer_eval=longer, calibration=calibration,
                  role=role)
    bad_seed = next((x for x in seeds if not 0 <= x <= MAX_SEED), None)
    if bad_seed is not None:
        raise UserError(f"seeds: {bad_seed} is out of range; seeds are 0..{MAX_SEED}")
    n_cells = len(specs) * len(seeds) * len(students)
    if n_cells > MAX_CELLS:
        raise UserError(f"{n_cells} cells (suites × seeds × students) are more than {MAX_CELLS}; split the study")
    # Every cell valid before the first one trains; cells differ across seeds only by the seed, checked above.
    checked: set = set()
    for cell in study.cells():
        if (cell.suite, cell.student.name) in checked:
            continue
        checked.add((cell.suite, cell.student.name))
        try:
            cfg = cell.config().check()
        except (TypeError, UserError) as err:
            raise UserError(f"{cell.label()}: {err}") from None
        if cfg.max_new_tokens < eval_settings.max_new_tokens and not longer:
            raise UserError(f"{cell.label()}: rollouts of {cfg.max_new_tokens} tokens but answers judged at "
                            f"{eval_settings.max_new_tokens}: the tokens past the rollout budget are never trained; raise "
                            f"[train] max_new_tokens to at least {eval_settings.max_new_tokens}, or set allow_longer_eval = true")
    for cell in study.cells():  # no cell's folder leaves the runs folder, whatever the names say
        if not Path(os.path.abspath(cell.out)).is_relative_to(os.path.abspath(study.runs_dir)):
            raise UserError(f"{cell.label()}: its folder {cell.out} is outside the runs folder {study.runs_dir}")
    return study


def load_study(path: str | os.PathLike, runs_dir: str | os.PathLike | None = None,
               results_dir: str | os.PathLike | None = None) -> Study:
    """Read and check a study file: every mistake is a one-line error naming the file and the key, before any
    training starts. Every value is checked against the type of the TrainConfig / EvalSettings field it sets, every
    name against the name rule (interp.core.store.check_name), and every cell's settings are validated as a TrainConfig."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise UserError(f"study file {path} does not exist; see studies/smoke.toml for an example")
    try:
        text = read_text_file(path, "study file (TOML)")
    except UserError as err:
        raise UserError(f"study file {err}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        _fail(path, f"not valid TOML ({str(err).splitlines()[0]})")
    except RecursionError:
        _fail(path, "not valid TOML (nested too deeply)")
    try:
        return _parse(data, runs_dir, results_dir, str(path))
    except UserError as err:
        _fail(path, str(err))
        raise
