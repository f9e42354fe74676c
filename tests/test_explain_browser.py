"""The x-ray page in a real browser: Debian's Chromium, headless, driven by Playwright. The static
page opens from file:// with no console error and no network request, draws n_layer x n_head
heatmaps of exactly T(T+1)/2 cells each (the causal triangle), and its temperature / top-k /
top-p controls give the bars sample.shape_probs's values (< 1e-9). It saves docs/explain.png,
the README's screenshot."""

from __future__ import annotations

import importlib
import shutil

import pytest

import puregpt
from helpers_train import REPO
from puregpt import sample

explain_mod = importlib.import_module("puregpt.explain")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TEXT = "emmanuel"
SCREENSHOT = REPO / "docs" / "explain.png"


@pytest.fixture(scope="module")
def page_file(tmp_path_factory):
    """A page of a briefly trained 2-layer model (real, if young, attention patterns)."""
    model = puregpt.train(steps=150, batch_size=8, n_layer=2, n_embd=16, seed=1, eval_every=0,
                          workers=1)
    data = puregpt.explain(model, TEXT)
    path = tmp_path_factory.mktemp("page") / "explain.html"
    path.write_text(explain_mod.render_page(data), encoding="utf-8")
    return path, data


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (.ci/run installs it with apt-get)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, path):
    """The page, with every console message, page error and request recorded."""
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    seen = {"console": [], "errors": [], "requests": []}
    page.on("console", lambda m: seen["console"].append((m.type, m.text)))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.goto(path.as_uri())
    page.wait_for_selector("[data-bar]")
    return page, seen


@pytest.mark.oracle
def test_the_static_page_loads_offline_and_draws_every_head(browser, page_file):
    path, data = page_file
    page, seen = open_page(browser, path)
    assert seen["errors"] == [] and [m for m in seen["console"] if m[0] == "error"] == []
    assert seen["requests"] == [path.as_uri()]  # the page itself, nothing else
    cfg = data["model"]
    T = len(data["inputs"])
    heatmaps = page.locator("svg.heatmap")
    assert heatmaps.count() == cfg["n_layer"] * cfg["n_head"] == 2 * 4
    for i in range(heatmaps.count()):
        cells = heatmaps.nth(i).locator("rect.cell")
        assert cells.count() == T * (T + 1) // 2
    # the cells hold the engine's weights, in the causal triangle only
    layer, head = 1, 2
    cells = page.eval_on_selector_all(
        f'svg.heatmap[data-layer="{layer}"][data-head="{head}"] rect.cell',
        "cells => cells.map(c => [+c.dataset.query, +c.dataset.key, +c.dataset.weight])")
    assert all(k <= q for q, k, _ in cells)
    assert {(q, k): w for q, k, w in cells} == {
        (q, k): w for q, row in enumerate(data["attention"][layer][head])
        for k, w in enumerate(row)}
    # hovering a cell shows its exact weight and its query and key tokens
    cell = page.locator(f'svg.heatmap[data-layer="{layer}"][data-head="{head}"] '
                        f'rect.cell[data-query="{T - 1}"][data-key="0"]')
    cell.hover()
    tip = page.locator("#tip").inner_text()
    assert repr(data["attention"][layer][head][T - 1][0]) in tip and "<BOS>" in tip
    # tokens: one per token of the sequence, coloured by surprisal, carrying the log-probability
    toks = page.eval_on_selector_all("#tokens .tok", "ts => ts.map(t => t.dataset.logprob)")
    assert len(toks) == len(data["tokens"])
    assert [float(x) for x in toks[1:]] == [t["logprob"] for t in data["tokens"][1:]]
    assert page.locator("#gradients tr[data-param]").count() == len(
        data["train_step"]["tensors"])
    assert page.locator("#ops-forward li").count() == page.locator("#ops-backward li").count()
    assert page.locator("#pca-chart circle").count() == data["model"]["vocab_size"]
    # the README's screenshot: the top of the page, at a modest size
    page.mouse.move(0, 0)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SCREENSHOT), full_page=True,
                    clip={"x": 0, "y": 0, "width": 1000, "height": 1050})
    page.close()


def bars(page) -> dict[int, float]:
    return {int(t): float(p) for t, p in page.eval_on_selector_all(
        "[data-bar]", "bars => bars.map(b => [b.dataset.token, b.dataset.p])")}


@pytest.mark.oracle
def test_the_sampling_controls_reshape_as_shape_probs(browser, page_file):
    path, data = page_file
    page, seen = open_page(browser, path)
    T = len(data["inputs"])
    settings = [(1.0, 0, 1.0), (0.5, 0, 1.0), (0.7, 3, 1.0), (1.3, 0, 0.6), (0.8, 5, 0.9),
                (2.5, 1, 1.0), (0.05, 0, 0.3), (1.0, 27, 0.999)]
    for pos in (0, T // 2, T - 1):
        page.click(f'#tokens .tok[data-pos="{pos}"]')
        for temperature, top_k, top_p in settings:
            page.fill("#temperature", str(temperature))
            page.fill("#top-k", str(top_k))
            page.fill("#top-p", str(top_p))
            shown = bars(page)
            expected = sample.shape_probs(data["logits"][pos], temperature, top_k, top_p)
            assert sorted(shown) == sorted(i for i, _ in data["top"][pos])
            for token, p in shown.items():
                assert abs(p - expected[token]) < 1e-9, (pos, temperature, top_k, top_p, token)
            kept = sum(p > 0 for p in expected)
            assert page.locator("#kept").inner_text().startswith(f"{kept} of ")
    # the range slider drives the same number
    page.fill("#temperature-range", "2")
    assert page.input_value("#temperature") == "2"
    # settings shape_probs refuses give a message, not bars
    page.fill("#temperature", "0")
    assert page.locator("[data-bar]").count() == 0 and "must be > 0" in page.inner_text("#bars")
    assert seen["errors"] == []
    page.close()
