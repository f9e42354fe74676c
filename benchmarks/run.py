"""puregpt's benchmarks: one command each, a Markdown table on stdout, JSON in benchmarks/results/.

    python benchmarks/run.py all               # everything (about 10-20 minutes)
    python benchmarks/run.py train-tiny        # microgpt: puregpt vs scalar autograd vs PyTorch
    python benchmarks/run.py race              # the 1000-step microgpt run, fresh processes
    python benchmarks/run.py train-large       # ~200K parameters: MAC/s vs the dot ceiling, workers
    python benchmarks/run.py sample            # KV-cached generation vs full re-forward
    python benchmarks/run.py memory            # peak RSS of training, fresh processes
    python benchmarks/run.py all --quick       # tiny sizes, for CI (asserts the checks, not speed)

Every benchmark compares within ONE run (ratios), alternating the contenders and keeping each
one's best repeat, because the machine is shared and noisy. See benchmarks/README.md for what each
measures and how. Every speed comparison is paired with an equality check (losses, gradients or
tokens) that raises when it fails: a faster wrong answer is not a result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import repeat
from operator import mul
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (str(REPO), str(BENCH_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from puregpt import model, ops, optim  # noqa: E402
from puregpt.config import GPTConfig, TrainConfig, preset  # noqa: E402
from puregpt.data import bundled_names_path, get_batch, load_corpus  # noqa: E402
from puregpt.sample import generate  # noqa: E402
from puregpt.tokenizer import CharTokenizer  # noqa: E402
from puregpt.parallel import available_cpus  # noqa: E402

import scalar_baseline  # noqa: E402

RESULTS_DIR = BENCH_DIR / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
BENCHMARKS = ("train-tiny", "race", "train-large", "sample", "memory")
LOSS_TOL = 1e-9  # puregpt vs the scalar baseline and vs PyTorch: the same algorithm
PARALLEL_TOL = 1e-12  # --workers 2 vs one process: only the order of additions differs

# Sizes: full runs, and --quick (CI: every code path, seconds each).
FULL = {
    "tiny_steps": 1000, "baseline_steps": 40, "tiny_rounds": 3, "race_steps": 1000,
    "race_rounds": 3,
    "large": dict(n_embd=64, n_head=4, n_layer=4, block_size=32), "large_batch": 32,
    "large_steps": 5, "ceiling_budget": 0.25,
    "sample_contexts": 4, "sample_rounds": 2,
    "memory_tiny_steps": 50, "memory_large_steps": 1,
}
QUICK = {
    "tiny_steps": 20, "baseline_steps": 3, "tiny_rounds": 1, "race_steps": 20,
    "race_rounds": 1,
    "large": dict(n_embd=32, n_head=4, n_layer=2, block_size=16), "large_batch": 8,
    "large_steps": 1, "ceiling_budget": 0.02,
    "sample_contexts": 2, "sample_rounds": 1,
    "memory_tiny_steps": 5, "memory_large_steps": 1,
}


# --- helpers -----------------------------------------------------------------------------------


def names_path() -> str:
    shared = SHARED_DATA / "names.txt"
    return str(shared) if shared.exists() else bundled_names_path()


def stream_path() -> tuple[str, str]:
    """The train-large corpus: tinyshakespeare when present, else the bundled names as a stream."""
    shared = SHARED_DATA / "tinyshakespeare.txt"
    if shared.exists():
        return str(shared), "tinyshakespeare, stream windows of block_size + 1 characters"
    return bundled_names_path(), "bundled names.txt read as a stream (tinyshakespeare absent)"


def have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


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
    if isinstance(t, dict):
        return max((max_abs(v) for v in t.values()), default=0.0)
    if t and isinstance(t[0], list):
        return max((max_abs(r) for r in t), default=0.0)
    return max((abs(x) for x in t), default=0.0)


def environment() -> dict:
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
        "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg")
        else None, "has_math_sumprod": hasattr(math, "sumprod"), "torch": torch_version,
        "git_commit": commit, "engine_uncommitted_changes": dirty,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def say(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


# --- train-tiny: the microgpt recipe on three engines --------------------------------------


def microgpt_setup(docs: list[str], steps: int, seed: int = 42):
    """microgpt's recipe with puregpt's engine: shuffle, vocabulary, init from one RNG."""
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    tok = CharTokenizer(sorted(set("".join(docs))))
    p = preset("microgpt")
    cfg = GPTConfig(**{**p["model"], "vocab_size": tok.vocab_size})
    tc = TrainConfig(**{**p["train"], "steps": steps, "seed": seed})
    params = model.init_params(cfg, rng)
    examples = []
    for doc in docs:
        ids = tok.encode_doc(doc)
        n = min(cfg.block_size, len(ids) - 1)
        examples.append(([ids[:n]], [ids[1:n + 1]]))
    return cfg, tc, params, examples


def puregpt_tiny(docs: list[str], steps: int, seed: int = 42) -> dict:
    """Train `steps` microgpt steps with puregpt's engine; per-step wall times, losses."""
    cfg, tc, params, examples = microgpt_setup(docs, steps, seed)
    state, grads = optim.new_state(params), model.zeros_like(params)
    losses, tokens, times = [], [], []
    clock = time.perf_counter
    for step in range(steps):
        inputs, targets = examples[step % len(examples)]
        t0 = clock()
        optim.zero_grads(grads)
        loss, _, n = model.loss_and_grads(params, cfg, inputs, targets, grads)
        optim.adamw_step(params, grads, state, optim.lr_at(step, tc), tc.beta1, tc.beta2, tc.eps,
                         tc.weight_decay)
        times.append(clock() - t0)
        losses.append(loss)
        tokens.append(n)
    return {"losses": losses, "tokens": tokens, "times": times, "params": model.num_params(params)}


