"""Every hand-derived backward in puregpt checked against finite differences of its own forward.

Finite differences: the fourth-order central stencil
    f'(x) ~ [8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))] / (12 h),   h = 1e-4.
Its truncation error is O(h^4 f^(5)) ~ 1e-16; its rounding error is ~1.5 * (the loss's rounding
error) / h. The loss is computed to ~2e-14 (measured against torch; ops.matmul's dot products are
accurate to ~1e-16 |a||b|, see test_matmul.py), so finite differences carry ~3e-10 of noise.
(The plain two-point stencil would need h ~1e-5 to keep truncation small, and its noise would be
~2e-9.)

Criterion: rel = |analytic - numeric| / max(|analytic| + |numeric|, FLOOR) < RTOL = 1e-6.
The floor is needed because some gradients are exactly zero by symmetry (the key bias attn_wk_b:
adding a constant to every key shifts all scores of a query equally, and softmax is invariant),
and the finite difference of a zero gradient is pure rounding noise, not a signal. With
FLOOR = 1e-3, gradients below ~5e-4 are held to |analytic - numeric| < 1e-9, about 10x the noise
(a floor of 1e-4 would ask for 1e-10, within the noise).
"""

from __future__ import annotations

import math
import random

import pytest
from conftest import COMBOS, combo_id, perturbed_params, random_batch, tiny_config

from puregpt import model, ops
from puregpt.config import PRESETS, GPTConfig

H = 1e-4
FLOOR = 1e-3  # gradients smaller than ~5e-4 are compared in absolute terms (to 1e-9)
RTOL = 1e-6


def numeric_derivative(f) -> float:
    """d/dt f(t) at t = 0, f a scalar function of a scalar offset."""
    return (8 * (f(H) - f(-H)) - (f(2 * H) - f(-2 * H))) / (12 * H)


def rel_err(analytic: float, numeric: float) -> float:
    return abs(analytic - numeric) / max(abs(analytic) + abs(numeric), FLOOR)


def rows(t):
    """A matrix is its rows; a vector is one row (entries are addressed as rows(t)[r][c])."""
    return t if isinstance(t[0], list) else [t]


def entries(t):
    return [(r, c) for r, row in enumerate(rows(t)) for c in range(len(row))]


def along(loss, tensor, direction: dict) -> float:
    """The numeric derivative of loss() when `tensor` moves by t * direction, a direction being
    a dict {(row, col): weight} (a single entry is {(r, c): 1.0})."""
    R = rows(tensor)
    base = {rc: R[rc[0]][rc[1]] for rc in direction}

    def f(t):
        for (r, c), d in direction.items():
            R[r][c] = base[r, c] + t * d
        try:
            return loss()
        finally:
            for (r, c), x in base.items():
                R[r][c] = x

    return numeric_derivative(f)


def projected(grad, direction: dict) -> float:
    """The analytic derivative along a direction: sum of grad * weight."""
    G = rows(grad)
    return math.fsum(G[r][c] * d for (r, c), d in direction.items())


def dot(A, B) -> float:
    return math.fsum(x * y for ra, rb in zip(rows(A), rows(B)) for x, y in zip(ra, rb))


# --- op by op: every entry of every input --------------------------------------------------------


def rand_matrix(rng, n, m, lo=-1.0, hi=1.0):
    return [[rng.uniform(lo, hi) for _ in range(m)] for _ in range(n)]


def weighted_sum(R):
    """A scalar loss from an op's output Y: sum(R * Y) with fixed random R, so dL/dY = R."""
    return lambda Y: dot(R, Y)


def check_all_entries(loss, wrt: dict, analytic: dict):
    """Compare analytic[name] with the numeric gradient of loss() at every entry of wrt[name]."""
    assert set(wrt) == set(analytic)
    for name, tensor in wrt.items():
        for r, c in entries(tensor):
            numeric = along(loss, tensor, {(r, c): 1.0})
            a = rows(analytic[name])[r][c]
            assert rel_err(a, numeric) < RTOL, (name, r, c, a, numeric)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(with_bias):
    rng = random.Random(1)
    X, W, b = rand_matrix(rng, 3, 4), rand_matrix(rng, 5, 4), [rng.uniform(-1, 1) for _ in range(5)]
    R = rand_matrix(rng, 3, 5)
    bias = b if with_bias else None
    L = weighted_sum(R)
    dW, db = [[0.0] * 4 for _ in range(5)], [0.0] * 5
    dX = ops.linear_backward(R, ops.linear_forward(X, W, bias)[1], dW, db if with_bias else None)
    wrt, analytic = {"X": X, "W": W}, {"X": dX, "W": dW}
    if with_bias:
        wrt["b"], analytic["b"] = b, db
    check_all_entries(lambda: L(ops.linear_forward(X, W, bias)[0]), wrt, analytic)
    # parameter gradients accumulate (+=): a second backward doubles them (tied embeddings and
    # gradient accumulation rely on it)
    once = [list(row) for row in dW]
    ops.linear_backward(R, ops.linear_forward(X, W, bias)[1], dW, db if with_bias else None)
    assert dW == [[2 * x for x in row] for row in once]


