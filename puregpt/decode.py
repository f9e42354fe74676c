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

Layouts, by how a matrix's rows are stored:
  * "tuple": every row as tuples of floats, ~36 bytes a parameter (a float object and a
    pointer): the fastest, one C loop over floats that already exist;
  * "array": every row in one flat array per matrix, float64, or float32 for imported float32
    weights (exact): 8 or 4 bytes a parameter (~7 at the peak for GPT-2), but each product
    first makes a float object per element: struct's iter_unpack turns the flat array into
    the tuple layout's very pieces, in C (~1.25x faster than iterating array rows), at ~0.5x
    the tuple layout's speed. The default from TUPLES_UP_TO parameters on, on one process:
    GPT-2 124M is then ready in ~4 s and decodes at ~0.5 tokens a second (~1 on two);
  * "mixed": the first TUPLE_SHARE["mixed"] of each matrix's rows (of each process's slice)
    as tuples, the rest flat: ~18 bytes a parameter at ~0.6x the tuple layout's speed; the
    default from TUPLES_UP_TO parameters on, on several processes (see default_layout).
Every row is computed by the same function from the same values whatever its storage (dist or
sumprod over the same tuples), so the three layouts give exactly the same numbers (tested).
Before 3.12 the rows are cut into pieces of about PIECE values (see there).

