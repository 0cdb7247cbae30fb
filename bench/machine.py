"""What every benchmark prints first: the machine's load when it started. A ratio measured while something else
shares the cores is not a measurement, so a load above 0.5 per core is said out loud."""

from __future__ import annotations

import os


def load_line() -> str:
    """"load 0.12 per core (1-min average 0.24 on 2 cores)", with a warning when above 0.5 per core."""
    one, _, _ = os.getloadavg()
    cores = os.cpu_count() or 1
    per = one / cores
    line = f"load at start {per:.2f} per core (1-min average {one:.2f} on {cores} cores)"
    if per > 0.5:
        line += "; WARNING: the machine is busy, these timings are not a measurement: rerun on a quiet machine"
    return line
