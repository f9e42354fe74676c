"""sample: greedy generation with the KV cache (puregpt.sample.generate) against a full forward
over the growing sequence for every token, on the train-large model; identical tokens asserted.
Then microgpt-size decoding: puregpt.decode.Decoder (prepared weights, one process) and
sample.generate against PyTorch eager's KV-cached greedy decoding of the same model (the same
weights: torch_microgpt's seed-42 init), identical tokens asserted."""

from __future__ import annotations

import random

from bench_train_large import large_setup
from harness import alternate, fmt, md_table, names_path, say, torch_skipped
from puregpt import model
from puregpt.config import GPTConfig, preset
from puregpt.decode import Decoder
from puregpt.sample import generate

FULL = {"sample_contexts": 4, "sample_rounds": 2, "micro_contexts": 26, "micro_rounds": 5}
QUICK = {"sample_contexts": 2, "sample_rounds": 1, "micro_contexts": 2, "micro_rounds": 1}
MICRO_TARGET = 1.0  # issue 16: KV-cached tokens/s at least PyTorch eager's


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
    micro = micro_decode(sz, args)
    return {"microgpt": micro, "config": {**sz["large"], "vocab_size": cfg.vocab_size},
            "params": model.num_params(params), "weights": "random init (seed 42)",
            "contexts": len(contexts), "new_tokens_per_context": new, "tokens": n_tokens,
            "kv_cache": {"tokens_per_s": n_tokens / kv, "seconds_all": times["kv_cache"]},
            "naive": {"tokens_per_s": n_tokens / naive_s, "seconds_all": times["naive"]},
            "speedup": naive_s / kv, "identical": True,
            "example": tok.decode(contexts[0] + outs["kv_cache"][0][0])}


def micro_decode(sz: dict, args) -> dict:
    """Greedy KV-cached decoding at microgpt's size: each context is BOS and a letter, decoded
    to the end of the block (14 new tokens)."""
    skipped = torch_skipped(args)
    if skipped:
        return {"skipped": skipped}
    import torch
    from scalar_baseline import load_docs
    from torch_microgpt import MicroGPT
    m = MicroGPT(load_docs(names_path()))
    cfg = GPTConfig(vocab_size=m.vocab_size, **preset("microgpt")["model"])
    params = {name: t.tolist() for name, t in m.params.items()}
    contexts = [[m.bos, m.stoi[ch]] for ch in "abcdefghijklmnopqrstuvwxyz"[:sz["micro_contexts"]]]
    new = cfg.block_size - 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the fastest torch setting at this size
    decoder = Decoder(params, cfg)
    try:
        outs, times = alternate({
            "decoder": lambda r: [list(decoder.generate(c, new, random.Random(0), greedy=True))
                                  for c in contexts],
            "generate": lambda r: [list(generate(params, cfg, c, new, random.Random(0),
                                                 greedy=True)) for c in contexts],
            "torch": lambda r: [m.decode_greedy(c, new) for c in contexts]},
            sz["micro_rounds"])
    finally:
        decoder.close()
        torch.set_num_threads(threads)
    ref = outs["torch"][0]
    identical = all(run == ref for runs in outs.values() for run in runs)
    assert identical, "puregpt and PyTorch greedy decoding differ"
    n_tokens = len(contexts) * new
    rates = {k: n_tokens / min(v) for k, v in times.items()}
    return {"contexts": len(contexts), "new_tokens_per_context": new, "tokens": n_tokens,
            "tokens_per_s": rates, "seconds_all": times, "identical": identical,
            "decoder_over_torch": rates["decoder"] / rates["torch"],
            "generate_over_torch": rates["generate"] / rates["torch"], "target": MICRO_TARGET}


def table(r: dict) -> str:
    c = r["config"]
    rows = [["KV cache (puregpt.sample.generate)", fmt(r["kv_cache"]["tokens_per_s"]),
             fmt(r["speedup"]) + "x"],
            ["full forward per token (naive)", fmt(r["naive"]["tokens_per_s"]), "1"]]
    return (f"### sample: greedy, n_embd {c['n_embd']}, n_layer {c['n_layer']}, block "
            f"{c['block_size']} ({r['params']:,} params), {r['contexts']} contexts x "
            f"{r['new_tokens_per_context']} new tokens\n\n"
            + md_table(["decoder", "tokens/s (best)", "speedup"], rows)
            + f"\n\nIdentical tokens: {fmt(r['identical'])}." + micro_table(r["microgpt"]))


def micro_table(m: dict) -> str:
    if "skipped" in m:
        return f"\n\nmicrogpt decoding vs PyTorch: skipped: {m['skipped']}."
    rate = m["tokens_per_s"]
    rows = [["puregpt.decode.Decoder (prepared weights)", fmt(rate["decoder"]),
             fmt(m["decoder_over_torch"]) + "x"],
            ["puregpt.sample.generate (model.forward)", fmt(rate["generate"]),
             fmt(m["generate_over_torch"]) + "x"],
            ["PyTorch eager, KV cache, 1 thread", fmt(rate["torch"]), "1"]]
    return (f"\n\n### sample: microgpt-size greedy KV-cached decoding, {m['contexts']} contexts "
            f"x {m['new_tokens_per_context']} new tokens\n\n"
            + md_table(["decoder", "tokens/s (best)", "vs PyTorch"], rows)
            + f"\n\nIdentical tokens: {fmt(m['identical'])}.")


def summary_rows(r: dict) -> list:
    return [["sample", f"KV cache {fmt(r['kv_cache']['tokens_per_s'])} tokens/s vs full "
                       f"re-forward {fmt(r['naive']['tokens_per_s'])} (identical tokens)",
             fmt(r["speedup"]) + "x", "-", "-"]] + micro_rows(r["microgpt"])


def micro_rows(m: dict) -> list:
    if "skipped" in m:
        return []
    return [["sample", f"microgpt-size KV-cached decoding: puregpt (prepared weights) "
                       f"{fmt(m['tokens_per_s']['decoder'])} tokens/s vs PyTorch eager "
                       f"{fmt(m['tokens_per_s']['torch'])}", fmt(m["decoder_over_torch"]) + "x",
             f">= {MICRO_TARGET:g}x", fmt(m["decoder_over_torch"] >= MICRO_TARGET)]]