def puregpt_tiny_split(docs: list[str], steps: int, seed: int = 42) -> dict:
    """The same steps with the backward pass split across two processes (parallel.SplitStep,
    what `puregpt train` does with one sequence per step on two cores): losses and the wall
    time of the whole loop (steps overlap, so there is no per-step time)."""
    from puregpt.parallel import SplitStep
    cfg, tc, params, examples = microgpt_setup(docs, steps, seed)
    state, grads = optim.new_state(params), model.zeros_like(params)
    split = SplitStep(cfg, tc, params, state)
    losses, tokens = [], 0
    try:
        t0 = time.perf_counter()
        for step in range(steps):
            inputs, targets = examples[step % len(examples)]
            loss, n = split.step(params, grads, inputs, targets, optim.lr_at(step, tc), state)
            losses.append(loss)
            tokens += n
        split.sync()
        seconds = time.perf_counter() - t0
    finally:
        split.close()
    return {"losses": losses, "tokens": tokens, "seconds": seconds}


def bench_train_tiny(sz: dict, args) -> dict:
    data = names_path()
    docs = scalar_baseline.load_docs(data)
    N, K = sz["tiny_steps"], min(sz["baseline_steps"], sz["tiny_steps"])
    use_torch = have_torch() and not args.no_torch
    if use_torch:
        import torch_microgpt
    runs = {"puregpt": [], "split": [], "baseline": [], "torch": []}
    two_cores = available_cpus() >= 2

    def run_puregpt():
        say(f"  puregpt: {N} steps")
        runs["puregpt"].append(puregpt_tiny(docs, N))
        if two_cores:
            say(f"  puregpt, backward split across two processes: {N} steps")
            runs["split"].append(puregpt_tiny_split(docs, N))

    # P B T P B T ... P: every contender sees the machine in the same phases; best repeat kept.
    for r in range(sz["tiny_rounds"]):
        run_puregpt()
        if r < max(1, sz["tiny_rounds"] - 1):
            say(f"  scalar baseline: {K} steps of a {N}-step schedule")
            runs["baseline"].append(scalar_baseline.train(docs, K, seed=42, total_steps=N))
            if use_torch:
                say(f"  torch: {N} steps")
                res = torch_microgpt.train(docs, N, seed=42, threads=1)
                res.pop("model")
                runs["torch"].append(res)
    if sz["tiny_rounds"] == 1:
        run_puregpt()

    ref = runs["puregpt"][0]["losses"]
    for other in runs["puregpt"][1:] + runs["split"]:
        assert other["losses"] == ref, "puregpt is not deterministic (or the split step differs)"
    base_diff = max(max_abs_diff(b["losses"], ref[:K]) for b in runs["baseline"])
    assert base_diff < LOSS_TOL, f"scalar baseline losses differ from puregpt's by {base_diff}"
    # the benchmark's loop must be the trainer's: `puregpt train --preset microgpt` on this data
    from puregpt.train import train as puregpt_train
    tr = puregpt_train(GPTConfig(**preset("microgpt")["model"]),
                       TrainConfig(**{**preset("microgpt")["train"], "steps": N}),
                       data=data, quiet=True)
    trainer_diff = max_abs_diff(tr.losses, ref)
    assert trainer_diff < 1e-12, \
        f"puregpt.train.train losses differ from the loop's: {trainer_diff}"

    def best_rate(run_list, first=None):
        rates = []
        for run in run_list:
            toks = run["tokens"][:first] if first else run["tokens"]
            secs = run["times"][:first] if first else run["times"]
            rates.append(sum(toks) / sum(secs))
        return max(rates), rates

    pg_rate, pg_rates = best_rate(runs["puregpt"])
    pg_rate_k, _ = best_rate(runs["puregpt"], K)
    base_rates = [b["tokens"] / b["seconds"] for b in runs["baseline"]]
    out = {
        "data": data, "documents": len(docs), "params": runs["puregpt"][0]["params"],
        "steps": N, "baseline_steps": K, "rounds": sz["tiny_rounds"],
        "puregpt": {"tokens_per_s": pg_rate, "tokens_per_s_first_k_steps": pg_rate_k,
                    "tokens_per_s_all_repeats": pg_rates,
                    "tokens": sum(runs["puregpt"][0]["tokens"]),
                    "step_ms_median": 1e3 * statistics.median(
                        min(t) for t in zip(*(r["times"] for r in runs["puregpt"]))),
                    "final_loss": ref[-1]},
        "baseline": {"tokens_per_s": max(base_rates), "tokens_per_s_all_repeats": base_rates,
                     "tokens": runs["baseline"][0]["tokens"],
                     "max_loss_diff_vs_puregpt": base_diff},
        "ratio_vs_baseline": pg_rate_k / max(base_rates),
        "split": ({"tokens_per_s": max(r["tokens"] / r["seconds"] for r in runs["split"]),
                   "tokens_per_s_all_repeats": [r["tokens"] / r["seconds"]
                                                for r in runs["split"]],
                   "same_losses_as_one_process": True}
                  if runs["split"] else {"skipped": "fewer than two cores"}),
        "trainer_loop_max_loss_diff": trainer_diff,
        "target_ratio_vs_baseline": 50.0,
    }
    if use_torch:
        t_diff = max(max_abs_diff(t["losses"], ref) for t in runs["torch"])
        assert t_diff < LOSS_TOL, f"PyTorch losses differ from puregpt's by {t_diff}"
        t_rates = [t["tokens"] / t["seconds"] for t in runs["torch"]]
        out["torch"] = {"tokens_per_s": max(t_rates), "tokens_per_s_all_repeats": t_rates,
                        "threads": 1, "dtype": "float64", "max_loss_diff_vs_puregpt": t_diff}
        out["ratio_vs_torch"] = pg_rate / max(t_rates)
        if runs["split"]:
            out["split"]["ratio_vs_torch"] = out["split"]["tokens_per_s"] / max(t_rates)
    else:
        out["torch"] = {"skipped": "torch not installed" if not have_torch() else "--no-torch"}
        out["ratio_vs_torch"] = None
    if not args.no_race:
        out["race"] = bench_race(sz, args)
    return out


