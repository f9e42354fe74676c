"""race: the whole microgpt run (train + 20 samples), each engine in a fresh process, wall time
from launch to exit (imports included). train-tiny runs it too, unless --no-race."""

from __future__ import annotations

import os
import re
import sys
import tempfile

from harness import (BENCH_DIR, alternate, fmt, md_table, names_path, run_process, say,
                     size_options, torch_skipped)

FULL = {"race_steps": 1000, "race_rounds": 3}
QUICK = {"race_steps": 20, "race_rounds": 1}

STEP_LINE = re.compile(r"^step\s+\d+ /\s*\d+ \| loss \S+$", re.M)
SAMPLE_LINE = re.compile(r"^sample\s+\d+: (.*)$", re.M)


def add_arguments(group) -> None:
    size_options(group, FULL, QUICK, "race_steps", "race_rounds")


def run(sz: dict, args) -> dict:
    """Wall time of a whole microgpt run (train + 20 samples) in a fresh process, each engine."""
    N, data = sz["race_steps"], names_path()
    skipped = torch_skipped(args)
    with tempfile.TemporaryDirectory(prefix="puregpt-race-") as tmp:
        def command(name, r):
            if name.startswith("puregpt"):  # puregpt1: one process (--workers 1)
                return [sys.executable, "-m", "puregpt", "train", "--preset", "microgpt",
                        "--steps", str(N), "--data", data, "--out",
                        os.path.join(tmp, f"{name}-run{r}")] + (
                            ["--workers", "1"] if name == "puregpt1" else [])
            return [sys.executable, str(BENCH_DIR / "torch_microgpt.py"), "--steps", str(N),
                    "--samples", "20", "--data", data, "--threads", name[len("torch"):]]

        def contender(name):
            def fresh_process(r):
                say(f"  race: {name} ({N} steps + 20 samples, fresh process)")
                return run_process(command(name, r))
            return fresh_process

        # puregpt uses both cores: so may PyTorch (it is no faster with them)
        names = ["puregpt", "puregpt1"] + ([] if skipped else ["torch1", "torch2"])
        stdouts, walls = alternate({name: contender(name) for name in names}, sz["race_rounds"])
    outputs = {name: runs[-1] for name, runs in stdouts.items()}
    pg_samples = SAMPLE_LINE.findall(outputs["puregpt"])
    assert len(pg_samples) == 20, f"puregpt printed {len(pg_samples)} samples, not 20"
    # one process and two compute the same run: the same losses and samples, bit for bit
    assert outputs["puregpt1"] == outputs["puregpt"], "--workers 1 printed another run"
    out = {"steps": N, "samples": 20, "data": data, "rounds": sz["race_rounds"],
           "commands": {
               "puregpt": f"python -m puregpt train --preset microgpt --steps {N} --data "
                          f"names.txt --out TMP",
               "torch": f"python benchmarks/torch_microgpt.py --steps {N} --samples 20 "
                        f"--threads 1|2"},
           "puregpt_seconds": min(walls["puregpt"]), "puregpt_seconds_all": walls["puregpt"],
           "puregpt_1_process_seconds": min(walls["puregpt1"]),
           "puregpt_1_process_seconds_all": walls["puregpt1"],
           "target": "puregpt faster than PyTorch eager (torch/puregpt > 1)"}
    if skipped:
        out.update({"torch_seconds": None, "torch_over_puregpt": None, "skipped": skipped})
        return out
    for name in ("torch1", "torch2"):
        t_samples = SAMPLE_LINE.findall(outputs[name])
        assert len(t_samples) == 20, f"{name} printed {len(t_samples)} samples, not 20"
    torch_best = min(walls["torch1"] + walls["torch2"])
    out.update({
        "torch_seconds": torch_best,
        "torch_seconds_1_thread": min(walls["torch1"]),
        "torch_seconds_2_threads": min(walls["torch2"]),
        "torch_seconds_all": {"1 thread": walls["torch1"], "2 threads": walls["torch2"]},
        "torch_over_puregpt": torch_best / min(walls["puregpt"]),
        "torch_over_puregpt_1_process": torch_best / min(walls["puregpt1"]),
        "same_printed_losses": all(STEP_LINE.findall(outputs["puregpt"])
                                   == STEP_LINE.findall(outputs[name])
                                   for name in ("torch1", "torch2")),
        "same_samples": all(pg_samples == SAMPLE_LINE.findall(outputs[name])
                            for name in ("torch1", "torch2")),
    })
    return out


def table(r: dict) -> str:
    head = f"### race: {r['steps']} steps + 20 samples, fresh process\n\n"
    columns = ["run", "wall s (best)", "torch / puregpt"]
    if r.get("torch_seconds") is None:
        rows = [["puregpt (python -m puregpt train --preset microgpt)",
                 fmt(r["puregpt_seconds"]), "-"],
                ["puregpt, one process (--workers 1)", fmt(r["puregpt_1_process_seconds"]), "-"],
                ["PyTorch eager (torch_microgpt.py)", "skipped: " + r["skipped"], "-"]]
        return head + md_table(columns, rows)
    pg = r["puregpt_seconds"]
    pg1 = r["puregpt_1_process_seconds"]
    rows = [["puregpt (python -m puregpt train --preset microgpt; 2 processes)", fmt(pg), "1"],
            ["puregpt, one process (--workers 1)", fmt(pg1),
             fmt(r["torch_seconds"] / pg1) + "x (of the faster torch)"],
            ["PyTorch eager, 1 thread (benchmarks/torch_microgpt.py, incl. import torch)",
             fmt(r["torch_seconds_1_thread"]), fmt(r["torch_seconds_1_thread"] / pg) + "x"],
            ["PyTorch eager, 2 threads", fmt(r["torch_seconds_2_threads"]),
             fmt(r["torch_seconds_2_threads"] / pg) + "x"]]
    return (head + md_table(columns, rows)
            + f"\n\nSame printed losses: {fmt(r['same_printed_losses'])}; same 20 samples: "
              f"{fmt(r['same_samples'])} (target: torch / puregpt > 1, with 2 processes and "
              f"with one: {fmt(r['torch_over_puregpt_1_process'])}x). The one-process run "
              f"printed exactly what the two-process run did.")


def summary_rows(r: dict) -> list:
    if r.get("torch_seconds") is None:
        return [["race", f"{r['steps']} steps + 20 samples, fresh process",
                 f"puregpt {fmt(r['puregpt_seconds'])} s; torch skipped", "-", "-"]]
    return [["race", f"{r['steps']} steps + 20 samples, fresh process: puregpt "
                     f"{fmt(r['puregpt_seconds'])} s, torch {fmt(r['torch_seconds'])} s",
             fmt(r["torch_over_puregpt"]) + "x", "> 1x (puregpt faster)",
             fmt(r["torch_over_puregpt"] > 1)],
            ["race", f"the same, puregpt in one process (--workers 1): "
                     f"{fmt(r['puregpt_1_process_seconds'])} s, torch {fmt(r['torch_seconds'])} s",
             fmt(r["torch_over_puregpt_1_process"]) + "x", "> 1x (puregpt faster)",
             fmt(r["torch_over_puregpt_1_process"] > 1)]]
