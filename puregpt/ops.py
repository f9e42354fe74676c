"""The operations of a GPT, each forward next to its hand-derived backward.

Convention (llm.c style): `x_forward(...)` returns `(out, cache)`; `x_backward(dout, cache, ...)`
returns the gradient with respect to the op's input and *accumulates* (+=) the gradients of the
op's parameters into the `d`-prefixed buffers it is given.

Tensors are plain Python lists: a matrix is a list of rows. Activations are (N, C) with one row
per position; N is every position of every sequence in the batch, laid end to end, so all ops but
attention treat the batch as one long list of rows. Dimension names, as in config.py: B
sequences, T positions of one sequence, N = all positions of a batch (the sum of its T), C
channels (n_embd), V vocabulary, hd = head_dim = C / n_head.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from itertools import chain, repeat, starmap
from operator import add, mul

# --- the one product every layer uses: matmul(A, B) = A B^T -----------------------------------
#
# Every product in the model (linear layers, their gradients, attention scores and values) is
# "each row of A dotted with each row of B": C[i][j] = sum_k A[i][k] B[j][k]. This is the only
# place where real time is spent, so it is the one place tuned for speed; the math is just that.

def matmul_sumprod(A, B, acc=None):
    """A (n, k), B (m, k) -> A B^T (n, m) with math.sumprod (Python 3.12+), a C dot product with
    extended precision. With acc (n, m): acc += A B^T, in place (each matmul does this)."""
    _sumprod = math.sumprod
    if acc is None:
        return [list(map(_sumprod, B, repeat(a))) for a in A]
    for row, a in zip(acc, A):
        row[:] = map(add, row, map(_sumprod, B, repeat(a)))
    return acc


def dots_sumprod(a, B):
    """[a . b for b in B] with math.sumprod: one vector's products with a few rows (one decoding
    step, one attention query)."""
    return list(map(math.sumprod, B, repeat(a)))


def matmul_dist(A, B, acc=None):
    """A (n, k), B (m, k) -> A B^T (n, m) with math.dist, on every Python; with acc (n, m):
    acc += A B^T, in place, the sum taken inside the product's own loop (a gradient's +=
    ~10% faster than adding the product's rows after).

    Before Python 3.12 the stdlib has no dot product, but it has math.dist, a C loop that
    creates no float object per element, and the law of cosines turns one into the other:
        a.b = (|a|^2 + |b|^2 - |a - b|^2) / 2
    Every dot product is then one dist() call: ~2x the speed of sum(map(mul, a, b)). The
    subtraction cancels, losing accuracy unless |a| and |b| are about equal; rescaling
    rows to equal lengths keeps the rounding error at ~1e-16 |a||b|, as good as a plain sum
    whatever the scales of a and b. Two ways to get equal lengths:
      * when B's rows (typically a weight matrix's) have lengths within a factor 4 of each
        other, only A's rows are rescaled, to rho = sqrt(shortest * longest) of B's: then
        |b| / rho is within [1/2, 2], and B, the larger side, is used as it is;
      * otherwise every row of both sides is scaled to unit length.
    """
    if len(A) <= 2 or len(B) <= 2 or len(A) * len(B) * len(A[0]) < 512:
        if acc is None:  # too little work to repay rescaling rows
            return [dots(a, B) for a in A]
        for row, a in zip(acc, A):
            row[:] = map(add, row, dots(a, B))
        return acc
    dist, norms_b = math.dist, list(starmap(math.hypot, B))
    shortest, longest = min(norms_b), max(norms_b)
    if 0.0 < longest <= 4.0 * shortest:
        rho = math.sqrt(shortest * longest)
        A, norms_a = _scaled_rows(A, rho)
        B = list(map(tuple, B))  # dist() copies any other sequence into a tuple per call
        c = [rho * rho + y * y for y in norms_b]  # |a|^2 + |b|^2 for every a
        hs = [0.5 * x / rho for x in norms_a]  # a.b = |a|/rho ~a.b
        if acc is None:
            return [[h * (cb - d * d) for cb, d in zip(c, map(dist, B, repeat(a)))]
                    for a, h in zip(A, hs)]
        for row, a, h in zip(acc, A, hs):
            row[:] = [r + h * (cb - d * d) for r, cb, d in zip(row, c, map(dist, B, repeat(a)))]
        return acc
    A, norms_a = _scaled_rows(A, 1.0)
    B, _ = _scaled_rows(B, 1.0, norms_b)
    if acc is None:
        return [[x * y * (1.0 - 0.5 * d * d) for y, d in zip(norms_b, map(dist, B, repeat(a)))]
                for a, x in zip(A, norms_a)]
    for row, a, x in zip(acc, A, norms_a):
        row[:] = [r + x * y * (1.0 - 0.5 * d * d)
                  for r, y, d in zip(row, norms_b, map(dist, B, repeat(a)))]
    return acc


def _scaled_rows(rows, length, norms=None):
    """Each row scaled to the given length (all-zero rows stay zero: their products are then
    0), as tuples (dist() copies any other sequence into one on every call: tuples make it
    1.5-2x faster), and the rows' original lengths."""
    norms = norms or list(starmap(math.hypot, rows))
    scales = [length / n if n else 0.0 for n in norms]
    return [tuple([x * s for x in r]) for r, s in zip(rows, scales)], norms