def table_train_tiny(r: dict) -> str:
    rows = [
        ["puregpt engine, one process", fmt(r["puregpt"]["tokens_per_s"]), r["steps"], "1",
         "reference"],
        ["scalar autograd (benchmarks/scalar_baseline.py)", fmt(r["baseline"]["tokens_per_s"]),
         r["baseline_steps"], fmt(r["ratio_vs_baseline"]) + "x",
         f"{r['baseline']['max_loss_diff_vs_puregpt']:.1e}"],
    ]
    split = r.get("split", {})
    if "tokens_per_s" in split:
        rows.insert(1, ["puregpt engine, backward split across 2 processes",
                        fmt(split["tokens_per_s"]), r["steps"],
                        fmt(split["tokens_per_s"] / r["puregpt"]["tokens_per_s"]) + "x faster",
                        "0 (bit-identical)"])
    if "skipped" in r["torch"]:
        rows.append(["PyTorch eager float64, 1 thread", "skipped: " + r["torch"]["skipped"],
                     "-", "-", "-"])
    else:
        rows.append(["PyTorch eager float64, 1 thread", fmt(r["torch"]["tokens_per_s"]),
                     r["steps"], fmt(r["ratio_vs_torch"]) + "x",
                     f"{r['torch']['max_loss_diff_vs_puregpt']:.1e}"])
    text = (f"### train-tiny: microgpt ({r['params']:,} params, one name per step, "
            f"{r['documents']:,} names)\n\n"
            + md_table(["engine", "tokens/s (best)", "steps", "puregpt speedup",
                        "max loss diff vs puregpt"], rows)
            + f"\n\npuregpt/baseline is measured over the same {r['baseline_steps']} steps "
              f"(target >= {r['target_ratio_vs_baseline']:.0f}x).")
    if "race" in r:
        text += "\n\n" + table_race(r["race"])
    return text


# --- the end-to-end race ---------------------------------------------------------------------

STEP_LINE = re.compile(r"^step\s+\d+ /\s*\d+ \| loss \S+$", re.M)
SAMPLE_LINE = re.compile(r"^sample\s+\d+: (.*)$", re.M)


def bench_race(sz: dict, args) -> dict:
    """Wall time of a whole microgpt run (train + 20 samples) in a fresh process, each engine."""
    N, data = sz["race_steps"], names_path()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    use_torch = have_torch() and not args.no_torch
    walls = {"puregpt": [], "torch1": [], "torch2": []}
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="puregpt-race-") as tmp:
        for r in range(sz["race_rounds"]):
            cmds = {"puregpt": [sys.executable, "-m", "puregpt", "train", "--preset", "microgpt",
                                "--steps", str(N), "--data", data,
                                "--out", os.path.join(tmp, f"run{r}")]}
            if use_torch:  # puregpt uses both cores: so may PyTorch (it is no faster with them)
                for threads in (1, 2):
                    cmds[f"torch{threads}"] = [sys.executable, str(BENCH_DIR / "torch_microgpt.py"),
                                               "--steps", str(N), "--samples", "20", "--data",
                                               data, "--threads", str(threads)]
            order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]
            for name in order:
                say(f"  race: {name} ({N} steps + 20 samples, fresh process)")
                t0 = time.perf_counter()
                proc = subprocess.run(cmds[name], cwd=REPO, env=env, capture_output=True,
                                      text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmds[name])} failed:\n{proc.stderr[-3000:]}")
                walls[name].append(wall)
                outputs[name] = proc.stdout
    pg_samples = SAMPLE_LINE.findall(outputs["puregpt"])
    assert len(pg_samples) == 20, f"puregpt printed {len(pg_samples)} samples, not 20"
    out = {"steps": N, "samples": 20, "data": data, "rounds": sz["race_rounds"],
           "commands": {
               "puregpt": f"python -m puregpt train --preset microgpt --steps {N} --data "
                          f"names.txt --out TMP",
               "torch": f"python benchmarks/torch_microgpt.py --steps {N} --samples 20 "
                        f"--threads 1|2"},
           "puregpt_seconds": min(walls["puregpt"]), "puregpt_seconds_all": walls["puregpt"],
           "target": "puregpt faster than PyTorch eager (torch/puregpt > 1)"}
    if use_torch:
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
            "same_printed_losses": all(STEP_LINE.findall(outputs["puregpt"])
                                       == STEP_LINE.findall(outputs[name])
                                       for name in ("torch1", "torch2")),
            "same_samples": all(pg_samples == SAMPLE_LINE.findall(outputs[name])
                                for name in ("torch1", "torch2")),
        })
    else:
        out.update({"torch_seconds": None, "torch_over_puregpt": None,
                    "skipped": "torch not installed" if not have_torch() else "--no-torch"})
    return out


