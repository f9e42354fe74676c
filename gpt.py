"""The whole GPT algorithm in one file, in pure Python: the puregpt package's `microgpt` preset,
with the package's names and numbers (same data, same losses), written to be read top to bottom.

    python gpt.py [data.txt]   train on one document per line (default: puregpt/data/names.txt)
    STEPS=20 python gpt.py     train for 20 steps instead of 1000 (the lr decays over those 20)

Gradients are derived by hand: an op's forward returns (out, cache); its backward maps d loss /
d out to d loss / d input and adds (+=) its weights' gradients into the d-prefixed buffers.
docs/math.md derives each one from the chain rule; comments link to its sections.
"""
import math
import os
import random
import sys
from operator import mul
from pathlib import Path

n_layer, n_embd, n_head, block_size = 1, 16, 4, 16  # block_size: the longest context
head_dim = n_embd // n_head
init_std, norm_eps = 0.08, 1e-5
lr, beta1, beta2, eps = 0.01, 0.85, 0.99, 1e-8  # Adam; lr: docs/math.md#learning-rate-schedules
temperature, top_k, top_p = 0.5, 0, 1.0  # sampling; top_k = 0 and top_p = 1.0 switch those off

# --- data: one document per stripped non-empty line, shuffled by the seeded rng ---
def load_docs(path, rng):
    docs = [line.strip() for line in Path(path).read_text(encoding="utf-8").split("\n")]
    docs = [doc for doc in docs if doc]
    rng.shuffle(docs)
    return docs

# --- tokenizer: one id per character, and BOS (id len(chars)) around every document ---
def build_vocab(docs):  # chars: the sorted distinct characters; stoi: char -> id; bos
    chars = sorted(set("".join(docs)))
    return chars, {ch: i for i, ch in enumerate(chars)}, len(chars)

# --- parameters: matrices, lists of rows [out][in], ~ N(0, init_std), drawn in this order ---
def init_params(vocab_size, rng):
    shapes = {"wte": (vocab_size, n_embd), "wpe": (block_size, n_embd),
              "lm_head": (vocab_size, n_embd)}
    for l in range(n_layer):
        for name in ("attn_wq", "attn_wk", "attn_wv", "attn_wo"):
            shapes[f"layer{l}.{name}"] = (n_embd, n_embd)
        shapes[f"layer{l}.mlp_fc1"] = (4 * n_embd, n_embd)
        shapes[f"layer{l}.mlp_fc2"] = (n_embd, 4 * n_embd)
    return {name: [[rng.gauss(0, init_std) for _ in range(cols)] for _ in range(rows)]
            for name, (rows, cols) in shapes.items()}

def zeros_like(params):
    return {name: [[0.0] * len(row) for row in W] for name, W in params.items()}

# --- model (forward), each op next to its backward; T positions, C = n_embd, V vocabulary ---
def dot(a, b):
    return sum(map(mul, a, b))  # sum_i a_i b_i: where nearly all the time goes

def add(A, B):  # A + B: a residual, or two gradients meeting (docs/math.md#residual-connection)
    return [[a + b for a, b in zip(row_a, row_b)] for row_a, row_b in zip(A, B)]

def linear(X, W):  # docs/math.md#linear
    return [[dot(w, x) for w in W] for x in X], (X, W)  # Y = X W^T: each row x becomes W x

def linear_backward(dY, cache, dW):  # dX = dY W;  dW += dY^T X
    X, W = cache
    X_cols, W_cols = list(zip(*X)), list(zip(*W))
    for dw_row, dy_col in zip(dW, zip(*dY)):  # dW[o][i] += sum over t of dY[t][o] X[t][i]
        dw_row[:] = [d + dot(dy_col, x_col) for d, x_col in zip(dw_row, X_cols)]
    return [[dot(w_col, dy) for w_col in W_cols] for dy in dY]

