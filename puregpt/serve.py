"""`puregpt serve`: the x-ray page, live, from the standard library's threaded HTTP server.

    GET  /              the page in live mode (explain.render_page(None, live=True))
    GET  /api/info      the model: checkpoint, step, config, mode, vocabulary, limits, defaults
    POST /api/generate  {"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed"} ->
                        application/x-ndjson, one line per sampled token as it is drawn,
                        {"token", "id", "p", "top": [[text, prob], ...]}, then
                        {"done": true, "text": prompt + generated, "seed", "tokens",
                        "context_tokens"} (tokens: how many were drawn; context_tokens: the
                        prompt's, with BOS)
    POST /api/explain   {"text"} -> explain.explain's numbers as JSON

Errors are {"error": message} with 400 (bad JSON, unknown fields, wrong types, settings out of
range, text outside the vocabulary), 403 (a Host header that is not this server's, when it
listens on loopback), 404, 405, 411, 413 (a body over MAX_BODY) and 500.

The model is loaded once and only read: every request gets its own RNG and KV cache, so requests
run side by side in their own threads without touching each other. Generation is
`sample.generate` itself, drawing from a random.Random seeded with the request's seed, so a seed
gives the very tokens `puregpt sample --seed` gives with the same settings. Sockets time out
(TIMEOUT), so a client that stalls or stops reading costs its own thread only; one that goes away
mid-stream ends its own generation (the write fails, the thread returns).
"""

from __future__ import annotations

import ipaddress
import json
import math
import random
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import sample
from .checkpoint import Checkpoint
from .model import num_params

MAX_BODY = 64 * 1024  # bytes of a request body; more is answered 413 unread
MAX_TOKENS = 1000  # new tokens per generate request
TOP = 10  # alternatives sent with each token
TIMEOUT = 30.0  # seconds a socket may wait on its client (to send its request, or to read)
# The defaults of a generate request: `puregpt sample`'s (its max tokens: block_size for
# documents, 256 for continuous text).
DEFAULTS = {"prompt": "", "max_tokens": None, "temperature": 0.5, "top_k": 0, "top_p": 1.0,
            "seed": None}


class RequestError(ValueError):
    """A request the server refuses: its HTTP status and the message the client gets."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class DrawRecorder(random.Random):
    """A random.Random that remembers the weights of its last choices() call.

    sample.pick draws each token as rng.choices(range(V), weights=probs), probs being
    sample.shape_probs' distribution: recording them gives the very probabilities each token
    was drawn from, at no extra cost, while the draws (so the tokens) stay those of a plain
    random.Random with the same seed.
    """

    weights: list[float] = []

    def choices(self, population, weights=None, **kw):
        self.weights = weights
        return super().choices(population, weights=weights, **kw)


# --- the requests, as plain functions (no sockets) -----------------------------------------------


def _number(name, value, kind):
    """value as an int (kind int) or a finite float (kind float), else a 400 naming the field."""
    ok = not isinstance(value, bool) and (isinstance(value, int) if kind is int else
                                          isinstance(value, (int, float)) and math.isfinite(value))
    if not ok:
        raise RequestError(400, f"{name} must be {'an integer' if kind is int else 'a number'}, "
                                f"got {json.dumps(value)}")
    return value


def parse_json(body: bytes, fields: dict) -> dict:
    """A request body as a JSON object with only the given fields (name -> default), defaults
    filled in."""
    try:
        req = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"malformed JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    if not isinstance(req, dict):
        raise RequestError(400, f"the body must be a JSON object, got {type(req).__name__}")
    unknown = sorted(set(req) - set(fields))
    if unknown:
        raise RequestError(400, f"unknown field(s): {', '.join(unknown)} (known: "
                                f"{', '.join(fields)})")
    return {**fields, **req}


def check_text(ckpt: Checkpoint, name: str, text) -> list[int]:
    if not isinstance(text, str):
        raise RequestError(400, f"{name} must be a string, got {json.dumps(text)}")
    try:
        return ckpt.tokenizer.encode(text)
    except ValueError as e:  # names the characters outside the vocabulary
        raise RequestError(400, f"{name}: {e}") from None


def default_max_tokens(ckpt: Checkpoint, docs_mode: bool) -> int:
    """`puregpt sample`'s: block_size for documents, 256 for continuous text (within the cap)."""
    return min(MAX_TOKENS, ckpt.config.block_size if docs_mode else 256)