def table_race(r: dict) -> str:
    if r.get("torch_seconds") is None:
        rows = [["puregpt (python -m puregpt train --preset microgpt)",
                 fmt(r["puregpt_seconds"]), "-"],
                ["PyTorch eager (torch_microgpt.py)", "skipped: " + r["skipped"], "-"]]
        return f"### race: {r['steps']} steps + 20 samples, fresh process\n\n" + md_table(
            ["run", "wall s (best)", "torch / puregpt"], rows)
    pg = r["puregpt_seconds"]
    rows = [["puregpt (python -m puregpt train --preset microgpt; 2 processes)", fmt(pg), "1"],
            ["PyTorch eager, 1 thread (benchmarks/torch_microgpt.py, incl. import torch)",
             fmt(r["torch_seconds_1_thread"]), fmt(r["torch_seconds_1_thread"] / pg) + "x"],
            ["PyTorch eager, 2 threads", fmt(r["torch_seconds_2_threads"]),
             fmt(r["torch_seconds_2_threads"] / pg) + "x"]]
    return (f"### race: {r['steps']} steps + 20 samples, fresh process\n\n"
            + md_table(["run", "wall s (best)", "torch / puregpt"], rows)
            + f"\n\nSame printed losses: {fmt(r['same_printed_losses'])}; same 20 samples: "
              f"{fmt(r['same_samples'])} (target: torch / puregpt > 1).")


# --- train-large: MAC/s against the interpreter's dot-product ceiling, and workers ------------


def large_setup(sz: dict, seed: int = 42):
    """The train-large model and its batches: full block_size windows of a character stream."""
    path, what = stream_path()
    rng = random.Random(seed)
    shape = sz["large"]
    tc = TrainConfig(mode="stream", batch_size=sz["large_batch"], val_fraction=0.0,
                     steps=max(1, sz["large_steps"]), seed=seed, workers=1)
    corpus = load_corpus(path, tc, shape["block_size"], rng)
    cfg = GPTConfig(vocab_size=corpus.tokenizer.vocab_size, **shape)
    params = model.init_params(cfg, rng)

    def batch(step):
        return get_batch(corpus, step, 0, tc, cfg.block_size, rng)

    return cfg, tc, params, batch, path, what, corpus


def macs_per_step(cfg: GPTConfig, lengths: list[int]) -> dict:
    """Useful multiply-adds of one forward + backward over sequences of these lengths.

    forward = N (12 L C^2 + V C)  +  L C sum_T T (T + 1)     (N = sum of lengths)
              matmuls: q, k, v, o (4C^2), fc1 and fc2 (8C^2) per layer, lm_head (VC);
              attention per layer and sequence: q.k and a.v over the causal triangle,
              C T (T + 1) / 2 each.
    backward = 2 x forward (dX and dW for each matmul; dA, dV, dQ, dK for attention).
    Embeddings, norms, softmax, cross-entropy and Adam are O(N C) or O(N V): not counted.
    """
    N, L, C, V = sum(lengths), cfg.n_layer, cfg.n_embd, cfg.vocab_size
    matmul = N * (12 * L * C * C + V * C)
    attention = L * C * sum(T * (T + 1) for T in lengths)
    return {"forward_matmul": matmul, "forward_attention": attention,
            "total": 3 * (matmul + attention)}


CEILING_KINDS = ("sum_map_mul", "sumprod")  # the ceiling the targets are stated against