def dots_sum(a, B):
    """[a . b for b in B] as plain sums: one vector's products with a few rows (one decoding
    step, one attention query), where making unit rows for dist() would cost more than it saves."""
    return [sum(map(mul, a, b)) for b in B]


# Each way of computing the products: name -> (matmul, dots). Each Python takes the fastest,
# measured on train-large and microgpt steps (`python benchmarks/run.py pythons`): before 3.12
# only "dist" exists; on 3.12 and 3.13, dist's rescaled rows still beat math.sumprod on the
# many-row products (sumprod alone made train-large steps 0.7-0.95x as fast), and sumprod
# takes the few-row ones and attention's queries (its C loop beats sum(map(mul))).
PRODUCTS = {"dist": (matmul_dist, dots_sum)}
if hasattr(math, "sumprod"):
    PRODUCTS["sumprod"] = (matmul_sumprod, dots_sumprod)
    PRODUCTS["dist+sumprod"] = (matmul_dist, dots_sumprod)
PRODUCT_PATH = "dist+sumprod" if "sumprod" in PRODUCTS else "dist"
matmul = PRODUCTS[PRODUCT_PATH][0]  # (A, B[, acc]) -> A B^T (or acc += it): every product
dots = PRODUCTS[PRODUCT_PATH][1]  # (a, B) -> [a . b for b in B]


def use_products(path: str) -> None:
    """Compute every product of this process with PRODUCTS[path] from now on (for benchmarks and
    tests that compare the paths; the results agree to rounding)."""
    global matmul, dots, PRODUCT_PATH
    if path not in PRODUCTS:
        raise ValueError(f"no product path {path!r} on this Python; available: {sorted(PRODUCTS)}")
    (matmul, dots), PRODUCT_PATH = PRODUCTS[path], path


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off inside (on again after, if it was on). A forward
    and backward pass builds ~10^5 lists of floats that never form cycles (reference counting
    frees them), yet every 700 new containers start a collection that walks the young lists
    float by float: ~8% of a train-large step, finding nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def matvec(W, x):
    """W x for W (out, in), x (in,) -> (out,)."""
    return dots(x, W)


def transpose(M):
    """(rows, cols) -> (cols, rows); zip runs in C, so this is cheap next to any matmul."""
    return list(zip(*M))


def add_into(dst, src):
    """dst += src for two vectors, in place (the list object stays the same)."""
    dst[:] = map(add, dst, src)