@pytest.mark.parametrize("with_wpe", [False, True])
def test_embedding(with_wpe):
    rng = random.Random(2)
    tokens, positions = [2, 0, 2, 1, 2], [0, 1, 2, 0, 1]  # repeated tokens and positions
    wte, wpe = rand_matrix(rng, 3, 4), rand_matrix(rng, 3, 4) if with_wpe else None
    R = rand_matrix(rng, 5, 4)
    L = weighted_sum(R)
    dwte, dwpe = [[0.0] * 4 for _ in range(3)], [[0.0] * 4 for _ in range(3)] if with_wpe else None
    ops.embedding_backward(R, ops.embedding_forward(tokens, positions, wte, wpe)[1], dwte, dwpe)
    wrt, analytic = {"wte": wte}, {"wte": dwte}
    if with_wpe:
        wrt["wpe"], analytic["wpe"] = wpe, dwpe
    check_all_entries(lambda: L(ops.embedding_forward(tokens, positions, wte, wpe)[0]),
                      wrt, analytic)


@pytest.mark.parametrize("eps", [1e-5, 0.5])  # a large eps makes its place in the formula matter
@pytest.mark.parametrize("with_gain", [False, True])
def test_rmsnorm(with_gain, eps):
    rng = random.Random(3)
    X, R = rand_matrix(rng, 3, 6, -2, 2), rand_matrix(rng, 3, 6)
    g = [rng.uniform(0.5, 1.5) for _ in range(6)] if with_gain else None
    L = weighted_sum(R)
    dg = [0.0] * 6 if with_gain else None
    dX = ops.rmsnorm_backward(R, ops.rmsnorm_forward(X, g, eps)[1], dg)
    wrt, analytic = {"X": X}, {"X": dX}
    if with_gain:
        wrt["g"], analytic["g"] = g, dg
    check_all_entries(lambda: L(ops.rmsnorm_forward(X, g, eps)[0]), wrt, analytic)


@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("with_gain,with_bias", [(False, False), (True, False), (False, True),
                                                 (True, True)])
def test_layernorm(with_gain, with_bias, eps):
    rng = random.Random(4)
    X, R = rand_matrix(rng, 3, 6, -2, 2), rand_matrix(rng, 3, 6)
    g = [rng.uniform(0.5, 1.5) for _ in range(6)] if with_gain else None
    b = [rng.uniform(-1, 1) for _ in range(6)] if with_bias else None
    L = weighted_sum(R)
    dg, db = ([0.0] * 6 if with_gain else None), ([0.0] * 6 if with_bias else None)
    dX = ops.layernorm_backward(R, ops.layernorm_forward(X, g, b, eps)[1], dg, db)
    wrt, analytic = {"X": X}, {"X": dX}
    if with_gain:
        wrt["g"], analytic["g"] = g, dg
    if with_bias:
        wrt["b"], analytic["b"] = b, db
    check_all_entries(lambda: L(ops.layernorm_forward(X, g, b, eps)[0]), wrt, analytic)


@pytest.mark.parametrize("name", sorted(ops.ACTIVATIONS))
def test_activation(name):
    fwd, bwd = ops.ACTIVATIONS[name]
    rng = random.Random(5)
    # inputs spread over [-4, 4], but at least 0.01 away from relu's kink at 0 (h is 1e-4)
    X = [[rng.choice((-1, 1)) * rng.uniform(0.01, 4.0) for _ in range(8)] for _ in range(3)]
    R = rand_matrix(rng, 3, 8)
    dX = bwd(R, fwd(X)[1])
    check_all_entries(lambda: weighted_sum(R)(fwd(X)[0]), {"X": X}, {"X": dX})


