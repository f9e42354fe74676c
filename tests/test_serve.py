"""`puregpt serve`: over real loopback sockets against a tiny trained model. Seeded generation
gives exactly `puregpt sample`'s tokens (a subprocess of the CLI is the reference) and, with each
token, the distribution it was drawn from (recomputed here by a full forward pass and
sample.shape_probs); /api/explain gives explain()'s numbers; every bad request gets its status
and a message naming the problem; a stalled or vanished client costs only its own request; 20
concurrent requests all finish with their seeds' outputs; Ctrl-C stops the command cleanly."""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from helpers_train import REPO, TINY_RUN, cli_env, run_cli, stream_text
from puregpt import model, sample, serve
from puregpt.checkpoint import load_checkpoint, resolve_checkpoint


def start(run):
    path = resolve_checkpoint(str(run))
    server = serve.Server(load_checkpoint(path), path, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread):
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def docs_server(finished_run):
    server, thread = start(finished_run[0])
    yield server
    stop(server, thread)


def _train_on_prose(base, *flags):
    """A tiny stream-mode run on 3,000 characters of prose, in base/run."""
    data = base / "text.txt"
    data.write_text(stream_text(3000), encoding="utf-8")
    proc = run_cli("train", "--data", data, "--mode", "stream", "--out", base / "run",
                   *TINY_RUN, *flags, "--quiet")
    assert proc.returncode == 0, proc.stderr
    return base / "run"


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory):
    return _train_on_prose(tmp_path_factory.mktemp("stream"), "--steps", 6)


@pytest.fixture(scope="module")
def stream_server(stream_run):
    server, thread = start(stream_run)
    yield server
    stop(server, thread)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    return _train_on_prose(tmp_path_factory.mktemp("bpe"), "--tokenizer", "bpe",
                           "--vocab-size", 300, "--steps", 3)


