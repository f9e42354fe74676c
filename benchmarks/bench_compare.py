"""compare: `puregpt compare` on a grid of 4 runs (2 configs x 2 seeds) with --jobs 2, against
the same 4 runs one after another (--jobs 1); each in a fresh process, alternated, best of
rounds. Target: --jobs 2 on 2 cores takes <= 0.6x the time. The two must give bit-identical
results (each run is the same computation, whichever process it lands in)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

from harness import REPO, alternate, fmt, md_table, names_path, run_process, say

FULL = {"compare_steps": 150, "compare_rounds": 2}
QUICK = {"compare_steps": 4, "compare_rounds": 1}
TARGET = 0.6
MODEL = ["--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "8",
         "--eval-tokens", "2000"]


def run(sz: dict, args) -> dict:
    steps = sz["compare_steps"]
    base = tempfile.mkdtemp(prefix="bench-compare-")
    data = os.path.join(base, "names.txt")
    with open(names_path(), encoding="utf-8") as f:  # 2,000 names: the same text every run
        lines = f.read().splitlines()[:2000]
    with open(data, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")

    def grid(jobs):
        def go(r):
            out = os.path.join(base, f"jobs{jobs}-r{r}")
            say(f"  compare: --jobs {jobs}, 4 runs x {steps} steps")
            run_process([sys.executable, "-m", "puregpt", "compare", "--data", data, "--vary",
                         "pos=learned,none", "--seeds", "2", "--steps", str(steps),
                         "--eval-every", "0", *MODEL, "--jobs", str(jobs), "--out", out,
                         "--quiet"])
            with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
                numbers = json.load(f)
            shutil.rmtree(out)
            return {c["label"]: c["finals"] for c in numbers["configs"]}
        return go
    try:
        outs, times = alternate({"jobs 2": grid(2), "jobs 1": grid(1)}, sz["compare_rounds"])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    first = outs["jobs 1"][0]
    identical = all(o == first for runs in outs.values() for o in runs)
    assert identical, "--jobs 2 and --jobs 1 gave different losses"
    two, one = min(times["jobs 2"]), min(times["jobs 1"])
    return {"runs": 4, "steps": steps, "model": MODEL, "cpus": os.cpu_count(),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "jobs2_seconds": two, "jobs1_seconds": one, "ratio": two / one,
            "seconds_all": times, "identical": identical, "target": TARGET,
            "met": two / one <= TARGET, "repo": str(REPO)}


def table(r: dict) -> str:
    rows = [["--jobs 2 (two runs at once)", fmt(r["jobs2_seconds"]), fmt(r["ratio"])],
            ["--jobs 1 (one after another)", fmt(r["jobs1_seconds"]), "1"]]
    load = ", ".join(f"{x:.2f}" for x in r["loadavg"]) if r["loadavg"] else "-"
    return (f"### compare: 4 runs x {r['steps']} steps, {r['cpus']} cores (load {load})\n\n"
            + md_table(["pool", "seconds (best)", "ratio"], rows)
            + f"\n\nIdentical losses: {fmt(r['identical'])}. Target ratio <= {TARGET}: "
            f"{fmt(r['met'])}.")


def summary_rows(r: dict) -> list:
    return [["compare", "4-run grid, --jobs 2 / --jobs 1 wall time (identical losses)",
             fmt(r["ratio"]), f"<= {TARGET}", fmt(r["met"])]]
