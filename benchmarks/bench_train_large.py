"""train-large: a ~200K-parameter model's training step, achieved multiply-adds per second against
the interpreter's own dot-product ceiling, and --workers N processes against one (same results).
Its model and batches (`large_setup`) are also the sample and memory benchmarks'."""

from __future__ import annotations

import math
import random
import statistics
from itertools import repeat
from operator import mul

from harness import (SHARED_DATA, alternation, at_least, fmt, max_abs, max_abs_diff, md_table,
                     say, seconds_per_call, size_options, timed)
from puregpt import model, ops, optim
from puregpt.config import GPTConfig, TrainConfig
from puregpt.data import bundled_names_path, get_batch, load_corpus

FULL = {"large": dict(n_embd=64, n_head=4, n_layer=4, block_size=32), "large_batch": 32,
        "large_steps": 5, "ceiling_budget": 0.25}
QUICK = {"large": dict(n_embd=32, n_head=4, n_layer=2, block_size=16), "large_batch": 8,
         "large_steps": 1, "ceiling_budget": 0.02}
PARALLEL_TOL = 1e-12  # --workers 2 vs one process: only the order of additions differs
TARGETS = {"fraction_of_ceiling": 0.8, "workers_speedup": 1.8, "workers_tolerance": PARALLEL_TOL,
           "fraction_of_products": 0.85}
CEILING_KINDS = ("sum_map_mul", "sumprod")  # the ceiling the targets are stated against


def add_arguments(group) -> None:
    group.add_argument("--workers", type=at_least(2, " (the comparison is against one process)"),
                       default=2, metavar="N",
                       help="processes for train-large's parallel run (>= 2, default 2)")
    size_options(group, FULL, QUICK, "large_steps", "large_batch")


def stream_path() -> tuple[str, str]:
    """The train-large corpus: tinyshakespeare when present, else the bundled names as a stream."""
    shared = SHARED_DATA / "tinyshakespeare.txt"
    if shared.exists():
        return str(shared), "tinyshakespeare, stream windows of block_size + 1 characters"
    return bundled_names_path(), "bundled names.txt read as a stream (tinyshakespeare absent)"


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


def dot_rates(lengths, budget: float) -> dict:
    """MAC/s of dot products of rows of each length, best of 3 trials of `budget` seconds:

    sum_map_mul    [sum(map(mul, w, x)) for w in W]         (the ceiling before Python 3.12)
    sumprod        list(map(math.sumprod, W, repeat(x)))     (Python 3.12+)
    math_dist      list(map(math.dist, W, repeat(x)))        (not a dot product: the fastest
                   C loop over two float vectors in the 3.11 stdlib, for reference)
    engine_matmul  ops.matmul(X, W), 16 rows of X, or ops.matvec per row: the engine's own
                   primitive, whatever it is at the moment
    W has 16384 / n rows, so every call does the same number of multiply-adds."""
    out = {}
    for n in lengths:
        rng = random.Random(n)
        rows = max(1, 16384 // n)
        W = [[rng.random() for _ in range(n)] for _ in range(rows)]
        x = [rng.random() for _ in range(n)]
        X = [[rng.random() for _ in range(n)] for _ in range(16)]
        kinds = {"sum_map_mul": (lambda: [sum(map(mul, w, x)) for w in W], 1)}
        if hasattr(math, "sumprod"):
            sumprod = math.sumprod
            kinds["sumprod"] = (lambda: list(map(sumprod, W, repeat(x))), 1)
        dist = math.dist
        kinds["math_dist"] = (lambda: list(map(dist, W, repeat(x))), 1)
        if hasattr(ops, "matmul"):
            kinds["engine_matmul"] = (lambda: ops.matmul(X, W), len(X))
        else:
            kinds["engine_matmul"] = (lambda: [ops.matvec(W, xi) for xi in X], len(X))
        out[str(n)] = {kind: per_call * rows * n / seconds_per_call(f, budget)
                       for kind, (f, per_call) in kinds.items()}
    return out


def record_products(params, cfg, batch) -> list:
    """Every product one gradient pass of this batch asks of the engine, as (function, A, B)
    with copies of its arguments (the backward pass later adds into some of them in place):
    the top-level calls of ops.matmul and ops.dots (attention's per-query products), not the
    calls those make themselves."""
    from puregpt.train import batch_grads
    calls, depth = [], [0]

    def copy(M):
        return [type(r)(r) for r in M] if M and isinstance(M[0], (list, tuple)) else list(M)

    def recorder(name, f):
        def record(A, B, *acc):  # a gradient's matmul(A, B, acc) adds into acc: recorded as
            if depth[0] == 0:    # the product alone, the primitive (the += is the step's)
                calls.append((name, copy(A), copy(B)))
            depth[0] += 1
            try:
                return f(A, B, *acc)
            finally:
                depth[0] -= 1
        return record

    saved = {name: getattr(ops, name) for name in ("matmul", "dots")}
    try:
        for name, f in saved.items():
            setattr(ops, name, recorder(name, f))
        batch_grads(params, cfg, [batch], model.zeros_like(params))
    finally:
        for name, f in saved.items():
            setattr(ops, name, f)
    return [(saved[name], A, B) for name, A, B in calls]


def products_seconds(calls: list, trials: int = 3) -> float:
    """Wall seconds of the recorded products alone, replayed back to back: best of `trials`,
    with the garbage collector paused as a training step pauses it (train.batch_grads)."""
    best = math.inf
    for _ in range(trials):
        with ops.collector_paused():
            _, seconds = timed(lambda: [f(A, B) for f, A, B in calls])
        best = min(best, seconds)
    return best


def merge_best(a: dict, b: dict) -> dict:
    return {n: {k: max(a[n][k], b[n][k]) for k in a[n]} for n in a}


def ceiling_of(rates: dict, n: int) -> float:
    """The dot-product ceiling at length n: the faster of sum(map(mul)) and math.sumprod."""
    return max(v for k, v in rates[str(n)].items() if k in CEILING_KINDS)


def run(sz: dict, args) -> dict:
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
    # the engine's own primitive alone on this step's exact products (shapes and values)
    products = record_products(params, cfg, batches[0])
    say(f"  the step's {len(products):,} products alone (before)")
    t_products = products_seconds(products)

    # One set of weights: each step computes the gradient in one process and with the pool (in
    # alternating order), compares them, then applies Adam once (timed once, added to both).
    grads = {"single": model.zeros_like(params), "workers": model.zeros_like(params)}
    times = {"single": [], "workers": []}
    state, checks, losses, paired_products = optim.new_state(params), [], [], []
    pool = WorkerPool(cfg, n_workers)

    def gradient(kind, s):
        optim.zero_grads(grads[kind])
        return batch_grads(params, cfg, [batches[s]], grads[kind],
                           pool if kind == "workers" else None)[0]

    try:
        for s in range(n_steps):
            loss = {}
            for kind in alternation(["single", "workers"], s):
                say(f"  step {s + 1}/{n_steps}: "
                    + ("1 process" if kind == "single" else f"{n_workers} processes"))
                loss[kind], seconds = timed(gradient, kind, s)
                times[kind].append(seconds)
                if kind == "single":  # the products alone, adjacent in time to this step
                    paired_products.append(products_seconds(products, trials=1))
            _, t_adam = timed(optim.adamw_step, params, grads["single"], state,
                              optim.lr_at(s, tc), tc.beta1, tc.beta2, tc.eps, tc.weight_decay)
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
    say("  the step's products alone (after)")
    t_products = min(t_products, products_seconds(products))

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
        # the target's measure: the share of a step's time that its products need on their
        # own, each step against the replay of its products run right after it (this VM's
        # speed drifts by 20% within minutes: a ratio of two bests taken minutes apart moves
        # with the drift, the median of adjacent pairs does not), median over the steps
        "products": {"calls": len(products), "seconds": t_products,
                     "macs_per_s": macs["total"] / t_products},
        "fraction_of_products": statistics.median(
            p / t for p, t in zip(paired_products, times["single"])),
        "fraction_of_products_best": t_products / t1,  # best replay / best step, for reference
        "products_seconds_paired": paired_products,
        "targets": dict(TARGETS),
    }


