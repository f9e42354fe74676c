"""Adam with bias correction and decoupled weight decay (AdamW), learning-rate schedules, and
gradient-norm clipping.

Per parameter, at step t = 1, 2, ...:
    p = p - lr wd p                                (decoupled weight decay; nothing when wd = 0)
    m = beta1 m + (1 - beta1) g                    (running mean of gradients)
    v = beta2 v + (1 - beta2) g^2                  (running mean of squared gradients)
    p = p - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
The divisions by 1 - beta^t undo the bias of m and v towards their zero start.
"""

from __future__ import annotations

import math
from itertools import chain

from .config import TrainConfig


def _rows(t):
    """A matrix is its list of rows; a vector is treated as a single row."""
    return t if isinstance(t[0], list) else [t]


def decays(name: str, tensor) -> bool:
    """Weight decay applies to the matrices of matmuls: not to norms, biases or embeddings
    (wte, wpe), which the usual recipe leaves undecayed because shrinking them toward zero
    only fights the normalization or the lookup."""
    return isinstance(tensor[0], list) and name not in ("wte", "wpe")


def new_state(params: dict) -> dict:
    """Optimizer state: the step count, and the first and second moments of every tensor as one
    flat list each (a matrix's rows laid end to end)."""
    sizes = {n: sum(map(len, _rows(t))) for n, t in params.items()}
    return {"step": 0, "m": {n: [0.0] * k for n, k in sizes.items()},
            "v": {n: [0.0] * k for n, k in sizes.items()}}


def adamw_step(params: dict, grads: dict, state: dict, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float = 0.0) -> None:
    """One AdamW update of every parameter, in place."""
    state["step"] += 1
    for name, tensor in params.items():
        rows = _rows(tensor)
        # a whole tensor as one flat run: three long loops run ~25% faster than many short ones
        # (p as an iterator over the rows: read once, it needs no flat copy)
        p, state["m"][name], state["v"][name] = adamw_update(
            chain.from_iterable(rows), list(chain.from_iterable(_rows(grads[name]))),
            state["m"][name], state["v"][name], state["step"], lr, beta1, beta2, eps,
            weight_decay if decays(name, tensor) else 0.0)
        start = 0
        for row in rows:  # back into the rows, in place
            row[:] = p[start:start + len(row)]
            start += len(row)


def adamw_update(p, g, m, v, t: int, lr, beta1, beta2, eps, weight_decay=0.0):
    """The update above of one tensor at step t, on flat lists (p: any iterable, read once):
    returns the new (p, m, v)."""
    # with its scalars hoisted out of the loop (as PyTorch arranges it):
    # lr (m / bc1) / (sqrt(v / bc2) + eps) = step_size m / (sqrt(v) inv_sqrt_bc2 + eps)
    step_size, inv_sqrt_bc2 = lr / (1 - beta1 ** t), 1 / math.sqrt(1 - beta2 ** t)
    c1, c2 = 1 - beta1, 1 - beta2
    keep = 1 - lr * weight_decay  # the decay, p (1 - lr wd), folded into the last loop
    m = [beta1 * mi + c1 * gi for mi, gi in zip(m, g)]
    v = [beta2 * vi + c2 * gi * gi for vi, gi in zip(v, g)]
    if keep == 1.0:  # no decay: the same numbers (pi * 1.0 == pi) without a multiply (~8%)
        p = [pi - step_size * mi / (si * inv_sqrt_bc2 + eps)  # sqrt via map: C, not pow
             for pi, mi, si in zip(p, m, map(math.sqrt, v))]
    else:
        p = [pi * keep - step_size * mi / (si * inv_sqrt_bc2 + eps)
             for pi, mi, si in zip(p, m, map(math.sqrt, v))]
    return p, m, v


def lr_at(step: int, tc: TrainConfig) -> float:
    """Learning rate for 0-based `step` of tc.steps.

    linear: warmup, then decay to zero, lr (1 - s / steps) without warmup (microgpt's rule).
    cosine: warmup, then half a cosine from lr down to lr * min_lr_frac.  constant: warmup, lr.
    """
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    if tc.schedule == "constant":
        return tc.lr
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    if tc.schedule == "linear":
        return tc.lr * (1 - progress)
    floor = tc.lr * tc.min_lr_frac
    return floor + 0.5 * (tc.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def grad_norm(grads: dict) -> float:
    return math.sqrt(sum(sum(x * x for x in row) for g in grads.values() for row in _rows(g)))


def clip_grads(grads: dict, max_norm: float) -> float:
    """Scale all gradients so that their global L2 norm is at most max_norm; return the norm
    before clipping."""
    norm = grad_norm(grads)
    if max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for g in grads.values():
            for row in _rows(g):
                row[:] = [x * scale for x in row]
    return norm


def zero_grads(grads: dict) -> None:
    zeros = {}  # one list of zeros per row length, copied in: no new list per row (~35% faster)
    for g in grads.values():
        for row in _rows(g):
            z = zeros.get(len(row))
            if z is None:
                z = zeros[len(row)] = [0.0] * len(row)
            row[:] = z
