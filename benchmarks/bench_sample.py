"""sample: greedy generation with the KV cache (puregpt.sample.generate) against a full forward
over the growing sequence for every token, on the train-large model; identical tokens asserted."""

from __future__ import annotations

import random

from bench_train_large import large_setup
from harness import alternate, fmt, md_table, say
from puregpt import model
from puregpt.sample import generate

FULL = {"sample_contexts": 4, "sample_rounds": 2}
QUICK = {"sample_contexts": 2, "sample_rounds": 1}


def naive_generate(params, cfg, context, max_new_tokens):
    """Greedy decoding without a cache: the full forward over the growing sequence each token
    (the last block_size tokens, at positions 0.., as puregpt.sample.generate slides)."""
    tokens, out = list(context), []
    for _ in range(max_new_tokens):
        logits, _ = model.forward(params, cfg, [tokens[-cfg.block_size:]])
        last = logits[-1]
        token = max(range(len(last)), key=last.__getitem__)
        out.append(token)
        tokens.append(token)
    return out


def run(sz: dict, args) -> dict:
    cfg, tc, params, batch, path, what, corpus = large_setup(sz)
    tok = corpus.tokenizer
    contexts = [[tok.stoi[ch]] for ch in "TAMWSRBH"[:sz["sample_contexts"]]]
    new = cfg.block_size - 1  # fills the context exactly: every token through the cache

    def kv_cache(r):
        say(f"  sample: kv_cache, {len(contexts)} x {new} tokens")
        return [list(generate(params, cfg, c, new, random.Random(0), greedy=True))
                for c in contexts]

    def naive(r):
        say(f"  sample: naive, {len(contexts)} x {new} tokens")
        return [naive_generate(params, cfg, c, new) for c in contexts]

    outs, times = alternate({"kv_cache": kv_cache, "naive": naive}, sz["sample_rounds"])
    for kind, runs in outs.items():
        assert all(res == runs[0] for res in runs), f"{kind} decoding is not deterministic"
    assert outs["kv_cache"][0] == outs["naive"][0], "KV-cached and naive greedy outputs differ"
    n_tokens = len(contexts) * new
    kv, naive_s = min(times["kv_cache"]), min(times["naive"])
    return {"config": {**sz["large"], "vocab_size": cfg.vocab_size},
            "params": model.num_params(params), "weights": "random init (seed 42)",
            "contexts": len(contexts), "new_tokens_per_context": new, "tokens": n_tokens,
            "kv_cache": {"tokens_per_s": n_tokens / kv, "seconds_all": times["kv_cache"]},
            "naive": {"tokens_per_s": n_tokens / naive_s, "seconds_all": times["naive"]},
            "speedup": naive_s / kv, "identical": True,
            "example": tok.decode(contexts[0] + outs["kv_cache"][0][0])}


def table(r: dict) -> str:
    c = r["config"]
    rows = [["KV cache (puregpt.sample.generate)", fmt(r["kv_cache"]["tokens_per_s"]),
             fmt(r["speedup"]) + "x"],
            ["full forward per token (naive)", fmt(r["naive"]["tokens_per_s"]), "1"]]
    return (f"### sample: greedy, n_embd {c['n_embd']}, n_layer {c['n_layer']}, block "
            f"{c['block_size']} ({r['params']:,} params), {r['contexts']} contexts x "
            f"{r['new_tokens_per_context']} new tokens\n\n"
            + md_table(["decoder", "tokens/s (best)", "speedup"], rows)
            + f"\n\nIdentical tokens: {fmt(r['identical'])}.")


def summary_rows(r: dict) -> list:
    return [["sample", f"KV cache {fmt(r['kv_cache']['tokens_per_s'])} tokens/s vs full "
                       f"re-forward {fmt(r['naive']['tokens_per_s'])} (identical tokens)",
             fmt(r["speedup"]) + "x", "-", "-"]]