def rmsnorm(X):  # y = x r, r = (mean(x^2) + eps)^-1/2 by row (no gain): docs/math.md#rmsnorm
    rstds = [(dot(x, x) / len(x) + norm_eps) ** -0.5 for x in X]
    Y = [[xi * r for xi in x] for x, r in zip(X, rstds)]
    return Y, (Y, rstds)

def rmsnorm_backward(dY, cache):
    """dr/dx_i = -r^3 x_i / C, so dx = r (dy - y mean(dy * y)); the 2nd term flows through r."""
    Y, rstds = cache
    projs = [dot(dy, y) / len(y) for dy, y in zip(dY, Y)]  # mean(dy * y), row by row
    return [[(g - yi * proj) * r for g, yi in zip(dy, y)]
            for dy, y, r, proj in zip(dY, Y, rstds, projs)]

def relu(X):  # docs/math.md#relu
    return [[x if x > 0.0 else 0.0 for x in row] for row in X], X

def relu_backward(dY, X):  # d relu(x) / dx = 1 where x > 0, else 0
    return [[g if x > 0.0 else 0.0 for g, x in zip(dy, row)] for dy, row in zip(dY, X)]

def softmax(z):  # docs/math.md#softmax
    m = max(z)  # exp(z - max z) / sum: the same numbers, but exp cannot overflow
    e = [math.exp(zi - m) for zi in z]
    s = sum(e)
    return [ei / s for ei in e]

def heads(M):  # the (T, head_dim) slices of M (T, C), one per head
    return [[row[h * head_dim:(h + 1) * head_dim] for row in M] for h in range(n_head)]

def attention(Q, K, V):  # docs/math.md#causal-self-attention
    """Causal self-attention, per head: s[t][u] = q_t . k_u / sqrt(head_dim), masked to -inf for
    u > t (no looking ahead); a[t] = softmax(s[t]); out_t = sum over u of a[t][u] v_u."""
    T, scale = len(Q), 1 / math.sqrt(head_dim)
    out, weights = [[] for _ in range(T)], []
    for q, k, v in zip(heads(Q), heads(K), heads(V)):
        A = [softmax([dot(k[u], q[t]) * scale if u <= t else -math.inf for u in range(T)])
             for t in range(T)]  # exp(-inf) = 0: the future gets weight exactly 0
        for t in range(T):  # concatenate the heads' outputs
            out[t] += [sum(A[t][u] * v[u][j] for u in range(T)) for j in range(head_dim)]
        weights.append(A)
    return out, (Q, K, V, weights)

def attention_backward(dout, cache):
    """Per head: dv_u = sum_t a[t][u] dout_t;  da[t][u] = dout_t . v_u;
    ds[t][u] = a[t][u] (da[t][u] - sum_w a[t][w] da[t][w])   (the softmax's Jacobian);
    dq_t = scale sum_u ds[t][u] k_u;  dk_u = scale sum_t ds[t][u] q_t.
    Masked entries have a = 0, so ds = 0 there: no gradient flows back across the mask."""
    Q, K, V, weights = cache
    T, scale = len(Q), 1 / math.sqrt(head_dim)
    dQ, dK, dV = [[] for _ in range(T)], [[] for _ in range(T)], [[] for _ in range(T)]
    for q, k, v, do, A in zip(heads(Q), heads(K), heads(V), heads(dout), weights):
        dA = [[dot(do[t], v[u]) for u in range(T)] for t in range(T)]  # da[t][u]
        a_da = [dot(a_t, da_t) for a_t, da_t in zip(A, dA)]  # sum_w a[t][w] da[t][w]
        dS = [[a * (d - c) * scale for a, d in zip(a_t, da_t)]  # ds[t][u], times scale
              for a_t, da_t, c in zip(A, dA, a_da)]
        for u in range(T):
            dV[u] += [sum(do[t][j] * A[t][u] for t in range(T)) for j in range(head_dim)]
            dK[u] += [sum(q[t][j] * dS[t][u] for t in range(T)) for j in range(head_dim)]
        for t in range(T):
            dQ[t] += [sum(k[u][j] * dS[t][u] for u in range(T)) for j in range(head_dim)]
    return dQ, dK, dV

