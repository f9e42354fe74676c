"""Fast decoding: weights prepared once for matrix-vector products, on one or several processes.

KV-cached decoding is matrix-vector work: each new token multiplies one vector by every weight
matrix. model.forward treats that as a matmul of one row and takes the plain-sum path; here every
matrix is prepared once instead, so that each product is one C call per output row:

  * Python 3.12+: math.sumprod(row, x) over tuple rows;
  * before: the law of cosines, as in ops.matmul: with x rescaled to length rho (about the rows'
    typical length) a.b = (|x|/rho) (rho^2 + |b|^2 - dist(x', b)^2) / 2, math.dist reading
    tuples of floats without creating an object per element (~4x the plain sum). The row lengths
    are computed once here, not per product. When a matrix's rows differ in length by more
    than a factor 4, its rows are stored at unit length instead (see ops.matmul for the
    rounding argument: either way the error is ~1e-16 |x||b|, as good as a plain sum).

Layouts: "tuple" rows (32 bytes a parameter: a float object and a pointer; the fast one) or the
compact "array" rows (array('d'), 8 bytes a parameter; math.dist then copies each row into
floats per call: slower, see README "Large models").

Several processes (Decoder(..., workers=n)): every matrix's output rows are split into n
contiguous slices; the calling process keeps slice 0 and worker process k slice k. The workers
get their rows through one shared-memory block (float64, written once, freed when they are
ready), build and keep their own prepared slices, and then per product receive x (its float64
bytes through a pipe) and send back their outputs. Every output element is computed by the very
same function from the very same numbers whichever process owns its row, so the logits, and the
tokens, are bit-identical to one process. A worker that dies or fails is noticed while waiting
(its liveness is polled) and raises parallel.WorkerError naming it.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import random
import struct
import traceback
from array import array
from itertools import repeat, starmap
from multiprocessing import shared_memory
from operator import add
from typing import Iterator

from . import model, ops
from .checkpoint import ROW_TYPES
from .parallel import POLL_SECONDS, WorkerError, available_cpus, receive, stop_workers
from .sample import pick

LAYOUTS = ("tuple", "array")


# --- one matrix (or a slice of its rows), prepared -----------------------------------------


def _plan(shortest: float, longest: float) -> float | None:
    """rho for the law-of-cosines product when the rows' lengths allow it, else None (rows are
    then stored at unit length). The rule of ops.matmul: lengths within a factor 4."""
    if 0.0 < longest <= 4.0 * shortest:
        return math.sqrt(shortest * longest)
    return None


def _as_layout(rows, layout: str) -> list:
    if layout == "array":  # array('f') rows (imported float32 weights) stay: 4 bytes a value
        return [r if isinstance(r, array) else array("d", r) for r in rows]
    return [r if type(r) is tuple else tuple(r) for r in rows]  # dist() reads tuples in place


class Matrix:
    """Rows of one weight matrix (out, in), ready for W x: `rows` in the layout, their lengths,
    and rho (see _plan; None: unit rows). Build with prepare_matrix, or finish() a slice once
    the whole matrix's shortest and longest row are known."""

    def __init__(self, rows, layout: str):
        self.rows = _as_layout(rows, layout)
        self.layout = layout
        self.norms = list(starmap(math.hypot, self.rows))
        self.rho, self.c = None, None

    def stats(self) -> tuple[float, float]:
        return (min(self.norms), max(self.norms)) if self.norms else (math.inf, 0.0)

    def finish(self, rho: float | None) -> "Matrix":
        self.rho = rho
        if _SUMPROD:
            return self
        if rho is not None:
            self.c = [rho * rho + n * n for n in self.norms]  # |x'|^2 + |b|^2 for every row
        else:  # unit rows (all-zero rows stay zero: their products are then 0)
            unit = [tuple([v / n for v in r]) if n else tuple(r) for r, n in
                    zip(self.rows, self.norms)]
            self.rows = _as_layout(unit, self.layout)
        return self

    def matvec(self, x: list[float]) -> list[float]:
        """W x for x (in,) -> (out,)."""
        if _SUMPROD:
            return list(map(_SUMPROD, self.rows, repeat(x)))
        xn = math.hypot(*x)
        if xn == 0.0:
            return [0.0] * len(self.rows)
        dist = math.dist
        if self.rho is not None:
            s, h = self.rho / xn, 0.5 * xn / self.rho
            xs = tuple([v * s for v in x])
            return [h * (cb - d * d) for cb, d in zip(self.c, map(dist, self.rows, repeat(xs)))]
        xs = tuple([v / xn for v in x])
        return [xn * n * (1.0 - 0.5 * d * d)
                for n, d in zip(self.norms, map(dist, self.rows, repeat(xs)))]


