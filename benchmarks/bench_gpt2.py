"""gpt2: a random model of GPT-2 124M's shape (12 layers, n_embd 768, 12 heads, 1,024 positions,
the real 50,257-token vocabulary): `puregpt import-hf` of a Hugging Face directory, loading the
checkpoint ready to sample, and greedy KV-cached decoding with 1 and 2 processes (tokens asserted
identical) in each row layout (array, the default at this size on one process; mixed, the
default on two; tuple). Each step runs in a fresh process (`run.py _gpt2-child`) that reports
its wall and CPU seconds and its peak RSS, so a loaded machine shows in the gap between the two
clocks.

The directory is written directly (no torch): config.json, merges.txt + vocab.json (256 byte
tokens, 50,000 merges of byte pairs, <|endoftext|>) and model.safetensors in F32 whose weights
are random bits with a fixed exponent: uniform magnitudes in [2^-6, 2^-5), random signs (std
~0.024, about GPT-2's 0.02), LayerNorm gains 1 and biases 0. Building it costs a few seconds.
"""

from __future__ import annotations

import json
import os
import random
import resource
import struct
import tempfile
import time
from array import array

from bench_memory import PssPeak, peak_rss_kb
from harness import child_command, fmt, md_table, run_process, say

FULL = {"gpt2_layers": 12, "gpt2_embd": 768, "gpt2_heads": 12, "gpt2_vocab": 50257,
        "gpt2_tokens": 8}
QUICK = {"gpt2_layers": 2, "gpt2_embd": 64, "gpt2_heads": 4, "gpt2_vocab": 1000,
         "gpt2_tokens": 3}  # (at least 2: tokens/s is timed from the first)
BLOCK = 1024
PROMPT = "Hello"


def add_arguments(group) -> None:
    from harness import size_options
    size_options(group, FULL, QUICK, "gpt2_layers", "gpt2_embd", "gpt2_tokens")


# --- building the directory ----------------------------------------------------------------


def _tokenizer(vocab: int):
    from puregpt.bpe import BPETokenizer, bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    encoder = {c: i for i, c in enumerate(chars)}
    merges = []
    for a in chars:  # merges of byte pairs: any pair of existing tokens is a valid merge
        for b in chars:
            if len(encoder) >= vocab - 1:
                break
            merges.append((a, b))
            encoder[a + b] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    return BPETokenizer(encoder, merges)


def _random_f32(rng: random.Random, n: int) -> bytes:
    """n little-endian float32s of magnitude in [2^-6, 2^-5), random sign and mantissa: random
    bytes whose top 9 bits (after the sign) are set to the exponent 121, at C speed."""
    buf = bytearray(rng.randbytes(4 * n))
    buf[3::4] = buf[3::4].translate(bytes((b & 0x80) | 0x3C for b in range(256)))
    buf[2::4] = buf[2::4].translate(bytes(b | 0x80 for b in range(256)))
    return bytes(buf)


