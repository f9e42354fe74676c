"""Training-loss plot as a standalone SVG string, in pure Python (no matplotlib).

`read_metrics` loads a metrics.jsonl log; `render_loss_svg` draws its "loss" (train) and "val_loss"
(validation) columns against "step". Long curves are downsampled by min/max bucketing rather than
by averaging: a loss spike is exactly what one looks at a training plot to find, and a mean would
flatten it. Only curves use <path>, so counting paths counts curves.
"""

from __future__ import annotations

import json
import math
import os
import re

CURVES = (("train", "loss", "#1f77b4", 1.3), ("validation", "val_loss", "#e4572e", 2.2))
FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 44, 48  # margins: room for tick labels, axis labels, header


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """One dict per non-blank line. A malformed line raises ValueError naming file and line, except
    an unterminated last line: that is a write cut short by a crash, or a live run mid-write."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")  # a complete file ends with "\n", so the last piece is ""
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            if i == len(lines):
                break
            raise ValueError(f"{os.fspath(path)}:{i}: malformed metrics line: {e}") from None
        rows.append(row)
    return rows


def _num(v) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def _series(rows: list[dict], key: str, log_scale: bool) -> list[tuple[float, float]]:
    """(step, value) sorted by step. For a repeated step the last row carrying `key` wins (a resumed
    run re-logs); rows without the key, e.g. steps where validation was not run, do not erase it.
    Points whose winning value is non-finite (or not positive on a log axis) are dropped."""
    last: dict[float, object] = {}
    for row in rows:
        step = _num(row.get("step"))
        if step is not None and row.get(key) is not None:
            last[step] = row[key]
    pts = [(s, _num(v)) for s, v in sorted(last.items())]
    return [(s, v) for s, v in pts if v is not None and (v > 0 or not log_scale)]


def _downsample(pts: list, cap: int) -> list:
    """At most `cap` points: both endpoints (so the curve still spans the run), then per bucket its
    lowest and highest point in step order, so spikes and dips survive."""
    if len(pts) <= cap:
        return pts
    inner, nb = pts[1:-1], max(1, (cap - 2) // 2)
    out = [pts[0]]
    for b in range(nb):
        chunk = inner[b * len(inner) // nb:(b + 1) * len(inner) // nb]
        if chunk:
            out += sorted({min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])})
    return out + [pts[-1]]


def _nice(x: float) -> float:
    """The 1/2/5 x 10^k number nearest x (on a log scale)."""
    e = math.floor(math.log10(x))
    f = x / 10 ** e
    return (1 if f < 1.5 else 2 if f < 3.5 else 5 if f < 7.5 else 10) * 10 ** e


def _span(vals: list[float], pad_min: float, frac: float = 0.0) -> tuple[float, float]:
    """Data range widened by `frac` of itself (so extreme points do not sit on the frame), and
    around a single value so the axis is never zero-length. Never below 0 if the data is not."""
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    pad = (hi - lo) * frac
    if hi - lo < 1e-12 * max(1.0, abs(lo)):
        pad = max(abs(lo) * 0.05, pad_min)
    return (max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad


def _linear_ticks(lo: float, hi: float, min_step: float = 0.0) -> tuple[float, float, list[float]]:
    """About five nice ticks; the axis is widened to the outermost ones so it starts and ends on a
    label."""
    step = max(_nice((hi - lo) / 5), min_step)
    a, b = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return a * step, b * step, [i * step for i in range(a, b + 1)]  # i*step: no float drift


def _log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """1/2/5 x 10^k ticks inside the data range (padded a little in log space); only powers of ten
    over many decades; plain nice linear ticks when the range is too narrow to hold three."""
    llo, lhi = math.log10(lo), math.log10(hi)
    pad = max((lhi - llo) * 0.05, 0.02)
    lo, hi = 10 ** (llo - pad), 10 ** (lhi + pad)
    decades = range(math.floor(llo - pad), math.ceil(lhi + pad) + 1)
    mants = (1,) if lhi - llo > 2.5 else (1, 2, 5)
    ticks = [m * 10.0 ** k for k in decades for m in mants if lo <= m * 10.0 ** k <= hi]
    if len(ticks) < 3:
        step = _nice((hi - lo) / 4)
        ticks = [i * step for i in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return lo, hi, ticks[:: max(1, math.ceil(len(ticks) / 10))]


def _label(v: float, step: float) -> str:
    """Tick text with as many decimals as the tick spacing needs; 20000 reads as 20k."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= 10 * div and step >= div / 10:
            return f"{v / div:g}{suffix}"
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


def _c(v: float) -> str:
    """A coordinate rounded to 0.1 px, without a trailing ".0"."""
    s = f"{v:.1f}"
    return s[:-2] if s.endswith(".0") else s