def add_into_rows(A, B):
    """A += B for two (N, C) matrices, in place."""
    for a, b in zip(A, B):
        a[:] = map(add, a, b)


def add_rows(A, B):
    """A + B for two (N, C) matrices (a residual connection)."""
    return [list(map(add, a, b)) for a, b in zip(A, B)]


# --- linear: Y = X W^T + b ---------------------------------------------------------------------


def linear_forward(X, W, b=None):
    """X (N, in), W (out, in) as PyTorch stores it, b (out,) or None -> Y (N, out)."""
    Y = matmul(X, W)
    if b is not None:
        Y = [list(map(add, y, b)) for y in Y]
    return Y, (X, W)


def linear_backward(dY, cache, dW, db=None):
    """dX = dY W, and the parameter gradients (linear_param_grads) unless dW is None: then the
    caller computes them elsewhere (parallel.SplitStep hands them to another process)."""
    X, W = cache
    dX = matmul(dY, transpose(W))  # (N, in): dX = dY W, W^T's rows are W's columns
    if dW is not None:
        linear_param_grads(dY, X, dW, db)
    return dX


def linear_param_grads(dY, X, dW, db=None):
    """dW += dY^T X;  db += sum over positions of dY."""
    # dW[o][i] = sum_n dY[n][o] X[n][i]: dot products along the position axis (length N) run
    # about 2x faster than N separate outer-product updates of dW.
    dYT, XT = transpose(dY), transpose(X)  # (out, N), (in, N)
    matmul(dYT, XT, dW)  # dW += dYT XT^T
    if db is not None:
        add_into(db, map(sum, dYT))


# --- embedding: X[n] = wte[token_n] (+ positional row) ------------------------------------------


def embedding_forward(tokens, positions, wte, wpe):
    """tokens, positions: (N,) ints; wte (V, C); wpe (block_size, C) table or None -> X (N, C).

    wpe is either a learned parameter or the fixed sinusoidal table; the sum is the same.
    """
    if wpe is None:
        X = [list(wte[t]) for t in tokens]
    else:
        X = [list(map(add, wte[t], wpe[p])) for t, p in zip(tokens, positions)]
    return X, (tokens, positions)


def embedding_backward(dX, cache, dwte, dwpe=None):
    """A lookup routes each row's gradient back to the table row it came from: dwte[t] += dX[n]."""
    tokens, positions = cache
    for dx, t, p in zip(dX, tokens, positions):
        add_into(dwte[t], dx)
        if dwpe is not None:
            add_into(dwpe[p], dx)


def sinusoidal_table(block_size, C):
    """Fixed positions of Vaswani et al. (2017): PE[p][2i] = sin(p / 10000^(2i/C)), [2i+1] = cos."""
    table = []
    for p in range(block_size):
        row = []
        for j in range(C):
            angle = p / 10000 ** ((j - j % 2) / C)
            row.append(math.sin(angle) if j % 2 == 0 else math.cos(angle))
        table.append(row)
    return table


# --- normalization -----------------------------------------------------------------------------


def rmsnorm_forward(X, gain=None, eps=1e-5):
    """y = x / sqrt(mean(x^2) + eps) (* gain). X (N, C) -> Y (N, C)."""
    C = len(X[0])
    xhats, rstds = [], []
    for x in X:
        rstd = (sum(map(mul, x, x)) / C + eps) ** -0.5
        xhats.append([xi * rstd for xi in x])
        rstds.append(rstd)
    Y = xhats if gain is None else [list(map(mul, xh, gain)) for xh in xhats]
    return Y, (xhats, rstds, gain)