def build_hf_dir(out: str, n_layer: int, C: int, n_head: int, vocab: int, seed: int = 0) -> int:
    """Write a random GPT-2-shaped Hugging Face directory; returns its number of parameters."""
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    _tokenizer(vocab).save(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                   "vocab_size": vocab, "n_positions": BLOCK, "n_embd": C, "n_layer": n_layer,
                   "n_head": n_head, "activation_function": "gelu_new",
                   "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                   "bos_token_id": vocab - 1, "eos_token_id": vocab - 1}, f)
    shapes = [("transformer.wte.weight", [vocab, C], "w"), ("transformer.wpe.weight",
                                                             [BLOCK, C], "w")]
    for l in range(n_layer):
        h = f"transformer.h.{l}."
        shapes += [(h + "ln_1.weight", [C], 1), (h + "ln_1.bias", [C], 0),
                   (h + "attn.c_attn.weight", [C, 3 * C], "w"), (h + "attn.c_attn.bias",
                                                                 [3 * C], 0),
                   (h + "attn.c_proj.weight", [C, C], "w"), (h + "attn.c_proj.bias", [C], 0),
                   (h + "ln_2.weight", [C], 1), (h + "ln_2.bias", [C], 0),
                   (h + "mlp.c_fc.weight", [C, 4 * C], "w"), (h + "mlp.c_fc.bias", [4 * C], 0),
                   (h + "mlp.c_proj.weight", [4 * C, C], "w"), (h + "mlp.c_proj.bias", [C], 0)]
    shapes += [("transformer.ln_f.weight", [C], 1), ("transformer.ln_f.bias", [C], 0)]
    header, at, count = {}, 0, 0
    for name, shape, _ in shapes:
        n = shape[0] * (shape[1] if len(shape) == 2 else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + 4 * n]}
        at, count = at + 4 * n, count + n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, kind in shapes:
            n = shape[0] * (shape[1] if len(shape) == 2 else 1)
            f.write(_random_f32(rng, n) if kind == "w" else array("f", [float(kind)] * n)
                    .tobytes())
    return count


# --- the fresh processes -------------------------------------------------------------------


