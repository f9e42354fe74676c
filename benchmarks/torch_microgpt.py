"""PyTorch eager (float64, one thread) microgpt: the speed reference puregpt races against.

The same algorithm as `puregpt train --preset microgpt` and benchmarks/scalar_baseline.py, written
the way one would write it in PyTorch: whole-sequence tensor ops, autograd, torch.optim.Adam. It
imports nothing from puregpt, yet reproduces its losses (the benchmark asserts agreement to 1e-9
over every step it compares), and, drawing the samples from the same Python RNG, its samples.

Algorithm (fixed, so that the losses can be compared digit for digit):
  * rng = random.Random(seed); the documents (stripped non-empty lines) shuffled with
    rng.shuffle; vocabulary sorted(set("".join(docs))) plus BOS (id len(chars)).
  * n_embd 16, n_head 4, n_layer 1, block_size 16; weights ~ N(0, 0.08) drawn row by row from
    rng.gauss in the order wte, wpe, lm_head, then per layer attn_wq, attn_wk, attn_wv, attn_wo,
    mlp_fc1, mlp_fc2 (each stored [out][in]).
  * x = rmsnorm(wte[tok] + wpe[pos]); per layer x += attn(rmsnorm(x)); x += mlp(rmsnorm(x))
    (causal multi-head attention, ReLU MLP, RMSNorm without gain, eps 1e-5, no biases);
    logits = x lm_head^T.
  * Step s trains on docs[s % len(docs)] encoded [BOS] + chars + [BOS], truncated to block_size
    predictions; loss = mean cross-entropy; Adam (betas 0.85, 0.99, eps 1e-8) with lr
    0.01 (1 - s / total_steps).
  * Samples: temperature 0.5, drawn with rng.choices from the same rng, up to block_size tokens,
    stopping at BOS.

Usage:
    python benchmarks/torch_microgpt.py [--data PATH] [--steps 1000] [--samples 20] [--seed 42]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

N_EMBD = 16
N_HEAD = 4
N_LAYER = 1
BLOCK_SIZE = 16
HEAD_DIM = N_EMBD // N_HEAD
DTYPE = torch.float64


def load_docs(path) -> list[str]:
    """Stripped, non-empty lines of a text file."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def default_data_path() -> Path:
    repo = Path(__file__).resolve().parents[1]
    shared = repo.parent / "shared" / "data" / "names.txt"
    return shared if shared.exists() else repo / "puregpt" / "data" / "names.txt"