def rmsnorm_backward(dY, cache, dgain=None):
    """With r = (mean(x^2)+eps)^-1/2 and xhat = x r: dx = r (dxhat - xhat mean(dxhat * xhat)).

    (dr/dx_i = -r^3 x_i / C, so the second term is the gradient flowing through the scale r.)
    """
    xhats, rstds, gain = cache
    C = len(xhats[0])
    if gain is not None:
        for dy, xh in zip(dY, xhats):
            add_into(dgain, map(mul, dy, xh))  # y = gain * xhat
        dY = [list(map(mul, dy, gain)) for dy in dY]
    dX = []
    for dxh, xh, r in zip(dY, xhats, rstds):
        proj = sum(map(mul, dxh, xh)) / C
        dX.append([(g - x * proj) * r for g, x in zip(dxh, xh)])
    return dX


def layernorm_forward(X, gain=None, bias=None, eps=1e-5):
    """y = (x - mean(x)) / sqrt(var(x) + eps) (* gain + bias), var biased (divides by C)."""
    C = len(X[0])
    xhats, rstds = [], []
    for x in X:
        mu = sum(x) / C
        xc = [xi - mu for xi in x]
        rstd = (sum(map(mul, xc, xc)) / C + eps) ** -0.5
        xhats.append([xi * rstd for xi in xc])
        rstds.append(rstd)
    Y = xhats
    if gain is not None:
        Y = [list(map(mul, xh, gain)) for xh in Y]
    if bias is not None:
        Y = [list(map(add, y, bias)) for y in Y]
    return Y, (xhats, rstds, gain)


def layernorm_backward(dY, cache, dgain=None, dbias=None):
    """dx = r (dxhat - mean(dxhat) - xhat mean(dxhat * xhat)): the two means undo the centring
    and the scaling, as in rmsnorm with one more projection (onto the all-ones direction)."""
    xhats, rstds, gain = cache
    C = len(xhats[0])
    if dbias is not None:
        for dy in dY:
            add_into(dbias, dy)
    if gain is not None:
        for dy, xh in zip(dY, xhats):
            add_into(dgain, map(mul, dy, xh))
        dY = [list(map(mul, dy, gain)) for dy in dY]
    dX = []
    for dxh, xh, r in zip(dY, xhats, rstds):
        mean_g = sum(dxh) / C
        proj = sum(map(mul, dxh, xh)) / C
        dX.append([(g - mean_g - x * proj) * r for g, x in zip(dxh, xh)])
    return dX


# --- activations -------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def relu_forward(X):
    return [[x if x > 0.0 else 0.0 for x in row] for row in X], X


def relu_backward(dY, X):
    """d relu(x)/dx = 1 where x > 0, else 0."""
    return [[g if x > 0.0 else 0.0 for g, x in zip(dy, row)] for dy, row in zip(dY, X)]


def gelu_forward(X):
    """Exact GELU: x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    erf = math.erf
    return [[0.5 * x * (1.0 + erf(x * _INV_SQRT_2)) for x in row] for row in X], X


def gelu_backward(dY, X):
    """d/dx x Phi(x) = Phi(x) + x phi(x), phi the standard normal density."""
    erf, exp = math.erf, math.exp
    return [[g * (0.5 * (1.0 + erf(x * _INV_SQRT_2)) + x * _INV_SQRT_2PI * exp(-0.5 * x * x))
             for g, x in zip(dy, row)] for dy, row in zip(dY, X)]


def gelu_tanh_forward(X):
    """GPT-2's GELU: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)."""
    tanh = math.tanh
    return [[0.5 * x * (1.0 + tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))) for x in row]
            for row in X], X


def gelu_tanh_backward(dY, X):
    """d/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx, t = tanh(u), du/dx = sqrt(2/pi)(1 + 3·0.044715 x^2)."""
    tanh = math.tanh
    out = []
    for dy, row in zip(dY, X):
        drow = []
        for g, x in zip(dy, row):
            t = tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
            du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
            drow.append(g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du))
        out.append(drow)
    return out


def _sigmoid(x):
    """1 / (1 + e^-x), never overflowing: for x < 0 the same value as e^x / (1 + e^x)."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def silu_forward(X):
    """SiLU (swish): x sigmoid(x), the gate of Llama's MLP."""
    return [[x * _sigmoid(x) for x in row] for row in X], X


