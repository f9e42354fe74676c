"""The loss plot: well-formed SVG, one path per curve, pixel geometry that follows the data, and a
metrics reader that tolerates a run killed mid-write."""

import json
import math
import re
import xml.etree.ElementTree as ET

import pytest

from puregpt.plot import read_metrics, render_loss_svg

NS = "{http://www.w3.org/2000/svg}"


def parse(svg):
    root = ET.fromstring(svg)
    assert root.tag == NS + "svg"
    return root


def paths(root):
    return root.findall(f".//{NS}path")


def curve(root, name):
    found = [p for p in paths(root) if p.get("class") == f"curve {name}"]
    assert len(found) == 1 and found[0].get("id")
    return found[0]


def points(path):
    """(x, y) pairs of a path's d attribute: M/L commands, plus a trailing "h 0" for a dot."""
    nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path.get("d").replace("h 0", ""))]
    assert len(nums) % 2 == 0
    return list(zip(nums[::2], nums[1::2]))


def texts(root, cls=None):
    return ["".join(t.itertext()) for t in root.iter(NS + "text")
            if cls is None or t.get("class") == cls]


def run(n=50, val_every=10):
    rows = []
    for s in range(n):
        r = {"step": s, "loss": 3.0 - 2.0 * s / n, "lr": 1e-3, "tokens_per_s": 900.0}
        if s % val_every == 0:
            r["val_loss"] = 3.1 - 2.0 * s / n
        rows.append(r)
    return rows


def test_train_and_validation_curves_axes_and_legend():
    root = parse(render_loss_svg(run()))
    assert len(paths(root)) == 2
    curve(root, "train"), curve(root, "validation")
    assert curve(root, "train").get("stroke") != curve(root, "validation").get("stroke")
    assert texts(root, "axis-label x") == ["step"]
    assert texts(root, "axis-label y") == ["loss (nats/token)"]
    legend = texts(root, "legend")
    assert "train" in legend and "validation" in legend
    assert "puregpt training loss" in texts(root)
    assert len(texts(root, "tick x")) >= 2 and len(texts(root, "tick y")) >= 2


def test_train_only_draws_one_path():
    rows = [{"step": r["step"], "loss": r["loss"]} for r in run()]
    root = parse(render_loss_svg(rows))
    assert len(paths(root)) == 1
    curve(root, "train")
    assert texts(root, "legend") == ["train"]


def test_tick_labels_are_nice_numbers():
    root = parse(render_loss_svg(run(n=1234)))
    for label in texts(root, "tick x") + texts(root, "tick y"):
        v = float(label.replace("k", "e3").replace("M", "e6"))
        if v:
            mant = abs(v) / 10 ** math.floor(math.log10(abs(v)) + 1e-9)
            assert any(abs(mant * k - round(mant * k)) < 1e-6 for k in (1, 2, 5)), label
    xs = [float(t.replace("k", "e3")) for t in texts(root, "tick x")]
    steps = {round(b - a, 9) for a, b in zip(xs, xs[1:])}
    assert len(steps) == 1 and steps.pop() in (100, 200, 250, 500)  # evenly spaced 1/2/5 x 10^k


def test_decreasing_loss_goes_down_the_page_and_x_follows_step():
    root = parse(render_loss_svg(run()))
    for name in ("train", "validation"):
        pts = points(curve(root, name))
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        assert all(a < b for a, b in zip(xs, xs[1:])), name
        assert all(a < b for a, b in zip(ys, ys[1:])), name  # SVG y grows downwards


def test_unsorted_rows_and_duplicate_steps_keep_the_last():
    rows = run(n=20)[::-1] + [{"step": 10, "loss": 100.0}]
    pts = points(curve(parse(render_loss_svg(rows)), "train"))
    assert len(pts) == 20
    top = min(pts, key=lambda p: p[1])  # the highest loss is the smallest y
    assert top == pts[10]
    # a later row without val_loss does not erase the validation point at that step
    assert len(points(curve(parse(render_loss_svg(rows)), "validation"))) == 2


