"""Data-parallel training on several cores, in pure Python.

Each micro-batch's sequences are split into n contiguous shards of about equal token counts. The
main process computes shard 0 itself; worker processes compute the others. Weights travel to the
workers, and gradients back, through shared memory (one flat float64 block for the weights and
one per worker for its gradients), so nothing is pickled per step but the token ids. The shards'
gradients are added in worker order, so a run is deterministic and equals the single-process
result up to the order of floating-point additions (~1e-16 relative).

A worker that raises sends its traceback; one that dies (killed, out of memory) is noticed by
polling its liveness while waiting: either way the run stops with an error naming the worker.
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import os
import signal
import traceback
from array import array
from contextlib import contextmanager
from itertools import chain
from multiprocessing import shared_memory

from . import model, ops, optim

POLL_SECONDS = 0.5


def available_cpus() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the
    machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextmanager
def signals_held():
    """Start processes inside this block: SIGINT and SIGTERM blocked, a mask the new process
    inherits (through fork and exec) until it has set its own handlers and unblocks them
    (`unblock_signals`); a signal that reaches this process meanwhile waits and is handled
    when the block ends, instead of being lost. Workers ignore both (`ignore_signals`): Ctrl-C
    on a terminal signals the whole process group, and a worker killed by it would fail the
    step instead of letting the main process finish it and save a resumable checkpoint.
    (compare starts its runs the same way, with their own handlers.)"""
    held = hasattr(signal, "pthread_sigmask")
    if held:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def unblock_signals() -> None:
    """In a process started inside `signals_held`, once its own handlers are set."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def ignore_signals() -> None:
    """A worker's first act (see `signals_held`): the main process handles SIGINT and SIGTERM;
    the worker stops when the pool closes, or when it notices that its parent died."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # (also drops any copy pending since the fork)
    unblock_signals()


class WorkerError(RuntimeError):
    """A worker process failed; the message says which and how."""


def stop_workers(conns, procs, send_stop) -> None:
    """Ask each worker to stop (send_stop(conn)), then wait for it; one that lingers past 5 s is
    terminated. Workers already gone are fine."""
    for conn in conns:
        try:
            send_stop(conn)
        except (OSError, ValueError):
            pass
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join()


def receive(conn, proc, died):
    """The next message from a worker process, polling its liveness while waiting: a worker
    that is gone (dead, or its pipe broken) raises died(), a WorkerError naming it."""
    while not conn.poll(POLL_SECONDS):
        if not proc.is_alive():
            raise died()
    try:
        return conn.recv()
    except (EOFError, OSError):  # the pipe broke: the worker is gone
        raise died() from None


def _layout(params: dict):
    """(name, offset, rows, cols) of each tensor in the flat buffer (cols = 0 for a vector)."""
    layout, offset = [], 0
    for name, t in params.items():
        rows, cols = (len(t), len(t[0])) if isinstance(t[0], list) else (len(t), 0)
        layout.append((name, offset, rows, cols))
        offset += rows * max(cols, 1)
    return layout, offset


def _write(view, params: dict, layout) -> None:
    for name, offset, rows, cols in layout:
        t = params[name]
        flat = [x for row in t for x in row] if cols else t
        view[offset:offset + len(flat)] = array("d", flat)


def _read(view, layout, into: dict | None = None) -> dict:
    """Tensors from the flat buffer; with `into`, added to those tensors in place."""
    out = {}
    for name, offset, rows, cols in layout:
        flat = view[offset:offset + rows * max(cols, 1)].tolist()
        if into is None:
            out[name] = [flat[r * cols:(r + 1) * cols] for r in range(rows)] if cols else flat
        else:
            t = into[name]
            for r in range(rows if cols else 1):
                row = t[r] if cols else t
                seg = flat[r * cols:(r + 1) * cols] if cols else flat
                row[:] = map(float.__add__, row, seg)
    return out


def _worker_main(config, layout, weights_name, grads_name, conn, parent_pid):
    ignore_signals()
    gc.disable()  # what a step allocates never forms cycles: see ops.collector_paused
    weights = shared_memory.SharedMemory(name=weights_name)
    grads_mem = shared_memory.SharedMemory(name=grads_name)
    wview, gview = weights.buf.cast("d"), grads_mem.buf.cast("d")
    try:
        while True:
            # a forked worker holds copies of the pipes' other ends, so the main process's death
            # does not end recv(): the worker checks that its parent is still there
            while not conn.poll(POLL_SECONDS):
                if os.getppid() != parent_pid:
                    return
            msg = conn.recv()
            if msg[0] == "stop":
                break
            try:
                kind, inputs, targets, dloss = msg
                params = _read(wview, layout)
                if kind == "grads":
                    loss, grads, n = model.loss_and_grads(params, config, inputs, targets,
                                                          dloss=dloss)
                    _write(gview, grads, layout)
                    conn.send(("ok", loss, n))
                else:
                    conn.send(("ok", *model.evaluate_loss(params, config, inputs, targets)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        del wview, gview
        weights.close()
        grads_mem.close()


def split_by_tokens(lengths: list[int], n: int) -> list[tuple[int, int]]:
    """n contiguous [start, end) ranges over sequences with about equal total length each
    (some may be empty when there are fewer sequences than shards)."""
    total, bounds, acc, start = sum(lengths), [], 0, 0
    for i in range(1, n):
        target = total * i / n
        end = start
        while end < len(lengths) and acc + lengths[end] / 2 < target:
            acc += lengths[end]
            end += 1
        bounds.append((start, end))
        start = end
    bounds.append((start, len(lengths)))
    return bounds


class WorkerPool:
    """n - 1 worker processes plus the calling process, sharing weights and gradients."""

    def __init__(self, config, n: int):
        self.config, self.n = config, n
        shapes = model.param_shapes(config)
        template = {name: ([[0.0] * s[1] for _ in range(s[0])] if len(s) == 2 else [0.0] * s[0])
                    for name, s in shapes.items()}
        self.layout, size = _layout(template)
        self.weights = shared_memory.SharedMemory(create=True, size=max(8, 8 * size))
        self.grad_mems, self.procs, self.conns = [], [], []
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        try:
            for _ in range(n - 1):
                mem = shared_memory.SharedMemory(create=True, size=max(8, 8 * size))
                self.grad_mems.append(mem)
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, daemon=True,
                                   args=(config, self.layout, self.weights.name, mem.name, child,
                                         os.getpid()))
                with signals_held():
                    proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
        except BaseException:
            self.close()
            raise

    def _died(self, i: int) -> WorkerError:
        proc = self.procs[i]
        proc.join(timeout=1)
        return WorkerError(f"worker process {i + 1} (pid {proc.pid}) died (exit code "
                           f"{proc.exitcode}); training stopped")

    def _receive(self, i: int):
        reply = receive(self.conns[i], self.procs[i], lambda: self._died(i))
        if reply[0] == "error":
            raise WorkerError(f"worker process {i + 1} failed:\n{reply[1]}")
        return reply[1:]

    def _run(self, kind, params, inputs, targets, dloss=1.0, grads=None):
        counts = [sum(1 for y in seq if y >= 0) for seq in targets]
        shards = split_by_tokens([len(s) for s in inputs], self.n)
        total = sum(counts)
        view = self.weights.buf.cast("d")
        try:
            _write(view, params, self.layout)
        finally:
            del view
        busy = []
        for w, (a, b) in enumerate(shards[1:]):
            n_w = sum(counts[a:b])
            if n_w:
                try:
                    self.conns[w].send((kind, inputs[a:b], targets[a:b], dloss * n_w / total))
                except OSError:
                    raise self._died(w) from None
                busy.append((w, n_w))
        a, b = shards[0]
        n0 = sum(counts[a:b])
        loss = 0.0
        if n0:  # the main process's own shard, computed while the workers compute theirs
            if kind == "grads":
                l0 = model.loss_and_grads(params, self.config, inputs[a:b], targets[a:b], grads,
                                          dloss * n0 / total)[0]
            else:
                l0 = model.evaluate_loss(params, self.config, inputs[a:b], targets[a:b])[0]
            loss += l0 * n0 / total
        for w, n_w in busy:
            loss += self._receive(w)[0] * n_w / total
            if kind == "grads":
                view = self.grad_mems[w].buf.cast("d")
                try:
                    _read(view, self.layout, into=grads)
                finally:
                    del view
        return loss, total

    def loss_and_grads(self, params, inputs, targets, grads, dloss=1.0) -> float:
        """Like model.loss_and_grads: accumulates into grads, returns the mean loss."""
        return self._run("grads", params, inputs, targets, dloss, grads)[0]

    def evaluate(self, params, inputs, targets) -> tuple[float, int]:
        return self._run("eval", params, inputs, targets)

    def close(self) -> None:
        """Stop the workers and free the shared memory (safe to call twice)."""
        if self.weights is None:
            return
        stop_workers(self.conns, self.procs, lambda conn: conn.send(("stop",)))
        for mem in [self.weights] + self.grad_mems:
            mem.close()
            mem.unlink()
        self.weights, self.procs, self.conns, self.grad_mems = None, [], [], []


# --- one sequence per step on two cores: the backward pass split between two processes -------
#
# With one sequence per step there is no batch to split, but there is still parallel work: once
# the backward pass has a linear layer's output gradient dY, that layer's weight gradient
# dW = dY^T X and its Adam update depend on nothing else, while the backward pass goes on with
# dX = dY W. So the main process runs the forward pass and the dX chain of the backward pass,
# and a helper process owns the linear layers' weights and Adam moments:
#   * for the first layers the backward pass reaches, the main process posts (dY, X) and the
#     helper computes the gradients while the backward pass goes on;
#   * for the last ones (whose gradients would arrive last either way) the main process
#     computes the gradients itself and posts them.
# The helper then updates the layers in the order the next forward pass uses them, and the main
# process picks each layer's new weights up only when that forward pass reaches it, so the
# helper's updates overlap the main process's own (embeddings, norms) and its next forward pass.
# Both processes run the very same functions on the very same numbers, so a run is
# bit-identical to a single-process one.

_STEP, _STATE, _STOP = 1.0, 2.0, 3.0  # commands, in header[0]
SPIN_TRIES = 40_000  # ~5 ms of non-blocking tries (~0.12 us each) before sleeping on a semaphore
_SPIN = available_cpus() > 1


def helper_layers(config, share: float = 0.75) -> tuple[list[str], set[str]]:
    """The linear layers the helper updates, in the order the backward pass reaches them, and
    those of them whose gradients the main process computes and sends: the last ones, beyond
    about `share` of all linear-layer weights (the main process also runs the forward pass and
    the dX chain). The tied lm_head stays with the main process: it shares wte's gradient with
    the embedding lookup."""
    shapes = model.param_shapes(config)
    layers = [name for name in model.linear_layers(config) if name != "wte"]
    sizes = {name: sum(math.prod(shapes[w]) for w in model.layer_tensors(name))
             for name in layers}
    total, taken, n = sum(sizes.values()), 0, 0
    while n < len(layers) and not (n and taken + sizes[layers[n]] / 2 > share * total):
        taken += sizes[layers[n]]
        n += 1
    return layers, set(layers[n:])


def _layer_tensors(name, params) -> list[str]:
    """A layer's weights and, when the model has them, biases."""
    return [w + s for w in model.layer_tensors(name) for s in ("", "_b") if w + s in params]