def _clocks(t0: float, c0: float) -> dict:
    return {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def child(words: list[str]) -> None:
    """`run.py _gpt2-child WHAT ...` in a fresh process; prints one JSON line.
    import HF_DIR OUT | decode CKPT LAYOUT WORKERS TOKENS."""
    t0, c0 = time.perf_counter(), time.process_time()
    info = {"what": words[0]}
    if words[0] == "import":
        from puregpt.cli import main
        main(["import-hf", words[1], words[2]])
        info.update(_clocks(t0, c0))
    else:
        from puregpt.checkpoint import load_checkpoint
        from puregpt.decode import Decoder
        path, layout, workers, n_new = words[1], words[2], int(words[3]), int(words[4])
        with PssPeak() as together:  # this process and its workers, shared pages once
            ckpt = load_checkpoint(path, rows="array")  # no float objects: the decoder makes them
            info["load"] = _clocks(t0, c0)
            decoder = Decoder(ckpt.params, ckpt.config, layout, workers, consume=True)  # as sample
            del ckpt.params  # the decoder holds what it needs: what stays is the decoder's memory
            info["ready"] = _clocks(t0, c0)
            context = ckpt.tokenizer.encode(PROMPT)
            t1, c1 = time.perf_counter(), time.process_time()
            tokens, stamps = [], []  # wall and CPU clocks at each new token
            with decoder:
                for token in decoder.generate(context, n_new, random.Random(0), greedy=True):
                    tokens.append(token)
                    stamps.append((time.perf_counter(), time.process_time()))
            info["decode"] = _clocks(t1, c1)
        info["peak_pss_all_kb"] = together.peak_kb
        # after the first token (the prompt's positions fed), each token is one position
        info["per_token"] = {"wall_s": (stamps[-1][0] - stamps[0][0]) / (n_new - 1),
                             "cpu_s": (stamps[-1][1] - stamps[0][1]) / (n_new - 1)}
        info.update(tokens=tokens, context=len(context), positions=len(context) + n_new - 1)
    info["peak_rss_kb"] = peak_rss_kb()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    info["children_peak_rss_kb"] = children.ru_maxrss  # the largest worker's (Linux: kB)
    info["children_cpu_s"] = children.ru_utime + children.ru_stime
    print(json.dumps(info))


# (name, layout, processes): array rows (the default on one process at GPT-2's size), mixed rows
# (the default on several), tuple rows (the fastest, the most memory)
RUNS = (("compact", "array", 1), ("compact_two", "array", 2), ("mixed", "mixed", 1),
        ("mixed_two", "mixed", 2), ("one", "tuple", 1), ("two", "tuple", 2))
WHAT = {"compact": "array rows (the default), 1 process", "compact_two": "array rows, 2 processes",
        "mixed": "mixed rows, 1 process", "mixed_two": "mixed rows (the default), 2 processes",
        "one": "tuple rows, 1 process", "two": "tuple rows, 2 processes"}


def _child(*words) -> dict:
    return json.loads(run_process(child_command("gpt2", *map(str, words))).splitlines()[-1])


def run(sz: dict, args) -> dict:
    L, C, H, V = sz["gpt2_layers"], sz["gpt2_embd"], sz["gpt2_heads"], sz["gpt2_vocab"]
    n_new = sz["gpt2_tokens"]
    with tempfile.TemporaryDirectory(prefix="puregpt-gpt2-") as tmp:
        hf_dir, ckpt = os.path.join(tmp, "hf"), os.path.join(tmp, "gpt2.safetensors")
        say(f"  gpt2: writing a random {L}-layer, n_embd {C}, vocab {V:,} directory")
        t0 = time.perf_counter()
        params = build_hf_dir(hf_dir, L, C, H, V)
        build_s = time.perf_counter() - t0
        say(f"  gpt2: import-hf ({params:,} params)")
        imp = _child("import", hf_dir, ckpt)
        runs = {}
        for name, layout, workers in RUNS:
            say(f"  gpt2: decode {n_new} tokens, {layout} rows, {workers} process(es)")
            runs[name] = _child("decode", ckpt, layout, workers, n_new)
    ref = runs["compact"]["tokens"]
    identical = all(r["tokens"] == ref for r in runs.values())
    assert identical, {k: r["tokens"] for k, r in runs.items()}
    for r in runs.values():
        r["tokens_per_s"] = 1.0 / r["per_token"]["wall_s"]
        # every process's CPU: positions decoded per CPU-second (includes the workers' setup)
        r["tokens_per_cpu_s"] = r["positions"] / (r["decode"]["cpu_s"] + r["children_cpu_s"])
        r["bytes_per_param"] = 1024 * r["peak_rss_kb"] / params
        r["bytes_per_param_all_processes"] = (1024 * (r["peak_rss_kb"]
                                                      + r["children_peak_rss_kb"]
                                                      * (r["what"] == "decode")) / params)
        # the processes' memory together, each shared page once (PSS; None without /proc)
        pss = r.get("peak_pss_all_kb")
        r["bytes_per_param_together"] = 1024 * pss / params if pss else None
    imp["bytes_per_param"] = 1024 * max(imp["peak_rss_kb"], imp["children_peak_rss_kb"]) / params
    return {"config": {"n_layer": L, "n_embd": C, "n_head": H, "vocab_size": V,
                       "block_size": BLOCK},
            "params": params, "build_s": build_s, "new_tokens": n_new, "prompt": PROMPT,
            "import_hf": imp, "decode": runs, "identical_tokens": identical,
            "loadavg": list(os.getloadavg())}


def table(r: dict) -> str:
    c, imp, d = r["config"], r["import_hf"], r["decode"]
    rows = [["import-hf (to a checkpoint)", f"{fmt(imp['wall_s'])} s", f"{fmt(imp['cpu_s'])} s",
             "-", fmt(imp["bytes_per_param"])]]
    for name, what in WHAT.items():
        x = d[name]
        rows.append([f"load + prepare, {what}", f"{fmt(x['ready']['wall_s'])} s",
                     f"{fmt(x['ready']['cpu_s'])} s", f"{fmt(x['tokens_per_s'])} tok/s "
                     f"({fmt(x['tokens_per_cpu_s'])} per CPU-s)",
                     f"{fmt(x['bytes_per_param'])} (together: "
                     f"{fmt(x['bytes_per_param_together'])} PSS, "
                     f"{fmt(x['bytes_per_param_all_processes'])} RSS summed)"])
    return (f"### gpt2: random GPT-2 shape, n_layer {c['n_layer']}, n_embd {c['n_embd']}, vocab "
            f"{c['vocab_size']:,} ({r['params']:,} params), greedy, {r['new_tokens']} new "
            f"tokens\n\n"
            + md_table(["step", "wall", "CPU (main process)", "decoding", "peak RSS B/param"],
                       rows)
            + f"\n\nIdentical tokens in every layout and process count: "
              f"{fmt(r['identical_tokens'])}. Load average at the end: "
              f"{', '.join(f'{x:.1f}' for x in r['loadavg'])}.")


TARGETS = {"load_s": 5.0, "import_s": 10.0, "two_tokens_per_s": 1.0, "one_tokens_per_s": 0.5,
           "bytes_per_param": 20.0}


def summary_rows(r: dict) -> list:
    """The targets, checked on the default layout for GPT-2's size at each process count
    (decode.default_layout: array rows on 1 process, mixed rows on 2): load time, speed and
    memory in the same runs; the other layouts shown beside them. Memory: the larger of the
    largest process's peak RSS and the peak of all processes' PSS together (each page a forked
    worker shares with its parent counted once; where /proc has no PSS, their RSS summed,
    which counts those pages twice)."""
    d, imp, t = r["decode"], r["import_hf"], TARGETS
    one, two = d["compact"], d["mixed_two"]

    def together(x):
        pss = x.get("bytes_per_param_together")
        return pss if pss is not None else x["bytes_per_param_all_processes"]
    worst = max(one["bytes_per_param"], two["bytes_per_param"],
                two["bytes_per_param_all_processes"] - two["bytes_per_param"], together(two))
    return [["gpt2 load", f"checkpoint ready to sample, default rows (array / mixed), 1 / 2 "
                          f"processes ({r['params']:,} params; array on 2 "
                          f"{fmt(d['compact_two']['ready']['wall_s'])} s, mixed on 1 "
                          f"{fmt(d['mixed']['ready']['wall_s'])} s, tuple "
                          f"{fmt(d['one']['ready']['wall_s'])} s)",
             f"{fmt(one['ready']['wall_s'])} / {fmt(two['ready']['wall_s'])} s",
             f"<= {t['load_s']:g} s", fmt(max(one["ready"]["wall_s"], two["ready"]["wall_s"])
                                          <= t["load_s"])],
            ["gpt2 import-hf", f"HF directory to a checkpoint (CPU {fmt(imp['cpu_s'])} s)",
             f"{fmt(imp['wall_s'])} s", f"<= {t['import_s']:g} s",
             fmt(imp["wall_s"] <= t["import_s"])],
            ["gpt2 decode", "greedy KV-cached tokens/s, default rows, 2 processes (mixed) / 1 "
                            f"(array) (identical tokens; array on 2 "
                            f"{fmt(d['compact_two']['tokens_per_s'])}, mixed on 1 "
                            f"{fmt(d['mixed']['tokens_per_s'])}, tuple "
                            f"{fmt(d['two']['tokens_per_s'])} / {fmt(d['one']['tokens_per_s'])})",
             f"{fmt(two['tokens_per_s'])} / {fmt(one['tokens_per_s'])}",
             f">= {t['two_tokens_per_s']:g} / >= {t['one_tokens_per_s']:g}",
             fmt(two["tokens_per_s"] >= t["two_tokens_per_s"]
                 and one["tokens_per_s"] >= t["one_tokens_per_s"])],
            ["gpt2 memory", "peak bytes/param of the largest process (RSS) and of all "
                            "processes together (PSS), default rows at the speeds above (1 "
                            f"process {fmt(one['bytes_per_param'])}; 2: "
                            f"{fmt(two['bytes_per_param'])} the main process, "
                            f"{fmt(together(two))} both together "
                            f"({fmt(two['bytes_per_param_all_processes'])} if their RSS are "
                            f"summed); tuple {fmt(d['one']['bytes_per_param'])})",
             fmt(worst), f"<= {t['bytes_per_param']:g}", fmt(worst <= t["bytes_per_param"])]]