@pytest.mark.parametrize("n_head", [1, 2])
@pytest.mark.parametrize("Tq,Tk", [(4, 4), (1, 5), (3, 5)])  # Tq < Tk: queries of a KV cache
def test_attention(Tq, Tk, n_head):
    rng = random.Random(6)
    Q, K = rand_matrix(rng, Tq, 4, -2, 2), rand_matrix(rng, Tk, 4, -2, 2)
    V, R = rand_matrix(rng, Tk, 4), rand_matrix(rng, Tq, 4)
    dQ, dK, dV = ops.attention_backward(R, ops.attention_forward(Q, K, V, n_head)[1])
    check_all_entries(lambda: weighted_sum(R)(ops.attention_forward(Q, K, V, n_head)[0]),
                      {"Q": Q, "K": K, "V": V}, {"Q": dQ, "K": dK, "V": dV})


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 2), (4, 1), (3, 1)])
@pytest.mark.parametrize("Tq,Tk", [(4, 4), (1, 5), (3, 5)])
def test_grouped_query_attention(Tq, Tk, n_head, n_kv_head):
    """K and V of n_kv_head heads (hd = 2), each read by n_head / n_kv_head query heads: their
    gradients sum over the group."""
    rng = random.Random(16)
    hd = 2
    Q, K = rand_matrix(rng, Tq, n_head * hd, -2, 2), rand_matrix(rng, Tk, n_kv_head * hd, -2, 2)
    V, R = rand_matrix(rng, Tk, n_kv_head * hd), rand_matrix(rng, Tq, n_head * hd)

    def forward():
        return ops.attention_forward(Q, K, V, n_head, n_kv_head)

    dQ, dK, dV = ops.attention_backward(R, forward()[1])
    check_all_entries(lambda: weighted_sum(R)(forward()[0]), {"Q": Q, "K": K, "V": V},
                      {"Q": dQ, "K": dK, "V": dV})


def test_grouped_attention_is_attention_with_repeated_heads():
    """Grouping is a weight-sharing pattern: attention over K, V with each head repeated for
    its group (transformers' repeat_kv) gives the same output, and the grouped dK is the sum of
    the repeated heads' dK."""
    rng = random.Random(17)
    n_head, n_kv, hd, T = 4, 2, 3, 5
    Q, K, V = (rand_matrix(rng, T, w * hd) for w in (n_head, n_kv, n_kv))
    R = rand_matrix(rng, T, n_head * hd)

    def repeat(M):  # head j becomes heads 2j, 2j + 1
        return [[x for j in range(n_kv) for _ in range(2) for x in row[j * hd:(j + 1) * hd]]
                for row in M]

    out, cache = ops.attention_forward(Q, K, V, n_head, n_kv)
    ref, ref_cache = ops.attention_forward(Q, repeat(K), repeat(V), n_head)
    assert max(abs(a - b) for ra, rb in zip(out, ref) for a, b in zip(ra, rb)) < 1e-15
    dK = ops.attention_backward(R, cache)[1]
    dK_rep = ops.attention_backward(R, ref_cache)[1]
    summed = [[sum(row[(2 * j + r) * hd + c] for r in range(2)) for j in range(n_kv)
               for c in range(hd)] for row in dK_rep]
    assert max(abs(a - b) for ra, rb in zip(dK, summed) for a, b in zip(ra, rb)) < 1e-14


@pytest.mark.parametrize("n_heads, hd", [(1, 2), (2, 4), (3, 6)])
@pytest.mark.parametrize("theta", [10000.0, 7.0])
def test_rope(n_heads, hd, theta):
    rng = random.Random(18)
    positions = [0, 3, 1, 3, 7]  # repeated, out of order, and position 0 (no rotation)
    X, R = rand_matrix(rng, 5, n_heads * hd, -2, 2), rand_matrix(rng, 5, n_heads * hd)
    cos, sin = ops.rope_table(8, hd, theta)
    dX = ops.rope_backward(R, ops.rope_forward(X, positions, n_heads, cos, sin)[1])
    check_all_entries(lambda: weighted_sum(R)(ops.rope_forward(X, positions, n_heads, cos,
                                                               sin)[0]), {"X": X}, {"X": dX})
    # a rotation: every head keeps its length, and position 0 is the identity
    Y = ops.rope_forward(X, positions, n_heads, cos, sin)[0]
    for x, y in zip(X, Y):
        for lo in range(0, n_heads * hd, hd):
            assert abs(math.hypot(*x[lo:lo + hd]) - math.hypot(*y[lo:lo + hd])) < 1e-14
    assert Y[0] == X[0]


