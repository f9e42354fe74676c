"""`puregpt compare`: a 2 x 2 grid x 2 seeds of tiny runs, its report (Markdown, HTML, JSON)
against numbers recomputed from the runs' own metrics, every run an ordinary run directory,
exact resume after Ctrl-C, a finished grid that reruns without training, the report of existing
runs, several runs on one plot, and bad input refused before anything trains."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from helpers_train import (REPO, TINY_MODEL, cli_env, exact_rows, metrics_rows, names_file,
                           params_bits, run_cli, snapshot)
from puregpt.checkpoint import load_checkpoint
from puregpt.compare import build_grid, dir_name, parse_vary
from puregpt.config import ConfigError
from puregpt.plot import ema, group_curves

TINY = TINY_MODEL + ["--batch-size", "2", "--eval-tokens", "64", "--warmup", "0"]
GRID = ["--vary", "norm-position=pre,post", "--vary", "pos=learned,none", "--seeds", "2"]
CONFIGS = ["norm-position=pre, pos=learned", "norm-position=pre, pos=none",
           "norm-position=post, pos=learned", "norm-position=post, pos=none"]
NS = "{http://www.w3.org/2000/svg}"


def compare_cli(*args, **kw):
    return run_cli("compare", *args, **kw, timeout=600)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The finished 2 x 2 x 2 grid (12 steps each, evaluations at 6 and 12), made once."""
    base = tmp_path_factory.mktemp("grid")
    data = names_file(base, 200)
    out = base / "cmp"
    proc = compare_cli("--data", data, *GRID, "--steps", 12, "--eval-every", 6, *TINY,
                       "--jobs", 2, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return out, data, proc


def run_dir(out: Path, label: str, seed: int) -> Path:
    return out / dir_name(label) / f"seed-{seed}"


def finals(out: Path, label: str) -> list[float]:
    """Each seed's validation loss at the last step, read from its own metrics.jsonl."""
    vals = []
    for seed in (42, 43):
        last = metrics_rows(run_dir(out, label, seed))[-1]
        assert last["step"] == 12
        vals.append(last["val_loss"])
    return vals


def md_table(md: str, title_start: str) -> list[list[str]]:
    """The rows (cells) of the Markdown table under the heading that starts with title_start."""
    section = md.split(f"## {title_start}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines[2:]]


class Tables(HTMLParser):
    """The tables of an HTML page, by class: rows of cell texts; and every tag seen."""

    def __init__(self):
        super().__init__()
        self.tables, self.tags, self.current, self.row, self.cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.current = self.tables.setdefault(dict(attrs).get("class"), [])
        elif tag == "tr" and self.current is not None:
            self.row = []
        elif tag in ("td", "th") and self.row is not None:
            self.cell = ""

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.row.append(self.cell)
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self.current.append(self.row)
            self.row = None
        elif tag == "table":
            self.current = None


def test_the_grid_completes_and_every_run_is_an_ordinary_run(grid):
    out, data, proc = grid
    manifest = json.loads((out / "compare.json").read_text())
    assert [c["label"] for c in manifest["configs"]] == CONFIGS
    for label in CONFIGS:
        for seed in (42, 43):
            d = run_dir(out, label, seed)
            ckpt = load_checkpoint(d / "best.safetensors")
            last = load_checkpoint(d / "last.safetensors")
            assert last.step == 12 and last.train_config.seed == seed
            assert last.train_config.data_seed == 42  # one split and order for every run
            assert last.train_config.workers == 1
            norm, pos = re.match(r"norm-position=(\w+), pos=(\w+)", label).groups()
            assert (ckpt.config.norm_position, ckpt.config.pos) == (norm, pos)
    d = run_dir(out, CONFIGS[3], 43)
    sample = run_cli("sample", d, "-n", 3, "--seed", 1)
    assert sample.returncode == 0 and len(sample.stdout.splitlines()) == 3, sample.stderr
    info = run_cli("info", d)
    assert "norm_position=post" in info.stdout and "pos=none" in info.stdout
    assert "## Ranking" in proc.stdout and "verdict" in proc.stdout  # printed, too


def test_the_tables_means_and_stds_are_the_runs_own(grid):
    out, _, _ = grid
    md = (out / "report.md").read_text(encoding="utf-8")
    rows = md_table(md, "Ranking")
    assert len(rows) == 4
    means = []
    for rank, label, val, best, params, tokens, tps, wall, seeds in rows:
        label = label.replace(" (baseline)", "")
        v = finals(out, label)
        m, s = statistics.mean(v), statistics.stdev(v)
        means.append(m)
        assert val == f"{m:.4f} ± {s:.4f}", label
        bests = [min(r["val_loss"] for r in metrics_rows(run_dir(out, label, seed))
                     if "val_loss" in r) for seed in (42, 43)]
        assert best == f"{statistics.mean(bests):.4f}"
        tok = [sum(r["tokens"] for r in metrics_rows(run_dir(out, label, seed)))
               for seed in (42, 43)]
        assert tokens == f"{statistics.mean(tok):,.0f}"
        weights = load_checkpoint(run_dir(out, label, 42) / "last.safetensors").params
        count = sum(len(t) * (len(t[0]) if isinstance(t[0], list) else 1)
                    for t in weights.values())
        assert params == f"{count:,}"
        assert seeds == "2/2"
    assert means == sorted(means)  # ranked by mean final validation loss
    numbers = json.loads((out / "report.json").read_text())
    for c in numbers["configs"]:
        v = finals(out, c["label"])
        assert c["val_mean"] == pytest.approx(statistics.mean(v), abs=1e-15)
        assert c["val_std"] == pytest.approx(statistics.stdev(v), abs=1e-15)


@pytest.mark.oracle
def test_the_verdicts_are_welchs_test_as_scipy_computes_it(grid):
    import scipy.stats
    out, _, _ = grid
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["baseline"] == CONFIGS[0]  # the first value of each --vary
    base = finals(out, CONFIGS[0])
    md_rows = {r[0]: r for r in md_table((out / "report.md").read_text(), "Against")}
    assert sorted(md_rows) == sorted(CONFIGS[1:])
    for v in numbers["versus"]:
        a = finals(out, v["label"])
        ref = scipy.stats.ttest_ind(a, base, equal_var=False)
        ci = ref.confidence_interval(0.95)
        assert v["p"] == pytest.approx(ref.pvalue, abs=1e-9)
        assert v["low"] == pytest.approx(ci.low, abs=1e-9)
        assert v["high"] == pytest.approx(ci.high, abs=1e-9)
        word = "better" if ci.high < 0 else "worse" if ci.low > 0 else \
            "no difference detectable with 2 seeds"
        assert v["verdict"] == word and md_rows[v["label"]][4] == word
        assert md_rows[v["label"]][1] == f"{statistics.mean(a) - statistics.mean(base):+.4f}"


def test_the_html_report_is_self_contained_and_holds_the_same_tables(grid):
    out, _, _ = grid
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = Tables()
    parser.feed(page)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert parser.tables["ranking"][1:] == md_table(md, "Ranking")
    assert len(parser.tables["versus"]) == 4 and len(parser.tables["differences"]) == 5
    samples = parser.tables["samples"]
    assert samples[0] == [c for c in (r[1].replace(" (baseline)", "")
                                      for r in md_table(md, "Ranking"))]
    assert len(samples) == 6 and all(cell.strip() for row in samples[1:] for cell in row)
    for tag, attrs in parser.tags:  # nothing fetched from elsewhere
        assert tag not in ("script", "link", "img", "iframe")
        assert not any(k in ("src", "href") for k in attrs)
    svg = page[page.index("<svg"):page.index("</svg>") + 6]
    root = ET.fromstring(svg)
    curves = root.findall(f".//{NS}path")
    assert sorted(p.get("data-label") for p in curves) == sorted(CONFIGS)
    assert len(root.findall(f".//{NS}polygon")) == 4  # a seed band per config
    assert len(root.findall(f".//{NS}circle")) == 4 * 2  # validation at steps 6 and 12
    assert (out / "curves.svg").read_text(encoding="utf-8") == svg + "\n"


def test_a_finished_compare_reruns_in_seconds_without_training(grid):
    out, data, _ = grid
    runs = {label: snapshot(out / dir_name(label)) for label in CONFIGS}
    t0 = time.monotonic()
    proc = compare_cli("--data", data, *GRID, "--steps", 12, "--eval-every", 6, *TINY,
                       "--jobs", 2, "--out", out)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert "8 already done" in proc.stderr
    assert {label: snapshot(out / dir_name(label)) for label in CONFIGS} == runs
    assert elapsed < 15, elapsed


def _grid_args(data, out, steps=150):
    return ["--data", data, "--vary", "pos=learned,sinusoidal", "--seeds", "2", "--steps",
            steps, "--eval-every", 50, *TINY, "--batch-size", "1", "--jobs", 2, "--out", out]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("ref")
    data = names_file(base, 200)
    ref = compare_cli(*_grid_args(data, base / "ref"), "--quiet")
    assert ref.returncode == 0, ref.stderr
    return base / "ref", data


def _start_and_cut(out: Path, data, sig) -> subprocess.Popen:
    """Start a compare and send it `sig` once its first run has trained 30 steps."""
    proc = subprocess.Popen([sys.executable, "-m", "puregpt", "compare",
                             *map(str, _grid_args(data, out))], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = out / dir_name("pos=learned") / "seed-42" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if first.exists() and len(first.read_text().splitlines()) >= 30:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc


def _check_resumed_equals(ref: Path, out: Path, data) -> None:
    steps = [load_checkpoint(out / dir_name(label) / f"seed-{s}" / "last.safetensors").step
             for label in ("pos=learned", "pos=sinusoidal") for s in (42, 43)
             if (out / dir_name(label) / f"seed-{s}" / "last.safetensors").exists()]
    assert any(0 < s < 150 for s in steps), steps  # stopped in the middle, checkpoint saved
    again = compare_cli(*_grid_args(data, out))
    assert again.returncode == 0, again.stderr
    for label in ("pos=learned", "pos=sinusoidal"):
        for seed in (42, 43):
            a = ref / dir_name(label) / f"seed-{seed}"
            b = out / dir_name(label) / f"seed-{seed}"
            assert exact_rows(a) == exact_rows(b), (label, seed)
            for name in ("last.safetensors", "best.safetensors"):
                assert params_bits(load_checkpoint(a / name).params) == \
                    params_bits(load_checkpoint(b / name).params), (label, seed, name)
    numbers = [json.loads((d / "report.json").read_text())["configs"] for d in (ref, out)]
    assert [c["val_mean"] for c in numbers[0]] == [c["val_mean"] for c in numbers[1]]


def test_ctrl_c_then_rerun_is_bit_identical_to_an_uninterrupted_compare(uninterrupted,
                                                                        tmp_path):
    ref, data = uninterrupted
    proc = _start_and_cut(tmp_path / "cut", data, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "resumes them" in err
    assert not list((tmp_path / "cut").rglob(".lock"))  # every run has stopped
    _check_resumed_equals(ref, tmp_path / "cut", data)


def test_a_killed_compare_stops_its_runs_and_resumes_exactly(uninterrupted, tmp_path):
    """SIGKILL: no chance to forward anything; the runs notice their parent is gone, save and
    stop (their locks go), and the same command resumes them."""
    ref, data = uninterrupted
    proc = _start_and_cut(tmp_path / "cut", data, signal.SIGKILL)
    proc.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while list((tmp_path / "cut").rglob(".lock")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((tmp_path / "cut").rglob(".lock"))
    _check_resumed_equals(ref, tmp_path / "cut", data)


def test_a_token_budget_gives_each_config_its_steps(tmp_path):
    data = names_file(tmp_path, 300)
    names = data.read_text().split()
    per_doc = statistics.mean(len(n) + 1 for n in names)  # BOS + its letters predict the next
    g = build_grid({"block_size": 32}, {"batch_size": 4, "val_fraction": 0.0},
                   ["n-embd=8,16"], seeds=1, data=str(data), tokens=5000)
    assert [c.train["steps"] for c in g.configs] == [round(5000 / (per_doc * 4))] * 2


@pytest.mark.parametrize("args, message", [
    (["--vary", "nhead=2,4"], "--vary nhead: unknown field 'nhead'"),
    (["--vary", "pos=learned,rotary"],
     "pos must be one of learned, sinusoidal, none, rope; got 'rotary'"),
    (["--vary", "n-layer=1,two"], "'two' is not an int"),
    (["--vary", "n-head=2,3"], "config n-head=3 is impossible: GPTConfig.n_embd (8) must be "
                               "divisible by n_head (3)"),
    (["--vary", "seed=1,2"], "cannot be varied (use --seeds N)"),
    (["--vary", "pos"], "expected FIELD=VALUE1,VALUE2"),
    (["--vary", "pos=none", "--steps", "5", "--tokens", "100"], "--steps or --tokens"),
    (["--vary", "pos=none", "--baseline", "pos=learned"], "--baseline pos=learned: matches no"),
    (["--vary", "pos=none", "--workers", "2"], "each run of a compare uses one process"),
])
def test_bad_input_is_refused_before_anything_trains(tmp_path, args, message):
    proc = compare_cli(*args, *TINY, "--steps", 3, "--out", tmp_path / "c") \
        if "--steps" not in args else compare_cli(*args, *TINY, "--out", tmp_path / "c")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "c").exists()  # nothing written, nothing trained


def test_a_directory_holding_another_compare_is_refused(grid, tmp_path):
    out, data, _ = grid
    before = snapshot(out)
    for args, why in ((["--vary", "pos=learned,sinusoidal"], "vary"),
                      ([*GRID, "--lr", "0.02"], "lr 0.01 -> 0.02")):
        proc = compare_cli("--data", data, *args, "--steps", 12, "--eval-every", 6, *TINY,
                           "--out", out)
        assert proc.returncode == 1
        assert f"{out} holds a different compare" in proc.stderr and why in proc.stderr
    assert snapshot(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    proc = compare_cli("--data", data, *GRID, *TINY, "--steps", 3, "--out", tmp_path / "other")
    assert proc.returncode == 1 and "is not empty and holds no compare.json" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


def test_compare_of_existing_runs_groups_them_by_config(grid, tmp_path):
    out, _, _ = grid
    dirs = [run_dir(out, label, seed) for seed in (43, 42) for label in CONFIGS[::-1]]
    proc = compare_cli(*dirs, "--out", tmp_path / "rep", "--baseline", "norm-position=pre,"
                       "pos=learned")
    assert proc.returncode == 0, proc.stderr
    mine = json.loads((tmp_path / "rep" / "report.json").read_text())
    grids = json.loads((out / "report.json").read_text())
    key = lambda label: frozenset(label.split(", "))  # noqa: E731 (fields in GPTConfig order)
    assert mine["baseline"] == "pos=learned, norm-position=pre"
    assert {key(c["label"]): c["val_mean"] for c in mine["configs"]} == \
        {key(c["label"]): c["val_mean"] for c in grids["configs"]}
    assert {key(v["label"]): v["p"] for v in mine["versus"]} == \
        {key(v["label"]): v["p"] for v in grids["versus"]}
    assert all(c["seeds_done"] == 2 for c in mine["configs"])
    bad = compare_cli(tmp_path, "--out", tmp_path / "rep2")
    assert bad.returncode == 1 and "has no config.json" in bad.stderr
    mixed = compare_cli(dirs[0], "--vary", "pos=none", "--out", tmp_path / "rep3")
    assert mixed.returncode == 2 and "reports on runs already trained" in mixed.stderr


def test_plot_draws_several_runs_smoothed(grid, tmp_path):
    out, _, _ = grid
    a, b = run_dir(out, CONFIGS[0], 42), run_dir(out, CONFIGS[3], 42)
    proc = run_cli("plot", a, b, "--smooth", "0.5", "-o", tmp_path / "two.svg")
    assert proc.returncode == 0, proc.stderr
    root = ET.fromstring((tmp_path / "two.svg").read_text())
    paths = root.findall(f".//{NS}path")
    assert [p.get("data-label") for p in paths] == [str(a), str(b)]
    assert len(root.findall(f".//{NS}circle")) == 4  # two validations each
    assert run_cli("plot", a, b).returncode == 2  # several runs need -o
    one = run_cli("plot", a, "--smooth", "0.9", "-o", tmp_path / "one.svg")
    assert one.returncode == 0 and "curve train" in (tmp_path / "one.svg").read_text()


def test_ema_and_the_seed_band():
    assert ema([1.0, 2.0, 3.0], 0.0) == [1.0, 2.0, 3.0]
    s = ema([4.0, 2.0], 0.5)  # debiased: 4, then (0.5 * 2 + 0.5 * 2) / 0.75
    assert s[0] == 4.0 and s[1] == pytest.approx((0.25 * 4 + 0.5 * 2) / 0.75, rel=1e-15)
    with pytest.raises(ValueError):
        ema([1.0], 1.0)
    runs = [[{"step": i, "loss": float(i + k)} for i in range(1, 5)] for k in (0, 2)]
    runs[0][-1]["val_loss"], runs[1][-1]["val_loss"] = 1.0, 2.0
    curve, vals = group_curves(runs)
    assert curve == [(i, i + 1.0, float(i), i + 2.0) for i in range(1, 5)]
    assert vals == [(4, 1.5)]
    runs[1] = runs[1][:2]  # a seed still running: the curve stops where it is
    assert [p[0] for p in group_curves(runs)[0]] == [1, 2]


def test_the_grid_in_python():
    g = build_grid({"n_embd": 8, "n_head": 2}, {"steps": 5}, ["pos=learned,none",
                                                             "bias=off,on"], seeds=3)
    assert [c.label for c in g.configs] == ["pos=learned, bias=off", "pos=learned, bias=on",
                                             "pos=none, bias=off", "pos=none, bias=on"]
    assert g.seeds == [42, 43, 44] and g.baseline == "pos=learned, bias=off"
    assert [c.name for c in g.configs][1] == "pos-learned_bias-on"
    assert {c.train["data_seed"] for c in g.configs} == {42}
    g = build_grid({}, {}, ["pos=learned,none"], seeds=1, baseline="pos=none")
    assert g.baseline == "pos=none"
    with pytest.raises(ConfigError, match="varied twice"):
        parse_vary(["pos=none", "pos=learned"])
    with pytest.raises(ConfigError, match="not on or off"):
        parse_vary(["bias=maybe"])
    assert parse_vary(["lr=0.01,1e-3"])[0][3] == [0.01, 0.001]


def test_the_modern_switches_vary_including_auto():
    """n_kv_head and mlp_hidden are int-or-unset fields: `auto` is the unset value; a grid over
    them is checked like any other (a K/V head count that does not divide n_head is refused)."""
    assert parse_vary(["n-kv-head=auto,1,2"])[0][3] == [None, 1, 2]
    assert parse_vary(["mlp-hidden=auto,64"])[0][3] == [None, 64]
    with pytest.raises(ConfigError, match="is not an int or auto"):
        parse_vary(["n-kv-head=two"])
    g = build_grid({"n_embd": 8, "n_head": 4}, {"steps": 5},
                   ["n-kv-head=1,2", "pos=learned,rope"], seeds=1)
    assert [c.model["n_kv_head"] for c in g.configs] == [1, 1, 2, 2]
    with pytest.raises(ConfigError, match="n_kv_head"):
        build_grid({"n_embd": 8, "n_head": 4}, {}, ["n-kv-head=3"], seeds=1)


def test_verdicts_in_words():
    from puregpt.report import verdict
    assert verdict([1.0, 1.1, 1.05], [2.0, 2.1, 2.05])["verdict"] == "better"  # lower loss
    assert verdict([2.0, 2.1, 2.05], [1.0, 1.1, 1.05])["verdict"] == "worse"
    assert verdict([1.0, 2.0, 1.5], [1.1, 2.1, 1.4])["verdict"] == \
        "no difference detectable with 3 seeds"
    assert verdict([1.0, 2.0], [1.1, 2.1, 1.4])["verdict"] == \
        "no difference detectable with 2 and 3 seeds"
    one = verdict([1.0], [2.0])
    assert one["diff"] == -1.0 and one["low"] is None and "one seed: no interval" in one["verdict"]
    assert verdict([], [2.0])["verdict"] == "not finished yet"


def test_the_report_is_redrawn_as_runs_finish(tmp_path):
    data = names_file(tmp_path, 200)
    out = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, "-m", "puregpt", "compare", "--data", str(data),
                             "--vary", "steps=4,3000", "--seeds", "1", *TINY, "--jobs", "1",
                             "--out", str(out)], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    report = out / "report.md"
    deadline = time.monotonic() + 120
    while not report.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    running = proc.poll() is None
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert running and report.exists()
    rows = {r[1].replace(" (baseline)", ""): r for r in md_table(report.read_text(), "Ranking")}
    assert rows["steps=4"][8] == "1/1" and rows["steps=3000"][8] == "0/1"


def test_ctrl_c_while_a_run_is_forked_stops_that_run(tmp_path, monkeypatch):
    """A Ctrl-C that lands while the pool forks a run waits (signals are blocked around the
    fork) and then reaches that run: it stops instead of training on unseen. The signal is
    sent from inside Process.start, so it is pending exactly in that window."""
    import multiprocessing.process
    from puregpt import compare as compare_mod
    from puregpt.train import Interrupted
    real_start = multiprocessing.process.BaseProcess.start

    def start_then_ctrl_c(self):
        real_start(self)
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", start_then_ctrl_c)
    g = build_grid({"n_embd": 8, "n_head": 2, "block_size": 8},
                   {"batch_size": 2, "eval_tokens": 64, "warmup": 0, "steps": 5000},
                   ["pos=learned"], seeds=1, data=str(names_file(tmp_path, 200)))
    with pytest.raises(Interrupted, match="1 run"):  # (before the fix: 0 runs, it trained on)
        compare_mod.compare(g, str(tmp_path / "c"), jobs=1, quiet=True)
    run_dir = tmp_path / "c" / g.configs[0].name / "seed-42"
    assert compare_mod.run_state(str(run_dir), 5000)[0] != "done"


def test_more_seeds_on_a_rerun_add_runs_and_keep_the_others(tmp_path):
    data = names_file(tmp_path, 200)
    args = ["--data", data, "--vary", "pos=none", *TINY, "--steps", 3, "--out", tmp_path / "c"]
    assert compare_cli(*args, "--seeds", 1).returncode == 0
    first = snapshot(tmp_path / "c" / "pos-none" / "seed-42")
    proc = compare_cli(*args, "--seeds", 2)
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path / "c" / "pos-none" / "seed-42") == first
    assert load_checkpoint(tmp_path / "c" / "pos-none" / "seed-43" / "last.safetensors").step == 3
    assert json.loads((tmp_path / "c" / "compare.json").read_text())["seeds"] == [42, 43]
    fewer = compare_cli(*args, "--seeds", 1)
    assert fewer.returncode == 1 and "holds a different compare" in fewer.stderr
