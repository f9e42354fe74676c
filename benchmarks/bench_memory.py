"""memory: peak resident set of training, each run in a fresh process (`run.py _memory-child`):
the floor (interpreter with puregpt and the benchmarks imported), train-tiny, train-large."""

from __future__ import annotations

import json
import os
import resource
import sys
import threading

import bench_train_large
import scalar_baseline
from bench_train_tiny import puregpt_tiny
from harness import child_command, fmt, md_table, names_path, run_process, say
from puregpt import model, optim

FULL = {"memory_tiny_steps": 50, "memory_large_steps": 1}
QUICK = {"memory_tiny_steps": 5, "memory_large_steps": 1}


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


def pss_kb(pid: int) -> int | None:
    """A process's proportional set size (kB): its private pages plus its share of the pages it
    shares (a page two processes map counts half in each), so that the processes' PSS add up
    to the memory they hold together. None where /proc has no smaps_rollup."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is pid (from /proc/*/stat)."""
    out = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # (the name may hold spaces)
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                out.append(int(name))
    return out


class PssPeak:
    """The peak, over time, of this process's PSS plus its children's (kB), sampled every
    `every` seconds by a thread while in a `with` block: the memory a process and its forked
    workers hold together, each shared page counted once (summing their peak RSS counts the
    pages a forked worker shares with its parent in both). peak_kb is None without /proc."""

    def __init__(self, every: float = 0.25):
        self.every, self.peak_kb = every, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        while True:
            sizes = [pss_kb(pid) for pid in [me] + children_of(me)]
            if sizes[0] is not None:
                total = sum(s for s in sizes if s is not None)
                self.peak_kb = total if self.peak_kb is None else max(self.peak_kb, total)
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def child(words: list[str]) -> None:
    """In a fresh process (`run.py _memory-child WHICH STEPS BATCH [--quick]`): train STEPS steps
    of WHICH (floor, tiny or large), print the peak RSS as JSON."""
    which, steps, batch_size = words[0], int(words[1]), int(words[2])
    large = bench_train_large.QUICK if "--quick" in words else bench_train_large.FULL
    info = {"which": which, "steps": steps}
    if which == "tiny":
        res = puregpt_tiny(scalar_baseline.load_docs(names_path()), steps)
        info.update(params=res["params"], tokens_per_step=sum(res["tokens"]) / steps)
    elif which == "large":
        cfg, tc, params, batch, *_ = bench_train_large.large_setup(
            {**large, "large_batch": batch_size})
        grads, state = model.zeros_like(params), optim.new_state(params)
        for s in range(steps):
            optim.zero_grads(grads)
            inputs, targets = batch(s)
            model.loss_and_grads(params, cfg, inputs, targets, grads)
            optim.adamw_step(params, grads, state, optim.lr_at(s, tc), tc.beta1, tc.beta2,
                             tc.eps)
        info.update(params=model.num_params(params), tokens_per_step=batch_size * cfg.block_size)
    info["peak_rss_kb"] = peak_rss_kb()
    print(json.dumps(info))


def run(sz: dict, args) -> dict:
    runs = {}
    for which, steps in (("floor", 0), ("tiny", sz["memory_tiny_steps"]),
                         ("large", sz["memory_large_steps"])):
        say(f"  memory: {which}, {steps} steps, fresh process")
        words = [which, str(steps), str(sz["large_batch"])] + (["--quick"] if args.quick else [])
        runs[which] = json.loads(run_process(child_command("memory", *words)).splitlines()[-1])
    floor = runs["floor"]["peak_rss_kb"]
    return {"floor_mb": floor / 1024,
            "tiny": {**runs["tiny"], "peak_rss_mb": runs["tiny"]["peak_rss_kb"] / 1024,
                     "over_floor_mb": (runs["tiny"]["peak_rss_kb"] - floor) / 1024},
            "large": {**runs["large"], "config": {**sz["large"], "batch": sz["large_batch"]},
                      "peak_rss_mb": runs["large"]["peak_rss_kb"] / 1024,
                      "over_floor_mb": (runs["large"]["peak_rss_kb"] - floor) / 1024},
            "method": "VmHWM of /proc/self/status read by the child at its end (getrusage "
                      "ru_maxrss where /proc is absent); each in a fresh process"}


def table(r: dict) -> str:
    L = r["large"]["config"]
    rows = [["python + puregpt imported (floor)", "-", "-", fmt(r["floor_mb"]), "-"],
            ["train-tiny (microgpt)", fmt(r["tiny"]["params"]), r["tiny"]["steps"],
             fmt(r["tiny"]["peak_rss_mb"]), fmt(r["tiny"]["over_floor_mb"])],
            [f"train-large (C {L['n_embd']}, L {L['n_layer']}, T {L['block_size']}, "
             f"B {L['batch']})", fmt(r["large"]["params"]), r["large"]["steps"],
             fmt(r["large"]["peak_rss_mb"]), fmt(r["large"]["over_floor_mb"])]]
    return ("### memory: peak RSS of training, one process, fresh each\n\n"
            + md_table(["run", "params", "steps", "peak RSS MB", "over floor MB"], rows))


def summary_rows(r: dict) -> list:
    return [["memory", "peak RSS train-tiny / train-large (MB)",
             f"{fmt(r['tiny']['peak_rss_mb'])} / {fmt(r['large']['peak_rss_mb'])}", "-", "-"]]