def forward(params, tokens):  # logits (T, V) at every position of one sequence, and caches
    cache = {"tokens": tokens}
    x = add([params["wte"][tok] for tok in tokens], params["wpe"][:len(tokens)])  # tok + pos
    x, cache["emb_norm"] = rmsnorm(x)
    for l in range(n_layer):
        p = f"layer{l}."
        h, cache[p + "attn_norm"] = rmsnorm(x)  # pre-norm attention, with a residual
        q, cache[p + "attn_wq"] = linear(h, params[p + "attn_wq"])
        k, cache[p + "attn_wk"] = linear(h, params[p + "attn_wk"])
        v, cache[p + "attn_wv"] = linear(h, params[p + "attn_wv"])
        h, cache[p + "attention"] = attention(q, k, v)
        h, cache[p + "attn_wo"] = linear(h, params[p + "attn_wo"])
        x = add(x, h)
        h, cache[p + "mlp_norm"] = rmsnorm(x)  # pre-norm MLP, with a residual
        h, cache[p + "mlp_fc1"] = linear(h, params[p + "mlp_fc1"])  # (T, 4C)
        h, cache[p + "relu"] = relu(h)
        h, cache[p + "mlp_fc2"] = linear(h, params[p + "mlp_fc2"])  # (T, C)
        x = add(x, h)
    logits, cache["lm_head"] = linear(x, params["lm_head"])
    return logits, cache

# --- loss: mean cross-entropy of the next token (docs/math.md#cross-entropy) ---
def cross_entropy(logits, targets):  # mean over t of -log softmax(z_t)[y_t]
    probs = [softmax(z) for z in logits]
    loss = -sum(math.log(p[y]) for p, y in zip(probs, targets)) / len(targets)
    return loss, (probs, targets)

def cross_entropy_backward(cache):  # d loss / d z_t = (softmax(z_t) - onehot(y_t)) / T
    probs, targets = cache
    return [[(p - 1.0 if i == y else p) / len(targets) for i, p in enumerate(p_t)]
            for p_t, y in zip(probs, targets)]

# --- backward: the forward pass in reverse (docs/math.md#the-model-as-equations) ---
def backward(dlogits, cache, params):
    grads = zeros_like(params)
    dx = linear_backward(dlogits, cache["lm_head"], grads["lm_head"])  # logits = x lm_head^T
    for l in reversed(range(n_layer)):
        p = f"layer{l}."
        # x = x + mlp_fc2(relu(mlp_fc1(mlp_norm(x)))): d/dx = identity (residual) + MLP path
        dh = linear_backward(dx, cache[p + "mlp_fc2"], grads[p + "mlp_fc2"])  # dh = dx fc2
        dh = relu_backward(dh, cache[p + "relu"])  # kept only where fc1's output was > 0
        dh = linear_backward(dh, cache[p + "mlp_fc1"], grads[p + "mlp_fc1"])  # dh = dh fc1
        dx = add(dx, rmsnorm_backward(dh, cache[p + "mlp_norm"]))  # residual + MLP path
        # x = x + attn_wo(attention(q, k, v)), q, k, v = attn_wq/wk/wv(attn_norm(x)): likewise
        dh = linear_backward(dx, cache[p + "attn_wo"], grads[p + "attn_wo"])  # dh = dx wo
        dq, dk, dv = attention_backward(dh, cache[p + "attention"])  # softmax, causal mask
        # attn_norm(x) fed q, k and v: its gradient is the sum of the three paths
        dh = linear_backward(dq, cache[p + "attn_wq"], grads[p + "attn_wq"])  # dq wq
        dh = add(dh, linear_backward(dk, cache[p + "attn_wk"], grads[p + "attn_wk"]))  # + dk wk
        dh = add(dh, linear_backward(dv, cache[p + "attn_wv"], grads[p + "attn_wv"]))  # + dv wv
        dx = add(dx, rmsnorm_backward(dh, cache[p + "attn_norm"]))  # residual + attention path
    dx = rmsnorm_backward(dx, cache["emb_norm"])  # x = rmsnorm(wte[tok] + wpe[pos])
    # x = wte[tok] + wpe[pos]: a scatter-add into both tables (docs/math.md#embedding-lookup)
    for pos, (tok, dx_t) in enumerate(zip(cache["tokens"], dx)):
        grads["wte"][tok] = [g + d for g, d in zip(grads["wte"][tok], dx_t)]
        grads["wpe"][pos] = [g + d for g, d in zip(grads["wpe"][pos], dx_t)]
    return grads