def request(server, method, path, body=None, headers=None, timeout=60):
    """(status, headers, body bytes) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.headers, data


def generate(server, **settings) -> list[dict]:
    status, headers, data = request(server, "POST", "/api/generate", settings)
    assert status == 200, data
    assert headers["Content-Type"] == "application/x-ndjson"
    events = [json.loads(line) for line in data.decode().splitlines()]
    assert events[-1]["done"] is True and all("done" not in e for e in events[:-1])
    return events


def cli_sample(run, **s) -> str:
    """What `puregpt sample -n 1` prints for these settings."""
    flags = []
    for name, value in s.items():
        flags += [{"max_tokens": "--max-new-tokens"}.get(name, "--" + name.replace("_", "-")),
                  value]
    # (bytes, decoded here: text mode would turn a sampled "\r" into "\n")
    proc = subprocess.run([sys.executable, "-m", "puregpt", "sample", str(run), "-n", "1",
                           *map(str, flags)], cwd=REPO, env=cli_env(), capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.decode("utf-8")


# --- generation ----------------------------------------------------------------------------------

SETTINGS = [dict(seed=1), dict(seed=7, prompt="ma", temperature=1.0),
            dict(seed=123, temperature=0.8, top_k=5, top_p=0.9, max_tokens=20),
            dict(seed=5, temperature=2.0, top_p=0.5, max_tokens=30, prompt="e")]


@pytest.mark.parametrize("mode", ["docs", "stream", "bpe"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_seeded_generation_is_puregpt_samples(mode, settings, finished_run, stream_run,
                                              docs_server, stream_server, bpe_run):
    if mode == "bpe":  # (byte-level BPE, stream mode)
        server, thread = start(bpe_run)
        try:
            events = generate(server, **settings)
        finally:
            stop(server, thread)
        run = bpe_run
    else:
        run, server = (finished_run[0], docs_server) if mode == "docs" else (stream_run,
                                                                              stream_server)
        events = generate(server, **settings)
    printed = cli_sample(run, **settings)
    prompt = settings.get("prompt", "")
    assert printed == events[-1]["text"] + "\n"
    tok = load_checkpoint(resolve_checkpoint(str(run))).tokenizer
    assert prompt + tok.decode([e["id"] for e in events[:-1]]) == events[-1]["text"]
    if mode != "bpe":  # (a BPE token may hold part of a character: its text then shows U+FFFD)
        assert prompt + "".join(e["token"] for e in events[:-1]) == events[-1]["text"]
    assert events[-1]["seed"] == settings["seed"]
    assert events[-1]["tokens"] == len(events) - 1


@pytest.mark.parametrize("settings", SETTINGS[1:], ids=lambda s: "-".join(map(str, s.values())))
def test_each_token_comes_with_the_distribution_it_was_drawn_from(settings, finished_run,
                                                                 docs_server):
    """p and top are sample.shape_probs of the logits a full forward pass over the context
    gives (no KV cache: an independent path), to 1e-9; top is the 10 likeliest, in order."""
    ckpt = load_checkpoint(resolve_checkpoint(str(finished_run[0])))
    tok, cfg = ckpt.tokenizer, ckpt.config
    events = generate(docs_server, **settings)
    context = [tok.bos] + tok.encode(settings.get("prompt", ""))
    shape = {k: settings.get(k, serve.DEFAULTS[k]) for k in ("temperature", "top_k", "top_p")}
    for e in events[:-1]:
        logits, _ = model.forward(ckpt.params, cfg, [context[-cfg.block_size:]])
        probs = sample.shape_probs(logits[-1], **shape)
        assert e["id"] == tok.encode(e["token"])[0]
        assert e["p"] == pytest.approx(probs[e["id"]], abs=1e-9)
        order = sorted(range(len(probs)), key=lambda i: -probs[i])[:serve.TOP]
        want = [[tok.token_str(i), probs[i]] for i in order if probs[i] > 0]
        assert [t for t, _ in e["top"]] == [t for t, _ in want]
        assert [p for _, p in e["top"]] == pytest.approx([p for _, p in want], abs=1e-9)
        context.append(e["id"])


def test_without_a_seed_the_seed_used_is_reported_and_repeats_the_sample(docs_server):
    first = generate(docs_server, temperature=1.5, max_tokens=20)
    seed = first[-1]["seed"]
    assert isinstance(seed, int)
    assert generate(docs_server, temperature=1.5, max_tokens=20, seed=seed) == first


def test_the_default_length_is_samples(finished_run, docs_server, stream_server):
    info = json.loads(request(docs_server, "GET", "/api/info")[2])
    ckpt = load_checkpoint(resolve_checkpoint(str(finished_run[0])))
    assert info["defaults"]["max_tokens"] == ckpt.config.block_size  # docs mode: block_size
    assert json.loads(request(stream_server, "GET", "/api/info")[2])["defaults"][
        "max_tokens"] == 256
    assert info["mode"] == "docs" and info["step"] == ckpt.step == 6
    assert info["config"] == ckpt.config.to_dict()
    assert info["chars"] == "".join(ckpt.tokenizer.chars)
    assert info["vocab_size"] == ckpt.tokenizer.vocab_size


def test_twenty_concurrent_requests_all_finish_with_their_seeds_outputs(finished_run,
                                                                        docs_server):
    ckpt = load_checkpoint(resolve_checkpoint(str(finished_run[0])))
    want = {seed: sample.generate_text(ckpt.params, ckpt.config, ckpt.tokenizer, "",
                                       max_new_tokens=40, rng=random.Random(seed),
                                       temperature=1.2) for seed in range(20)}
    got, errors = {}, []
    barrier = threading.Barrier(20)

    def client(seed):
        try:
            barrier.wait(30)  # all 20 in flight together
            got[seed] = generate(docs_server, seed=seed, max_tokens=40, temperature=1.2)
        except Exception as e:  # reported below
            errors.append(f"seed {seed}: {e!r}")

    threads = [threading.Thread(target=client, args=(s,)) for s in range(20)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "requests still running after 120 s"
    assert not errors, errors
    assert {s: e[-1]["text"] for s, e in got.items()} == want


# --- bad requests --------------------------------------------------------------------------------

BAD_GENERATE = [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),
    (b"\xff\xfe", "not UTF-8"),
    ({"prompt": "a", "bogus": 1}, "unknown field(s): bogus"),
    ({"prompt": 3}, "prompt must be a string"),
    ({"prompt": "aZ"}, "not in the vocabulary: 'Z'"),
    ({"temperature": 0}, "temperature must be > 0"),
    ({"temperature": "hot"}, "temperature must be a number"),
    (b'{"temperature": NaN}', "temperature must be a number"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"top_p": 0}, "top_p in (0, 1]"),
    ({"top_p": 1.5}, "top_p in (0, 1]"),
    ({"max_tokens": serve.MAX_TOKENS + 1}, f"between 0 and {serve.MAX_TOKENS} (the server's "
                                           f"cap on tokens per request)"),
    ({"max_tokens": -1}, "between 0 and"),
    ({"max_tokens": True}, "max_tokens must be an integer"),
    ({"seed": "x"}, "seed must be an integer"),
]


@pytest.mark.parametrize("body, message", BAD_GENERATE, ids=lambda x: str(x)[:30])
def test_bad_generate_requests_get_400_with_a_message(body, message, docs_server):
    status, headers, data = request(docs_server, "POST", "/api/generate", body)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    assert message in json.loads(data)["error"]


@pytest.mark.parametrize("body, message", [
    ({}, "text must be a string, got null"),
    ({"text": 5}, "text must be a string, got 5"),
    ({"text": "emZ"}, "not in the vocabulary: 'Z'"),
    ({"text": "em", "prompt": "x"}, "unknown field(s): prompt"),
    (b"text=emma", "malformed JSON"),
], ids=lambda x: str(x)[:30])
def test_bad_explain_requests_get_400_with_a_message(body, message, docs_server):
    status, _, data = request(docs_server, "POST", "/api/explain", body)
    assert status == 400
    assert message in json.loads(data)["error"]


@pytest.mark.parametrize("method, path, status, message", [
    ("GET", "/nope", 404, "no such page: /nope"),
    ("POST", "/api/nope", 404, "no such page"),
    ("GET", "/api/generate", 405, "/api/generate takes POST, not GET"),
    ("POST", "/api/info", 405, "/api/info takes GET, not POST"),
    ("PUT", "/", 405, "/ takes GET, not PUT"),
    ("DELETE", "/api/explain", 405, "takes POST, not DELETE"),
])
def test_unknown_pages_and_wrong_methods(method, path, status, message, docs_server):
    got, headers, data = request(docs_server, method, path, b"{}" if method != "GET" else None)
    assert got == status
    assert message in json.loads(data)["error"]
    if status == 405:
        assert headers["Allow"] == ("POST" if path.startswith("/api/e") or
                                    path.startswith("/api/g") else "GET")


def raw(server, data: bytes, timeout=30) -> tuple[int, dict]:
    """Send raw bytes; the status and the JSON of the answer."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_body_over_the_limit_gets_413_unread(docs_server):
    n = serve.MAX_BODY + 1
    status, answer = raw(docs_server, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Content-Length: %d\r\n\r\n" % n)  # not one byte of the body sent
    assert status == 413
    assert answer["error"] == f"the request body is {n} bytes; the limit is {serve.MAX_BODY}"
    # a body just at the limit is read (and then judged as JSON)
    status, _, data = request(docs_server, "POST", "/api/explain", b" " * serve.MAX_BODY)
    assert status == 400 and "malformed JSON" in json.loads(data)["error"]


def test_a_post_without_a_length_gets_411(docs_server):
    status, answer = raw(docs_server, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert status == 411 and "Content-Length" in answer["error"]


def test_another_host_name_gets_403(docs_server):
    """A page elsewhere reaching 127.0.0.1 through its own DNS name (DNS rebinding)."""
    status, _, data = request(docs_server, "GET", "/api/info", headers={"Host": "evil.example"})
    assert status == 403 and "'evil.example' is not this server" in json.loads(data)["error"]
    port = docs_server.server_address[1]
    assert request(docs_server, "GET", "/api/info", headers={"Host": f"localhost:{port}"})[0] \
        == 200


# --- clients that stall or vanish ----------------------------------------------------------------


def handler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "process_request_thread" in t.name]


def wait_for_no_handlers(seconds=10.0) -> None:
    deadline = time.monotonic() + seconds
    while handler_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not handler_threads(), "a request thread is still running"


def test_a_client_that_vanishes_mid_stream_ends_only_its_own_generation(stream_run,
                                                                        stream_server,
                                                                        monkeypatch):
    ckpt = load_checkpoint(resolve_checkpoint(str(stream_run)))
    settings = dict(prompt="the", max_tokens=300, temperature=0.5, top_k=3)
    # a seed whose sample runs the full 300 tokens (BOS would end it sooner)
    seed = next(s for s in range(100) if len(list(sample.generate(
        ckpt.params, ckpt.config, ckpt.tokenizer.encode("the"), 300, random.Random(s),
        0.5, 3, stop_token=ckpt.tokenizer.bos))) == 300)
    produced = []
    real = serve.generate_events

    def slow(*args):  # 10 ms a token: the whole sample would take 3 s
        for event in real(*args):
            produced.append(event)
            time.sleep(0.01)
            yield event

    monkeypatch.setattr(serve, "generate_events", slow)
    wait_for_no_handlers()
    body = json.dumps({**settings, "seed": seed}).encode()
    s = socket.create_connection(("127.0.0.1", stream_server.server_address[1]), 10)
    s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
              % len(body) + body)
    got = b""
    while got.count(b"\n{") < 2:  # the headers, then two token lines
        got += s.recv(4096)
    # vanish: close with a reset (SO_LINGER 0), as a killed browser tab would
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    wait_for_no_handlers(5)
    assert 2 <= len(produced) < 100  # the generation stopped, well before its 300 tokens
    monkeypatch.setattr(serve, "generate_events", real)
    events = generate(stream_server, **settings, seed=seed)  # the server goes on
    assert len(events) == 301