class MicroGPT:
    """Parameters, vocabulary and the RNG of one run (the RNG continues into sampling)."""

    def __init__(self, docs: list[str], seed: int = 42):
        self.rng = random.Random(seed)
        self.docs = list(docs)
        self.rng.shuffle(self.docs)
        self.chars = sorted(set("".join(self.docs)))
        self.bos = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}
        V, C = self.vocab_size, N_EMBD
        shapes = {"wte": (V, C), "wpe": (BLOCK_SIZE, C), "lm_head": (V, C)}
        for l in range(N_LAYER):
            for w in ("attn_wq", "attn_wk", "attn_wv", "attn_wo"):
                shapes[f"layer{l}.{w}"] = (C, C)
            shapes[f"layer{l}.mlp_fc1"] = (4 * C, C)
            shapes[f"layer{l}.mlp_fc2"] = (C, 4 * C)
        self.params = {
            name: torch.tensor([[self.rng.gauss(0, 0.08) for _ in range(cols)]
                                for _ in range(rows)], dtype=DTYPE, requires_grad=True)
            for name, (rows, cols) in shapes.items()}
        self.mask = torch.ones(BLOCK_SIZE, BLOCK_SIZE, dtype=torch.bool).triu(1)

    def encode(self, doc: str) -> list[int]:
        return [self.bos] + [self.stoi[ch] for ch in doc] + [self.bos]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (T, V) of one sequence of token ids idx (T,)."""
        P, T = self.params, idx.shape[0]
        x = _rmsnorm(P["wte"][idx] + P["wpe"][:T])
        for l in range(N_LAYER):
            p = f"layer{l}."
            h = _rmsnorm(x)
            q, k, v = (F.linear(h, P[p + w]).view(T, N_HEAD, HEAD_DIM).transpose(0, 1)
                       for w in ("attn_wq", "attn_wk", "attn_wv"))  # (H, T, hd)
            att = (q @ k.transpose(1, 2)) * (1.0 / math.sqrt(HEAD_DIM))
            att = att.masked_fill(self.mask[:T, :T], float("-inf")).softmax(-1)
            x = x + F.linear((att @ v).transpose(0, 1).reshape(T, N_EMBD), P[p + "attn_wo"])
            h = _rmsnorm(x)
            x = x + F.linear(F.relu(F.linear(h, P[p + "mlp_fc1"])), P[p + "mlp_fc2"])
        return F.linear(x, P["lm_head"])

    def train(self, steps: int, log=None, *, total_steps: int | None = None) -> dict:
        """Train `steps` steps of a `total_steps`-step schedule (default: steps).

        Returns {"losses", "tokens", "seconds"} (seconds: the training loop only)."""
        total_steps = total_steps or steps
        opt = torch.optim.Adam(self.params.values(), lr=0.01, betas=(0.85, 0.99), eps=1e-8)
        losses, tokens = [], 0
        t0 = time.perf_counter()
        for step in range(steps):
            ids = self.encode(self.docs[step % len(self.docs)])
            n = min(BLOCK_SIZE, len(ids) - 1)
            logits = self.forward(torch.tensor(ids[:n]))
            loss = F.cross_entropy(logits, torch.tensor(ids[1:n + 1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.param_groups[0]["lr"] = 0.01 * (1 - step / total_steps)
            opt.step()
            value = loss.item()
            losses.append(value)
            tokens += n
            if log is not None:
                log(f"step {step + 1:4d} / {total_steps:4d} | loss {value:.4f}")
        return {"losses": losses, "tokens": tokens, "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def sample(self, temperature: float = 0.5) -> str:
        """One document: from BOS, up to block_size tokens, stopping at BOS."""
        tokens = [self.bos]
        for _ in range(BLOCK_SIZE):
            logits = self.forward(torch.tensor(tokens[-BLOCK_SIZE:]))[-1]
            probs = (logits / temperature).softmax(-1).tolist()
            token = self.rng.choices(range(self.vocab_size), weights=probs)[0]
            if token == self.bos:
                break
            tokens.append(token)
        return "".join(self.chars[t] for t in tokens[1:])


    @torch.no_grad()
    def decode_greedy(self, context: list[int], max_new_tokens: int) -> list[int]:
        """Greedy KV-cached decoding, as one writes it in PyTorch eager: each step feeds one
        token, appends its keys and values to per-layer caches, and attends over them."""
        P, out = self.params, []
        cache = [[None, None] for _ in range(N_LAYER)]
        tokens = list(context)
        for pos, token in enumerate(tokens):
            if pos >= len(context) - 1 + max_new_tokens:
                break
            x = _rmsnorm(P["wte"][token] + P["wpe"][pos])  # (C,)
            for l in range(N_LAYER):
                p = f"layer{l}."
                h = _rmsnorm(x)
                q, k, v = (F.linear(h, P[p + w]).view(N_HEAD, 1, HEAD_DIM)
                           for w in ("attn_wq", "attn_wk", "attn_wv"))  # (H, 1, hd)
                ks, vs = cache[l]
                ks = k if ks is None else torch.cat([ks, k], 1)  # (H, pos + 1, hd)
                vs = v if vs is None else torch.cat([vs, v], 1)
                cache[l] = [ks, vs]
                att = ((q @ ks.transpose(1, 2)) * (1.0 / math.sqrt(HEAD_DIM))).softmax(-1)
                x = x + F.linear((att @ vs).reshape(N_EMBD), P[p + "attn_wo"])
                h = _rmsnorm(x)
                x = x + F.linear(F.relu(F.linear(h, P[p + "mlp_fc1"])), P[p + "mlp_fc2"])
            if pos >= len(context) - 1:  # past the context: the next token is the argmax
                nxt = int(F.linear(x, P["lm_head"]).argmax())
                out.append(nxt)
                tokens.append(nxt)
        return out


def _rmsnorm(x: torch.Tensor) -> torch.Tensor:
    return x * (x.square().mean(-1, keepdim=True) + 1e-5).rsqrt()


def train(docs: list[str], steps: int, seed: int = 42, log=None, *,
          total_steps: int | None = None, threads: int = 1) -> dict:
    """Like scalar_baseline.train: {"losses", "tokens", "seconds", "model"}."""
    torch.set_num_threads(threads)
    model = MicroGPT(docs, seed)
    result = model.train(steps, log, total_steps=total_steps)
    result["model"] = model
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="PyTorch eager float64 microgpt (one thread).")
    parser.add_argument("--data", type=Path, default=None,
                        help="text file, one document per line (default: names.txt)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no per-step lines")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = MicroGPT(load_docs(args.data or default_data_path()), args.seed)
    print(f"num docs: {len(model.docs)}\nvocab size: {model.vocab_size}\n"
          f"num params: {sum(p.numel() for p in model.params.values())}", flush=True)
    log = None if args.quiet else (lambda line: print(line, flush=True))
    model.train(args.steps, log)
    if args.samples:
        print("--- inference (new, hallucinated names) ---")
        for i in range(args.samples):
            print(f"sample {i + 1:2d}: {model.sample(0.5)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