def _wait(sem, alive) -> None:
    """Acquire sem: spin first (a step is milliseconds; waking a sleeper costs ~20 us), then
    sleep in short slices, checking that the other process is still there. On a single core
    spinning would only keep the other process from running: there it sleeps at once."""
    for _ in range(SPIN_TRIES if _SPIN else 0):
        if sem.acquire(False):
            return
    while not sem.acquire(timeout=POLL_SECONDS):
        alive()


class _Arriving(dict):
    """The parameters as the forward pass sees them: looking up a tensor the helper is still
    updating waits for it (the forward pass reads each tensor just before using it)."""

    def __init__(self, params, split):
        super().__init__(params)
        self.split = split

    def __getitem__(self, name):
        self.split.receive(name)
        return dict.__getitem__(self, name)

    def get(self, name, default=None):
        self.split.receive(name)
        return dict.get(self, name, default)


class SplitStep:
    """The main process's side of a one-sequence training step split across two processes.

    `params` (updated in place) and `opt_state` are the training's own; after step() some
    tensors may still be on their way from the helper: sync() waits for them."""

    def __init__(self, config, tc, params: dict, opt_state: dict):
        self.config, self.tc, self.params = config, tc, params
        # the helper's layers, in the order the backward pass reaches them, and those of them
        # whose gradients the main process computes and sends
        self.layers, self.sent = helper_layers(config)
        self.owner = {w: name for name in self.layers for w in _layer_tensors(name, params)}
        self.own = [name for name in params if name not in self.owner]
        # the gradient buffers the main process fills: its own tensors', and the sent layers'
        self.filled = self.own + [w for name in self.sent for w in _layer_tensors(name, params)]
        self.pending = []  # the helper's layers not yet received, in forward order
        self.weights_layout, self.n_weights = _layout({w: params[w] for w in self.owner})
        self.arrivals = {name: [e for e in self.weights_layout if self.owner[e[0]] == name]
                         for name in self.layers}  # where each layer's new weights lie
        self.slots, size = _slots(config, self.layers, self.sent)
        self.mems = [shared_memory.SharedMemory(create=True, size=8 * size)
                     for size in (size, self.n_weights, 2 * self.n_weights)]
        self.views = [m.buf.cast("d") for m in self.mems]
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.work, self.done = ctx.Semaphore(0), ctx.Semaphore(0)
        parent, child = ctx.Pipe()
        self.conn = parent
        self.defer = {name: self._poster(name) for name in self.layers}
        self.grads = None  # the step's gradient buffers (the main process's layers go there)
        helper_state = {"step": opt_state["step"],
                        "m": {w: opt_state["m"][w] for w in self.owner},
                        "v": {w: opt_state["v"][w] for w in self.owner}}
        self.proc = ctx.Process(
            target=_helper_main, daemon=True,
            args=(config, tc, self.layers, self.sent, {w: params[w] for w in self.owner},
                  helper_state,
                  [m.name for m in self.mems], self.work, self.done, child, os.getpid()))
        try:
            with signals_held():
                self.proc.start()
        except BaseException:
            self.close()
            raise
        child.close()

    def _alive(self) -> None:
        if not self.proc.is_alive():
            self.proc.join(timeout=1)
            raise WorkerError(f"the helper process (pid {self.proc.pid}) died (exit code "
                              f"{self.proc.exitcode}); training stopped")

    def _poster(self, name):
        """defer[name] for model.backward: sends the helper what it needs to update the layer."""
        view = self.views[0]
        if name in self.sent:
            offset, size = self.slots[name]
            tensors = _layer_tensors(name, self.params)

            def post(dY, X):  # the gradients, computed here
                model.linear_param_grads(name, dY, X, self.grads)
                view[offset:offset + size] = array(
                    "d", chain.from_iterable(_flat(self.grads[w]) for w in tensors))
                self.work.release()
            return post
        offset, out_dim, x_offset, in_dim = self.slots[name]

        def post(dY, X):  # what the helper computes the gradients from
            view[offset:offset + len(dY) * out_dim] = array("d", chain.from_iterable(dY))
            view[x_offset:x_offset + len(X) * in_dim] = array("d", chain.from_iterable(X))
            self.work.release()
        return post

    def _wait_done(self) -> None:
        _wait(self.done, self._alive)
        if self.conn.poll():
            raise WorkerError(f"the helper process failed:\n{self.conn.recv()[1]}")

    def _receive_next(self) -> None:
        """Wait for the next layer the helper finishes (in self.pending's order); take it."""
        self._wait_done()
        _read_into(self.views[1], self.arrivals[self.pending.pop(0)], self.params)

    def receive(self, name) -> None:
        """Wait until tensor `name` holds its updated values (nothing to do for most names)."""
        layer = self.owner.get(name)
        while layer in self.pending:
            self._receive_next()

    def sync(self) -> None:
        """Wait for every tensor the helper is still updating."""
        while self.pending:
            self._receive_next()

    def step(self, params, grads, inputs, targets, lr: float, opt_state) -> tuple[float, int]:
        """Forward, backward and AdamW update of one sequence; returns (loss, positions). When
        the loss is not finite, nothing is updated (the caller stops the run). The gradients
        are computed afresh (grads is only working space)."""
        assert params is self.params
        with ops.collector_paused():
            return self._step(params, grads, inputs, targets, lr, opt_state)

    def _step(self, params, grads, inputs, targets, lr, opt_state):
        logits, cache = model.forward(_Arriving(params, self), self.config, inputs)
        loss, lcache = ops.cross_entropy_forward(logits, [y for seq in targets for y in seq])
        if not math.isfinite(loss):
            return loss, lcache[2]
        header = self.views[0]
        header[0], header[1], header[2] = _STEP, len(logits), lr
        optim.zero_grads({w: grads[w] for w in self.filled})  # the others stay unused here
        self.grads = grads
        model.backward(ops.cross_entropy_backward(1.0, lcache), cache, params, grads,
                       self.config, defer=self.defer)
        tc = self.tc
        optim.adamw_step({w: params[w] for w in self.own}, grads, opt_state, lr, tc.beta1,
                         tc.beta2, tc.eps, tc.weight_decay)
        self.pending = self.layers[::-1]
        return loss, lcache[2]

    def pull_optimizer_state(self, opt_state) -> None:
        """Copy the helper's Adam moments into opt_state (before saving a checkpoint)."""
        self.sync()
        self.views[0][0] = _STATE
        self.work.release()
        self._wait_done()
        for key, base in (("m", 0), ("v", self.n_weights)):
            for name, offset, rows, cols in self.weights_layout:
                size = rows * max(cols, 1)
                opt_state[key][name][:] = self.views[2][base + offset:base + offset + size].tolist()

    def close(self) -> None:
        """Stop the helper and free the shared memory (safe to call twice)."""
        if not self.mems:
            return
        if self.proc.is_alive():
            self.views[0][0] = _STOP
            self.work.release()
            self.proc.join(timeout=5)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join()
        for view in self.views:
            view.release()
        for mem in self.mems:
            mem.close()
            mem.unlink()
        self.mems, self.views = [], []


