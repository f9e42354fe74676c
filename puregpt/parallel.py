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

import multiprocessing as mp
import os
import traceback
from array import array
from multiprocessing import shared_memory

from . import model

POLL_SECONDS = 0.5


class WorkerError(RuntimeError):
    """A worker process failed; the message says which and how."""


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
        conn, proc = self.conns[i], self.procs[i]
        while not conn.poll(POLL_SECONDS):
            if not proc.is_alive():
                raise self._died(i)
        try:
            reply = conn.recv()
        except (EOFError, OSError):  # the pipe broke: the worker is gone
            raise self._died(i) from None
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
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for mem in [self.weights] + self.grad_mems:
            mem.close()
            mem.unlink()
        self.weights, self.procs, self.conns, self.grad_mems = None, [], [], []