def _esc(s: str) -> str:
    """XML-escaped text, minus the control characters XML 1.0 forbids even when escaped."""
    s = re.sub(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", "", s)
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _text(x: float, y: float, s: str, **attrs) -> str:
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{_c(x)}" y="{_c(y)}"{extra}>{_esc(s)}</text>'


def ema(values: list[float], smooth: float) -> list[float]:
    """Exponential moving average with weight `smooth` on the past (0: the values unchanged),
    debiased as TensorBoard does: s_t = smooth s_(t-1) + (1 - smooth) x_t, divided by
    1 - smooth^t so that the first points are not dragged toward zero."""
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smooth}")
    out, s = [], 0.0
    for t, x in enumerate(values, 1):
        s = smooth * s + (1.0 - smooth) * x
        out.append(s / (1.0 - smooth ** t))
    return out


def _frame(xs: list[float], ys: list[float], log_scale: bool, title: str, width: int,
           height: int, plot_height: int):
    """The SVG's opening, axes, ticks, grid, labels and title for data spanning xs and ys;
    returns (lines so far, px, py): the pixel of a step and of a loss."""
    x0, x1, xticks = _linear_ticks(*_span(xs, 1.0), min_step=1.0)  # steps are whole numbers
    if log_scale:
        y0, y1, yticks = _log_ticks(min(ys), max(ys)) if ys else _log_ticks(1.0, 10.0)
    else:
        y0, y1, yticks = _linear_ticks(*_span(ys, 1e-3, 0.03))
    f = math.log10 if log_scale else (lambda v: v)
    pw, ph = width - LEFT - RIGHT, plot_height
    px = lambda x: LEFT + (x - x0) / (x1 - x0) * pw
    py = lambda y: TOP + ph - (f(y) - f(y0)) / (f(y1) - f(y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="{FONT}" font-size="12" fill="#333">',
           f"<title>{_esc(title)}</title>", '<rect width="100%" height="100%" fill="#fff"/>']
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else 1.0
    for t in xticks:  # grid line, tick mark, label
        x = _c(px(t))
        out.append(f'<line x1="{x}" y1="{TOP}" x2="{x}" y2="{TOP + ph}" stroke="#eee"/>'
                   f'<line x1="{x}" y1="{TOP + ph}" x2="{x}" y2="{TOP + ph + 5}" stroke="#888"/>')
        out.append(_text(px(t), TOP + ph + 18, _label(t, xstep), text_anchor="middle",
                         class_="tick x"))
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    for t in yticks:
        y = _c(py(t))
        out.append(f'<line x1="{LEFT}" y1="{y}" x2="{LEFT + pw}" y2="{y}" stroke="#eee"/>'
                   f'<line x1="{LEFT - 5}" y1="{y}" x2="{LEFT}" y2="{y}" stroke="#888"/>')
        lab = f"{t:.6g}" if log_scale else _label(t, ystep)  # %g: log ticks differ in decimals
        out.append(_text(LEFT - 8, py(t) + 4, lab, text_anchor="end", class_="tick y"))
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>')
    ylab = "loss (nats/token, log scale)" if log_scale else "loss (nats/token)"
    out.append(_text(LEFT + pw / 2, TOP + ph + BOTTOM - 10, "step", text_anchor="middle",
                     class_="axis-label x"))
    out.append(_text(14, TOP + ph / 2, ylab, text_anchor="middle", class_="axis-label y",
                     transform=f"rotate(-90 14 {_c(TOP + ph / 2)})"))
    out.append(_text(LEFT, 26, title, font_size="16", font_weight="600", class_="title"))
    if not xs:
        out.append(_text(LEFT + pw / 2, TOP + ph / 2, "no data yet", text_anchor="middle",
                         font_size="16", fill="#999", class_="empty"))
    return out, px, py


def _path_d(pts, px, py) -> str:
    return "M" + " L".join(f"{_c(px(x))} {_c(py(y))}" for x, y in pts)


def render_loss_svg(rows: list[dict], log_scale: bool = False, title: str = "puregpt training loss",
                    width: int = 720, height: int = 420, max_points: int = 2000,
                    smooth: float = 0.0) -> str:
    """The train and validation loss curves of `rows` (metrics.jsonl records) as an SVG document;
    `smooth`: EMA weight of the train curve (0: raw)."""
    curves = []
    for name, key, color, sw in CURVES:
        pts = _series(rows, key, log_scale)
        if smooth and key == "loss":
            pts = list(zip([s for s, _ in pts], ema([v for _, v in pts], smooth)))
        curves.append((name, color, sw, _downsample(pts, max_points)))
    curves = [c for c in curves if c[3]]
    xs = [p[0] for c in curves for p in c[3]]
    ys = [p[1] for c in curves for p in c[3]]
    out, px, py = _frame(xs, ys, log_scale, title, width, height, height - TOP - BOTTOM)
    for name, color, sw, pts in curves:
        d = _path_d(pts, px, py)
        if len(pts) == 1:
            d, sw = d + " h 0", 6  # a zero-length stroke with round caps draws a dot
        out.append(f'<path class="curve {name}" id="curve-{name}" d="{d}" fill="none" '
                   f'stroke="{color}" stroke-width="{sw}" stroke-linejoin="round" '
                   'stroke-linecap="round"/>')
    # Legend in the header, right-aligned: outside the plot area, so it can never hide a curve.
    lx = width - RIGHT
    for name, color, sw, _ in reversed(curves):
        lx -= 8 * len(name) + 34
        out.append(f'<line x1="{lx}" y1="22" x2="{lx + 20}" y2="22" stroke="{color}" '
                   f'stroke-width="{min(sw, 3)}" stroke-linecap="round"/>')
        out.append(_text(lx + 26, 26, name, class_="legend"))
    return "\n".join(out + ["</svg>"]) + "\n"


# Colours of the groups of render_runs_svg, in order (Tableau 10: distinct, colour-blind aware).
PALETTE = ("#4e79a7", "#e15759", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948",
           "#ff9da7", "#9c755f", "#bab0ac")


def group_curves(runs: list[list[dict]], smooth: float = 0.0, log_scale: bool = False):
    """The curves of one group of runs (a config's seeds): (steps, mean, low, high) of the
    EMA-smoothed train loss over the steps every run has reached (low/high: the seeds' spread),
    and (step, mean) of the validation loss at the evaluations every run has made."""
    train = [_series(rows, "loss", log_scale) for rows in runs]
    train = [dict(zip([s for s, _ in pts], ema([v for _, v in pts], smooth))) for pts in train]
    train = [t for t in train if t]
    steps = sorted(set.intersection(*(set(t) for t in train))) if train else []
    curve = [(s, [t[s] for t in train]) for s in steps]
    vals = [dict(_series(rows, "val_loss", log_scale)) for rows in runs]
    vals = [v for v in vals if v]
    vsteps = sorted(set.intersection(*(set(v) for v in vals))) if vals else []
    return ([(s, sum(v) / len(v), min(v), max(v)) for s, v in curve],
            [(s, sum(v[s] for v in vals) / len(vals)) for s in vsteps])


def render_runs_svg(groups: list[tuple[str, list[list[dict]]]], smooth: float = 0.0,
                    log_scale: bool = False, title: str = "puregpt: loss curves compared",
                    width: int = 760, height: int = 440, max_points: int = 600) -> str:
    """Several groups of runs on one chart: per group (label, the metrics rows of each of its
    runs), the mean of its runs' smoothed train loss as a curve (<path class="curve group">),
    the runs' spread as a band (<polygon class="band">, min to max over the runs), and its mean
    validation loss at each evaluation as dots (<circle class="val">). The legend sits under
    the plot, so it never hides a curve."""
    drawn = []
    for i, (label, runs) in enumerate(groups):
        curve, vals = group_curves(runs, smooth, log_scale)
        stride = max(1, math.ceil(len(curve) / max_points))  # every k-th step: mean and band align
        curve = curve[::stride] + ([curve[-1]] if curve and (len(curve) - 1) % stride else [])
        drawn.append((label, PALETTE[i % len(PALETTE)], curve, vals))
    xs = [p[0] for _, _, c, v in drawn for p in c + v]
    ys = [y for _, _, c, v in drawn for p in c for y in p[1:]] + \
         [p[1] for _, _, _, v in drawn for p in v]
    per_row = max(1, (width - LEFT - RIGHT) // 230)  # legend entries per row
    rows = math.ceil(len(drawn) / per_row)
    plot_height = height - TOP - BOTTOM
    total = height + 20 * rows
    out, px, py = _frame(xs, ys, log_scale, title, width, total, plot_height)
    for label, color, curve, vals in drawn:
        if len(curve) > 1 and any(lo != hi for _, _, lo, hi in curve):
            pts = [(s, hi) for s, _, _, hi in curve] + [(s, lo) for s, _, lo, _ in curve[::-1]]
            out.append(f'<polygon class="band" points="'
                       + " ".join(f"{_c(px(x))},{_c(py(y))}" for x, y in pts)
                       + f'" fill="{color}" fill-opacity="0.18" stroke="none"/>')
    for label, color, curve, vals in drawn:
        if curve:
            d = _path_d([(s, m) for s, m, _, _ in curve], px, py)
            out.append(f'<path class="curve group" data-label="{_esc(label)}" d="'
                       f'{d + (" h 0" if len(curve) == 1 else "")}" fill="none" stroke="{color}" '
                       f'stroke-width="{6 if len(curve) == 1 else 1.6}" stroke-linejoin="round" '
                       'stroke-linecap="round"/>')
        for s, v in vals:
            out.append(f'<circle class="val" data-label="{_esc(label)}" cx="{_c(px(s))}" '
                       f'cy="{_c(py(v))}" r="3.5" fill="#fff" stroke="{color}" '
                       'stroke-width="2"/>')
    y = TOP + plot_height + BOTTOM + 6
    for i, (label, color, _, _) in enumerate(drawn):
        lx, ly = LEFT + (i % per_row) * 230, y + (i // per_row) * 20
        out.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 20}" y2="{ly}" stroke="{color}" '
                   'stroke-width="3" stroke-linecap="round"/>')
        out.append(_text(lx + 26, ly + 4, label, class_="legend"))
    note = "train loss: mean over runs (band: their range)" + (
        f", EMA {smooth:g}" if smooth else "") + "; dots: validation loss"
    out.append(_text(width - RIGHT, TOP - 8, note, text_anchor="end", font_size="11",
                     fill="#666", class_="note"))
    return "\n".join(out + ["</svg>"]) + "\n"
