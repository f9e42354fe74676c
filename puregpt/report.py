"""The report of a compare: DIR/report.md, DIR/report.html (self-contained: inline CSS and SVG),
DIR/curves.svg and DIR/report.json (the numbers, unrounded), all from the run directories.

    ranking      configs by mean final validation loss: mean +/- std over seeds, best val
                 loss, parameters, tokens seen, tokens/s, wall time
    vs baseline  each config's difference in mean final validation loss from the baseline's, its
                 95% interval and p-value (Welch's t-test, puregpt/stats.py) and a verdict
    curves       every config's mean train loss (EMA-smoothed), its seeds' band, validation dots
    differences  the settings that tell the configs apart, and those they share
    samples      a few documents from each config's first seed, side by side

Every table is built once as (header, rows) and rendered twice, as Markdown and as HTML.
"""

from __future__ import annotations

import html
import json
import math
import os
import random

from . import stats
from .fsutil import atomic_write
from .plot import read_metrics, render_runs_svg

SAMPLES = 5  # documents per config in the samples table
SAMPLE_SEED = 0  # the samples' RNG: the same draws for every config


def run_numbers(run_dir: str, steps: int) -> dict:
    """What the report says of one run, from its metrics.jsonl: the validation loss at its
    last step (None until the run has finished), its best, tokens seen, training wall time
    (summed over the sessions of a resumed run) and tokens per second."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows = read_metrics(path) if os.path.exists(path) else []
    last = {}
    for r in rows:  # a resumed run re-logs nothing twice (train cuts metrics back), but be safe
        last[r["step"]] = r
    rows = [last[s] for s in sorted(last)]
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    final = rows[-1].get("val_loss") if rows and rows[-1]["step"] >= steps else None
    wall, prev = 0.0, 0.0
    for r in rows:  # "time" restarts at 0 in every session of a resumed run
        t = r.get("time", 0.0)
        wall += t - prev if t >= prev else t
        prev = t
    tokens = sum(r.get("tokens", 0) for r in rows)
    return {"dir": run_dir, "step": rows[-1]["step"] if rows else 0, "steps": steps,
            "final_val": final, "best_val": min(vals) if vals else None, "tokens": tokens,
            "wall": wall, "tokens_per_s": tokens / wall if wall > 0 else None, "rows": rows}


def run_dirs_of(grid, out: str) -> list[tuple[object, list[tuple[int, str]]]]:
    """(config, [(seed, run directory)]) of a compare.Grid: the directories compare made, or
    those `puregpt compare RUN...` was given."""
    return [(c, c.dirs or [(s, os.path.join(out, c.name, f"seed-{s}")) for s in grid.seeds])
            for c in grid.configs]


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return stats.mean(xs) if xs else None


def collect(grid, out: str) -> dict:
    """The report's numbers (what report.json holds)."""
    from .config import GPTConfig
    from .model import num_params_of
    configs = []
    for c, dirs in run_dirs_of(grid, out):
        runs = []
        for seed, d in dirs:
            steps = c.train["steps"]
            try:
                with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
                    info = json.load(f)
                steps, vocab = info["train"]["steps"], info["model"]["vocab_size"]
            except (OSError, ValueError, KeyError):
                vocab = None
            r = run_numbers(d, steps)
            r["seed"] = seed
            runs.append(r)
        finals = [r["final_val"] for r in runs if r["final_val"] is not None]
        params = num_params_of(GPTConfig.from_dict({**c.model, "vocab_size": vocab})) \
            if vocab else None
        configs.append({
            "label": c.label, "name": c.name, "model": c.model, "train": c.train,
            "seeds_done": len(finals), "seeds": len(runs), "finals": finals,
            "val_mean": stats.mean(finals) if finals else None,
            "val_std": stats.sample_std(finals) if len(finals) > 1 else None,
            "best_val": _mean(r["best_val"] for r in runs if r["final_val"] is not None),
            "params": params, "tokens": _mean(r["tokens"] for r in runs),
            "tokens_per_s": _mean(r["tokens_per_s"] for r in runs),
            "wall": _mean(r["wall"] for r in runs), "runs": runs})
    base = next(c for c in configs if c["label"] == grid.baseline)
    versus = [dict(label=c["label"], **verdict(c["finals"], base["finals"]))
              for c in configs if c is not base]
    ranked = sorted(configs, key=lambda c: (c["val_mean"] is None, c["val_mean"] or 0.0))
    return {"baseline": grid.baseline, "configs": ranked, "versus": versus,
            "seeds": grid.seeds, "data": grid.data, "vary": grid.vary}