Several processes (Decoder(..., workers=n)): every matrix's output rows are split into n
contiguous slices; the calling process keeps slice 0 and worker process k slice k. A forked
worker reads its rows from its copy of the caller's memory; a spawned one (where fork does not
exist) through one shared-memory block (written once, freed when they are ready). Each builds
and keeps its own prepared slices, and then per product receives x (its float64 bytes through a
pipe) and sends back its outputs. Every output element is computed by the very
same function from the very same numbers whichever process owns its row, so the logits, and the
tokens, are bit-identical to one process. A worker that dies or fails is noticed while waiting
(its liveness is polled) and raises parallel.WorkerError naming it.
"""

from __future__ import annotations

import ctypes
import gc
import math
import multiprocessing as mp
import os
import random
import struct
import traceback
from array import array
from itertools import chain, cycle, repeat, starmap
from multiprocessing import shared_memory
from operator import add, mul, sub
from typing import Iterator

from . import model, ops
from .checkpoint import ROW_TYPES
from .parallel import POLL_SECONDS, WorkerError, available_cpus, receive, stop_workers
from .sample import pick

LAYOUTS = ("tuple", "mixed", "array")
# the share of each matrix's rows stored as tuples, by layout ("mixed": ~18 bytes a parameter
# at GPT-2's size with float32 weights on one process, tuples ~32 a value, flat float32 arrays 4)
TUPLE_SHARE = {"tuple": 1.0, "mixed": 0.3, "array": 0.0}
TUPLES_UP_TO = 20_000_000  # the default layout: "tuple" up to this many parameters, then see below


def default_layout(n_params: int, processes: int = 1) -> str:
    """The layout Decoder takes by default: all tuples (the fastest, ~36 bytes a parameter)
    while that is under a GB or so; for larger models, making the tuples' float objects is
    most of the preparation, so: "mixed" on several processes (each makes and holds only its
    share of the tuples, in parallel: GPT-2 124M ready in ~4 s on two, ~1.1 tokens a second,
    ~18 bytes a parameter for both together by PSS), "array" on one (ready in ~4 s, ~7 bytes)."""
    if n_params <= TUPLES_UP_TO:
        return "tuple"
    return "mixed" if processes > 1 else "array"


# --- one matrix (or a slice of its rows), prepared -----------------------------------------


def _plan(shortest: float, longest: float) -> float | None:
    """rho for the law-of-cosines product when the rows' lengths allow it, else None (rows are
    then stored at unit length). The rule of ops.matmul: lengths within a factor 4."""
    if 0.0 < longest <= 4.0 * shortest:
        return math.sqrt(shortest * longest)
    return None


# Before Python 3.12 (the dist() path) each row is cut into pieces of at most PIECE values: an
# array piece is then made into at most ~100 floats per dist() call, which CPython takes from
# its float free list (100 floats) instead of its allocator: ~20% faster decoding with array
# rows. Distances add over pieces: |x - b|^2 = sum over pieces of |x_p - b_p|^2.
PIECE = 96


def _shape(cols: int) -> tuple[int, int]:
    """(k, width): a row of `cols` values as k pieces of `width` (the last zero-padded when
    width does not divide cols: zeros add nothing to a distance or a dot product)."""
    if _SUMPROD:
        return 1, cols
    k = -(-cols // PIECE)
    return k, -(-cols // k)


def typecode_of(rows) -> str:
    """'f' (float32: exact, 4 bytes a value) when every row is a float32 array (imported
    weights), else 'd'."""
    return "f" if all(isinstance(r, array) and r.typecode == "f" for r in rows) else "d"


def flatten(rows, typecode: str | None = None) -> array:
    """Rows (lists, tuples or arrays) as one flat array of typecode (default: typecode_of)."""
    typecode = typecode or typecode_of(rows)
    flat = array(typecode)
    if all(isinstance(r, array) and r.typecode == typecode for r in rows):
        flat.frombytes(b"".join(rows))  # one allocation (extend() row by row reallocates)
    else:
        for r in rows:
            flat.fromlist(list(r))
    return flat


class Matrix:
    """Rows of one weight matrix (out, in), or of a slice of its rows, ready for W x. flat: the
    rows one after another (a flat array, n_rows * cols values; float32 or float64). By the
    layout's TUPLE_SHARE, the first rows are kept as tuples of floats (`tuples`:
    pieces of `width` values, k a row; whole rows, k = 1, with sumprod), the others stay in
    the flat array (`flat`, padded to k * width a row), which struct's iter_unpack turns into
    the same pieces, as tuples, at each product (in C: ~1.25x an array's own iteration). The
    rows' lengths and rho (see _plan; None: unit rows) serve dist(). finish() a slice once the
    whole matrix's shortest and longest row are known; prepare_matrix does both."""

    def __init__(self, flat: array, cols: int, layout: str):
        self.n_rows = len(flat) // cols if cols else 0
        self.k, self.width = _shape(cols)
        if self.k * self.width != cols:  # pad each row with zeros to k pieces of `width`
            pad = array(flat.typecode, bytes(flat.itemsize * (self.k * self.width - cols)))
            flat = flatten([flat[i:i + cols] + pad for i in range(0, len(flat), cols)],
                           flat.typecode)
        self.unpack = struct.Struct(f"{self.width}{flat.typecode}").iter_unpack
        n_tuples = round(self.n_rows * TUPLE_SHARE[layout])
        cut = n_tuples * self.k * self.width  # values in the tuple rows
        self.tuples = list(self.unpack(memoryview(flat)[:cut])) if cut else []
        self.flat = flat[cut:] if cut else flat
        # the lengths serve dist() alone: sumprod needs none (skipping them saves a pass)
        self.norms = [] if _SUMPROD else list(starmap(
            math.hypot, _grouped(starmap(math.hypot, self.pieces()), self.k)))
        self.rho, self.c = None, None

    def pieces(self):
        """Every row's pieces, in order, as tuples: the tuple rows', then the flat rows'."""
        return chain(self.tuples, self.unpack(self.flat)) if self.flat else iter(self.tuples)

    def stats(self) -> tuple[float, float]:
        return (min(self.norms), max(self.norms)) if self.norms else (math.inf, 0.0)

    def finish(self, rho: float | None) -> "Matrix":
        self.rho = rho
        if _SUMPROD:
            return self
        if rho is not None:
            self.c = [rho * rho + n * n for n in self.norms]  # |x'|^2 + |b|^2 for every row
            return self
        # unit rows (all-zero rows stay zero: their products are then 0), stored as before;
        # the flat rows as float64 (scaled values are not float32s)
        scaled = [tuple([v / n for v in piece]) if n else piece
                  for piece, n in zip(self.pieces(), chain.from_iterable(
                      map(repeat, self.norms, repeat(self.k))))]
        n_tuples = len(self.tuples)
        self.tuples = scaled[:n_tuples]
        if self.flat:
            self.flat = array("d", [v for piece in scaled[n_tuples:] for v in piece])
            self.unpack = struct.Struct(f"{self.width}d").iter_unpack
        return self

    def matvec(self, x: list[float]) -> list[float]:
        """W x for x (in,) -> (out,)."""
        if _SUMPROD:
            return list(map(_SUMPROD, self.pieces(), repeat(x)))
        xn = math.hypot(*x)
        if xn == 0.0:
            return [0.0] * self.n_rows
        if self.rho is not None:
            s, h = self.rho / xn, 0.5 * xn / self.rho
            xs = tuple(map(mul, x, repeat(s)))
            if self.k == 1:  # (c - d^2) h, every row; one comprehension: ~5% faster than maps
                return [(c - d * d) * h
                        for c, d in zip(self.c, map(math.dist, self.pieces(), repeat(xs)))]
            return [(c - dd) * h for c, dd in zip(self.c, self._distances(xs))]
        d = self._distances(tuple([v / xn for v in x]))
        return [xn * n * (1.0 - 0.5 * dd) for n, dd in zip(self.norms, d)]

    def _distances(self, xs: tuple):
        """|xs - b|^2 for every row b: dist() per piece, the squares summed over a row's
        pieces."""
        if self.k == 1:  # whole rows (in <= PIECE): nothing to cut, nothing to sum
            d = list(map(math.dist, self.pieces(), repeat(xs)))
            return map(mul, d, d)
        w = self.width
        xs += (0.0,) * (self.k * w - len(xs))  # padded as the rows are
        parts = [xs[a:a + w] for a in range(0, len(xs), w)]  # xs cut as the rows are
        d = list(map(math.dist, self.pieces(), cycle(parts)))
        return map(sum, _grouped(map(mul, d, d), self.k))


def _grouped(values, k: int):
    """Consecutive groups of k values, as tuples (in C: zip over one iterator k times)."""
    it = iter(values)
    return zip(*[it] * k)


_SUMPROD = getattr(math, "sumprod", None)  # Python 3.12+: a C dot product over tuples


def prepare_matrix(rows, layout: str = "tuple") -> Matrix:
    m = Matrix(flatten(rows), len(rows[0]) if rows else 1, layout)
    return m.finish(_plan(*m.stats()))


def matrices(params: dict, config, consume: bool = False) -> dict:
    """Every weight matrix a decoding step multiplies by, name -> rows: per layer the stacked
    Q, K, V (attn_qkv, as model._qkv), attn_wo, mlp_fc1, mlp_fc2 (and mlp_gate); then
    lm_head. consume: take the matrices out of params (wte stays: token lookups read it)."""
    take = params.pop if consume else params.__getitem__
    out = {}
    for l in range(config.n_layer):
        p = f"layer{l}."
        out[p + "attn_qkv"] = [r for w in model.layer_tensors(p + "attn_qkv") for r in take(w)]
        for w in ("attn_wo", "mlp_fc1", "mlp_fc2", "mlp_gate"):  # (mlp_gate: SwiGLU only)
            if p + w in params:
                out[p + w] = take(p + w)
    lm_head = model.lm_head_name(config)
    out["lm_head"] = params[lm_head] if lm_head == "wte" else take(lm_head)
    return out


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere
    nothing). Freed rows (arrays of ~3 KB each at GPT-2's size) leave free blocks that glibc
    keeps resident: trimmed as each matrix is prepared, that is ~1 byte a parameter less
    (GPT-2 on 2 processes: 9.4 -> 8.5 bytes in the main process, 9.7 -> 9.0 in its worker, by
    PSS), for ~0.6 s more preparation."""
    if _malloc_trim is not None:
        _malloc_trim(0)


try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
    _malloc_trim = None


def _slices(n_rows: int, n: int) -> list[tuple[int, int]]:
    """n contiguous [start, end) ranges of about equal size over n_rows rows."""
    return [(n_rows * k // n, n_rows * (k + 1) // n) for k in range(n)]


# --- the decoder ---------------------------------------------------------------------------


class Cache:
    """The decoder's KV cache: per layer and K/V head, the keys as rows and the values as
    columns, each position appending one entry to each. One query then attends with two sets
    of dot products and slices nothing (ops.attention_forward, made for many queries, re-slices
    every head of every cached row per call: at microgpt's size most of a step's time)."""

    def __init__(self, config):
        g, hd, L = config.kv_heads, config.head_dim, config.n_layer
        self.length = 0  # positions cached
        self.keys = [[[] for _ in range(g)] for _ in range(L)]  # [l][j]: (T, hd) rows
        self.values = [[[[] for _ in range(hd)] for _ in range(g)] for _ in range(L)]  # (hd, T)




class Decoder:
    """KV-cached decoding with prepared weights. params: rows of lists, tuples or arrays (as
    checkpoint.load_checkpoint(rows=...) builds them); layout: "tuple" (fast), "mixed" or
    "array" (compact), None: default_layout for the model's size and the processes; workers:
    processes sharing the products (0: one per core); consume: take the weight matrices out
    of params as they are prepared, each freed once prepared (the peak memory is then about
    the prepared layout's alone). Use as a context manager, or call close(), to stop the workers."""

    def __init__(self, params: dict, config, layout: str | None = None, workers: int = 1,
                 consume: bool = False):
        if workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per core), got {workers}")
        self.n = workers or available_cpus()
        if layout is None:
            layout = default_layout(model.num_params_of(config), self.n)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.config, self.layout = config, layout
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
        mats = matrices(params, config, consume)
        self.names = list(mats)
        self.index = {name: i for i, name in enumerate(self.names)}
        try:
            with ops.collector_paused():  # ~20% of the preparation: collections of new rows
                if self.n == 1:
                    self.mats = {}
                    for name in self.names:  # popped: each matrix's rows freed once prepared
                        self.mats[name] = prepare_matrix(mats.pop(name), layout)
                        release_free_memory()
                else:
                    self._start(mats)
        except BaseException:
            self.close()
            raise

    # -- the worker processes --

    def _start(self, mats: dict) -> None:
        spans = {name: _slices(len(rows), self.n) for name, rows in mats.items()}
        # the rows as float64, or float32 when they are float32 arrays (exact, half the bytes)
        codes = {name: typecode_of(rows) for name, rows in mats.items()}
        layout, offset = [], 0  # per worker: (name, byte offset, first row, rows, cols, typecode)
        for k in range(1, self.n):
            mine = []
            for name, rows in mats.items():
                a, b = spans[name][k]
                mine.append((name, offset, a, b - a, len(rows[0]), codes[name]))
                offset += (b - a) * len(rows[0]) * array(codes[name]).itemsize
            layout.append(mine)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        forked = ctx.get_start_method() == "fork"
        if not forked:
            self.mem = shared_memory.SharedMemory(create=True, size=max(8, offset))
            self._share(mats, layout)
        for mine in layout:
            # a forked worker already sees the rows (its copy of this process's memory): it
            # reads its slices in place, which saves writing them to shared memory (page
            # faults on fresh shared pages: ~0.8 s of GPT-2's preparation on 2 processes),
            # and lets go of the rest of its copy of `mats` (see _worker_main)
            rows = [mats[name][a:a + n] for name, _, a, n, _, _ in mine] if forked else None
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, daemon=True,
                               args=(mine, self.layout, self.mem and self.mem.name, rows, child,
                                     os.getpid(), mats if forked else None))
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
            del rows  # (the workers' rows: this process frees them as it goes)
        # meanwhile, this process prepares its own slice (the workers do theirs in parallel)
        self.mats = {}
        for name in self.names:  # slice 0, from row 0; popped: the rows freed once prepared
            rows = mats.pop(name)[:spans[name][0][1]]
            self.mats[name] = Matrix(flatten(rows, codes[name]), len(rows[0]), self.layout)
            del rows
            release_free_memory()
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
            self._receive(w)  # ready: the shared block (if any) is no longer needed
        if self.mem is not None:
            self.mem.close()
            self.mem.unlink()
            self.mem = None

    def _share(self, mats: dict, layout: list) -> None:
        """Write each worker's slices into the shared block (for workers that are not forked)."""
        for mine in layout:
            for name, at, a, n_rows, cols, code in mine:
                for row in mats[name][a:a + n_rows]:  # straight into the block: no copy between
                    if not (isinstance(row, array) and row.typecode == code):
                        row = array(code, row)
                    self.mem.buf[at:at + len(row) * row.itemsize] = memoryview(row).cast("B")
                    at += len(row) * row.itemsize

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

    def _linear(self, name: str, x):
        """The linear layer `name` (a weight's name; its bias, if any, is name + "_b") on x."""
        y = self.mats[name].matvec(x) if not self.procs else self.matvec(self.index[name], x)
        bias = self.vectors.get(name + "_b")
        return y if bias is None else list(map(add, y, bias))

    def _norm(self, x, name):
        cfg = self.config
        if cfg.norm == "rmsnorm":  # ops.rmsnorm_forward's arithmetic on one row, without its
            # lists of rows and cache (~0.5 us of a microgpt step's ~4 us of norms)
            rstd = (sum(map(mul, x, x)) / len(x) + cfg.norm_eps) ** -0.5
            gain = self.vectors.get(name + "_g")
            xhat = [v * rstd for v in x]
            return xhat if gain is None else list(map(mul, xhat, gain))
        return model.norm_forward([x], self.vectors, name, cfg)[0][0]

    def new_cache(self) -> Cache:
        return Cache(self.config)

    def step(self, token: int, kv: Cache) -> list[float]:
        """The logits after `token`, at the position after those in the cache `kv`
        (new_cache()), which receives its keys and values: one position of model.forward,
        with the prepared products."""
        cfg = self.config
        pos = kv.length
        if not 0 <= token < cfg.vocab_size:
            raise ValueError(f"token id {token} outside the vocabulary (size {cfg.vocab_size})")
        if pos >= cfg.block_size:
            raise ValueError(f"sequence longer than block_size={cfg.block_size}")
        x = list(self.wte[token]) if self.pos is None else list(map(add, self.wte[token],
                                                                    self.pos[pos]))
        if cfg.emb_norm:
            x = self._norm(x, "emb_norm")
        for l in range(cfg.n_layer):
            p = f"layer{l}."
            if cfg.norm_position == "pre":
                x = list(map(add, x, self._attn(self._norm(x, p + "attn_norm"), p, kv, l, pos)))
                x = list(map(add, x, self._mlp(self._norm(x, p + "mlp_norm"), p)))
            else:
                x = self._norm(list(map(add, x, self._attn(x, p, kv, l, pos))), p + "attn_norm")
                x = self._norm(list(map(add, x, self._mlp(x, p))), p + "mlp_norm")
        kv.length += 1
        if cfg.final_norm:
            x = self._norm(x, "final_norm")
        return self.matvec(self.index["lm_head"], x)

    def _attn(self, h, p, kv, l, pos):
        """model.attn_forward for one position (its steps in its order, one row)."""
        cfg, C = self.config, self.config.n_embd
        kvd = cfg.kv_heads * cfg.head_dim
        qkv = self._linear(p + "attn_qkv", h)  # (C + 2 kvd,)
        q, k, v = [qkv[:C]], [qkv[C:C + kvd]], qkv[C + kvd:]
        if cfg.qk_norm:
            q = ops.head_rmsnorm_forward(q, cfg.n_head, self.vectors[p + "attn_q_norm_g"],
                                         cfg.norm_eps)[0]
            k = ops.head_rmsnorm_forward(k, cfg.kv_heads, self.vectors[p + "attn_k_norm_g"],
                                         cfg.norm_eps)[0]
        if cfg.pos == "rope":
            cos, sin = model.rope_table(cfg.block_size, cfg.head_dim, cfg.rope_theta)
            q = ops.rope_forward(q, [pos], cfg.n_head, cos, sin)[0]
            k = ops.rope_forward(k, [pos], cfg.kv_heads, cos, sin)[0]
        # ops.attention_forward's math for one query: head h reads K/V head h // group
        hd, group = cfg.head_dim, cfg.n_head // cfg.kv_heads
        keys, values = kv.keys[l], kv.values[l]
        k = k[0]
        for j in range(cfg.kv_heads):
            keys[j].append(k[j * hd:(j + 1) * hd])
            list(map(list.append, values[j], v[j * hd:(j + 1) * hd]))  # a column each, in C
        # q scaled once by 1/sqrt(hd) for every head (rather than each head's scores: the
        # same up to rounding, one list instead of n_head)
        scale = 1.0 / math.sqrt(hd)
        q, out = [x * scale for x in q[0]], []
        for h, a in enumerate(range(0, cfg.n_head * hd, hd)):
            scores = ops.dots(q[a:a + hd], keys[h // group])
            top = max(scores)
            e = list(map(math.exp, map(sub, scores, repeat(top))))  # softmax's exps
            total = sum(e)
            # softmax(scores) . v as (e . v) / sum(e): hd divisions instead of T
            out += [y / total for y in ops.dots(e, values[h // group])]
        return self._linear(p + "attn_wo", out)

    def _mlp(self, h, p):
        """model.mlp_forward for one position."""
        cfg = self.config
        u = self._linear(p + "mlp_fc1", h)
        if cfg.mlp == "swiglu":
            a = ops.gated_forward([self._linear(p + "mlp_gate", h)], [u], cfg.activation)[0][0]
        else:
            a = ops.ACTIVATIONS[cfg.activation][0]([u])[0][0]
        return self._linear(p + "mlp_fc2", a)

    def feed(self, tokens: list[int], kv: Cache) -> list[float]:
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
        kv = self.new_cache()
        logits = self.feed(tokens[-cfg.block_size:], kv)
        for n in range(max_new_tokens):
            token = pick(logits, rng, temperature, top_k, top_p, greedy)
            if token == stop_token:
                return
            yield token
            if n + 1 == max_new_tokens:  # the last token: no logits after it are needed
                return
            tokens.append(token)
            if kv.length < cfg.block_size:  # room left: one more position through the cache
                logits = self.step(token, kv)
            else:  # the window slides: rebuild the cache from the last block_size tokens
                kv = self.new_cache()
                logits = self.feed(tokens[-cfg.block_size:], kv)

    def generator(self):
        """A function with sample.generate's signature (params and config ignored), for
        sample.stream_text's `generate` argument."""
        return lambda params, config, *args, **kwargs: self.generate(*args, **kwargs)


def _worker_main(mine, layout, mem_name, sources, conn, parent_pid, inherited=None):
    """A worker: prepare its slices (from `sources`, its rows when forked, else the shared
    block), then compute products on request. inherited: when forked, the caller's dict of
    every matrix's rows, emptied here: the rows this worker does not own are freed (and their
    pages handed back) instead of staying resident in its copy after the caller frees its own."""
    gc.disable()  # the rows and their floats are all the worker allocates: nothing to collect
    try:
        while inherited:
            inherited.popitem()
            release_free_memory()
        mem = shared_memory.SharedMemory(name=mem_name) if sources is None else None
        mats = []
        for i, (name, at, _, n_rows, cols, code) in enumerate(mine):
            if sources is None:
                flat = array(code)
                flat.frombytes(mem.buf[at:at + n_rows * cols * flat.itemsize])
            else:
                flat, sources[i] = flatten(sources[i], code), None
                release_free_memory()
            mats.append(Matrix(flat, cols, layout))
        if mem is not None:
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
