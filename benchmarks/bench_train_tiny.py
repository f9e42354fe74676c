"""train-tiny: the microgpt recipe on three engines (puregpt, scalar autograd, PyTorch eager),
tokens/s, with their losses asserted equal; then the end-to-end race (bench_race)."""

from __future__ import annotations

import random
import statistics
import time

import bench_race
import scalar_baseline
from harness import (fmt, max_abs_diff, md_table, names_path, say, size_options,
                     torch_skipped)
from puregpt import model, optim
from puregpt.config import GPTConfig, TrainConfig, preset
from puregpt.parallel import available_cpus
from puregpt.tokenizer import CharTokenizer

FULL = {"tiny_steps": 1000, "baseline_steps": 40, "tiny_rounds": 3}
QUICK = {"tiny_steps": 20, "baseline_steps": 3, "tiny_rounds": 1}
LOSS_TOL = 1e-9  # puregpt vs the scalar baseline and vs PyTorch: the same algorithm
TARGET_RATIO_VS_BASELINE = 50.0


def add_arguments(group) -> None:
    group.add_argument("--no-race", action="store_true",
                       help="train-tiny without the end-to-end race")
    size_options(group, FULL, QUICK, "tiny_steps", "baseline_steps", "tiny_rounds")


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


def run(sz: dict, args) -> dict:
    data = names_path()
    docs = scalar_baseline.load_docs(data)
    N, K = sz["tiny_steps"], min(sz["baseline_steps"], sz["tiny_steps"])
    skipped = torch_skipped(args)
    if not skipped:
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
    # (puregpt, the reference of every ratio, runs first and last; harness.alternate would
    # reverse the order instead.)
    for r in range(sz["tiny_rounds"]):
        run_puregpt()
        if r < max(1, sz["tiny_rounds"] - 1):
            say(f"  scalar baseline: {K} steps of a {N}-step schedule")
            runs["baseline"].append(scalar_baseline.train(docs, K, seed=42, total_steps=N))
            if not skipped:
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
        for one in run_list:
            toks = one["tokens"][:first] if first else one["tokens"]
            secs = one["times"][:first] if first else one["times"]
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
        "target_ratio_vs_baseline": TARGET_RATIO_VS_BASELINE,
    }
    if not skipped:
        t_diff = max(max_abs_diff(t["losses"], ref) for t in runs["torch"])
        assert t_diff < LOSS_TOL, f"PyTorch losses differ from puregpt's by {t_diff}"
        t_rates = [t["tokens"] / t["seconds"] for t in runs["torch"]]
        out["torch"] = {"tokens_per_s": max(t_rates), "tokens_per_s_all_repeats": t_rates,
                        "threads": 1, "dtype": "float64", "max_loss_diff_vs_puregpt": t_diff}
        out["ratio_vs_torch"] = pg_rate / max(t_rates)
        if runs["split"]:
            out["split"]["ratio_vs_torch"] = out["split"]["tokens_per_s"] / max(t_rates)
    else:
        out["torch"] = {"skipped": skipped}
        out["ratio_vs_torch"] = None
    if not args.no_race:
        out["race"] = bench_race.run(sz, args)
    return out


def table(r: dict) -> str:
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
        text += "\n\n" + bench_race.table(r["race"])
    return text


def summary_rows(r: dict) -> list:
    rows = [["train-tiny", "puregpt / scalar autograd (tokens/s)",
             fmt(r["ratio_vs_baseline"]) + "x", f">= {TARGET_RATIO_VS_BASELINE:.0f}x",
             fmt(r["ratio_vs_baseline"] >= TARGET_RATIO_VS_BASELINE)],
            ["train-tiny", "puregpt / PyTorch eager (tokens/s)",
             "skipped" if r["ratio_vs_torch"] is None else fmt(r["ratio_vs_torch"]) + "x",
             "-", "-"]]
    split = r.get("split", {})
    if "tokens_per_s" in split:
        rows.append(["train-tiny", "backward split across 2 processes / 1 process "
                                   "(bit-identical losses)",
                     fmt(split["tokens_per_s"] / r["puregpt"]["tokens_per_s"]) + "x", "-", "-"])
    if "race" in r:
        rows += bench_race.summary_rows(r["race"])
    return rows
