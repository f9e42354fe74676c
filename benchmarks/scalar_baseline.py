"""Scalar-autograd baseline: the "microgpt" training algorithm on a micrograd-style engine.

This is the speed baseline that puregpt's engine is measured against. Every
number is a Python float wrapped in a ``Value`` node; the forward pass builds a
graph of scalar operations and ``backward()`` walks it in reverse topological
order. It is deliberately an ordinary, idiomatic port of that style (the only
concession to speed is ``__slots__``, which such ports commonly use), so that
the comparison is apples to apples: same algorithm, same random draws, same
losses.

Algorithm (must stay fixed so losses can be compared digit for digit):
  * ``rng = random.Random(seed)``; docs shuffled with ``rng.shuffle``;
    char vocabulary ``sorted(set("".join(docs)))`` plus a BOS token.
  * n_embd 16, n_head 4, n_layer 1, block_size 16; weights ~ N(0, 0.08) drawn
    row by row in the order wte, wpe, lm_head, then per layer attn_wq, attn_wk,
    attn_wv, attn_wo, mlp_fc1, mlp_fc2 (each matrix stored [out][in]).
  * Token-by-token forward with a KV cache, RMSNorm without gain, ReLU MLP,
    no biases, no final norm.
  * Step s trains on docs[s % len(docs)]; loss is the mean next-token
    cross-entropy; Adam (0.85, 0.99, 1e-8) with linearly decaying lr 0.01.

Usage:
    python benchmarks/scalar_baseline.py [--data PATH] [--steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path


# ---------------------------------------------------------------------------
# Scalar autograd
# ---------------------------------------------------------------------------

class Value:
    """A scalar in the computation graph, with its gradient."""

    __slots__ = ("data", "grad", "_children", "_local_grads")

    def __init__(self, data, children=(), local_grads=()):
        self.data = data
        self.grad = 0.0
        self._children = children
        self._local_grads = local_grads

    def __add__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data + other.data, (self, other), (1.0, 1.0))

    def __mul__(self, other):
        other = other if isinstance(other, Value) else Value(other)
        return Value(self.data * other.data, (self, other), (other.data, self.data))

    def __pow__(self, exponent):
        assert isinstance(exponent, (int, float)), "only constant exponents are supported"
        return Value(self.data ** exponent, (self,), (exponent * self.data ** (exponent - 1),))

    def exp(self):
        e = math.exp(self.data)
        return Value(e, (self,), (e,))

    def log(self):
        return Value(math.log(self.data), (self,), (1.0 / self.data,))

    def relu(self):
        return Value(max(0.0, self.data), (self,), (float(self.data > 0),))

    def __neg__(self):
        return self * -1

    def __radd__(self, other):
        return self + other

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return other + (-self)

    def __rmul__(self, other):
        return self * other

    def __truediv__(self, other):
        return self * other ** -1

    def __rtruediv__(self, other):
        return other * self ** -1

    def __repr__(self):
        return f"Value(data={self.data}, grad={self.grad})"

    def backward(self):
        """Accumulate d(self)/d(node) into ``node.grad`` for every node in the graph."""
        topo = []
        visited = set()

        def build(v):
            if v not in visited:
                visited.add(v)
                for child in v._children:
                    build(child)
                topo.append(v)

        build(self)
        self.grad = 1.0
        for v in reversed(topo):
            for child, local_grad in zip(v._children, v._local_grads):
                child.grad += local_grad * v.grad


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

N_EMBD = 16
N_HEAD = 4
N_LAYER = 1
BLOCK_SIZE = 16
HEAD_DIM = N_EMBD // N_HEAD


def matrix(rng, n_out, n_in, std=0.08):
    return [[Value(rng.gauss(0, std)) for _ in range(n_in)] for _ in range(n_out)]


def linear(x, w):
    return [sum(wi * xi for wi, xi in zip(row, x)) for row in w]


def softmax(logits):
    max_val = max(v.data for v in logits)
    exps = [(v - max_val).exp() for v in logits]
    total = sum(exps)
    return [e / total for e in exps]


def rmsnorm(x):
    ms = sum(xi * xi for xi in x) / len(x)
    scale = (ms + 1e-5) ** -0.5
    return [xi * scale for xi in x]


def gpt(sd, token_id, pos_id, keys, values):
    """Forward one token at position ``pos_id``; appends to the KV cache, returns logits."""
    tok_emb = sd["wte"][token_id]
    pos_emb = sd["wpe"][pos_id]
    x = [t + p for t, p in zip(tok_emb, pos_emb)]
    x = rmsnorm(x)

    for li in range(N_LAYER):
        # multi-head causal self-attention
        x_residual = x
        x = rmsnorm(x)
        q = linear(x, sd[f"layer{li}.attn_wq"])
        k = linear(x, sd[f"layer{li}.attn_wk"])
        v = linear(x, sd[f"layer{li}.attn_wv"])
        keys[li].append(k)
        values[li].append(v)
        x_attn = []
        for h in range(N_HEAD):
            hs = h * HEAD_DIM
            q_h = q[hs:hs + HEAD_DIM]
            k_h = [ki[hs:hs + HEAD_DIM] for ki in keys[li]]
            v_h = [vi[hs:hs + HEAD_DIM] for vi in values[li]]
            attn_logits = [
                sum(q_h[j] * k_h[t][j] for j in range(HEAD_DIM)) / HEAD_DIM ** 0.5
                for t in range(len(k_h))
            ]
            attn_weights = softmax(attn_logits)
            head_out = [
                sum(attn_weights[t] * v_h[t][j] for t in range(len(v_h)))
                for j in range(HEAD_DIM)
            ]
            x_attn.extend(head_out)
        x = linear(x_attn, sd[f"layer{li}.attn_wo"])
        x = [a + b for a, b in zip(x, x_residual)]

        # MLP
        x_residual = x
        x = rmsnorm(x)
        x = linear(x, sd[f"layer{li}.mlp_fc1"])
        x = [xi.relu() for xi in x]
        x = linear(x, sd[f"layer{li}.mlp_fc2"])
        x = [a + b for a, b in zip(x, x_residual)]

    return linear(x, sd["lm_head"])


# ---------------------------------------------------------------------------
# Data and training
# ---------------------------------------------------------------------------

def load_docs(path) -> list[str]:
    """Stripped, non-empty lines of a text file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def train(docs: list[str], steps: int, seed: int = 42, log=None,
          *, total_steps: int | None = None) -> dict:
    """Train the scalar-autograd microgpt for ``steps`` steps.

    Returns {"losses": [float per step], "tokens": total predicted positions,
    "seconds": wall time of the training loop only}. ``log``, if given, is
    called with each step's printed-style line.

    ``total_steps`` (default: ``steps``) is the length of the schedule the
    learning rate decays over, lr_t = 0.01 * (1 - s / total_steps); it also
    appears as the denominator of the printed lines. Passing e.g.
    ``steps=3, total_steps=1000`` runs exactly the first three steps of a
    1000-step run.
    """
    if total_steps is None:
        total_steps = steps
    rng = random.Random(seed)
    docs = list(docs)
    rng.shuffle(docs)
    chars = sorted(set("".join(docs)))
    bos = len(chars)
    vocab_size = len(chars) + 1
    stoi = {ch: i for i, ch in enumerate(chars)}

    sd = {
        "wte": matrix(rng, vocab_size, N_EMBD),
        "wpe": matrix(rng, BLOCK_SIZE, N_EMBD),
        "lm_head": matrix(rng, vocab_size, N_EMBD),
    }
    for li in range(N_LAYER):
        sd[f"layer{li}.attn_wq"] = matrix(rng, N_EMBD, N_EMBD)
        sd[f"layer{li}.attn_wk"] = matrix(rng, N_EMBD, N_EMBD)
        sd[f"layer{li}.attn_wv"] = matrix(rng, N_EMBD, N_EMBD)
        sd[f"layer{li}.attn_wo"] = matrix(rng, N_EMBD, N_EMBD)
        sd[f"layer{li}.mlp_fc1"] = matrix(rng, 4 * N_EMBD, N_EMBD)
        sd[f"layer{li}.mlp_fc2"] = matrix(rng, N_EMBD, 4 * N_EMBD)
    params = [p for mat in sd.values() for row in mat for p in row]

    learning_rate, beta1, beta2, eps_adam = 0.01, 0.85, 0.99, 1e-8
    m = [0.0] * len(params)
    v = [0.0] * len(params)

    losses = []
    total_tokens = 0
    t0 = time.perf_counter()
    for step in range(steps):
        doc = docs[step % len(docs)]
        tokens = [bos] + [stoi[ch] for ch in doc] + [bos]
        n = min(BLOCK_SIZE, len(tokens) - 1)

        keys = [[] for _ in range(N_LAYER)]
        values = [[] for _ in range(N_LAYER)]
        step_losses = []
        for pos in range(n):
            token_id, target_id = tokens[pos], tokens[pos + 1]
            logits = gpt(sd, token_id, pos, keys, values)
            probs = softmax(logits)
            step_losses.append(-probs[target_id].log())
        loss = (1 / n) * sum(step_losses)

        loss.backward()

        lr_t = learning_rate * (1 - step / total_steps)
        for i, p in enumerate(params):
            m[i] = beta1 * m[i] + (1 - beta1) * p.grad
            v[i] = beta2 * v[i] + (1 - beta2) * p.grad ** 2
            m_hat = m[i] / (1 - beta1 ** (step + 1))
            v_hat = v[i] / (1 - beta2 ** (step + 1))
            p.data -= lr_t * m_hat / (v_hat ** 0.5 + eps_adam)
            p.grad = 0.0

        total_tokens += n
        losses.append(loss.data)
        line = f"step {step + 1:4d} / {total_steps:4d} | loss {loss.data:.4f}"
        if log is not None:
            log(line)
    seconds = time.perf_counter() - t0

    return {"losses": losses, "tokens": total_tokens, "seconds": seconds}


def _default_data_path() -> Path:
    repo = Path(__file__).resolve().parents[1]
    shared = repo.parent / "shared" / "data" / "names.txt"
    if shared.exists():
        return shared
    return repo / "puregpt" / "data" / "names.txt"


def main(argv=None):
    parser = argparse.ArgumentParser(description="Scalar-autograd microgpt baseline.")
    parser.add_argument("--data", type=Path, default=None,
                        help="text file, one document per line (default: names.txt)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    data = args.data if args.data is not None else _default_data_path()
    docs = load_docs(data)
    result = train(docs, args.steps, seed=args.seed, log=lambda s: print(s, flush=True))
    secs = result["seconds"]
    print(f"{args.steps} steps, {result['tokens']} tokens in {secs:.2f}s: "
          f"{args.steps / secs:.2f} steps/s, {result['tokens'] / secs:.1f} tokens/s")


if __name__ == "__main__":
    main()