def table(r: dict) -> str:
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
                  f"the engine's own matmul primitive at length {r['ceiling_length']}, and "
                  f"{fmt(r['fraction_of_products'])} of that primitive on the step's own "
                  f"products (each step against its {r['products']['calls']:,} calls of "
                  f"ops.matmul and ops.dots replayed alone right after it, median; target >= "
                  f"{r['targets']['fraction_of_products']:g}; the best replay, "
                  f"{fmt(r['products']['seconds'])} s, {fmt(r['products']['macs_per_s'] / 1e6)}"
                  f" M MAC/s, against the best step: "
                  f"{fmt(r['fraction_of_products_best'])}).")
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


def summary_rows(r: dict) -> list:
    w = r["workers"]
    diff = max(w["max_grad_diff"], w["max_loss_diff"])
    return [["train-large", f"1 process: {fmt(r['single']['tokens_per_s'])} tokens/s, "
                            f"{fmt(r['single']['macs_per_s'] / 1e6)} M MAC/s, of the dot ceiling "
                            f"at {r['ceiling_length']} ({fmt(r['ceiling_macs_per_s'] / 1e6)} M "
                            f"MAC/s)",
             fmt(r["fraction_of_ceiling"]), f">= {TARGETS['fraction_of_ceiling']:g}",
             fmt(r["fraction_of_ceiling"] >= TARGETS["fraction_of_ceiling"])],
            ["train-large", f"{w['n']} processes / 1 (max diff {diff:.1e})",
             fmt(w["speedup"]) + "x",
             f">= {TARGETS['workers_speedup']:g}x, diff <= {PARALLEL_TOL:g}",
             fmt(w["speedup"] >= TARGETS["workers_speedup"] and diff <= PARALLEL_TOL)],
            ["train-large", "1 process / the engine's primitive alone on the step's products "
                            "(median of each step against a replay right after it)",
             fmt(r["fraction_of_products"]) + " (best / best "
             + fmt(r["fraction_of_products_best"]) + f": {fmt(r['products']['seconds'])} s of "
             f"{fmt(r['single']['best_step_seconds'])} s)",
             f">= {TARGETS['fraction_of_products']:g}",
             fmt(r["fraction_of_products"] >= TARGETS["fraction_of_products"])]]
