"""The benchmarks cannot rot: each runs in --quick mode, as a subprocess, and writes the JSON its
README documents. Nothing here asserts a timing; the equality checks the benchmarks make
themselves (losses, gradients, generated tokens) do fail the run when they break."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from puregpt.parallel import available_cpus

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "run.py"
# torch is an oracle: the full suite expects its rows (a missing torch fails, never skips);
# only the core suite (PUREGPT_TEST_CORE=1, .ci/run's other Pythons) checks the rows without it
HAVE_TORCH = importlib.util.find_spec("torch") is not None or \
    os.environ.get("PUREGPT_TEST_CORE") != "1"


def load_run():
    """benchmarks/run.py as a module (it puts benchmarks/ on sys.path for its bench_* modules)."""
    spec = importlib.util.spec_from_file_location("bench_run", RUN)
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


def run_bench(name: str, tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(RUN), name, "--quick", "--json", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == name and doc["quick"] is True
    assert doc["env"]["python"] and doc["env"]["cpu_count"]
    assert doc["markdown"].startswith("### ") and "| ---" in doc["markdown"]
    assert "### summary" in proc.stdout and "| ---" in proc.stdout
    return doc["results"], proc.stdout


def positive(*values) -> bool:
    return all(isinstance(v, (int, float)) and v > 0 for v in values)


def check_race(race: dict, torch_expected: bool) -> None:
    assert race["samples"] == 20 and race["steps"] > 0
    assert positive(race["puregpt_seconds"], race["puregpt_1_process_seconds"])
    if torch_expected:
        assert positive(race["torch_over_puregpt_1_process"])
        assert positive(race["torch_seconds"], race["torch_over_puregpt"],
                        race["torch_seconds_1_thread"], race["torch_seconds_2_threads"])
        assert race["torch_seconds"] == min(race["torch_seconds_1_thread"],
                                            race["torch_seconds_2_threads"])
        assert isinstance(race["same_printed_losses"], bool)
        assert isinstance(race["same_samples"], bool)
    else:
        assert race["torch_seconds"] is None and race["skipped"]


def test_train_tiny_with_race(tmp_path):
    r, stdout = run_bench("train-tiny", tmp_path)
    assert r["params"] == 4192
    assert positive(r["puregpt"]["tokens_per_s"], r["baseline"]["tokens_per_s"],
                    r["ratio_vs_baseline"])
    assert r["baseline"]["max_loss_diff_vs_puregpt"] < 1e-9
    assert r["trainer_loop_max_loss_diff"] < 1e-12
    assert r["target_ratio_vs_baseline"] == 50.0
    if available_cpus() >= 2:  # the split step ran, and its losses equal one process's
        assert positive(r["split"]["tokens_per_s"]) and r["split"]["same_losses_as_one_process"]
    else:
        assert r["split"] == {"skipped": "fewer than two cores"}
    if HAVE_TORCH:
        assert positive(r["torch"]["tokens_per_s"], r["ratio_vs_torch"])
        assert r["torch"]["max_loss_diff_vs_puregpt"] < 1e-9
    else:
        assert r["torch"]["skipped"] == "torch not installed" and r["ratio_vs_torch"] is None
        assert "skipped: torch not installed" in stdout
    check_race(r["race"], HAVE_TORCH)


def test_train_tiny_without_torch(tmp_path):
    r, stdout = run_bench("train-tiny", tmp_path, "--no-torch", "--no-race")
    assert "skipped" in r["torch"] and r["ratio_vs_torch"] is None and "race" not in r
    assert ("skipped: --no-torch" if HAVE_TORCH else "skipped: torch not installed") in stdout


def test_race(tmp_path):
    r, stdout = run_bench("race", tmp_path)
    check_race(r, HAVE_TORCH)
    assert r["rounds"] == 1 and len(r["puregpt_seconds_all"]) == 1
    assert len(r["puregpt_1_process_seconds_all"]) == 1 and "one process (--workers 1)" in stdout
    assert "### race: 20 steps + 20 samples" in stdout


def test_train_large(tmp_path):
    r, _ = run_bench("train-large", tmp_path)
    C = r["config"]["n_embd"]
    assert r["tokens_per_step"] == r["batch"] * r["config"]["block_size"]
    assert positive(r["params"], r["macs_per_token"], r["macs_per_step"]["total"])
    for run in (r["single"], r["workers"]):
        assert positive(run["tokens_per_s"], run["macs_per_s"], run["best_step_seconds"])
        assert len(run["step_seconds"]) == r["steps"]
    assert r["ceiling_length"] == C and str(C) in r["dot_rates"]
    for rates in r["dot_rates"].values():
        assert positive(rates["sum_map_mul"], rates["engine_matmul"])
    assert positive(r["ceiling_macs_per_s"], r["fraction_of_ceiling"])
    # the step's products replayed alone: a part of the step, so below its time (with noise)
    assert r["products"]["calls"] > 0 and positive(r["products"]["seconds"])
    assert (r["fraction_of_products_best"]
            == r["products"]["seconds"] / r["single"]["best_step_seconds"])
    assert len(r["products_seconds_paired"]) == r["steps"]
    assert r["fraction_of_products"] == statistics.median(
        p / t for p, t in zip(r["products_seconds_paired"], r["single"]["step_seconds"]))
    w = r["workers"]
    assert w["n"] == 2 and positive(w["speedup"])
    assert w["max_grad_rel_diff"] <= 1e-9 and w["max_loss_diff"] <= 1e-9
    assert isinstance(w["identical_1e-12"], bool) and len(w["checks"]) == r["steps"]
    assert r["targets"] == {"fraction_of_ceiling": 0.8, "workers_speedup": 1.8,
                            "workers_tolerance": 1e-12, "fraction_of_products": 0.85}


def test_sample(tmp_path):
    r, _ = run_bench("sample", tmp_path)
    assert r["identical"] is True
    assert r["tokens"] == r["contexts"] * r["new_tokens_per_context"] > 0
    assert positive(r["kv_cache"]["tokens_per_s"], r["naive"]["tokens_per_s"], r["speedup"])
    m = r["microgpt"]
    if HAVE_TORCH:  # microgpt-size decoding vs PyTorch eager's KV cache: same tokens asserted
        assert m["identical"] is True and m["tokens"] == m["contexts"] * 14 > 0
        assert positive(*m["tokens_per_s"].values(), m["decoder_over_torch"])
    else:
        assert m == {"skipped": "torch not installed"}


def test_gpt2(tmp_path):
    """The GPT-2-shape benchmark at a small shape: import-hf, load, decoding in every layout and
    process count (identical tokens asserted by the benchmark), the memory figures."""
    r, stdout = run_bench("gpt2", tmp_path)
    assert r["identical_tokens"] is True and r["params"] > 0
    assert positive(r["import_hf"]["wall_s"], r["import_hf"]["cpu_s"],
                    r["import_hf"]["bytes_per_param"])
    for name in ("mixed", "mixed_two", "one", "two", "compact", "compact_two"):
        d = r["decode"][name]
        assert len(d["tokens"]) == r["new_tokens"] == 3
        assert positive(d["tokens_per_s"], d["tokens_per_cpu_s"], d["ready"]["wall_s"],
                        d["bytes_per_param"], d["bytes_per_param_together"])
        # together (PSS, shared pages once) is at most the processes' RSS summed
        assert d["bytes_per_param_together"] <= d["bytes_per_param_all_processes"] * 1.05
    assert "gpt2 decode" in stdout


def test_pss_peak_counts_pages_a_forked_child_shares_once():
    """bench_memory.PssPeak against a known layout: a 256 MB buffer, then a forked child that
    maps the same pages (copy-on-write, untouched) and 64 MB of its own. The two RSS sum to
    ~576 MB above the baseline; their PSS together to ~320 MB (each shared page once)."""
    import os
    import time
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_memory import PssPeak, pss_kb
    MB = 1024
    base = pss_kb(os.getpid())
    buf = bytearray(256 * MB * 1024)
    buf[::4096] = b"\x01" * len(buf[::4096])  # touch every page
    r, w = os.pipe()
    pid = os.fork()  # (before the sampler's thread starts: fork a single-threaded process)
    if pid == 0:  # the child: 64 MB of its own, then wait to be told to exit
        own = bytearray(64 * MB * 1024)
        own[::4096] = b"\x01" * len(own[::4096])
        os.read(r, 1)
        os._exit(0)
    with PssPeak(every=0.05) as peak:
        time.sleep(1.0)  # several samples with both processes alive
        os.write(w, b"x")
        os.waitpid(pid, 0)
    together_mb = (peak.peak_kb - base) / MB
    assert 300 <= together_mb <= 380, together_mb  # ~320, not ~576


def test_compare(tmp_path):
    r, _ = run_bench("compare", tmp_path)
    assert r["identical"] is True and r["runs"] == 4 and r["target"] == 0.6
    assert positive(r["jobs1_seconds"], r["jobs2_seconds"])
    assert r["ratio"] == r["jobs2_seconds"] / r["jobs1_seconds"]


def test_memory(tmp_path):
    r, _ = run_bench("memory", tmp_path)
    assert positive(r["floor_mb"], r["tiny"]["peak_rss_mb"], r["large"]["peak_rss_mb"])
    assert r["tiny"]["peak_rss_mb"] >= r["floor_mb"] and r["large"]["peak_rss_mb"] >= r["floor_mb"]
    assert r["tiny"]["params"] == 4192 and r["large"]["params"] > r["tiny"]["params"]


def test_pythons(tmp_path):
    """This interpreter and the oldest other supported one found, side by side: every product
    path timed (and checked equal to dist's inside the child), the benchmarks' JSON read back,
    torch's contender skipped where torch is missing."""
    bench = load_run().BENCHMARKS["pythons"]
    found = bench.interpreters()
    assert found and all((3, 10) <= v[:2] <= (3, 13) for _, v in found)
    chosen = [sys.executable] + [p for p, v in found if v[:2] != sys.version_info[:2]][:1]
    r, stdout = run_bench("pythons", tmp_path, *[w for p in chosen for w in ("--python", p)])
    assert [p["executable"] for p in r["pythons"]] == sorted(
        chosen, key=lambda p: bench.version_of(p))
    for p in r["pythons"]:
        paths = p["paths"]
        assert paths["chosen"] in paths["seconds"] and "dist" in paths["seconds"]
        assert all(positive(*t.values()) for t in paths["seconds"].values())
        assert set(p["results"]) == {"train-tiny", "train-large"}
        assert positive(p["results"]["train-large"]["fraction_of_products"])
        ratio = bench.engine_path_ratio(p)  # the engine's path against the fastest: >= 1
        assert ratio >= 1 and (ratio == 1) == (p["fastest"]["large"] == paths["chosen"])
        torch = p["results"]["train-tiny"]["torch"]
        assert ("skipped" in torch) != (p["env"]["torch"] is not None)
        assert f"Python {p['python']}" in stdout


@pytest.mark.oracle
def test_notebook(tmp_path):
    import ipykernel  # noqa: F401  (the oracle: the benchmark only skips without them)
    import nbclient  # noqa: F401
    r, stdout = run_bench("notebook", tmp_path)
    assert r["train_steps"] == 10 and r["code_cells"] >= 10 and r["cells_ran_without_error"]
    assert positive(r["run_all_seconds"]) and r["run_all_seconds"] >= r["cells_seconds"] > 0
    assert r["meets_target"] is None and "- (--quick)" in stdout  # the target: full runs only
    assert len(r["slowest_cells"]) == 3 and r["slowest_cells"][0][0] >= r["slowest_cells"][1][0]


def test_train_large_records_every_product_of_a_step():
    """The products replayed alone are the step's: per layer, forward Q K V, O, fc1, fc2 and per
    sequence and head one a.v product, backward dX and dW of each linear layer and three
    attention products per head; lm_head's forward, dX and dW; and one ops.dots call per query
    and head in each direction. The replay gives the recorded calls' results again."""
    bench = load_run().BENCHMARKS["train-large"]
    cfg, _, params, batch, *_ = bench.large_setup(bench.QUICK)
    B, T, H, L = bench.QUICK["large_batch"], cfg.block_size, cfg.n_head, cfg.n_layer
    calls = bench.record_products(params, cfg, batch(0))
    from puregpt import ops
    names = [{ops.matmul: "matmul", ops.dots: "dots"}[f] for f, _, _ in calls]
    assert names.count("matmul") == L * (4 + B * H + 8 + 3 * B * H) + 3
    assert names.count("dots") == L * B * H * T * 2
    f, A, Bm = calls[0]  # the first layer's stacked Q, K, V product: (N, C) x (3C, C)
    assert (len(A), len(Bm), len(A[0])) == (B * T, 3 * cfg.n_embd, cfg.n_embd)
    row = f(A, Bm)[0]
    assert max(abs(c - math.fsum(x * y for x, y in zip(A[0], b))) for c, b in zip(row, Bm)) < 1e-12
    assert bench.products_seconds(calls[:5], trials=1) > 0


def test_mac_formula():
    """forward = N (12 L C^2 + V C) + L C sum T (T + 1); total = 3 x forward."""
    from puregpt.config import GPTConfig
    cfg = GPTConfig(vocab_size=3, n_embd=2, n_head=1, n_layer=1, block_size=4)
    macs = load_run().BENCHMARKS["train-large"].macs_per_step(cfg, [2, 3])
    # matmuls per position: q, k, v, o 4 * 2 * 2, fc1 and fc2 2 * 8 * 2, lm_head 3 * 2 -> 54
    assert macs["forward_matmul"] == 5 * 54
    # attention: q.k and a.v over the causal triangle, C * T(T+1)/2 each
    assert macs["forward_attention"] == 2 * (2 * 3 // 2 + 3 * 4 // 2) * 2
    assert macs["total"] == 3 * (5 * 54 + 2 * 9 * 2)


@pytest.mark.oracle
def test_torch_microgpt_script_prints_microgpt_lines():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "torch_microgpt.py"),
                           "--steps", "3", "--samples", "2", "--data",
                           str(REPO / "puregpt" / "data" / "names.txt")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "step    3 /    3 | loss " in proc.stdout
    assert sum(line.startswith("sample ") for line in lines) == 2


def test_every_benchmark_keeps_the_harness_contract():
    """Each registered benchmark has sizes for both modes (the same keys, none shared with
    another benchmark), run/table/summary_rows, and a --quick test in this file."""
    benchmarks = load_run().BENCHMARKS
    seen = set()
    for name, bench in benchmarks.items():
        assert bench.FULL and set(bench.FULL) == set(bench.QUICK), name
        assert not set(bench.FULL) & seen, f"{name} reuses another benchmark's size keys"
        seen |= set(bench.FULL)
        for function in ("run", "table", "summary_rows"):
            assert callable(getattr(bench, function, None)), f"{name} lacks {function}()"
        test = "test_" + name.replace("-", "_")
        assert any(t.startswith(test) for t in globals()), f"no {test}* runs {name} --quick"


def load_harness():
    load_run()  # puts benchmarks/ on sys.path
    import harness
    return harness


def test_alternate_reverses_the_order_every_other_round():
    harness = load_harness()
    calls = []
    contenders = {name: (lambda r, name=name: calls.append((r, name)) or f"{name}{r}")
                  for name in ("a", "b", "c")}
    results, seconds = harness.alternate(contenders, 3)
    assert calls == [(0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"),
                     (2, "a"), (2, "b"), (2, "c")]
    assert results == {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"], "c": ["c0", "c1", "c2"]}
    assert all(len(s) == 3 and min(s) >= 0 for s in seconds.values())


def test_sizes_quick_full_overrides_and_clear_errors():
    import argparse
    import types
    harness = load_harness()
    one = types.SimpleNamespace(FULL={"x_steps": 100, "x_rounds": 3},
                                QUICK={"x_steps": 2, "x_rounds": 1})
    two = types.SimpleNamespace(FULL={"y": 5}, QUICK={"y": 1})
    parser = argparse.ArgumentParser()
    harness.size_options(parser, one.FULL, one.QUICK, "x_steps")
    args = parser.parse_args(["--x-steps", "7"])
    args.quick = False
    assert harness.sizes({"one": one, "two": two}, args) == {"x_steps": 7, "x_rounds": 3, "y": 5}
    args = parser.parse_args([])
    args.quick = True
    assert harness.sizes({"one": one, "two": two}, args) == {"x_steps": 2, "x_rounds": 1, "y": 1}
    with pytest.raises(ValueError, match="redefines another's sizes: \\['y'\\]"):
        harness.sizes({"two": two, "again": two}, args)
    with pytest.raises(ValueError, match="same keys"):
        harness.sizes({"bad": types.SimpleNamespace(FULL={"a": 1}, QUICK={})}, args)


@pytest.mark.parametrize("words, message", [
    (["sample", "--tiny-steps", "0"], "argument --tiny-steps: must be >= 1, not 0"),
    (["sample", "--workers", "1"], "argument --workers: must be >= 2, not 1"),
    (["sample", "--large-batch", "x"], "argument --large-batch: not a whole number: 'x'"),
    (["nonsense"], "argument NAME: invalid choice: 'nonsense'"),
])
def test_bad_command_line_is_refused_before_anything_runs(words, message):
    proc = subprocess.run([sys.executable, str(RUN), *words], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_explain(tmp_path):
    r, stdout = run_bench("explain", tmp_path)
    for key in ("default", "large"):
        m = r[key]
        assert m["tokens"] == 16 and positive(m["seconds_per_page"], m["step_seconds"],
                                              m["page_over_step"], m["page_bytes"])
        assert m["seconds_per_page"] == min(m["seconds_all"])
    assert r["default"]["mode"] == "docs" and r["default"]["config"]["n_embd"] == 32
    assert r["checked"] is True and r["target_seconds"] == 1.0
    assert isinstance(r["meets_target"], bool) and "### explain: seconds per x-ray page" in stdout


def test_benchmarks_run_puregpt_from_compiled_bytecode(tmp_path):
    """Fresh-process benchmarks start as a user's second run does: harness.compile_bytecode
    leaves puregpt's modules compiled for this Python (with PYTHONDONTWRITEBYTECODE=1, as on
    these machines, nothing else would), and a fresh process then compiles nothing."""
    harness = load_harness()
    import puregpt
    package = Path(puregpt.__file__).parent
    harness.compile_bytecode()
    for source in package.glob("*.py"):
        assert Path(importlib.util.cache_from_source(str(source))).exists(), source
    probe = ("import builtins, sys; compiled = []; real = builtins.compile\n"
             "builtins.compile = lambda *a, **k: (compiled.append(a[1]), real(*a, **k))[1]\n"
             "import puregpt.cli, puregpt.train, puregpt.sample\n"
             "print([c for c in compiled if 'puregpt' in str(c)])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