def test_rope_angles_are_the_documented_ones():
    """Pair i of a head (channels i and i + hd/2) turns by p * theta^(-2i/hd)."""
    cos, sin = ops.rope_table(6, 8, 100.0)
    for p in range(6):
        for i in range(4):
            angle = p * 100.0 ** (-2 * i / 8)
            assert abs(cos[p][i] - math.cos(angle)) < 1e-15
            assert abs(sin[p][i] - math.sin(angle)) < 1e-15
    x = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # channel 0 turns towards channel 4
    y = ops.rope_forward([x], [2], 1, cos, sin)[0][0]
    assert abs(y[0] - math.cos(2.0)) < 1e-15 and abs(y[4] - math.sin(2.0)) < 1e-15


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_gated(act):
    """act(G) * U: SwiGLU's product (act = silu), here also with another activation."""
    rng = random.Random(19)
    G, U = rand_matrix(rng, 3, 6, -4, 4), rand_matrix(rng, 3, 6, -2, 2)
    R = rand_matrix(rng, 3, 6)
    dG, dU = ops.gated_backward(R, ops.gated_forward(G, U, act)[1])
    check_all_entries(lambda: weighted_sum(R)(ops.gated_forward(G, U, act)[0]),
                      {"G": G, "U": U}, {"G": dG, "U": dU})


def test_silu_far_from_zero():
    """No overflow in the sigmoid at large |x|; silu(x) -> x and -> 0 on either side."""
    Y = ops.silu_forward([[-800.0, -40.0, 40.0, 800.0]])[0][0]
    assert Y[0] == 0.0 and abs(Y[1]) < 1e-15 and Y[2] == 40.0 and Y[3] == 800.0
    dX = ops.silu_backward([[1.0] * 4], [[-800.0, -40.0, 40.0, 800.0]])[0]
    assert dX[0] == 0.0 and dX[3] == 1.0


@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("n_heads", [1, 3])
def test_head_rmsnorm(n_heads, eps):
    """QK-norm: each head's hd = 4 channels normalized alone, one gain (hd,) for all heads."""
    rng = random.Random(20)
    X, R = rand_matrix(rng, 3, 4 * n_heads, -2, 2), rand_matrix(rng, 3, 4 * n_heads)
    g = [rng.uniform(0.5, 1.5) for _ in range(4)]
    dg = [0.0] * 4
    dX = ops.head_rmsnorm_backward(R, ops.head_rmsnorm_forward(X, n_heads, g, eps)[1], dg)
    check_all_entries(lambda: weighted_sum(R)(ops.head_rmsnorm_forward(X, n_heads, g, eps)[0]),
                      {"X": X, "g": g}, {"X": dX, "g": dg})


def test_cross_entropy_with_ignored_targets():
    rng = random.Random(7)
    logits = rand_matrix(rng, 6, 5, -3, 3)
    targets = [3, -1, 0, 4, -1, 4]
    dloss = 0.7  # the upstream gradient scales everything
    dlogits = ops.cross_entropy_backward(dloss, ops.cross_entropy_forward(logits, targets)[1])
    assert dlogits[1] == [0.0] * 5 and dlogits[4] == [0.0] * 5  # ignored rows get no gradient
    check_all_entries(lambda: dloss * ops.cross_entropy_forward(logits, targets)[0],
                      {"logits": logits}, {"logits": dlogits})
    with pytest.raises(ValueError):
        ops.cross_entropy_forward(logits, [-1] * 6)


def test_softmax():
    """softmax has no backward of its own (its Jacobian lives in attention_backward and
    cross_entropy_backward, checked above); here its values against exp(z) / sum exp(z)."""
    z = [0.3, -1.2, 2.5, 0.0, 2.5]
    s = ops.softmax(z)
    ref = [math.exp(x) / math.fsum(math.exp(y) for y in z) for x in z]
    assert max(abs(a - b) for a, b in zip(s, ref)) < 1e-15
    # invariant to a shift, and no overflow where exp(z) alone would overflow (z + 1000 is
    # itself rounded by up to ~1e-13, hence the looser tolerance)
    shifted = ops.softmax([x + 1000.0 for x in z])
    assert max(abs(a - b) for a, b in zip(shifted, ref)) < 1e-12


# --- the whole model -----------------------------------------------------------------------------