def verdict(a: list[float], base: list[float]) -> dict:
    """mean(a) - mean(base) (lower loss is better), its 95% interval, p and a verdict in words:
    better or worse when the interval excludes 0, else no difference detectable."""
    n = f"{len(a)}" if len(a) == len(base) else f"{len(a)} and {len(base)}"
    if not a or not base:
        return {"diff": None, "low": None, "high": None, "p": None,
                "verdict": "not finished yet"}
    diff = stats.mean(a) - stats.mean(base)
    if len(a) < 2 or len(base) < 2:
        return {"diff": diff, "low": None, "high": None, "p": None,
                "verdict": "one seed: no interval, so no verdict (use --seeds 2 or more)"}
    w = stats.welch(a, base)
    if w.low > 0 or w.high < 0:
        word = "better" if w.high < 0 else "worse"
    else:
        word = f"no difference detectable with {n} seeds"
    return {"diff": w.diff, "low": w.low, "high": w.high, "p": w.p, "verdict": word}


# --- formatting --------------------------------------------------------------------------------


def _f(v, digits: int = 4, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _count(v) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k" if v >= 1e4 else f"{v:,.0f}"


def _secs(v) -> str:
    return "-" if v is None else f"{v:.1f} s" if v < 120 else f"{v / 60:.1f} min"


def _p(p) -> str:
    return "-" if p is None else f"{p:.2g}" if p >= 1e-4 else "< 0.0001"


def tables(numbers: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report."""
    ranked, versus = numbers["configs"], numbers["versus"]
    ranking = [[str(i + 1), c["label"] + (" (baseline)" if c["label"] == numbers["baseline"]
                                          else ""),
                _f(c["val_mean"]) + (f" ± {_f(c['val_std'])}" if c["val_std"] is not None
                                     else ""),
                _f(c["best_val"]), _count(c["params"]), _count(c["tokens"]),
                _count(c["tokens_per_s"]), _secs(c["wall"]), f"{c['seeds_done']}/{c['seeds']}"]
               for i, c in enumerate(ranked)]
    vs = [[v["label"], _f(v["diff"], sign=True),
           "-" if v["low"] is None else f"[{_f(v['low'], sign=True)}, {_f(v['high'], sign=True)}]",
           _p(v["p"]), v["verdict"]] for v in versus]
    order = [c["label"] for c in ranked]
    return [
        ("Ranking: final validation loss, mean ± std over seeds (lower is better)",
         ["rank", "config", "val loss", "best val loss", "parameters", "tokens seen",
          "tokens/s", "wall time", "seeds"], ranking),
        (f"Against the baseline ({numbers['baseline']}): Welch's t-test, 95% interval",
         ["config", "Δ val loss", "95% interval", "p", "verdict"],
         sorted(vs, key=lambda r: order.index(r[0]))),
    ]


def differences(numbers: dict) -> tuple[list[str], list[list[str]], str]:
    """(header, rows, shared settings): the fields whose value differs between configs."""
    configs = numbers["configs"]
    keys = []
    for part in ("model", "train"):
        for k in configs[0][part]:
            if k != "vocab_size" or part == "train":
                if len({json.dumps(c[part].get(k)) for c in configs}) > 1:
                    keys.append((part, k))
    header = ["config"] + [k.replace("_", "-") for _, k in keys]
    rows = [[c["label"]] + [str(c[part].get(k)) for part, k in keys] for c in configs]
    shared = ", ".join(f"{k}={v}" for part in ("model", "train")
                       for k, v in configs[0][part].items()
                       if (part, k) not in keys and not (part == "model" and k == "vocab_size"))
    return header, rows, shared


def samples(numbers: dict) -> tuple[list[str], list[list[str]], int | None]:
    """A few documents from each config's first finished seed (its best checkpoint), drawn
    with the same RNG seed and temperature 0.5."""
    from .checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from .sample import generate_text
    columns, seed = [], None
    for c in numbers["configs"]:
        done = [r for r in c["runs"] if r["final_val"] is not None]
        texts = []
        if done:
            run = min(done, key=lambda r: r["seed"])
            seed = run["seed"] if seed is None else seed
            try:
                ckpt = load_checkpoint(resolve_checkpoint(run["dir"]))
            except CheckpointError:
                ckpt = None
            if ckpt is not None:
                docs = ckpt.trainer.get("mode", "docs") == "docs"
                rng = random.Random(SAMPLE_SEED)
                texts = [generate_text(ckpt.params, ckpt.config, ckpt.tokenizer, docs_mode=docs,
                                       max_new_tokens=None if docs else 48, rng=rng,
                                       temperature=0.5).replace("\n", " ⏎ ")
                         for _ in range(SAMPLES)]
        columns.append(texts + [""] * (SAMPLES - len(texts)))
    header = [c["label"] for c in numbers["configs"]]
    return header, [list(row) for row in zip(*columns)], seed


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ") or " "


def _md_table(header, rows) -> str:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows])


def _html_table(header, rows, cls: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>\n"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>'


def _title(numbers: dict) -> str:
    vary = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in numbers["vary"] if v)
    return "puregpt compare" + (f": {vary}" if vary else "")


def _setup(numbers: dict) -> str:
    c = numbers["configs"][0]
    steps = sorted({x["train"]["steps"] for x in numbers["configs"]})
    return (f"data: {numbers['data'] or 'the bundled names'} | {len(numbers['configs'])} "
            f"config(s) x seeds {', '.join(map(str, numbers['seeds']))} | steps "
            f"{', '.join(map(str, steps))} | batch {c['train']['batch_size']} x grad-accum "
            f"{c['train']['grad_accum']} | the same split and order for every run "
            f"(data-seed {c['train']['data_seed']})")


CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;
max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ddd;padding:4px 8px;
text-align:left;font-variant-numeric:tabular-nums}th{background:#f4f4f4}
.verdict-better{color:#1a7f37;font-weight:600}.verdict-worse{color:#c62828;font-weight:600}
.setup,.note{color:#555}table.samples td{font-family:ui-monospace,Menlo,Consolas,monospace}"""


def render(numbers: dict, svg: str) -> tuple[str, str]:
    """(report.md, report.html)."""
    ts = tables(numbers)
    dh, drows, shared = differences(numbers)
    sh, srows, seed = samples(numbers)
    sample_title = f"Samples (seed {seed}'s best checkpoint, temperature 0.5, the same draws)" \
        if seed is not None else "Samples (none yet: no config has finished a run)"
    md = [f"# {_title(numbers)}", "", _setup(numbers), ""]
    doc = [f"<h1>{html.escape(_title(numbers))}</h1>",
           f'<p class="setup">{html.escape(_setup(numbers))}</p>']
    for i, (title, header, rows) in enumerate(ts):
        md += [f"## {title}", "", _md_table(header, rows), ""]
        table = _html_table(header, rows, "ranking" if i == 0 else "versus")
        if i == 1:  # colour the verdicts
            for word in ("better", "worse"):
                table = table.replace(f"<td>{word}</td>",
                                      f'<td class="verdict-{word}">{word}</td>')
        doc += [f"<h2>{html.escape(title)}</h2>", table]
    note = ("A verdict is \"better\" or \"worse\" when the 95% interval of the difference in "
            "mean final validation loss excludes 0; otherwise the seeds' spread hides it.")
    md += [note, "", "## Loss curves", "", "![loss curves](curves.svg)", "",
           "## Config differences", "", _md_table(dh, drows), "", f"Shared: {shared}", "",
           f"## {sample_title}", "", _md_table(sh, srows), ""]
    doc += [f'<p class="note">{html.escape(note)}</p>', "<h2>Loss curves</h2>", svg,
            "<h2>Config differences</h2>", _html_table(dh, drows, "differences"),
            f'<p class="note">Shared: {html.escape(shared)}</p>',
            f"<h2>{html.escape(sample_title)}</h2>", _html_table(sh, srows, "samples")]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(_title(numbers))}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(doc) + "\n</body></html>\n")
    return "\n".join(md), page


def write_report(grid, out: str, smooth: float = 0.8) -> dict:
    """Write DIR/report.md, report.html, curves.svg and report.json (each atomically) from the
    run directories as they are now; return the numbers."""
    numbers = collect(grid, out)
    svg = render_runs_svg([(c["label"], [r["rows"] for r in c["runs"]])
                           for c in numbers["configs"]], smooth=smooth,
                          title="train loss by config (mean over seeds)")
    md, page = render(numbers, svg)
    atomic_write(os.path.join(out, "curves.svg"), [svg.encode()])
    atomic_write(os.path.join(out, "report.md"), [md.encode()])
    atomic_write(os.path.join(out, "report.html"), [page.encode()])
    slim = {**numbers, "configs": [{k: v for k, v in c.items() if k != "runs"} | {
        "runs": [{k: v for k, v in r.items() if k != "rows"} for r in c["runs"]]}
        for c in numbers["configs"]]}
    atomic_write(os.path.join(out, "report.json"), [json.dumps(slim, indent=1).encode()])
    numbers["markdown"] = md
    return numbers