def silu_backward(dY, X):
    """d/dx x s(x) = s + x s (1 - s), with s = sigmoid(x) and s' = s (1 - s)."""
    out = []
    for dy, row in zip(dY, X):
        drow = []
        for g, x in zip(dy, row):
            s = _sigmoid(x)
            drow.append(g * s * (1.0 + x * (1.0 - s)))
        out.append(drow)
    return out


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
    "silu": (silu_forward, silu_backward),
}


# --- the gated MLP's product: act(G) * U (SwiGLU with act = silu) -------------------------------


def gated_forward(G, U, act="silu"):
    """Y = act(G) * U entry by entry; G (the gate) and U (up) are (N, H). SwiGLU is act = silu
    (Shazeer 2020; Llama's MLP is down(silu(gate x) * up x))."""
    A, ca = ACTIVATIONS[act][0](G)
    return [list(map(mul, a, u)) for a, u in zip(A, U)], (A, ca, U, act)


def gated_backward(dY, cache):
    """Product rule: dU = dY * act(G);  dG = act'(G) (dY * U), act' applied by its backward."""
    A, ca, U, act = cache
    dU = [list(map(mul, dy, a)) for dy, a in zip(dY, A)]
    dG = ACTIVATIONS[act][1]([list(map(mul, dy, u)) for dy, u in zip(dY, U)], ca)
    return dG, dU


# --- rotary position embeddings (RoPE, Su et al. 2021) -----------------------------------------