class ReluWatch:
    """Stands in for relu's forward (through monkeypatch) and records, per forward pass, the sign
    pattern of every relu input and the smallest |input|. At relu's kink the derivative does not
    exist: a stencil that straddles it measures nothing, whatever the backward, so such checks
    are redrawn, and test points are chosen with no relu input within MARGIN of 0."""

    MARGIN = 1e-3  # 5x the stencil's reach of 2h = 2e-4

    def __init__(self, monkeypatch):
        relu_forward, relu_backward = ops.ACTIVATIONS["relu"]

        def recording_forward(X):
            self.signs.append(tuple(x > 0.0 for row in X for x in row))
            self.margin = min([self.margin] + [abs(x) for row in X for x in row])
            return relu_forward(X)

        monkeypatch.setitem(ops.ACTIVATIONS, "relu", (recording_forward, relu_backward))

    def loss(self, params, cfg, inputs, targets) -> float:
        self.signs, self.margin = [], math.inf
        return model.evaluate_loss(params, cfg, inputs, targets)[0]


def model_gradcheck(watch, cfg, params, inputs, targets, pick, tries=1, seed=0):
    """Largest relative error over the checks: per parameter tensor, `pick(tensor, rng)` gives
    the directions to differentiate along (single entries, or random directions through the
    whole tensor). A check whose stencil straddles a relu kink is drawn again (up to
    `tries` draws) or else skipped. Returns (worst rel_err, where, number of checks skipped)."""
    rng = random.Random(seed)
    _, grads, _ = model.loss_and_grads(params, cfg, inputs, targets)
    watch.loss(params, cfg, inputs, targets)
    centre = watch.signs
    straddled = False

    def loss():
        nonlocal straddled
        value = watch.loss(params, cfg, inputs, targets)
        straddled |= watch.signs != centre
        return value

    worst, where, skipped = 0.0, None, 0
    for name, tensor in params.items():
        directions = pick(tensor, rng)
        for k in range(len(directions)):
            for _ in range(tries):
                straddled = False
                numeric = along(loss, tensor, directions[k])
                if not straddled:
                    break
                directions = pick(tensor, rng)
            else:
                skipped += 1
                continue
            err = rel_err(projected(grads[name], directions[k]), numeric)
            if err > worst:
                d = directions[k]
                worst, where = err, (name, next(iter(d)) if len(d) == 1 else "random direction")
    return worst, where, skipped


def one_entry_and_one_direction(tensor, rng):
    """One random entry, and one random direction through every entry of the tensor."""
    return [{rng.choice(entries(tensor)): 1.0},
            {rc: rng.gauss(0, 1) for rc in entries(tensor)}]


def every_entry(tensor, rng):
    return [{rc: 1.0} for rc in entries(tensor)]


def batch_away_from_kinks(watch, cfg, params, seed, lengths, ignore_frac=0.0):
    """The first random batch (from `seed` on) with no relu input within MARGIN of 0."""
    for attempt in range(100):
        inputs, targets = random_batch(cfg, random.Random(1000 * seed + attempt), lengths,
                                       ignore_frac)
        watch.loss(params, cfg, inputs, targets)
        if watch.margin >= watch.MARGIN:
            return inputs, targets
    raise AssertionError("no batch away from relu kinks")


def tiny_gradcheck(watch, cfg, seed):
    params = perturbed_params(cfg, seed)
    # two sequences of different lengths; a quarter of the targets ignored (-1)
    inputs, targets = batch_away_from_kinks(watch, cfg, params, seed, [5, 3], ignore_frac=0.25)
    return model_gradcheck(watch, cfg, params, inputs, targets, one_entry_and_one_direction,
                           tries=10, seed=seed)


def test_model_gradcheck(combo, monkeypatch):
    worst, where, skipped = tiny_gradcheck(ReluWatch(monkeypatch), tiny_config(combo),
                                           COMBOS.index(combo))
    assert worst < RTOL, (worst, where)
    assert skipped == 0


@pytest.mark.parametrize("combo", random.Random(1).sample(COMBOS, 36), ids=combo_id)
def test_model_gradcheck_without_norm_affine(combo, monkeypatch):
    cfg = tiny_config(combo, norm_affine=False)
    worst, where, skipped = tiny_gradcheck(ReluWatch(monkeypatch), cfg, COMBOS.index(combo))
    assert worst < RTOL, (worst, where)
    assert skipped == 0