_SUMPROD = getattr(math, "sumprod", None)  # Python 3.12+: a C dot product over tuples


def prepare_matrix(rows, layout: str = "tuple") -> Matrix:
    m = Matrix(rows, layout)
    return m.finish(_plan(*m.stats()))


def matrices(params: dict, config) -> dict:
    """Every weight matrix a decoding step multiplies by, name -> rows: per layer the stacked
    Q, K, V (attn_qkv, as model._qkv), attn_wo, mlp_fc1, mlp_fc2; then lm_head."""
    out = {}
    for l in range(config.n_layer):
        p = f"layer{l}."
        out[p + "attn_qkv"] = [r for w in model.layer_tensors(p + "attn_qkv") for r in params[w]]
        for w in ("attn_wo", "mlp_fc1", "mlp_fc2"):
            out[p + w] = params[p + w]
    out["lm_head"] = model.lm_head_weight(params, config)
    return out


def _slices(n_rows: int, n: int) -> list[tuple[int, int]]:
    """n contiguous [start, end) ranges of about equal size over n_rows rows."""
    return [(n_rows * k // n, n_rows * (k + 1) // n) for k in range(n)]


# --- the decoder ---------------------------------------------------------------------------


class Decoder:
    """KV-cached decoding with prepared weights. params: rows of lists, tuples or arrays (as
    checkpoint.load_checkpoint(rows=...) builds them); layout: "tuple" (fast) or "array"
    (compact); workers: processes sharing the products (0: one per core). Use as a context
    manager, or call close(), to stop the workers."""

    def __init__(self, params: dict, config, layout: str = "tuple", workers: int = 1):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per core), got {workers}")
        self.config, self.layout = config, layout
        self.n = workers or available_cpus()
        # vectors (norm gains and biases, linear biases) as lists; Q, K, V's biases stacked
        self.vectors = {name: list(t) for name, t in params.items()
                        if not (t and isinstance(t[0], ROW_TYPES))}
        for l in range(config.n_layer):
            p = f"layer{l}."
            if p + "attn_wq_b" in self.vectors:
                self.vectors[p + "attn_qkv_b"] = [x for w in model.layer_tensors(p + "attn_qkv")
                                                  for x in self.vectors[w + "_b"]]
        self.wte = params["wte"]
        self.pos = model.position_table(params, config)
        self.procs, self.conns, self.mem = [], [], None
        mats = matrices(params, config)
        self.names = list(mats)
        if self.n == 1:
            self.mats = {name: prepare_matrix(rows, layout) for name, rows in mats.items()}
            return
        try:
            self._start(mats)
        except BaseException:
            self.close()
            raise

    # -- the worker processes --

    def _start(self, mats: dict) -> None:
        spans = {name: _slices(len(rows), self.n) for name, rows in mats.items()}
        # the rows as float64, or float32 when they are float32 arrays (exact, half the bytes)
        codes = {name: "f" if isinstance(rows[0], array) and rows[0].typecode == "f" else "d"
                 for name, rows in mats.items()}
        layout, offset = [], 0  # per worker: (name, byte offset, rows, cols, typecode)
        for k in range(1, self.n):
            mine = []
            for name, rows in mats.items():
                a, b = spans[name][k]
                mine.append((name, offset, b - a, len(rows[0]), codes[name]))
                offset += (b - a) * len(rows[0]) * array(codes[name]).itemsize
            layout.append(mine)
        self.mem = shared_memory.SharedMemory(create=True, size=max(8, offset))
        for k, mine in enumerate(layout, start=1):
            for name, at, n_rows, cols, code in mine:
                a = spans[name][k][0]
                for row in mats[name][a:a + n_rows]:
                    if not (isinstance(row, array) and row.typecode == code):
                        row = array(code, row)
                    self.mem.buf[at:at + len(row) * row.itemsize] = memoryview(row).cast("B")
                    at += len(row) * row.itemsize
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        for k, mine in enumerate(layout, start=1):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, daemon=True,
                               args=(mine, self.layout, self.mem.name, child, os.getpid()))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        # meanwhile, this process prepares its own slice (the workers do theirs in parallel)
        self.mats = {name: Matrix(rows[spans[name][0][0]:spans[name][0][1]], self.layout)
                     for name, rows in mats.items()}
        del mats
        stats = [[m.stats() for m in self.mats.values()]]
        stats += [self._receive(w) for w in range(len(self.procs))]
        rhos = [_plan(min(s[i][0] for s in stats), max(s[i][1] for s in stats))
                for i in range(len(self.names))]  # the whole matrix's rule, as one process
        for w, conn in enumerate(self.conns):
            self._send(w, rhos)
        for m, rho in zip(self.mats.values(), rhos):
            m.finish(rho)
        for w in range(len(self.procs)):
            self._receive(w)  # ready: the shared block is no longer needed
        self.mem.close()
        self.mem.unlink()
        self.mem = None

    def _died(self, w: int) -> WorkerError:
        proc = self.procs[w]
        proc.join(timeout=1)
        return WorkerError(f"decoding worker process {w + 1} (pid {proc.pid}) died (exit code "
                           f"{proc.exitcode}); decoding stopped")

    def _send(self, w: int, obj) -> None:
        try:
            self.conns[w].send(obj)
        except (OSError, ValueError):
            raise self._died(w) from None

    def _receive(self, w: int):
        reply = receive(self.conns[w], self.procs[w], lambda: self._died(w))
        if reply[0] == "error":
            raise WorkerError(f"decoding worker process {w + 1} failed:\n{reply[1]}")
        return reply[1]

    def close(self) -> None:
        """Stop the workers and free the shared memory (safe to call twice)."""
        stop_workers(self.conns, self.procs, lambda conn: conn.send_bytes(b""))  # b"": stop
        if self.mem is not None:
            self.mem.close()
            self.mem.unlink()
        self.procs, self.conns, self.mem = [], [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- one product, one position, a generation --

    def matvec(self, i: int, x: list[float]) -> list[float]:
        """Matrix number i (of self.names) times x, its rows' slices computed in parallel."""
        if not self.procs:
            return self.mats[self.names[i]].matvec(x)
        msg = struct.pack("<q", i) + array("d", x).tobytes()  # x's float64 bytes, exactly
        for w in range(len(self.procs)):
            try:
                self.conns[w].send_bytes(msg)
            except (OSError, ValueError):
                raise self._died(w) from None
        out = self.mats[self.names[i]].matvec(x)
        for w in range(len(self.procs)):
            part = array("d")
            part.frombytes(self._receive(w))
            out += part.tolist()
        return out

    def _linear(self, i: int, x, bias_name: str):
        y = self.matvec(i, x)
        bias = self.vectors.get(bias_name)
        return y if bias is None else list(map(add, y, bias))

    def _norm(self, x, name):
        return model.norm_forward([x], self.vectors, name, self.config)[0][0]

    def step(self, token: int, kv: list) -> list[float]:
        """The logits after `token`, at the position after those in the KV cache `kv`
        (model.new_kv_cache), which receives its keys and values: one position of
        model.forward, with the prepared products."""
        cfg, C = self.config, self.config.n_embd
        pos = len(kv[0][0])
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"token id {token} outside the vocabulary (size {cfg.vocab_size})")
        if pos >= cfg.block_size:
            raise ValueError(f"sequence longer than block_size={cfg.block_size}")
        x = list(self.wte[token]) if self.pos is None else list(map(add, self.wte[token],
                                                                    self.pos[pos]))
        if cfg.emb_norm:
            x = self._norm(x, "emb_norm")
        act = ops.ACTIVATIONS[cfg.activation][0]
        for l in range(cfg.n_layer):
            p, i = f"layer{l}.", 4 * l

            def attn(h):
                qkv = self._linear(i, h, p + "attn_qkv_b")
                kv[l][0].append(qkv[C:2 * C])
                kv[l][1].append(qkv[2 * C:])
                out = ops.attention_forward([qkv[:C]], kv[l][0], kv[l][1], cfg.n_head)[0][0]
                return self._linear(i + 1, out, p + "attn_wo_b")

            def mlp(h):
                a = act([self._linear(i + 2, h, p + "mlp_fc1_b")])[0][0]
                return self._linear(i + 3, a, p + "mlp_fc2_b")

            if cfg.norm_position == "pre":
                x = list(map(add, x, attn(self._norm(x, p + "attn_norm"))))
                x = list(map(add, x, mlp(self._norm(x, p + "mlp_norm"))))
            else:
                x = self._norm(list(map(add, x, attn(x))), p + "attn_norm")
                x = self._norm(list(map(add, x, mlp(x))), p + "mlp_norm")
        if cfg.final_norm:
            x = self._norm(x, "final_norm")
        return self.matvec(len(self.names) - 1, x)

    def feed(self, tokens: list[int], kv: list) -> list[float]:
        """Feed tokens one position at a time; the logits after the last."""
        if not tokens:
            raise ValueError("decoding needs at least one token")
        for t in tokens:
            logits = self.step(t, kv)
        return logits

    def generate(self, context: list[int], max_new_tokens: int, rng: random.Random,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, stop_token: int | None = None) -> Iterator[int]:
        """sample.generate with the prepared products (same arguments, same sliding window)."""
        if not context:
            raise ValueError("generation needs a context of at least one token (e.g. BOS)")
        cfg = self.config
        tokens = list(context)
        kv = model.new_kv_cache(cfg)
        logits = self.feed(tokens[-cfg.block_size:], kv)
        for _ in range(max_new_tokens):
            token = pick(logits, rng, temperature, top_k, top_p, greedy)
            if token == stop_token:
                return
            yield token
            tokens.append(token)
            if len(kv[0][0]) < cfg.block_size:  # room left: one more position through the cache
                logits = self.step(token, kv)
            else:  # the window slides: rebuild the cache from the last block_size tokens
                kv = model.new_kv_cache(cfg)
                logits = self.feed(tokens[-cfg.block_size:], kv)

    def generator(self):
        """A function with sample.generate's signature (params and config ignored), for
        sample.stream_text's `generate` argument."""
        return lambda params, config, *args, **kwargs: self.generate(*args, **kwargs)


def _worker_main(mine, layout, mem_name, conn, parent_pid):
    """A worker: prepare its slices from the shared block, then compute products on request."""
    try:
        mem = shared_memory.SharedMemory(name=mem_name)
        mats = []
        for name, at, n_rows, cols, code in mine:
            flat = array(code)
            flat.frombytes(mem.buf[at:at + n_rows * cols * flat.itemsize])
            rows = [flat[r:r + cols] for r in range(0, n_rows * cols, cols)]
            mats.append(Matrix(rows, layout))
        mem.close()
        conn.send(("ok", [m.stats() for m in mats]))
        rhos = conn.recv()
        for m, rho in zip(mats, rhos):
            m.finish(rho)
        conn.send(("ok", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        # a forked worker holds copies of the pipes' other ends, so the main process's death
        # does not end recv(): the worker checks that its parent is still there
        while not conn.poll(POLL_SECONDS):
            if os.getppid() != parent_pid:
                return
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not msg:  # close(): stop
            return
        try:
            (i,) = struct.unpack_from("<q", msg)
            x = array("d")
            x.frombytes(msg[8:])
            conn.send(("ok", array("d", mats[i].matvec(x.tolist())).tobytes()))
        except Exception:
            conn.send(("error", traceback.format_exc()))