def dot_rates(lengths, budget: float) -> dict:
    """MAC/s of dot products of rows of each length, best of 3 trials of `budget` seconds:

    sum_map_mul    [sum(map(mul, w, x)) for w in W]         (the ceiling before Python 3.12)
    sumprod        list(map(math.sumprod, W, repeat(x)))     (Python 3.12+)
    math_dist      list(map(math.dist, W, repeat(x)))        (not a dot product: the fastest
                   C loop over two float vectors in the 3.11 stdlib, for reference)
    engine_matmul  ops.matmul(X, W), 16 rows of X, or ops.matvec per row: the engine's own
                   primitive, whatever it is at the moment
    W has 16384 / n rows, so every call does the same number of multiply-adds."""
    import math as _m
    out = {}
    for n in lengths:
        rng = random.Random(n)
        rows = max(1, 16384 // n)
        W = [[rng.random() for _ in range(n)] for _ in range(rows)]
        x = [rng.random() for _ in range(n)]
        X = [[rng.random() for _ in range(n)] for _ in range(16)]
        kinds = {"sum_map_mul": (lambda: [sum(map(mul, w, x)) for w in W], 1)}
        if hasattr(_m, "sumprod"):
            sumprod = _m.sumprod
            kinds["sumprod"] = (lambda: list(map(sumprod, W, repeat(x))), 1)
        dist = _m.dist
        kinds["math_dist"] = (lambda: list(map(dist, W, repeat(x))), 1)
        if hasattr(ops, "matmul"):
            kinds["engine_matmul"] = (lambda: ops.matmul(X, W), len(X))
        else:
            kinds["engine_matmul"] = (lambda: [ops.matvec(W, xi) for xi in X], len(X))
        res = {}
        for kind, (f, per_call) in kinds.items():
            best = math.inf
            for _ in range(3):
                reps, t0 = 0, time.perf_counter()
                while True:
                    f()
                    reps += 1
                    elapsed = time.perf_counter() - t0
                    if elapsed >= budget:
                        break
                best = min(best, elapsed / reps)
            res[kind] = per_call * rows * n / best
        out[str(n)] = res
    return out


def merge_best(a: dict, b: dict) -> dict:
    return {n: {k: max(a[n][k], b[n][k]) for k in a[n]} for n in a}


def ceiling_of(rates: dict, n: int) -> float:
    """The dot-product ceiling at length n: the faster of sum(map(mul)) and math.sumprod."""
    return max(v for k, v in rates[str(n)].items() if k in CEILING_KINDS)


def bench_train_large(sz: dict, args) -> dict:
    from puregpt.parallel import WorkerPool
    from puregpt.train import batch_grads
    cfg, tc, params, batch, path, what, corpus = large_setup(sz)
    B, T = sz["large_batch"], cfg.block_size
    n_steps, n_workers = sz["large_steps"], args.workers
    batches = [batch(s) for s in range(n_steps)]
    assert all(len(x) == T for b in batches for x in b[0]), "windows must be full block_size"
    C, hd = cfg.n_embd, cfg.head_dim
    lengths = sorted({hd, T, C, 4 * C, B * T, B * T // n_workers})
    say(f"  dot-product ceiling at lengths {lengths} (before)")
    rates = dot_rates(lengths, sz["ceiling_budget"])

    # One set of weights: each step computes the gradient in one process and with the pool (in
    # alternating order), compares them, then applies Adam once (timed once, added to both).
    grads = {"single": model.zeros_like(params), "workers": model.zeros_like(params)}
    times = {"single": [], "workers": []}
    state, checks, losses = optim.new_state(params), [], []
    pool = WorkerPool(cfg, n_workers)
    try:
        for s in range(n_steps):
            order = ["single", "workers"] if s % 2 == 0 else ["workers", "single"]
            loss = {}
            for kind in order:
                say(f"  step {s + 1}/{n_steps}: "
                    + ("1 process" if kind == "single" else f"{n_workers} processes"))
                t0 = time.perf_counter()
                optim.zero_grads(grads[kind])
                loss[kind] = batch_grads(params, cfg, [batches[s]], grads[kind],
                                         pool if kind == "workers" else None)[0]
                times[kind].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            optim.adamw_step(params, grads["single"], state, optim.lr_at(s, tc), tc.beta1,
                             tc.beta2, tc.eps, tc.weight_decay)
            t_adam = time.perf_counter() - t0
            for kind in times:
                times[kind][-1] += t_adam
            gmax = max_abs(grads["single"])
            checks.append({"step": s + 1, "loss_diff": abs(loss["single"] - loss["workers"]),
                           "grad_diff": max_abs_diff(grads["single"], grads["workers"]),
                           "grad_max": gmax, "adam_seconds": t_adam})
            losses.append(loss["single"])
    finally:
        pool.close()
    say("  dot-product ceiling (after)")
    rates = merge_best(rates, dot_rates(lengths, sz["ceiling_budget"]))

    worst_grad = max(c["grad_diff"] for c in checks)
    worst_loss = max(c["loss_diff"] for c in checks)
    worst_rel = max(c["grad_diff"] / (c["grad_max"] or 1.0) for c in checks)
    # a bug (a lost shard, a wrong scale) shows up far above rounding: fail on it; the 1e-12
    # target itself is reported, not asserted
    assert worst_rel <= 1e-9 and worst_loss <= 1e-9, \
        f"--workers {n_workers} disagrees with one process: {checks}"

    tokens = B * T
    macs = macs_per_step(cfg, [T] * B)
    t1, tw = min(times["single"]), min(times["workers"])
    mac_rate = macs["total"] / t1
    ceiling64 = ceiling_of(rates, C)
    return {
        "config": {**sz["large"], "vocab_size": cfg.vocab_size}, "params": model.num_params(params),
        "data": path, "data_note": what, "batch": B, "tokens_per_step": tokens, "steps": n_steps,
        "macs_per_step": macs, "macs_per_token": macs["total"] / tokens,
        "single": {"step_seconds": times["single"], "best_step_seconds": t1,
                   "tokens_per_s": tokens / t1, "macs_per_s": mac_rate,
                   "tokens_per_s_median": tokens / statistics.median(times["single"])},
        "workers": {"n": n_workers, "step_seconds": times["workers"], "best_step_seconds": tw,
                    "tokens_per_s": tokens / tw, "macs_per_s": macs["total"] / tw,
                    "speedup": t1 / tw,
                    "speedup_median": statistics.median(times["single"])
                    / statistics.median(times["workers"]),
                    # each step's own ratio (the two runs of a step are adjacent in time), median
                    "speedup_paired_median": statistics.median(
                        a / b for a, b in zip(times["single"], times["workers"])),
                    "max_loss_diff": worst_loss, "max_grad_diff": worst_grad,
                    "max_grad_rel_diff": worst_rel,
                    "identical_1e-12": worst_loss <= PARALLEL_TOL and worst_grad <= PARALLEL_TOL,
                    "checks": checks},
        "losses": losses,
        "dot_rates": rates, "ceiling_length": C, "ceiling_macs_per_s": ceiling64,
        "fraction_of_ceiling": mac_rate / ceiling64,
        "fraction_of_ceiling_by_length": {n: mac_rate / ceiling_of(rates, int(n)) for n in rates},
        "fraction_of_engine_primitive": mac_rate / rates[str(C)]["engine_matmul"],
        "targets": {"fraction_of_ceiling": 0.8, "workers_speedup": 1.8,
                    "workers_tolerance": PARALLEL_TOL},
    }


def table_train_large(r: dict) -> str:
    c, s, w = r["config"], r["single"], r["workers"]
    head = (f"### train-large: n_embd {c['n_embd']}, n_layer {c['n_layer']}, n_head "
            f"{c['n_head']}, block {c['block_size']}, vocab {c['vocab_size']} "
            f"({r['params']:,} params), batch {r['batch']} windows = {r['tokens_per_step']:,} "
            f"tokens/step, {r['steps']} steps each\n\n")
    rows = [["1 process", fmt(s["best_step_seconds"]), fmt(s["tokens_per_s"]),
             fmt(s["macs_per_s"] / 1e6), fmt(r["fraction_of_ceiling"]), "1", "-"],
            [f"{w['n']} processes (WorkerPool)", fmt(w["best_step_seconds"]),
             fmt(w["tokens_per_s"]), fmt(w["macs_per_s"] / 1e6),
             fmt(w["macs_per_s"] / r["ceiling_macs_per_s"]), fmt(w["speedup"]) + "x",
             f"{max(w['max_grad_diff'], w['max_loss_diff']):.1e}"]]
    text = head + md_table(["run", "best step s", "tokens/s", "M MAC/s",
                            f"of ceiling@{r['ceiling_length']}", "speedup",
                            "max diff vs 1 process"], rows)
    kinds = list(next(iter(r["dot_rates"].values())))
    crow = [[n] + [fmt(r["dot_rates"][n][k] / 1e6) for k in kinds]
            + [fmt(r["fraction_of_ceiling_by_length"][n])] for n in r["dot_rates"]]
    kinds_note = (f"\n\nThe 1-process run reaches {fmt(r['fraction_of_engine_primitive'])} of "
                  f"the engine's own matmul primitive at length {r['ceiling_length']}.")
    text += ("\n\nDot-product rates of this interpreter (M MAC/s, best of before/after; the "
             "ceiling is the faster of " + " and ".join(k for k in kinds if k in CEILING_KINDS)
             + "):\n\n"
             + md_table(["length"] + kinds + ["1-process fraction of ceiling"], crow)
             + kinds_note)
    text += (f"\n\nSpeedup of the best steps {fmt(w['speedup'])}x; median of each step's own "
             f"ratio {fmt(w['speedup_paired_median'])}x; of the median steps "
             f"{fmt(w['speedup_median'])}x (step times, 1 process: "
             + ", ".join(fmt(x) for x in s["step_seconds"]) + "; 2 processes: "
             + ", ".join(fmt(x) for x in w["step_seconds"]) + ").")
    text += (f"\n\n{fmt(r['macs_per_token'])} MACs per token (forward + backward). Targets: "
             f">= {r['targets']['fraction_of_ceiling']:.0%} of the ceiling at length "
             f"{r['ceiling_length']}; {w['n']} processes >= {r['targets']['workers_speedup']}x "
             f"with results equal to {r['targets']['workers_tolerance']:g}.")
    return text


# --- sample: KV cache vs re-running the whole sequence ----------------------------------------


def naive_generate(params, cfg, context, max_new_tokens):
    """Greedy decoding without a cache: the full forward over the growing sequence each token
    (the last block_size tokens, at positions 0.., as puregpt.sample.generate slides)."""
    tokens, out = list(context), []
    for _ in range(max_new_tokens):
        logits, _ = model.forward(params, cfg, [tokens[-cfg.block_size:]])
        last = logits[-1]
        token = max(range(len(last)), key=last.__getitem__)
        out.append(token)
        tokens.append(token)
    return out


def bench_sample(sz: dict, args) -> dict:
    cfg, tc, params, batch, path, what, corpus = large_setup(sz)
    tok = corpus.tokenizer
    contexts = [[tok.stoi[ch]] for ch in "TAMWSRBH"[:sz["sample_contexts"]]]
    new = cfg.block_size - 1  # fills the context exactly: every token through the cache
    times = {"kv_cache": [], "naive": []}
    outs = {}
    for r in range(sz["sample_rounds"]):
        order = ["kv_cache", "naive"] if r % 2 == 0 else ["naive", "kv_cache"]
        for kind in order:
            say(f"  sample: {kind}, {len(contexts)} x {new} tokens")
            t0 = time.perf_counter()
            if kind == "kv_cache":
                res = [list(generate(params, cfg, c, new, random.Random(0), greedy=True))
                       for c in contexts]
            else:
                res = [naive_generate(params, cfg, c, new) for c in contexts]
            times[kind].append(time.perf_counter() - t0)
            assert outs.setdefault(kind, res) == res
    assert outs["kv_cache"] == outs["naive"], "KV-cached and naive greedy outputs differ"
    n_tokens = len(contexts) * new
    kv, naive = min(times["kv_cache"]), min(times["naive"])
    return {"config": {**sz["large"], "vocab_size": cfg.vocab_size},
            "params": model.num_params(params), "weights": "random init (seed 42)",
            "contexts": len(contexts), "new_tokens_per_context": new, "tokens": n_tokens,
            "kv_cache": {"tokens_per_s": n_tokens / kv, "seconds_all": times["kv_cache"]},
            "naive": {"tokens_per_s": n_tokens / naive, "seconds_all": times["naive"]},
            "speedup": naive / kv, "identical": True,
            "example": tok.decode(contexts[0] + outs["kv_cache"][0])}


def table_sample(r: dict) -> str:
    c = r["config"]
    rows = [["KV cache (puregpt.sample.generate)", fmt(r["kv_cache"]["tokens_per_s"]),
             fmt(r["speedup"]) + "x"],
            ["full forward per token (naive)", fmt(r["naive"]["tokens_per_s"]), "1"]]
    return (f"### sample: greedy, n_embd {c['n_embd']}, n_layer {c['n_layer']}, block "
            f"{c['block_size']} ({r['params']:,} params), {r['contexts']} contexts x "
            f"{r['new_tokens_per_context']} new tokens\n\n"
            + md_table(["decoder", "tokens/s (best)", "speedup"], rows)
            + f"\n\nIdentical tokens: {fmt(r['identical'])}.")


# --- memory: peak RSS of training in a fresh process ------------------------------------------


def peak_rss_kb() -> int:
    """This process's peak resident set: VmHWM from /proc, else getrusage (kB)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def memory_child(which: str, steps: int, quick: bool, batch_size: int) -> None:
    """Run in a fresh process: train `steps` steps of `which`, print the peak RSS as JSON."""
    sz = {**(QUICK if quick else FULL), "large_batch": batch_size}
    info = {"which": which, "steps": steps}
    if which == "tiny":
        res = puregpt_tiny(scalar_baseline.load_docs(names_path()), steps)
        info.update(params=res["params"], tokens_per_step=sum(res["tokens"]) / steps)
    elif which == "large":
        cfg, tc, params, batch, *_ = large_setup(sz)
        grads, state = model.zeros_like(params), optim.new_state(params)
        for s in range(steps):
            optim.zero_grads(grads)
            inputs, targets = batch(s)
            model.loss_and_grads(params, cfg, inputs, targets, grads)
            optim.adamw_step(params, grads, state, optim.lr_at(s, tc), tc.beta1, tc.beta2,
                             tc.eps)
        info.update(params=model.num_params(params),
                    tokens_per_step=sz["large_batch"] * cfg.block_size)
    info["peak_rss_kb"] = peak_rss_kb()
    print(json.dumps(info))


def bench_memory(sz: dict, args) -> dict:
    runs = {}
    for which, steps in (("floor", 0), ("tiny", sz["memory_tiny_steps"]),
                         ("large", sz["memory_large_steps"])):
        say(f"  memory: {which}, {steps} steps, fresh process")
        cmd = [sys.executable, str(Path(__file__).resolve()), "_memory-child", which,
               str(steps), str(sz["large_batch"])] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        runs[which] = json.loads(proc.stdout.strip().splitlines()[-1])
    floor = runs["floor"]["peak_rss_kb"]
    return {"floor_mb": floor / 1024,
            "tiny": {**runs["tiny"], "peak_rss_mb": runs["tiny"]["peak_rss_kb"] / 1024,
                     "over_floor_mb": (runs["tiny"]["peak_rss_kb"] - floor) / 1024},
            "large": {**runs["large"], "config": {**sz["large"], "batch": sz["large_batch"]},
                      "peak_rss_mb": runs["large"]["peak_rss_kb"] / 1024,
                      "over_floor_mb": (runs["large"]["peak_rss_kb"] - floor) / 1024},
            "method": "VmHWM of /proc/self/status read by the child at its end (getrusage "
                      "ru_maxrss where /proc is absent); each in a fresh process"}


def table_memory(r: dict) -> str:
    L = r["large"]["config"]
    rows = [["python + puregpt imported (floor)", "-", "-", fmt(r["floor_mb"]), "-"],
            ["train-tiny (microgpt)", fmt(r["tiny"]["params"]), r["tiny"]["steps"],
             fmt(r["tiny"]["peak_rss_mb"]), fmt(r["tiny"]["over_floor_mb"])],
            [f"train-large (C {L['n_embd']}, L {L['n_layer']}, T {L['block_size']}, "
             f"B {L['batch']})", fmt(r["large"]["params"]), r["large"]["steps"],
             fmt(r["large"]["peak_rss_mb"]), fmt(r["large"]["over_floor_mb"])]]
    return ("### memory: peak RSS of training, one process, fresh each\n\n"
            + md_table(["run", "params", "steps", "peak RSS MB", "over floor MB"], rows))


# --- summary -----------------------------------------------------------------------------------


def summary_rows(results: dict) -> list:
    rows = []
    t = results.get("train-tiny")
    if t:
        rows.append(["train-tiny", "puregpt / scalar autograd (tokens/s)",
                     fmt(t["ratio_vs_baseline"]) + "x", ">= 50x",
                     fmt(t["ratio_vs_baseline"] >= 50)])
        rows.append(["train-tiny", "puregpt / PyTorch eager (tokens/s)",
                     "skipped" if t["ratio_vs_torch"] is None else fmt(t["ratio_vs_torch"]) + "x",
                     "-", "-"])
        split = t.get("split", {})
        if "tokens_per_s" in split:
            rows.append(["train-tiny", "backward split across 2 processes / 1 process "
                                       "(bit-identical losses)",
                         fmt(split["tokens_per_s"] / t["puregpt"]["tokens_per_s"]) + "x", "-",
                         "-"])
    race = results.get("race") or (t or {}).get("race")
    if race:
        if race.get("torch_seconds") is None:
            rows.append(["race", f"{race['steps']} steps + 20 samples, fresh process",
                         f"puregpt {fmt(race['puregpt_seconds'])} s; torch skipped", "-", "-"])
        else:
            rows.append(["race", f"{race['steps']} steps + 20 samples, fresh process: "
                                 f"puregpt {fmt(race['puregpt_seconds'])} s, torch "
                                 f"{fmt(race['torch_seconds'])} s",
                         fmt(race["torch_over_puregpt"]) + "x", "> 1x (puregpt faster)",
                         fmt(race["torch_over_puregpt"] > 1)])
    g = results.get("train-large")
    if g:
        rows.append(["train-large", f"1 process: {fmt(g['single']['tokens_per_s'])} tokens/s, "
                                    f"{fmt(g['single']['macs_per_s'] / 1e6)} M MAC/s, of the "
                                    f"dot ceiling at {g['ceiling_length']} "
                                    f"({fmt(g['ceiling_macs_per_s'] / 1e6)} M MAC/s)",
                     fmt(g["fraction_of_ceiling"]), ">= 0.8",
                     fmt(g["fraction_of_ceiling"] >= 0.8)])
        w = g["workers"]
        diff = max(w["max_grad_diff"], w["max_loss_diff"])
        rows.append(["train-large", f"{w['n']} processes / 1 (max diff {diff:.1e})",
                     fmt(w["speedup"]) + "x", ">= 1.8x, diff <= 1e-12",
                     fmt(w["speedup"] >= 1.8 and diff <= PARALLEL_TOL)])
    s = results.get("sample")
    if s:
        rows.append(["sample", f"KV cache {fmt(s['kv_cache']['tokens_per_s'])} tokens/s vs "
                               f"full re-forward {fmt(s['naive']['tokens_per_s'])} (identical "
                               f"tokens)", fmt(s["speedup"]) + "x", "-", "-"])
    m = results.get("memory")
    if m:
        rows.append(["memory", "peak RSS train-tiny / train-large (MB)",
                     f"{fmt(m['tiny']['peak_rss_mb'])} / {fmt(m['large']['peak_rss_mb'])}",
                     "-", "-"])
    return rows


TABLES = {"train-tiny": table_train_tiny, "race": table_race, "train-large": table_train_large,
          "sample": table_sample, "memory": table_memory}
RUNNERS = {"train-tiny": bench_train_tiny, "race": bench_race, "train-large": bench_train_large,
           "sample": bench_sample, "memory": bench_memory}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_memory-child"]:
        memory_child(argv[1], int(argv[2]), "--quick" in argv, int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(
        description="puregpt benchmarks (see benchmarks/README.md).",
        epilog="all runs train-tiny (with the race), train-large, sample and memory.")
    parser.add_argument("benchmarks", nargs="+", choices=("all",) + BENCHMARKS, metavar="NAME",
                        help="all, " + ", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few steps (CI: checks every path, not speed)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the JSON here (default: benchmarks/results/NAME.json, "
                             "NAME.quick.json with --quick)")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes for train-large's parallel run (default 2)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch contender")
    parser.add_argument("--no-race", action="store_true",
                        help="train-tiny without the end-to-end race")
    for key in ("tiny_steps", "baseline_steps", "tiny_rounds", "race_steps", "race_rounds",
                "large_steps", "large_batch"):
        parser.add_argument("--" + key.replace("_", "-"), type=int, default=None,
                            help=f"override (full {FULL[key]}, quick {QUICK[key]})")
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be >= 2 (the comparison is against one process)")
    sz = dict(QUICK if args.quick else FULL)
    for key in ("tiny_steps", "baseline_steps", "tiny_rounds", "race_steps", "race_rounds",
                "large_steps", "large_batch"):
        if getattr(args, key) is not None:
            sz[key] = getattr(args, key)

    names = list(BENCHMARKS) if "all" in args.benchmarks else list(dict.fromkeys(args.benchmarks))
    if "train-tiny" in names and "race" in names and not args.no_race:
        names.remove("race")  # train-tiny runs it
    env = environment()
    results, tables = {}, []
    for name in names:
        say(f"== {name}{' (quick)' if args.quick else ''}")
        t0 = time.perf_counter()
        res = RUNNERS[name](sz, args)
        res["seconds"] = time.perf_counter() - t0
        results[name] = res
        table = TABLES[name](res)
        tables.append(table)
        print(table + "\n", flush=True)
        doc = {"benchmark": name, "quick": args.quick, "env": env, "results": res,
               "markdown": table}
        if not args.json:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            path = RESULTS_DIR / f"{name}{'.quick' if args.quick else ''}.json"
            path.write_text(json.dumps(doc, indent=2) + "\n")
    env["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    summary = md_table(["benchmark", "measure", "value", "target", "met"], summary_rows(results))
    print("### summary" + (" (--quick: sizes too small for the targets)" if args.quick else "")
          + "\n\n" + summary, flush=True)
    combined = {"benchmarks": names, "quick": args.quick, "env": env, "results": results,
                "summary_markdown": summary}
    if args.json:
        if len(names) == 1:
            combined = {"benchmark": names[0], "quick": args.quick, "env": env,
                        "results": results[names[0]], "markdown": tables[0],
                        "summary_markdown": summary}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(combined, indent=2) + "\n")
    elif len(names) > 1:
        path = RESULTS_DIR / f"all{'.quick' if args.quick else ''}.json"
        path.write_text(json.dumps(combined, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
