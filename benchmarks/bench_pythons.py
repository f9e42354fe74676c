"""pythons: the benchmarks on every CPython found (3.10 to 3.13), side by side, and on each the
engine's ways of computing products (ops.PRODUCTS) against each other, so that the path each
version takes (ops.PRODUCT_PATH) is the measured fastest there.

Interpreters: this one, plus `$(pyenv root)/versions/*/bin/python` for 3.10-3.13 (one per minor
version; --python PATH instead names them). Each runs, as a fresh process with this checkout on
PYTHONPATH (puregpt is pure Python: no install needed):
  * `run.py _pythons-child`: train-large gradient steps (batch of 8 windows) and 100 microgpt
    steps (forward + backward) with each product path, alternated, best of rounds;
  * `run.py train-tiny train-large --no-race` (with --quick and the size overrides given,
    e.g. --large-steps 2), whose JSON is read back. Contenders that need torch say "skipped: torch not installed" where it is missing.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

from harness import (RUN, fmt, md_table, run_process, say, size_options, timed)

FULL = {"pythons_rounds": 3}
QUICK = {"pythons_rounds": 1}
SUPPORTED = ((3, 10), (3, 13))  # the oldest and newest minor versions looked for
BENCHES = ("train-tiny", "train-large")  # what runs on each interpreter


def add_arguments(group) -> None:
    group.add_argument("--python", action="append", metavar="PATH", dest="pythons",
                       help="an interpreter to compare (repeatable; default: this one and "
                            "pyenv's 3.10-3.13)")
    size_options(group, FULL, QUICK, "pythons_rounds")


def version_of(python: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=60).stdout.split()
        return tuple(int(x) for x in out) if len(out) == 3 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def pyenv_root() -> str:
    if os.environ.get("PYENV_ROOT"):
        return os.environ["PYENV_ROOT"]
    if shutil.which("pyenv"):
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return os.path.expanduser("~/.pyenv")


def interpreters(given=None) -> list[tuple[str, tuple]]:
    """(path, version) of each interpreter to compare, oldest first: the given ones, else this
    one and pyenv's supported versions, one per minor version (this one's wins its minor)."""
    found = {}
    candidates = given or [sys.executable] + sorted(
        glob.glob(os.path.join(pyenv_root(), "versions", "*", "bin", "python")))
    for path in candidates:
        v = version_of(path)
        if v is None and given:
            raise SystemExit(f"pythons: cannot run {path}")
        if v is None:
            continue
        if given is None and not SUPPORTED[0] <= v[:2] <= SUPPORTED[1]:
            continue
        found.setdefault(v[:2] if given is None else path, (path, v))
    return sorted(found.values(), key=lambda pv: pv[1])


# --- in each interpreter: the product paths against each other ---------------------------------


def child(words: list[str]) -> None:
    """Seconds of a train-large gradient step and of 100 microgpt steps with each product path,
    alternated over `rounds` rounds, best kept; one JSON line on stdout."""
    import bench_train_large
    from puregpt import model, ops
    from puregpt.config import GPTConfig
    from puregpt.train import batch_grads
    quick, rounds = words[0] == "quick", int(words[1])
    sizes = dict(bench_train_large.QUICK if quick else bench_train_large.FULL, large_batch=8)
    cfg, _, params, batch, *_ = bench_train_large.large_setup(sizes)
    large_batch = batch(0)
    tiny_cfg = GPTConfig(vocab_size=27)
    tiny = model.init_params(tiny_cfg, random.Random(1))
    doc = [26, 4, 12, 12, 0, 3, 7, 26]  # "emma" + 3 letters, between BOS tokens
    tiny_steps = 10 if quick else 100

    def work(name):
        if name == "large":
            return batch_grads(params, cfg, [large_batch], model.zeros_like(params))[0]
        grads = model.zeros_like(tiny)
        return [model.loss_and_grads(tiny, tiny_cfg, [doc[:-1]], [doc[1:]], grads)[0]
                for _ in range(tiny_steps)][-1]

    chosen, paths = ops.PRODUCT_PATH, list(ops.PRODUCTS)
    seconds = {p: {"large": [], "tiny": []} for p in paths}
    losses = {p: {} for p in paths}
    for r in range(rounds):
        for path in (paths if r % 2 == 0 else paths[::-1]):
            ops.use_products(path)
            for name in ("large", "tiny"):
                losses[path][name], s = timed(work, name)
                seconds[path][name].append(s)
    ops.use_products(chosen)
    for path in paths:  # the paths compute the same thing: a faster wrong path is no result
        for name in ("large", "tiny"):
            diff = abs(losses[path][name] - losses["dist"][name])
            assert diff < 1e-12, f"{path} gives a {name} loss {diff:g} away from dist's"
    print(json.dumps({"chosen": chosen, "tiny_steps": tiny_steps,
                      "seconds": {p: {k: min(v) for k, v in s.items()}
                                  for p, s in seconds.items()},
                      "seconds_all": seconds}))


# --- the comparison ----------------------------------------------------------------------------


def forwarded_sizes(args) -> list[str]:
    """The size overrides given for the benchmarks run on each interpreter (--large-steps 2 ...)."""
    words = []
    for key, value in sorted(vars(args).items()):
        if key.startswith("size_") and value is not None and not key.startswith("size_pythons"):
            words += ["--" + key[len("size_"):].replace("_", "-"), str(value)]
    return words


def run(sz: dict, args) -> dict:
    found = interpreters(args.pythons)
    out = {"benchmarks": list(BENCHES), "pythons": []}
    with tempfile.TemporaryDirectory(prefix="puregpt-pythons-") as tmp:
        for path, v in found:
            version = ".".join(map(str, v))
            say(f"  Python {version} ({path}): product paths")
            paths = json.loads(run_process([path, str(RUN), "_pythons-child",
                                            "quick" if args.quick else "full",
                                            str(sz["pythons_rounds"])]).splitlines()[-1])
            fastest = {name: min(paths["seconds"], key=lambda p: paths["seconds"][p][name])
                       for name in ("large", "tiny")}
            say(f"  Python {version}: {' '.join(BENCHES)}")
            js = os.path.join(tmp, f"{version}.json")
            run_process([path, str(RUN), *BENCHES, "--no-race", "--json", js]
                        + (["--quick"] if args.quick else []) + forwarded_sizes(args)
                        + (["--no-torch"] if args.no_torch else []))
            with open(js, encoding="utf-8") as f:
                doc = json.load(f)
            out["pythons"].append({"python": version, "executable": path,
                                   "env": doc["env"], "paths": paths, "fastest": fastest,
                                   "results": doc["results"]})
    return out


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def rows_of(p: dict) -> dict:
    """The figures compared across interpreters: label -> text, for one interpreter."""
    s, r = p["paths"]["seconds"], p["results"]
    tiny, large = r.get("train-tiny", {}), r.get("train-large", {})
    rows = {"engine's product path (ops.PRODUCT_PATH)": p["paths"]["chosen"],
            "fastest path, train-large / microgpt steps": " / ".join(
                p["fastest"][k] for k in ("large", "tiny"))}
    for path in s:
        if path != "dist":
            rows[f"{path} speed / dist's, train-large / microgpt"] = " / ".join(
                fmt(s["dist"][k] / s[path][k]) + "x" for k in ("large", "tiny"))
    torch = _get(tiny, "torch", "skipped")
    rows.update({
        "train-tiny tokens/s (1 process)": fmt(_get(tiny, "puregpt", "tokens_per_s")),
        "train-tiny / scalar autograd": fmt(_get(tiny, "ratio_vs_baseline")) + "x",
        "train-tiny / PyTorch eager": ("skipped: " + torch) if torch
        else fmt(_get(tiny, "ratio_vs_torch")) + "x",
        "train-large tokens/s (1 process)": fmt(_get(large, "single", "tokens_per_s")),
        "train-large M MAC/s (1 process)": fmt((_get(large, "single", "macs_per_s") or 0) / 1e6),
        "train-large / its products alone": fmt(_get(large, "fraction_of_products")),
        "train-large 2 processes / 1": fmt(_get(large, "workers", "speedup")) + "x",
    })
    return rows


def table(r: dict) -> str:
    head = ("### pythons: " + ", ".join(BENCHES) + " and the product paths on each CPython\n\n")
    if not r["pythons"]:
        return head + "No CPython 3.10-3.13 found."
    columns = [rows_of(p) for p in r["pythons"]]
    labels = list(max(columns, key=len))  # the newest Python's have every path's rows
    text = head + md_table(["measure"] + [f"Python {p['python']}" for p in r["pythons"]],
                           [[label] + [c.get(label, "-") for c in columns] for label in labels])
    loads = ", ".join(f"{p['python']}: {fmt((p['env'].get('loadavg') or [None])[0])}"
                      for p in r["pythons"])
    return text + ("\n\nEach column ran in its own processes, one after the other (load average "
                   f"at each start: {loads}); ratios within a column are of one run.")


# Paths within 3% of each other on train-large steps are a tie: one path's own rounds differ by
# 3-6% on this machine (e.g. 1.84 / 1.90 / 1.95 s), so a smaller gap does not say which is faster.
TIE = 0.03


def engine_path_ratio(p: dict) -> float:
    """The engine's path's best train-large step / the fastest path's (1: it is the fastest)."""
    best = p["paths"]["seconds"]
    return best[p["paths"]["chosen"]]["large"] / best[p["fastest"]["large"]]["large"]


def summary_rows(r: dict) -> list:
    return [["pythons", f"Python {p['python']}: the engine's path {p['paths']['chosen']} vs the "
                        f"fastest on train-large steps (its time / the fastest's)",
             f"{p['fastest']['large']} ({fmt(engine_path_ratio(p))})",
             f"the engine's, or within {TIE:.0%}",
             fmt(engine_path_ratio(p) <= 1 + TIE)] for p in r["pythons"]]