def test_non_finite_values_are_skipped():
    rows = run(n=20) + [{"step": 3, "loss": float("nan")}, {"step": 30, "loss": float("inf")},
                        {"step": 40, "loss": -math.inf, "val_loss": math.nan},
                        {"step": math.nan, "loss": 1.0}, {"step": 41, "val_loss": None}]
    for log_scale in (False, True):
        svg = render_loss_svg(rows, log_scale=log_scale)
        parse(svg)
        assert not re.search(r"nan|inf", svg, re.IGNORECASE)
        assert len(points(curve(parse(svg), "train"))) == 19  # step 3's last value is NaN


def test_log_scale():
    rows = [{"step": s, "loss": 5.0 * math.exp(-s / 300) + 0.05} for s in range(2000)]
    svg = render_loss_svg(rows, log_scale=True)
    root = parse(svg)
    assert texts(root, "axis-label y") == ["loss (nats/token, log scale)"]
    ticks = [float(t) for t in texts(root, "tick y")]
    assert len(ticks) >= 3 and 0.1 in ticks and 1.0 in ticks
    ys = [p[1] for p in points(curve(root, "train"))]
    assert all(a <= b for a, b in zip(ys, ys[1:]))
    # equal ratios are equal distances on a log axis
    pos = {float(t.text): float(t.get("y")) for t in root.iter(NS + "text")
           if t.get("class") == "tick y"}
    assert pos[0.1] - pos[0.2] == pytest.approx(pos[1.0] - pos[2.0], abs=0.2)
    # a narrow range still gets several ticks, all inside the plot
    narrow = parse(render_loss_svg([{"step": s, "loss": 2.0 + s / 100} for s in range(50)], True))
    assert len(texts(narrow, "tick y")) >= 3


def test_downsampling_caps_points_and_spans_the_run():
    rows = [{"step": s, "loss": 4.0 - s / 50_000 + (3.0 if s == 61_234 else 0.0)}
            for s in range(100_000)]
    svg = render_loss_svg(rows)
    root = parse(svg)
    pts = points(curve(root, "train"))
    assert 1000 <= len(pts) <= 2000
    assert len(svg) < 100_000
    full = points(curve(parse(render_loss_svg(rows[:10] + rows[-10:])), "train"))
    assert pts[0][0] == full[0][0] and pts[-1][0] == full[-1][0]  # first and last step kept
    assert all(a <= b for a, b in zip([p[0] for p in pts], [p[0] for p in pts][1:]))
    # min/max bucketing keeps the one-step spike: its point is the highest on the page
    assert min(p[1] for p in pts) < min(p[1] for p in pts[:5]) - 50
    assert len(points(curve(parse(render_loss_svg(rows, max_points=300)), "train"))) <= 300


def test_coordinates_rounded_to_tenth_of_a_pixel():
    d = curve(parse(render_loss_svg(run(n=37))), "train").get("d")
    assert all(len(n.split(".")[1]) == 1 for n in re.findall(r"\d+\.\d+", d))


def test_single_point_curves():
    root = parse(render_loss_svg([{"step": 0, "loss": 3.3, "val_loss": 3.31}]))
    assert len(paths(root)) == 2
    for name in ("train", "validation"):
        assert len(points(curve(root, name))) == 1


def test_empty_input_renders_axes_and_message():
    for rows in ([], [{"step": 1}], [{"step": 2, "loss": float("nan")}]):
        for log_scale in (False, True):
            root = parse(render_loss_svg(rows, log_scale=log_scale))
            assert paths(root) == []
            assert "no data yet" in texts(root)
            assert texts(root, "axis-label x") == ["step"]
            assert len(texts(root, "tick y")) >= 2


def test_title_is_escaped_and_size_is_configurable():
    svg = render_loss_svg(run(), title="a <b> & 'c' \"d\"", width=400, height=300)
    root = parse(svg)
    assert "a <b> & 'c' \"d\"" in texts(root)
    assert root.get("width") == "400" and root.get("height") == "300"
    assert "<b>" not in svg


def test_read_metrics(tmp_path):
    f = tmp_path / "metrics.jsonl"
    lines = [json.dumps(r) for r in run(n=5)]
    f.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    assert read_metrics(f) == run(n=5)
    # a crash mid-write leaves an unterminated last line: ignored
    f.write_text("\n".join(lines) + '\n{"step": 5, "lo')
    assert read_metrics(str(f)) == run(n=5)
    # a malformed complete line is an error naming the file and line
    f.write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(f)
    f.write_text(lines[0] + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r":2"):
        read_metrics(f)