def test_a_stalled_client_does_not_block_others(docs_server):
    port = docs_server.server_address[1]
    stalled = [socket.create_connection(("127.0.0.1", port), 10) for _ in range(2)]
    stalled[0].sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers unended
    stalled[1].sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50"
                       b"\r\n\r\n{\"seed\":")  # a body cut short
    try:
        start_time = time.monotonic()
        events = generate(docs_server, seed=3, max_tokens=8)
        assert events[-1]["done"] and time.monotonic() - start_time < 10
    finally:
        for s in stalled:
            s.close()


# --- explain and the page ------------------------------------------------------------------------


def test_explain_gives_explains_numbers(finished_run, docs_server):
    from puregpt.explain import explain
    ckpt = load_checkpoint(resolve_checkpoint(str(finished_run[0])))
    status, headers, data = request(docs_server, "POST", "/api/explain", {"text": "emma"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    direct = explain(ckpt.params, ckpt.config, ckpt.tokenizer, "emma",
                     train_config=ckpt.train_config, docs_mode=True, optimizer=ckpt.optimizer,
                     step=ckpt.step)
    assert json.loads(data) == json.loads(json.dumps(direct))


def test_explains_and_generations_side_by_side_do_not_touch_each_other(finished_run,
                                                                       docs_server):
    """The model is shared: explain's training step works on copies, so four explains of
    different texts, running with generations, give each its own numbers."""
    from puregpt.explain import explain_checkpoint
    texts = ["emma", "ava", "olivia", "mia"]
    want = {t: json.loads(json.dumps(explain_checkpoint(docs_server.path, t))) for t in texts}
    got, errors = {}, []

    def client(text):
        try:
            got[text] = json.loads(request(docs_server, "POST", "/api/explain",
                                           {"text": text})[2])
            generate(docs_server, seed=len(text), max_tokens=8)
        except Exception as e:  # reported below
            errors.append(f"{text}: {e!r}")

    threads = [threading.Thread(target=client, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == want


def test_the_page_is_the_live_page(docs_server):
    status, headers, data = request(docs_server, "GET", "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert data.count(b'<meta name="puregpt-live" content="1">') == 1
    assert b'data-live="true"' in data and b'<script id="puregpt-live">' in data
    from puregpt.explain import explain_checkpoint, render_page
    static = render_page(explain_checkpoint(docs_server.path, "emma"))
    assert 'name="puregpt-live"' not in static and 'data-live="false"' in static


# --- the command ---------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(*args):
    """`puregpt serve ARGS` in a subprocess: yields its first three lines and a dict that, once
    the block ends and the command got its Ctrl-C (SIGINT), holds its code, stdout and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "puregpt", "serve", *map(str, args)],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stopped = {}
    try:
        yield [proc.stdout.readline() for _ in range(3)], stopped
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        stopped.update(code=proc.returncode, out=out, err=err)
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_stops_the_command_cleanly(finished_run):
    with serving(finished_run[0], "--port", 0) as (lines, stopped):
        assert lines[0].startswith(f"serving {finished_run[0] / 'best.safetensors'} at "
                                   f"http://127.0.0.1:"), lines
        assert lines[1].startswith("local only: only this machine can connect"), lines
        url = lines[0].split(" at ")[1].strip()
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert port > 0
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/api/info")
        assert json.loads(conn.getresponse().read())["step"] == 6
    assert stopped["code"] == 0, stopped["err"]
    assert stopped["out"].strip().endswith("stopped")
    assert "Traceback" not in stopped["err"]


def test_the_command_names_its_model_as_sample_does(tmp_path, finished_run):
    proc = subprocess.run([sys.executable, "-m", "puregpt", "serve", "--port", "0"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          timeout=60)  # no ./run here
    assert proc.returncode == 1 and "no model in ./run (the default)" in proc.stderr
    proc = run_cli("serve", "--port", 70000)
    assert proc.returncode == 2 and "--port must be between 0 and 65535" in proc.stderr
    with serving("-m", finished_run[0] / "last.safetensors", "--port", 0) as (lines, stopped):
        assert lines[0].startswith(f"serving {finished_run[0] / 'last.safetensors'} at ")
    assert stopped["code"] == 0


def test_listening_beyond_loopback_comes_with_a_warning(finished_run):
    """(and a Ctrl-C straight after the start is a clean stop too)"""
    with serving(finished_run[0], "--host", "0.0.0.0", "--port", 0) as (lines, stopped):
        assert " at http://0.0.0.0:" in lines[0]
        assert lines[1].startswith("warning: listening on 0.0.0.0: anyone who can reach this "
                                   "machine can use the model"), lines
    assert stopped["code"] == 0