def generation_settings(ckpt: Checkpoint, docs_mode: bool, body: bytes) -> dict:
    """A generate request's settings, checked (400s) before anything is generated."""
    req = parse_json(body, DEFAULTS)
    check_text(ckpt, "prompt", req["prompt"])
    if req["max_tokens"] is None:
        req["max_tokens"] = default_max_tokens(ckpt, docs_mode)
    if not 0 <= _number("max_tokens", req["max_tokens"], int) <= MAX_TOKENS:
        raise RequestError(400, f"max_tokens must be between 0 and {MAX_TOKENS} (the server's "
                                f"cap on tokens per request), got {req['max_tokens']}")
    for name, kind in (("temperature", float), ("top_k", int), ("top_p", float)):
        _number(name, req[name], kind)
    try:
        sample.check_shape(req["temperature"], req["top_k"], req["top_p"])
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    if req["seed"] is None:  # a fresh seed, reported at the end so the sample can be repeated
        req["seed"] = random.SystemRandom().randrange(2 ** 32)
    _number("seed", req["seed"], int)
    return req


def generate_events(ckpt: Checkpoint, docs_mode: bool, settings: dict):
    """Yield one dict per sampled token, then the closing {"done": true, ...}.

    The context is built as sample.stream_text builds it (docs mode: BOS before the prompt;
    stream mode: the prompt itself, or BOS when it is empty); generation stops at BOS.
    """
    tok = ckpt.tokenizer
    prompt_ids = tok.encode(settings["prompt"])
    context = prompt_ids if (prompt_ids and not docs_mode) else [tok.bos] + prompt_ids
    rng = DrawRecorder(settings["seed"])
    ids = []
    for i in sample.generate(ckpt.params, ckpt.config, context, settings["max_tokens"], rng,
                             temperature=settings["temperature"], top_k=settings["top_k"],
                             top_p=settings["top_p"], stop_token=tok.bos):
        ids.append(i)
        probs = rng.weights
        top = sorted(range(len(probs)), key=lambda j: -probs[j])[:TOP]
        yield {"token": tok.token_str(i), "id": i, "p": probs[i],
               "top": [[tok.token_str(j), probs[j]] for j in top if probs[j] > 0]}
    yield {"done": True, "text": settings["prompt"] + tok.decode(ids), "seed": settings["seed"],
           "tokens": len(ids), "context_tokens": len(context)}


def model_info(ckpt: Checkpoint, path: str, docs_mode: bool) -> dict:
    tok = ckpt.tokenizer
    info = {"checkpoint": path, "step": ckpt.step, "parameters": num_params(ckpt.params),
            "config": ckpt.config.to_dict(), "mode": "docs" if docs_mode else "stream",
            "tokenizer": tok.kind, "vocab_size": tok.vocab_size, "bos": tok.token_str(tok.bos),
            "bos_id": tok.bos,
            "max_tokens": MAX_TOKENS, "max_body": MAX_BODY,
            "defaults": {**DEFAULTS, "max_tokens": default_max_tokens(ckpt, docs_mode)}}
    if tok.kind == "char":
        info["chars"] = "".join(tok.chars)
    return info