def rope_table(block_size, hd, theta=10000.0):
    """cos and sin (block_size, hd/2) of the angles p * theta^(-2i/hd): pair i of a head (channels
    i and i + hd/2, the "rotate_half" layout of transformers' Llama) turns by angle p * f_i."""
    inv_freq = [1.0 / theta ** (2 * i / hd) for i in range(hd // 2)]
    cos = [[math.cos(p * f) for f in inv_freq] for p in range(block_size)]
    sin = [[math.sin(p * f) for f in inv_freq] for p in range(block_size)]
    return cos, sin


def rope_forward(X, positions, n_heads, cos, sin):
    """Each head of X (N, n_heads*hd) rotated by its row's position: with x1 = the head's first
    half, x2 = its second half, c = cos[p], s = sin[p] (all hd/2 long):
        y1 = x1 c - x2 s,   y2 = x2 c + x1 s
    (= x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1)). No parameters."""
    return _rotate(X, positions, n_heads, cos, sin, 1.0), (positions, n_heads, cos, sin)


def rope_backward(dY, cache):
    """A rotation's Jacobian is the rotation; its transpose turns back by the same angle:
        dx1 = dy1 c + dy2 s,   dx2 = dy2 c - dy1 s."""
    return _rotate(dY, *cache, -1.0)


def _rotate(X, positions, n_heads, cos, sin, sign):
    """Every channel pair (i, i + hd/2) of every head turned by sign * angle(p, i)."""
    hd = len(X[0]) // n_heads
    half = hd // 2
    Y = []
    for x, p in zip(X, positions):
        c, s = cos[p], [sign * si for si in sin[p]]
        y = []
        for lo in range(0, len(x), hd):
            x1, x2 = x[lo:lo + half], x[lo + half:lo + hd]
            y += [a * ci - b * si for a, b, ci, si in zip(x1, x2, c, s)]
            y += [b * ci + a * si for a, b, ci, si in zip(x1, x2, c, s)]
        Y.append(y)
    return Y


# --- QK-norm: RMSNorm over each head of q or k ---------------------------------------------------


def head_rmsnorm_forward(X, n_heads, gain, eps=1e-5):
    """X (N, n_heads*hd): each head's hd channels RMS-normalized on their own, times one gain
    (hd,) shared by the heads (QK-norm, as OLMo 2 and Qwen 3). rmsnorm_forward over the
    (N*n_heads, hd) rows."""
    hd = len(X[0]) // n_heads
    rows = [x[lo:lo + hd] for x in X for lo in range(0, len(x), hd)]  # (N * n_heads, hd)
    Y, cache = rmsnorm_forward(rows, gain, eps)
    return _join_heads(Y, n_heads), (cache, n_heads)


def head_rmsnorm_backward(dY, cache, dgain=None):
    """rmsnorm_backward over the same (N*n_heads, hd) rows: the gain's gradient sums over every
    position and every head."""
    rcache, n_heads = cache
    hd = len(dY[0]) // n_heads
    rows = [d[lo:lo + hd] for d in dY for lo in range(0, len(d), hd)]
    dX = rmsnorm_backward(rows, rcache, dgain)
    return _join_heads(dX, n_heads)


def _join_heads(rows, n_heads):
    """(N*n_heads, hd) rows back to (N, n_heads*hd): each position's heads side by side."""
    return [list(chain.from_iterable(rows[i:i + n_heads])) for i in range(0, len(rows), n_heads)]


# --- softmax -----------------------------------------------------------------------------------


def softmax(z):
    """exp(z - max z) / sum: subtracting the max changes nothing mathematically and keeps exp()
    from overflowing."""
    m = max(z)
    e = [math.exp(zi - m) for zi in z]
    s = sum(e)
    return [ei / s for ei in e]


# --- causal self-attention over one sequence ---------------------------------------------------


def attention_forward(Q, K, V, n_head, n_kv_head=None):
    """Multi-head causal attention for one sequence, with grouped K/V heads when n_kv_head is
    given (grouped-query attention; n_kv_head = 1 is multi-query attention).

    Q (Tq, C); K, V (Tk, n_kv_head*hd) with Tk >= Tq: the queries are the *last* Tq positions of
    the sequence (Tq == Tk in training; Tq == 1 when decoding with a KV cache). Query i sits at
    position p = Tk - Tq + i and may look at keys 0..p. Query head h (channels h*hd:(h+1)*hd)
    reads K/V head j = h // (n_head / n_kv_head) (consecutive query heads share one, as
    transformers' repeat_kv):
        scores[u] = q . k_u / sqrt(hd) for u <= p   (the causal mask: scores of u > p are
                                                     dropped, exactly as if set to -inf before
                                                     the softmax: their weight is 0)
        a = softmax(scores);  out = sum_u a[u] v_u
    Returns out (Tq, C) and a cache holding every query head's attention weights.
    """
    n_kv_head = n_kv_head or n_head
    Tq, Tk, C = len(Q), len(K), len(Q[0])
    hd = C // n_head
    group = n_head // n_kv_head  # query heads per K/V head
    scale = 1.0 / math.sqrt(hd)
    offset = Tk - Tq
    out = [[0.0] * C for _ in range(Tq)]
    zeros = [0.0] * Tk
    weights = []  # per query head: Tq rows of Tk weights (zeros past the mask)
    VT = transpose(V)  # (kvd, Tk): one transpose; each head's columns are a slice of it
    for j in range(n_kv_head):
        klo, khi = j * hd, (j + 1) * hd
        k = [row[klo:khi] for row in K]  # (Tk, hd)
        vT = VT[klo:khi]  # (hd, Tk)
        for h in range(j * group, (j + 1) * group):
            lo, hi = h * hd, (h + 1) * hd
            A = []
            for i, row in enumerate(Q):  # query i's scores against keys 0..p only: the triangle
                p = offset + i
                A.append(softmax([x * scale for x in dots(row[lo:hi], k[:p + 1])]) + zeros[p + 1:])
            for row, o in zip(out, matmul(A, vT)):  # out_i = sum_u a[i][u] v_u
                row[lo:hi] = o
            weights.append(A)
    return out, (Q, K, V, n_head, weights, n_kv_head)


def attention_backward(dout, cache):
    """Gradients of Q, K, V. Per query head, with s the scaled scores and a = softmax(s):
        da[i][u] = dout_i . v_u          dv_u = sum_i a[i][u] dout_i
        ds[i][u] = a[i][u] (da[i][u] - sum_w a[i][w] da[i][w])     (softmax Jacobian)
        dq_i = scale sum_u ds[i][u] k_u  dk_u = scale sum_i ds[i][u] q_i
    Masked entries have a = 0, hence ds = 0: no gradient crosses the causal mask. A K/V head
    shared by a group of query heads gets the sum of their dk and dv (it is used once by each).
    """
    Q, K, V, n_head, weights, n_kv_head = cache
    Tq, Tk, C = len(Q), len(K), len(Q[0])
    hd = C // n_head
    group = n_head // n_kv_head
    scale = 1.0 / math.sqrt(hd)
    offset, zeros = Tk - Tq, [0.0] * Tk
    dQ = [[0.0] * C for _ in range(Tq)]
    dK = [[0.0] * len(K[0]) for _ in range(Tk)]
    dV = [[0.0] * len(V[0]) for _ in range(Tk)]
    # the columns of Q, K and dout, each head's a slice: three transposes, not three per head
    QT, KT, DT = transpose(Q), transpose(K), transpose(dout)  # (C, Tq), (kvd, Tk), (C, Tq)
    for h, A in enumerate(weights):
        lo, hi = h * hd, (h + 1) * hd
        klo, khi = (h // group) * hd, (h // group + 1) * hd
        v = [row[klo:khi] for row in V]  # (Tk, hd)
        dS = []  # (Tq, Tk), scale folded in
        for i, (a, row) in enumerate(zip(A, dout)):
            p = offset + i
            da = dots(row[lo:hi], v[:p + 1])  # the masked da[i][u > p] would meet a[i][u] = 0
            a_da = sum(map(mul, a, da))
            dS.append([ai * (dai - a_da) * scale for ai, dai in zip(a, da)] + zeros[p + 1:])
        first = h % group == 0  # the group's first query head sets its K/V rows, the rest add
        for dst, src, right in ((dV, transpose(A), DT[lo:hi]),  # dv_u = sum_i a[i][u] dout_i
                                (dK, transpose(dS), QT[lo:hi])):  # dk_u = sum_i ds[i][u] q_i
            for row, g in zip(dst, matmul(src, right)):
                row[klo:khi] = g if first else map(add, row[klo:khi], g)
        for row, g in zip(dQ, matmul(dS, KT[klo:khi])):  # dq_i = sum_u ds[i][u] k_u
            row[lo:hi] = g
    return dQ, dK, dV


# --- loss: mean cross-entropy ------------------------------------------------------------------


def cross_entropy_forward(logits, targets):
    """Mean over positions of -log softmax(logits[n])[targets[n]]; targets of -1 are ignored.

    Computed stably as logsumexp(z) - z[y] with the max subtracted inside the exp.
    Returns (loss, cache); the cache keeps the probabilities for the backward pass.
    """
    total, count, probs = 0.0, 0, []
    for z, y in zip(logits, targets):
        m = max(z)
        e = [math.exp(zi - m) for zi in z]
        s = sum(e)
        probs.append([ei / s for ei in e])
        if y >= 0:
            total += math.log(s) + m - z[y]
            count += 1
    if count == 0:
        raise ValueError("cross-entropy over zero target positions")
    return total / count, (probs, targets, count)


def cross_entropy_backward(dloss, cache):
    """d loss / d z = (softmax(z) - onehot(y)) / count, times the upstream dloss."""
    probs, targets, count = cache
    g = dloss / count
    dlogits = []
    for p, y in zip(probs, targets):
        if y < 0:
            dlogits.append([0.0] * len(p))
            continue
        row = [pi * g for pi in p]
        row[y] -= g
        dlogits.append(row)
    return dlogits
