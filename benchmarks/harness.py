"""What every benchmark shares: timing, alternating contenders, best of repeats, sizes and quick
mode, Markdown tables, the environment and the JSON results.

A benchmark is a module `benchmarks/bench_NAME.py` with

    FULL = {...}; QUICK = {...}              its sizes (same keys; --quick picks QUICK)
    def add_arguments(group): ...            optional: its own options (size_options, ...)
    def run(sz, args) -> dict                measure; the dict is its JSON "results"
    def table(r) -> str                      "### NAME: ..." Markdown from that dict
    def summary_rows(r) -> list[list[str]]   its rows of the summary table

registered by name in run.py's BENCHMARKS. `sz` holds the sizes of every registered benchmark
(so one can reuse another's model shape) after the command line's overrides; `args` is the
parsed command line (args.quick, args.no_torch and the benchmark's own options).

Noise: the machine is shared, so a benchmark compares contenders measured in the same run,
alternates them (`alternation`, `alternate`) so that a burst of load hits all of them, and keeps
each one's best repeat (the minimum time: interference only ever adds time, as timeit argues).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from puregpt.data import bundled_names_path  # noqa: E402
from puregpt.fsutil import atomic_write  # noqa: E402

RUN = BENCH_DIR / "run.py"
RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA = REPO.parent / "shared" / "data"


# --- data and contenders -----------------------------------------------------------------------


def names_path() -> str:
    """The 32,033 names of ../shared/data, else the bundled copy."""
    shared = SHARED_DATA / "names.txt"
    return str(shared) if shared.exists() else bundled_names_path()


def have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def torch_skipped(args) -> str | None:
    """Why the PyTorch contender does not run ("torch not installed", "--no-torch"), or None."""
    if not have_torch():
        return "torch not installed"
    return "--no-torch" if args.no_torch else None


# --- timing ------------------------------------------------------------------------------------


def timed(f, *a, **kw):
    """(f(*a, **kw), its wall seconds)."""
    t0 = time.perf_counter()
    result = f(*a, **kw)
    return result, time.perf_counter() - t0


def alternation(names: list, r: int) -> list:
    """The order of the contenders in round (or step) r: as given, reversed every other round,
    so that neither always runs first (in the cooler or the busier moment)."""
    return list(names) if r % 2 == 0 else list(names)[::-1]


def alternate(contenders: dict, rounds: int) -> tuple[dict, dict]:
    """Run each contender `f(r)` once per round r, in `alternation` order.

    Returns (results, seconds): name -> the list of its results, and of its wall times, one per
    round. Keep min(seconds[name]) as its best repeat and the whole list in the JSON."""
    results = {name: [] for name in contenders}
    seconds = {name: [] for name in contenders}
    for r in range(rounds):
        for name in alternation(list(contenders), r):
            res, secs = timed(contenders[name], r)
            results[name].append(res)
            seconds[name].append(secs)
    return results, seconds


def seconds_per_call(f, budget: float, trials: int = 3) -> float:
    """timeit's way for a fast f: call it repeatedly for at least `budget` seconds, `trials`
    times; the best trial's seconds per call."""
    best = math.inf
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while True:
            f()
            reps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= budget:
                break
        best = min(best, elapsed / reps)
    return best