def _read_into(view, layout, params) -> None:
    """Overwrite params' tensors (in place, row by row) with the flat buffer's values."""
    for name, offset, rows, cols in layout:
        flat = view[offset:offset + rows * max(cols, 1)].tolist()
        t = params[name]
        if not cols:
            t[:] = flat
            continue
        for r, row in enumerate(t):
            row[:] = flat[r * cols:(r + 1) * cols]


def _helper_main(config, tc, layers, sent, params, state, mem_names, work, done, conn,
                 parent_pid):
    ignore_signals()
    gc.disable()  # what a step allocates never forms cycles: see ops.collector_paused
    mems = [shared_memory.SharedMemory(name=name) for name in mem_names]
    views = [m.buf.cast("d") for m in mems]
    header, wview, sview = views
    weights_layout, n_weights = _layout(params)
    offsets = {name: offset for name, offset, _, _ in weights_layout}
    slots, grads = _slots(config, layers, sent)[0], model.zeros_like(params)
    tensors = {name: _layer_tensors(name, params) for name in layers}
    # the helper keeps its tensors as flat lists: that is what Adam and the shared block want
    flat = {w: list(_flat(t)) for w, t in params.items()}
    decay = {w: tc.weight_decay if optim.decays(w, t) else 0.0 for w, t in params.items()}
    m, v, t = state["m"], state["v"], state["step"]

    def parent_alive():
        if os.getppid() != parent_pid:  # the main process is gone: nobody will ever post
            raise SystemExit(0)

    try:
        while True:
            _wait(work, parent_alive)
            command = header[0]
            if command == _STOP:
                break
            if command == _STATE:
                for base, moments in ((0, m), (n_weights, v)):
                    for w, offset in offsets.items():
                        sview[base + offset:base + offset + len(moments[w])] = array("d",
                                                                                    moments[w])
                done.release()
                continue
            N, lr = int(header[1]), header[2]
            t += 1
            g = {}  # each tensor's gradient, flat
            for i, name in enumerate(layers):  # gradients, as the backward pass posts them
                if i:
                    _wait(work, parent_alive)
                    if header[0] == _STOP:  # the main process stopped mid-step (Ctrl-C twice)
                        return
                if name in sent:  # computed by the main process: its tensors' flat lists
                    offset = slots[name][0]
                    for w in tensors[name]:
                        g[w] = header[offset:offset + len(flat[w])].tolist()
                        offset += len(flat[w])
                    continue
                offset, out_dim, x_offset, in_dim = slots[name]
                dy = header[offset:offset + N * out_dim].tolist()
                x = header[x_offset:x_offset + N * in_dim].tolist()
                optim.zero_grads({w: grads[w] for w in tensors[name]})
                model.linear_param_grads(name, _rows(dy, N, out_dim), _rows(x, N, in_dim), grads)
                for w in tensors[name]:
                    g[w] = list(_flat(grads[w]))
            for name in reversed(layers):  # updates, in the order the forward pass needs them
                for w in tensors[name]:
                    flat[w], m[w], v[w] = optim.adamw_update(flat[w], g[w], m[w], v[w], t, lr,
                                                             tc.beta1, tc.beta2, tc.eps, decay[w])
                    wview[offsets[w]:offsets[w] + len(flat[w])] = array("d", flat[w])
                done.release()
    except SystemExit:
        pass
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            done.release()
    finally:
        for view in views:
            view.release()
        for mem in mems:
            mem.close()


def _slots(config, layers, sent):
    """Where the main process posts each layer's data in the first shared block: for a layer
    whose gradients the helper computes, dY (N, out) and X (N, in), N <= block_size, as
    (dY offset, out, X offset, in); for the others their gradients, as (offset, size). Returns
    {name: slot} and the block's size. The block starts with a header: command, N, lr."""
    shapes, T, offset, slots = model.param_shapes(config), config.block_size, 3, {}
    for name in layers:
        if name in sent:
            size = sum(math.prod(shapes[w]) for w in _layer_tensors(name, shapes))
            slots[name] = (offset, size)
            offset += size
            continue
        in_dim = shapes[model.layer_tensors(name)[0]][1]
        out_dim = sum(shapes[w][0] for w in model.layer_tensors(name))  # Q, K and V stacked
        slots[name] = (offset, out_dim, offset + T * out_dim, in_dim)
        offset += T * (out_dim + in_dim)
    return slots, offset


def _flat(tensor):
    """A tensor's values in row order (a vector is its own single row)."""
    return chain.from_iterable(tensor) if isinstance(tensor[0], list) else tensor


def _rows(flat, n, cols):
    return [flat[i * cols:(i + 1) * cols] for i in range(n)]