# --- optimizer: Adam with bias correction (docs/math.md#adam-with-bias-correction) ---
def adam(params, grads, m, v, t, lr_t):  # step t = 1, 2, ... of every weight, in place
    for name, W in params.items():
        for w, g, m_row, v_row in zip(W, grads[name], m[name], v[name]):
            m_row[:] = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m_row, g)]  # avg g
            v_row[:] = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v_row, g)]  # avg g^2
            # m / (1 - beta1^t), v / (1 - beta2^t): undo the pull towards their zero start
            w[:] = [wi - lr_t * (mi / (1 - beta1 ** t)) / (math.sqrt(vi / (1 - beta2 ** t)) + eps)
                    for wi, mi, vi in zip(w, m_row, v_row)]

# --- training loop: one document per step ---
def train(params, docs, stoi, bos, steps):
    m, v, losses = zeros_like(params), zeros_like(params), []  # Adam's moments
    for step in range(steps):
        tokens = [bos] + [stoi[ch] for ch in docs[step % len(docs)]] + [bos]  # encode_doc
        n = min(block_size, len(tokens) - 1)  # tokens 0..n-1 predict tokens 1..n
        logits, cache = forward(params, tokens[:n])
        loss, loss_cache = cross_entropy(logits, tokens[1:n + 1])
        grads = backward(cross_entropy_backward(loss_cache), cache, params)
        adam(params, grads, m, v, step + 1, lr * (1 - step / steps))  # lr: linear decay to 0
        print(f"step {step + 1:4d} / {steps:4d} | loss {loss:.4f}", flush=True)
        losses.append(loss)
    return losses

# --- sampling: temperature, top-k, top-p; stop at BOS or after block_size tokens ---
def shape_probs(logits):  # the next token's distribution, reshaped
    probs = softmax([z / temperature for z in logits])  # temperature < 1 sharpens, > 1 flattens
    keep = sorted(range(len(probs)), key=lambda i: -probs[i])  # most likely first
    if top_k > 0:  # top-k: only the k most likely tokens
        keep = keep[:top_k]
    if top_p < 1.0:  # top-p (nucleus): the fewest of those whose share of their mass >= top_p
        kept_mass, mass, n = sum(probs[i] for i in keep), 0.0, 0
        while n < len(keep) and mass < top_p:
            mass += probs[keep[n]] / kept_mass
            n += 1
        keep = keep[:n]
    return [p if i in keep else 0.0 for i, p in enumerate(probs)]  # choices() renormalizes

def sample(params, bos, rng):  # the token ids of a new document, drawn one at a time
    tokens = [bos]
    while len(tokens) <= block_size:  # the whole context is rerun for each new token
        probs = shape_probs(forward(params, tokens)[0][-1])
        token = rng.choices(range(len(probs)), weights=probs)[0]
        if token == bos:
            break
        tokens.append(token)
    return tokens[1:]

if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "puregpt/data/names.txt"
    rng = random.Random(42)  # the one RNG: shuffles the docs, draws the weights, then samples
    docs = load_docs(path, rng)
    chars, stoi, bos = build_vocab(docs)
    params = init_params(len(chars) + 1, rng)
    train(params, docs, stoi, bos, int(os.environ.get("STEPS", 1000)))
    print("--- inference (new, hallucinated names) ---")
    for i in range(20):
        print(f"sample {i + 1:2d}: {''.join(chars[t] for t in sample(params, bos, rng))}")