def run_process(cmd: list[str]) -> str:
    """Run a command in a fresh process from the repository (puregpt importable); its stdout.
    A failure raises with the end of its stderr: a benchmark never reports a crashed run."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def child_command(name: str, *words: str) -> list[str]:
    """The command that runs benchmark `name`'s `child(words)` in a fresh process
    (`run.py _NAME-child WORDS...`), for what must be measured from a clean interpreter."""
    return [sys.executable, str(RUN), f"_{name}-child", *words]


# --- equality checks ---------------------------------------------------------------------------


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over two equally shaped dicts/lists of floats."""
    if isinstance(a, dict):
        return max((max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if a and isinstance(a[0], list):
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if len(a) != len(b):
        raise AssertionError(f"length mismatch {len(a)} != {len(b)}")
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)


def max_abs(t) -> float:
    """Largest |x| over a dict/list of floats."""
    if isinstance(t, dict):
        return max((max_abs(v) for v in t.values()), default=0.0)
    if t and isinstance(t[0], list):
        return max((max_abs(r) for r in t), default=0.0)
    return max((abs(x) for x in t), default=0.0)


# --- tables ------------------------------------------------------------------------------------


def md_table(headers, rows) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def fmt(x, digits=3) -> str:
    """A number for a table: thousands separators, `digits` significant figures below 1000."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, int) or abs(x) >= 1000:
        return f"{x:,.0f}"
    if x == 0:
        return "0"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def say(*args) -> None:
    """Progress, on stderr (stdout holds only the tables)."""
    print(*args, file=sys.stderr, flush=True)


# --- sizes and the command line ----------------------------------------------------------------


def at_least(minimum: int, why: str = ""):
    """An argparse type: a whole number >= minimum, else a clear error naming the option."""
    def whole_number(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {n}{why}")
        return n
    return whole_number


def size_options(group, full: dict, quick: dict, *keys: str) -> None:
    """Command-line overrides of some of a benchmark's sizes: --tiny-steps N for "tiny_steps"."""
    for key in keys:
        group.add_argument("--" + key.replace("_", "-"), dest="size_" + key, metavar=key.upper(),
                           type=at_least(1), default=None,
                           help=f"override (full {full[key]}, quick {quick[key]})")


def sizes(benchmarks: dict, args) -> dict:
    """Every benchmark's sizes (QUICK with --quick, else FULL), then the command's overrides."""
    sz = {}
    for name, bench in benchmarks.items():
        if set(bench.FULL) != set(bench.QUICK):
            raise ValueError(f"benchmark {name}: FULL and QUICK must have the same keys")
        if set(bench.FULL) & set(sz):
            raise ValueError(f"benchmark {name} redefines another's sizes: "
                             f"{sorted(set(bench.FULL) & set(sz))}")
        sz.update(bench.QUICK if args.quick else bench.FULL)
    for key in sz:
        if getattr(args, "size_" + key, None) is not None:
            sz[key] = getattr(args, "size_" + key)
    return sz


def parse_args(benchmarks: dict, argv: list[str], epilog: str):
    """The options every benchmark shares, then each benchmark's own, in a group named after it."""
    parser = argparse.ArgumentParser(description="puregpt benchmarks (see benchmarks/README.md).",
                                     epilog=epilog)
    parser.add_argument("benchmarks", nargs="+", choices=("all", *benchmarks), metavar="NAME",
                        help="all, " + ", ".join(benchmarks))
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few steps (CI: checks every path, not speed)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the JSON here (default: benchmarks/results/NAME.json, "
                             "NAME.quick.json with --quick)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contender")
    for name, bench in benchmarks.items():
        if hasattr(bench, "add_arguments"):
            bench.add_arguments(parser.add_argument_group(name))
    return parser.parse_args(argv)


# --- environment and results -------------------------------------------------------------------


def loadavg():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment() -> dict:
    """What the numbers were measured on (the JSON's "env")."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "puregpt"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    torch_version = None
    if have_torch():
        try:
            import torch
            torch_version = torch.__version__
        except Exception:  # a broken install counts as absent
            torch_version = None
    return {
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "executable": sys.executable, "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "loadavg": loadavg(),
        "has_math_sumprod": hasattr(math, "sumprod"), "torch": torch_version,
        "git_commit": commit, "engine_uncommitted_changes": dirty,
        "bytecode": "puregpt compiled before the run (harness.compile_bytecode)",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: Path, doc: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, [(json.dumps(doc, indent=2) + "\n").encode()])


def compile_bytecode() -> None:
    """puregpt's modules compiled to bytecode (puregpt/__pycache__, ignored by git), as pip
    compiles an installed package such as torch: a fresh process then starts as a user's second
    run does. Without it, where PYTHONDONTWRITEBYTECODE=1 is set (this project's machines and
    CI), every fresh puregpt process would compile its modules from source again (~0.1 s)."""
    import compileall
    compileall.compile_dir(str(REPO / "puregpt"), quiet=1)


def run(benchmarks: dict, names: list[str], args) -> int:
    """Run the named benchmarks in order: each prints its table and writes
    results/NAME[.quick].json; then the summary, and the combined JSON (results/all[.quick].json
    for several, or --json PATH)."""
    compile_bytecode()
    sz = sizes(benchmarks, args)
    quick = ".quick" if args.quick else ""
    env = environment()
    results, tables = {}, []
    for name in names:
        say(f"== {name}{' (quick)' if args.quick else ''}")
        res, seconds = timed(benchmarks[name].run, sz, args)
        res["seconds"] = seconds
        results[name] = res
        table = benchmarks[name].table(res)
        tables.append(table)
        print(table + "\n", flush=True)
        if not args.json:
            write_json(RESULTS_DIR / f"{name}{quick}.json",
                       {"benchmark": name, "quick": args.quick, "env": env, "results": res,
                        "markdown": table})
    env["loadavg_end"] = loadavg()
    rows = [row for name, bench in benchmarks.items() if name in results
            for row in bench.summary_rows(results[name])]
    summary = md_table(["benchmark", "measure", "value", "target", "met"], rows)
    print("### summary" + (" (--quick: sizes too small for the targets)" if args.quick else "")
          + "\n\n" + summary, flush=True)
    if args.json and len(names) == 1:
        write_json(args.json, {"benchmark": names[0], "quick": args.quick, "env": env,
                               "results": results[names[0]], "markdown": tables[0],
                               "summary_markdown": summary})
    elif args.json or len(names) > 1:
        write_json(args.json or RESULTS_DIR / f"all{quick}.json",
                   {"benchmarks": names, "quick": args.quick, "env": env, "results": results,
                    "summary_markdown": summary})
    return 0
