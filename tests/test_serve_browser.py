"""The live page in a real browser (headless Chromium driven by Playwright) against `puregpt
serve` on a loopback port: typing a prompt and pressing generate streams tokens into the page
while they are sampled, and they are `puregpt sample`'s tokens for the same seed and settings;
then the page draws the x-ray of the text, and clicking a token shows the attention rows of the
position that predicted it (explain()'s numbers) and the distribution it was drawn from. No
console errors, no request leaves the loopback server."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from helpers_train import run_cli
from puregpt import serve
from puregpt.checkpoint import load_checkpoint, resolve_checkpoint
from puregpt.explain import explain

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SETTINGS = dict(prompt="a", seed=11, temperature=1.0, top_k=0, top_p=0.95, max_tokens=5)


@pytest.fixture
def slow_server(finished_run, monkeypatch):
    """The server, drawing a token every 0.1 s, so the page can be watched mid-stream."""
    real = serve.generate_events

    def slow(*args):
        for event in real(*args):
            time.sleep(0.1)
            yield event

    monkeypatch.setattr(serve, "generate_events", slow)
    path = resolve_checkpoint(str(finished_run[0]))
    server = serve.Server(load_checkpoint(path), path, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.mark.oracle
def test_generating_in_the_page_streams_puregpt_samples_tokens(finished_run, slow_server):
    from playwright.sync_api import sync_playwright
    run = finished_run[0]
    ckpt = load_checkpoint(resolve_checkpoint(str(run)))
    proc = run_cli("sample", run, "-n", 1, "--prompt", SETTINGS["prompt"], "--seed",
                   SETTINGS["seed"], "--temperature", SETTINGS["temperature"], "--top-p",
                   SETTINGS["top_p"], "--max-new-tokens", SETTINGS["max_tokens"])
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.rstrip("\n")
    want = ckpt.tokenizer.encode(printed[len(SETTINGS["prompt"]):])
    assert len(want) >= 2, "choose settings that sample at least two tokens"

    errors, foreign = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.startswith(slow_server.url)
                    else foreign.append(r.url))
            page.goto(slow_server.url)
            page.wait_for_selector('#live-status[data-state="ready"]')
            # the x-ray waits for a text
            assert page.eval_on_selector("#attention-section", "n => n.hidden")
            page.fill("#live-prompt", SETTINGS["prompt"])
            for name in ("seed", "temperature", "top_k", "top_p", "max_tokens"):
                page.fill("#live-" + name.replace("_", "-"), str(SETTINGS[name]))
            page.click("#live-generate")
            # tokens arrive while the server is still sampling
            page.wait_for_function("document.querySelectorAll('#live-tokens .tok').length >= 1"
                                   " && document.getElementById('live-status').dataset.state"
                                   " === 'streaming'", timeout=20000)
            page.wait_for_selector('#live-status[data-state="done"]', timeout=60000)
            got = page.eval_on_selector_all("#live-tokens .tok", "ns => ns.map(n => "
                                            "[Number(n.dataset.id), Number(n.dataset.p)])")
            assert [i for i, _ in got] == want
            assert page.inner_text("#live-tokens .prompt") == SETTINGS["prompt"]
            assert all(0 < p <= 1 for _, p in got)

            # the x-ray is of the whole text; a token's click shows the attention rows of the
            # position that predicted it, as explain() computes them
            data = explain(ckpt.params, ckpt.config, ckpt.tokenizer, printed,
                           train_config=ckpt.train_config, docs_mode=True,
                           optimizer=ckpt.optimizer, step=ckpt.step)
            assert not page.eval_on_selector("#attention-section", "n => n.hidden")
            cfg = ckpt.config
            assert page.locator("svg.heatmap").count() == cfg.n_layer * cfg.n_head
            k = 1
            page.click(f'#live-tokens .tok[data-k="{k}"]')
            ids = [t["id"] for t in data["tokens"]]
            i = len(ids) - (ids[-1] == ckpt.tokenizer.bos) - len(want) + k
            assert ids[i] == want[k]
            rows = page.eval_on_selector_all("#live-detail .attn-row", "ns => ns.map(n => "
                                             "[Number(n.dataset.layer), Number(n.dataset.head),"
                                             " JSON.parse(n.dataset.weights)])")
            assert len(rows) == cfg.n_layer * cfg.n_head
            for l, h, weights in rows:
                assert weights == pytest.approx(data["attention"][l][h][i - 1], abs=1e-12)
                assert sum(weights) == pytest.approx(1.0, abs=1e-9)
            alternatives = page.eval_on_selector_all("#live-detail [data-alt]", "ns => ns.map("
                                                     "n => [n.dataset.alt, Number(n.dataset.p)])")
            probs = [q for _, q in alternatives]
            assert probs == sorted(probs, reverse=True) and probs[0] > 0
            # the x-ray's bars, reshaped in the page with the settings of the draw, give the
            # same probabilities (the server's, from the KV-cached pass, vs the page's own
            # shaping of explain's logits)
            bars = page.eval_on_selector_all("#bars .bar-row", "ns => ns.map(n => "
                                             "[Number(n.dataset.token), Number(n.dataset.p)])")
            drawn = dict(alternatives)
            same = [(drawn[data["vocab"][j]], q) for j, q in bars if data["vocab"][j] in drawn]
            assert len(same) >= 5
            assert [a for a, _ in same] == pytest.approx([b for _, b in same], abs=1e-9)
            # and the next-token bars above now show that position (the drawn token in orange,
            # when it is among the ten likeliest)
            shown = [j for j, _ in bars]
            assert shown == [j for j, _ in data["top"][i - 1]]
            if want[k] in shown:
                assert page.eval_on_selector(".bar-row.target",
                                             "n => Number(n.dataset.token)") == want[k]
        finally:
            browser.close()
    assert errors == []
    assert foreign == []
