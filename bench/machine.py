"""What every benchmark prints first: the machine's processor and its load when it started. A ratio measured while
something else shares the cores is not a measurement, so a load above 0.5 per core is said out loud; and seconds
measured on different processors are not comparable (the same TRL step takes twice as long on a host without
AVX-512), so the processor and its widest vector instructions are named."""

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
    return f"{cpu_line()}; {line}"


def cpu_line() -> str:
    """"cpu AMD EPYC (avx2, fma)": the model name and the vector extensions that set a matmul's speed (Linux)."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for row in f:
                key, _, value = row.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    wanted = ("avx512f", "avx512_bf16", "amx_tile", "avx2", "fma")
    vector = [f for f in wanted if f in flags]
    return f"cpu {model} ({', '.join(vector) or 'no AVX'})"