# --- HTTP ----------------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    """One loaded model, served to any number of clients, each in a daemon thread (so that
    stopping the server never waits on a client)."""

    daemon_threads = True
    # connections waiting to be accepted (socketserver's default, 5, resets the rest when a
    # burst of clients arrives while the generating threads hold the interpreter)
    request_queue_size = 128

    def __init__(self, ckpt: Checkpoint, path: str, host: str = "127.0.0.1", port: int = 8000,
                 quiet: bool = False):
        self.ckpt, self.path, self.quiet = ckpt, path, quiet
        self.docs_mode = ckpt.trainer.get("mode", "docs") == "docs"
        self.info = model_info(ckpt, path, self.docs_mode)
        # IPv4 or IPv6, as the host name resolves
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((host, port), Handler)
        self.loopback = ipaddress.ip_address(self.server_address[0].split("%")[0]).is_loopback

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "puregpt"
    timeout = TIMEOUT  # StreamRequestHandler sets it on the socket: reads and writes time out

    # path -> (method, the function answering it)
    def routes(self):
        return {"/": ("GET", self.page), "/favicon.ico": ("GET", self.no_icon),
                "/api/info": ("GET", self.api_info),
                "/api/generate": ("POST", self.api_generate),
                "/api/explain": ("POST", self.api_explain)}

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_PUT(self):
        self.route("PUT")

    def do_DELETE(self):
        self.route("DELETE")

    def do_PATCH(self):
        self.route("PATCH")

    def route(self, method: str) -> None:
        self.close_connection = True  # one request per connection: streams end by closing
        try:
            try:
                self.answer(method)
            except RequestError as e:
                self.send_json({"error": str(e)}, e.status)
            except (OSError, TimeoutError):
                raise
            except Exception as e:  # a bug: answered (if still possible) and logged, not fatal
                self.log_error("%s", f"{type(e).__name__}: {e}")
                self.send_json({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass  # the client went away or stalled: its request ends, the server goes on

    def answer(self, method: str) -> None:
        self.check_host()
        path = self.path.split("?", 1)[0]  # (a query string is ignored)
        if path not in self.routes():
            raise RequestError(404, f"no such page: {path} (try / or /api/info)")
        wanted, answer = self.routes()[path]
        if method != wanted:
            raise RequestError(405, f"{path} takes {wanted}, not {method}")
        answer()

    def check_host(self) -> None:
        """On loopback, answer only requests addressed to this machine: a web page elsewhere
        cannot then reach the server through a DNS name that resolves to 127.0.0.1."""
        if not self.server.loopback:
            return
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if host not in ("localhost", "127.0.0.1", "::1", self.server.server_address[0]):
            raise RequestError(403, f"Host {self.headers.get('Host')!r} is not this server "
                                    f"(it answers only on {self.server.url})")

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length, not chunked")
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError(411, "a POST needs a Content-Length") from None
        if n < 0:
            raise RequestError(400, f"bad Content-Length {n}")
        if n > MAX_BODY:
            raise RequestError(413, f"the request body is {n} bytes; the limit is {MAX_BODY}")
        data = self.rfile.read(n)
        if len(data) < n:
            raise RequestError(400, f"the body ended after {len(data)} of {n} bytes")
        return data

    def send_json(self, obj, status: int = 200) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        if status == 405:
            self.send_header("Allow", self.routes()[self.path.split("?", 1)[0]][0])
        self.end_headers()
        self.wfile.write(data)

    def page(self) -> None:
        from .explain import render_page
        data = render_page(None, live=True).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def no_icon(self) -> None:  # browsers ask for one: "none", rather than a 404 to log
        self.send_response(204)
        self.end_headers()

    def api_info(self) -> None:
        self.send_json(self.server.info)

    def api_generate(self) -> None:
        s = self.server
        settings = generation_settings(s.ckpt, s.docs_mode, self.body())
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")  # the stream ends when the connection closes
        self.end_headers()
        # wfile is unbuffered: each line leaves as its token is drawn
        for event in generate_events(s.ckpt, s.docs_mode, settings):
            self.wfile.write(json.dumps(event).encode() + b"\n")

    def api_explain(self) -> None:
        s = self.server
        req = parse_json(self.body(), {"text": None})
        check_text(s.ckpt, "text", req["text"])
        from .explain import explain
        c = s.ckpt
        try:
            data = explain(c.params, c.config, c.tokenizer, req["text"],
                           train_config=c.train_config, docs_mode=s.docs_mode,
                           optimizer=c.optimizer, step=c.step)
        except ValueError as e:  # e.g. a text too short to explain
            raise RequestError(400, str(e)) from None
        self.send_json(data)

    def log_message(self, format, *args):
        if not self.server.quiet:
            super().log_message(format, *args)


def serve(ckpt: Checkpoint, path: str, host: str = "127.0.0.1", port: int = 8000,
          out=sys.stdout) -> int:
    """Serve until Ctrl-C; print where (and whether only this machine can connect)."""
    server = Server(ckpt, path, host, port)
    try:  # (from here on, a Ctrl-C is a clean stop, even before the first request)
        print(f"serving {path} at {server.url}", file=out, flush=True)
        if server.loopback:
            print("local only: only this machine can connect (--host 0.0.0.0 to share it on "
                  "the network)", file=out, flush=True)
        else:
            print(f"warning: listening on {server.server_address[0]}: anyone who can reach "
                  f"this machine can use the model (there is no authentication)", file=out,
                  flush=True)
        print("Ctrl-C stops it", file=out, flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped", file=out, flush=True)
    finally:
        server.server_close()
    return 0
