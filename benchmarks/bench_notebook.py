"""notebook: notebooks/walkthrough.ipynb run top to bottom in a fresh kernel, as Jupyter's
"Run All" runs it, against its target (issue 17): under 3 minutes on 2 cores. Its cells check
their own numbers (the forward pass equals model.forward, the backward equals finite
differences): an error in any cell fails the benchmark. Needs the test-only nbclient and
ipykernel; without them the row says skipped. --quick trains 10 steps instead of 300 (every
cell runs, in seconds; too short for the target)."""

from __future__ import annotations

import importlib.util
import os
import time
from datetime import datetime

from harness import REPO, fmt, md_table, say, size_options

NOTEBOOK = REPO / "notebooks" / "walkthrough.ipynb"
TARGET_SECONDS = 180.0
FULL = {"notebook_train_steps": 300}  # the notebook as it is stored
QUICK = {"notebook_train_steps": 10}


def add_arguments(group):
    size_options(group, FULL, QUICK, "notebook_train_steps")


def missing() -> str | None:
    absent = [m for m in ("nbclient", "ipykernel") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(absent)} not installed" if absent else None


def with_steps(nb, steps: int):
    """The notebook with its training cell set to `steps` steps (the stored one trains 300)."""
    cells = [c for c in nb.cells if "puregpt.train(steps=300," in c.source]
    assert len(cells) == 1, "the notebook's training cell (puregpt.train(steps=300, ...)) moved"
    if steps != 300:
        cells[0].source = cells[0].source.replace("steps=300,", f"steps={steps},").replace(
            "eval_every=50,", f"eval_every={steps},")  # one evaluation, at the end
    return nb


def cell_seconds(cell) -> float:
    timing = cell.metadata.get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    return (datetime.fromisoformat(end.rstrip("Z")) - datetime.fromisoformat(start.rstrip("Z"))
            ).total_seconds()


def run(sz: dict, args) -> dict:
    steps = sz["notebook_train_steps"]
    skipped = missing()
    if skipped:
        return {"skipped": skipped, "train_steps": steps, "target_seconds": TARGET_SECONDS}
    import nbclient
    import nbformat

    nb = with_steps(nbformat.read(NOTEBOOK, as_version=4), steps)
    say(f"  notebook: {NOTEBOOK.name}, training {steps} steps, fresh kernel")
    env = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's puregpt in the kernel
    start = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}
                            ).execute(env=env)  # raises on a cell's error, naming the cell
    seconds = time.perf_counter() - start
    code = [c for c in nb.cells if c.cell_type == "code"]
    printed = "".join(o.get("text", "") for c in code for o in c.outputs
                      if o.output_type == "stream")
    assert f"from {REPO / 'puregpt'}" in printed, "the kernel did not use this checkout's puregpt"
    svgs = sum("image/svg+xml" in o.get("data", {}) for c in code for o in c.outputs)
    assert svgs == 1, f"expected the loss plot, got {svgs} SVG outputs"
    cells = sorted(((cell_seconds(c), c.source.split("\n")[0]) for c in code), reverse=True)
    return {"train_steps": steps, "code_cells": len(code), "run_all_seconds": seconds,
            "cells_seconds": sum(s for s, _ in cells), "slowest_cells": cells[:3],
            "target_seconds": TARGET_SECONDS,
            "meets_target": seconds < TARGET_SECONDS if steps == 300 else None,
            "cells_ran_without_error": True}


def table(r: dict) -> str:
    if "skipped" in r:
        return f"### notebook: walkthrough.ipynb\n\nskipped: {r['skipped']}"
    rows = [["Run All (kernel start included)", fmt(r["run_all_seconds"]) + " s"],
            ["the cells alone", fmt(r["cells_seconds"]) + " s"]]
    rows += [[f"cell `{src[:48]}`", fmt(s) + " s"] for s, src in r["slowest_cells"]]
    return (f"### notebook: walkthrough.ipynb top to bottom, {r['code_cells']} code cells, "
            f"training {r['train_steps']} steps\n\n" + md_table(["what", "wall time"], rows)
            + f"\n\nEvery cell ran without error: {fmt(r['cells_ran_without_error'])}.")


def summary_rows(r: dict) -> list:
    if "skipped" in r:
        return [["notebook", "walkthrough.ipynb Run All", f"skipped: {r['skipped']}",
                 "< 180 s", "-"]]
    met = "- (--quick)" if r["meets_target"] is None else fmt(r["meets_target"])
    return [["notebook", f"walkthrough.ipynb Run All, {r['train_steps']} training steps",
             fmt(r["run_all_seconds"]) + " s", "< 180 s", met]]
