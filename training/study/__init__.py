"""The removability study: a grid of suite entries × seeds × students, trained, evaluated and summed up.

A study file (TOML) names the suites (each may add training settings of its own, e.g. the no-context turn), the
seeds, the step count, the settings shared by every student and the students themselves (name → the settings that
differ: λ, warm-up, anchor, teacher, guided share, evidence mask…). `run_study` trains every cell into
`runs/<study>/<suite>/seed-<s>/<student>`, evaluates it, and writes `results/<study>/` (study.json, study.csv,
summary.md, rows.jsonl.gz, frontier.html). Finished cells are skipped and a killed cell resumes from its last
checkpoint, so a study can be stopped and restarted at will.

  plan        the study file read and checked, its cells and folders, what is done, the time left
  runner      the cells trained and evaluated (one process per job), resumable
  results     the files under results/<study>/
  seed_level  every measure per setting with the seed as the unit, and the comparisons between settings
"""

from training.study.plan import Cell, Student, Study, SuiteSpec, check_cells, check_results, estimate, plan
from training.study.results import collect, markdown, write_results
from training.study.runner import cell_times, run_cell, run_study
from training.study.study_file import load_study

__all__ = ["Study", "Student", "SuiteSpec", "Cell", "load_study", "check_cells", "check_results", "estimate", "plan",
           "run_study", "run_cell", "cell_times", "write_results", "collect", "markdown"]