def test_microgpt_default_every_entry(monkeypatch):
    """The default (microgpt) config at its own init scale: every entry of every parameter."""
    watch = ReluWatch(monkeypatch)
    cfg = GPTConfig()
    params = model.init_params(cfg, random.Random(42))
    inputs, targets = batch_away_from_kinks(watch, cfg, params, 42, [4, 3])
    worst, where, skipped = model_gradcheck(watch, cfg, params, inputs, targets, every_entry)
    assert worst < RTOL, (worst, where)
    assert skipped <= 0.005 * model.num_params(params)


@pytest.mark.parametrize("overrides", [
    {},  # the preset at a reduced width: RoPE, SwiGLU (H = 32), 4 query heads on 2 K/V heads
    {"qk_norm": True, "n_kv_head": 1, "bias": True, "mlp_hidden": 20, "rope_theta": 50.0},
    {"norm_position": "post", "norm": "layernorm", "tie_embeddings": True, "n_kv_head": 4},
], ids=["llama", "llama-qk_norm-mqa-bias", "llama-post-layernorm-tied"])
def test_llama_preset_gradcheck(overrides, monkeypatch):
    cfg = GPTConfig(**{**PRESETS["llama"]["model"], "vocab_size": 7, "n_embd": 16,
                       "block_size": 8, "init_std": 0.4, **overrides})
    worst, where, skipped = tiny_gradcheck(ReluWatch(monkeypatch), cfg, 3)
    assert worst < RTOL, (worst, where)
    assert skipped == 0


# --- the check itself must be able to fail --------------------------------------------------------


def _gelu_backward_off_by_1e5(dY, X):
    return [[1.00001 * g for g in row] for row in ops.gelu_backward(dY, X)]


_layernorm_backward = ops.layernorm_backward


def _layernorm_backward_without_centring(dY, cache, dgain=None, dbias=None):
    xhats, rstds, gain = cache
    dX = _layernorm_backward(dY, cache, dgain, dbias)
    if gain is not None:
        dY = [[g * w for g, w in zip(dy, gain)] for dy in dY]
    # add back the mean(dxhat) term that the true backward subtracts
    return [[x + r * sum(dy) / len(dy) for x in dx] for dx, dy, r in zip(dX, dY, rstds)]


def _rope_backward_turning_forward(dY, cache):
    """The rotation itself instead of its transpose: right at position 0 only."""
    return ops.rope_forward(dY, *cache)[0]


def _attention_backward_without_group_sum(dout, cache):
    """dK and dV from the last query head of each group only (as if overwritten, not summed)."""
    Q, K, V, n_head, weights, n_kv = cache
    group = n_head // n_kv
    dQ = _attention_backward(dout, cache)[0]
    last_only = [w if h % group == group - 1 else [[0.0] * len(r) for r in w]
                 for h, w in enumerate(weights)]
    _, dK, dV = _attention_backward(dout, (Q, K, V, n_head, last_only, n_kv))
    return dQ, dK, dV


_attention_backward = ops.attention_backward


@pytest.mark.parametrize("bug", ["gelu_backward_off_by_1e-5", "layernorm_without_centring",
                                 "rope_backward_not_transposed", "gqa_without_group_sum"])
def test_gradcheck_catches_a_wrong_backward(bug, monkeypatch):
    """A deliberately broken backward must fail the same criterion: a gelu derivative 1e-5 too
    large (a subtle error), a layernorm backward that forgets the mean's gradient, a rotary
    backward that turns forward again, grouped K/V gradients not summed over the group."""
    combo = dict(COMBOS[0], activation="gelu", norm="layernorm")
    if bug.startswith("rope") or bug.startswith("gqa"):
        combo.update(pos="rope", n_kv_head=1)
    if bug.startswith("rope"):
        monkeypatch.setattr(ops, "rope_backward", _rope_backward_turning_forward)
    elif bug.startswith("gqa"):
        monkeypatch.setattr(ops, "attention_backward", _attention_backward_without_group_sum)
    elif bug.startswith("gelu"):
        monkeypatch.setitem(ops.ACTIVATIONS, "gelu", (ops.gelu_forward, _gelu_backward_off_by_1e5))
    else:
        monkeypatch.setattr(ops, "layernorm_backward", _layernorm_backward_without_centring)
    worst, where, _ = tiny_gradcheck(ReluWatch(monkeypatch), tiny_config(combo), 0)
    assert worst > 10 * RTOL, (worst, where)
