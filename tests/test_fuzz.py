"""Fuzzing the loaders (issue 12): seeded mutants of puregpt checkpoints and of Hugging Face
directories given to import_hf. Every mutant either loads, and then samples, scores (a finite
log-probability), saves and loads back equal, or raises CheckpointError with a short message
naming the file; none takes more than 2 s or 200 MB.

How it is measured: per mutant, time.perf_counter around the load and the use; for memory, the
process's peak resident size (resource.getrusage's ru_maxrss, a high-water mark) read after each
mutant, against its value before the first: a mutant whose peak exceeds that baseline by 200 MB
raises the mark past the limit at that very mutant. (tracemalloc, per mutant, would triple the
run time; tests/test_hostile.py uses it for the audit's own cases.) fsync is skipped during the
run: durability is not what is tested here, and it is a third of the time.

PUREGPT_FUZZ_N mutants per test (default 500; six tests), PUREGPT_FUZZ_SEED the seed (default
12); e.g. `PUREGPT_FUZZ_N=20000 python -m pytest tests/test_fuzz.py`. A failure names the
mutant (its number and the mutations applied) and keeps its file(s) under the test's tmp_path.

Mutations: bit flips (in the header or the data, with or without the checksum), truncation,
appended bytes, length-field edits, header JSON edits (dtypes, shapes, offsets, names, swapped
tensors, nesting, huge numbers, missing and extra keys, anywhere in the header), metadata edits
(config, tokenizer, train config, optimizer step, RNG and trainer state; each re-signed, stripped
of its checksum or left stale), data swaps; for HF directories the same on model.safetensors,
JSON edits of config.json, vocab.json, tokenizer.json and tokenizer_config.json, line edits of
merges.txt, and files deleted, emptied, made directories or links to /dev/zero.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import struct
import time
import traceback
from pathlib import Path

import pytest

from puregpt import model, optim
from puregpt.bpe import BPETokenizer
from puregpt.checkpoint import (Checkpoint, CheckpointError, content_checksum, load_checkpoint,
                                save_checkpoint)
from puregpt.config import GPTConfig, TrainConfig, preset
from puregpt.hf import export_hf, import_hf
from puregpt.sample import generate_text, score_text
from puregpt.tokenizer import CharTokenizer

N = int(os.environ.get("PUREGPT_FUZZ_N", "500"))
SEED = int(os.environ.get("PUREGPT_FUZZ_SEED", "12"))
MAX_SECONDS, MAX_BYTES, MAX_MESSAGE = 2.0, 200e6, 2000

# Text json.dumps cannot write (or should not, for speed), spliced in where a marker string is.
MARKERS = {
    "huge-int": "9" * 5000,
    "long-int": "1" + "0" * 80,  # within the digit limit, far beyond any size
    "deep": "[" * 30000 + "]" * 30000,
    "big-float": "1e999",
    "neg-zero": "-0",
    "wide": "[" + ",".join(["0"] * 20000) + "]",
}
POOL = [None, True, False, 0, 1, -1, 2, 3, 5, 8, 1000, 2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63,
        2 ** 64, -2 ** 63, 10 ** 30, 0.5, -0.0, 1e-300, 1e308, 2.0 ** 65, math.nan, math.inf,
        -math.inf, "", "a", "docs", "stream", "F64", "F32", "F16", "BF16", "I64", "learned",
        "sinusoidal", "gelu", "layernorm", "char", "bpe", "<|endoftext|>", "x" * 1000, [], {},
        [1, 2], [[1]], {"a": 1}] + ["\0" + m for m in MARKERS]


def dumps(value) -> str:
    """json.dumps, with the markers replaced by their text."""
    text = json.dumps(value)
    for name, raw in MARKERS.items():
        text = text.replace(json.dumps("\0" + name), raw)
    return text


# --- mutating JSON values ----------------------------------------------------------------------


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, path + (i,))


def _at(value, path):
    for k in path:
        value = value[k]
    return value


def mutate_json(value, rng: random.Random, desc: list):
    """A copy of a JSON value with one node replaced, deleted, retyped, wrapped or tweaked, or
    a key or element inserted."""
    root = [copy.deepcopy(value)]  # a parent for the top node
    paths = [(0,) + p for p in _paths(root[0])]
    path = rng.choice(paths)
    parent, key = _at(root, path[:-1]), path[-1]
    node = parent[key]
    op = rng.choice(["replace", "replace", "delete", "insert", "retype", "wrap", "tweak"])
    desc.append(f"{op} at {list(path[1:])[:6]}")
    if op == "delete" and len(path) > 1:
        del parent[key]
    elif op == "insert" and isinstance(node, dict):
        node[rng.choice(["extra", "kind", "n_layer", "mode", "data", "0", "__metadata__"])] = \
            copy.deepcopy(rng.choice(POOL))
    elif op == "insert" and isinstance(node, list):
        node.insert(rng.randrange(len(node) + 1), copy.deepcopy(rng.choice(POOL)))
    elif op == "retype":
        parent[key] = (str(node) if not isinstance(node, str) else
                       int(node) if node.isdigit() and len(node) < 30 else [node])
    elif op == "wrap":
        parent[key] = rng.choice([[node], {"value": node}])
    elif op == "tweak" and isinstance(node, (int, float)) and not isinstance(node, bool):
        parent[key] = rng.choice([node + 1, node - 1, -node, node * 2, node * 1000, node / 3])
    else:
        parent[key] = copy.deepcopy(rng.choice(POOL))
    return root[0]


# --- the safetensors layout, taken apart and put back together --------------------------------


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header_text: str, data: bytes) -> bytes:
    blob = header_text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(blob)) + blob + data


def resign(header: dict, data: bytes) -> None:
    """Give the header the checksum its (mutated) contents have, where one can be computed."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or "checksum" not in meta:
        return
    tensors = {}
    try:
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                tensors[name] = [entry["dtype"], entry["shape"],
                                 hashlib.sha256(data[begin:end]).hexdigest()]
        meta["checksum"] = content_checksum(meta, tensors)
    except (KeyError, TypeError, ValueError):
        pass


def sign(header: dict, data: bytes, rng: random.Random, desc: list, weights) -> None:
    """Re-sign the header, strip its checksum (an older file) or leave it stale."""
    how = rng.choices(["resign", "strip", "stale"], weights)[0]
    desc.append(how)
    meta = header.get("__metadata__")
    if how == "strip" and isinstance(meta, dict):
        meta.pop("checksum", None)
    elif how == "resign":
        resign(header, data)


def flip_bits(raw: bytes, rng, desc, start: int = 0) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.choice([1, 1, 2, 4])):
        i = rng.randrange(start, len(b))
        b[i] ^= 1 << rng.randrange(8)
        desc.append(f"flip byte {i}")
    return bytes(b)


def mutate_layout(raw: bytes, rng: random.Random, desc: list, signed: bool) -> bytes:
    """One mutation of a safetensors file (signed: a puregpt checkpoint with a checksum)."""
    op = rng.choices(["flip", "truncate", "append", "length", "header", "swap"],
                     [15, 7, 3, 7, 25 if signed else 55, 5])[0]
    desc.append(op)
    header, data = split(raw)
    if op == "flip":
        if signed and rng.random() < 0.5:  # an unsigned file: the flip reaches the validation
            header["__metadata__"].pop("checksum")
            desc.append("strip")
            unsigned = join(json.dumps(header), data)
            return flip_bits(unsigned, rng, desc, start=len(unsigned) - len(data))
        return flip_bits(raw, rng, desc)
    if op == "truncate":
        return raw[:rng.randrange(len(raw))]
    if op == "append":
        return raw + bytes(rng.randrange(256) for _ in range(rng.choice([1, 8, 64])))
    if op == "length":
        n = struct.unpack("<Q", raw[:8])[0]
        value = rng.choice([n + rng.choice([-9, -1, 1, 8]), 0, 1, 2 ** 64 - 1, 2 ** 63,
                            len(raw), len(raw) - 8, rng.randrange(2 ** 64)]) % 2 ** 64
        return struct.pack("<Q", value) + raw[8:]
    names = [k for k in header if k != "__metadata__"]
    if op == "swap":  # two tensors' data exchanged (or, header-side, their entries)
        same = [(a, b) for a in names for b in names if a < b and
                header[a]["data_offsets"][1] - header[a]["data_offsets"][0] ==
                header[b]["data_offsets"][1] - header[b]["data_offsets"][0]]
        a, b = rng.choice(same)
        if rng.random() < 0.5:
            header[a], header[b] = header[b], header[a]
        else:
            (a0, a1), (b0, b1) = sorted([header[a]["data_offsets"], header[b]["data_offsets"]])
            data = data[:a0] + data[b0:b1] + data[a1:b0] + data[a0:a1] + data[b1:]
        desc.append(f"{a} <-> {b}")
    else:  # header JSON: a targeted edit of one entry, or anywhere
        target = rng.random()
        if target < 0.5:
            name = rng.choice(names)
            field = rng.choice(["dtype", "shape", "data_offsets", "name"])
            desc.append(f"{name}.{field}")
            if field == "name":
                header[rng.choice([name + "x", "optim.m." + name, "", "__metadata__"])] = \
                    header.pop(name)
            elif field == "dtype" and rng.random() < 0.7:
                header[name]["dtype"] = rng.choice(["F64", "F32", "F16", "BF16", "I8", "U8",
                                                    "F8_E4M3", "f64"])
            else:
                header[name] = mutate_json(header[name], rng, desc)
        else:
            header = mutate_json(header, rng, desc)
    if signed and isinstance(header, dict):
        sign(header, data, rng, desc, [35, 35, 30])
    return join(dumps(header), data)


META_STRINGS = ["-1", "0", "1", "7", "18446744073709551616", "1e3", " 1", "\uff11", "9" * 5000,
                "", "abc", "puregpt", "2", "null", "[]", "{}", "sha256:" + "0" * 64]


def mutate_metadata(raw: bytes, rng: random.Random, desc: list) -> bytes:
    header, data = split(raw)
    meta = header["__metadata__"]
    key = rng.choice(sorted(meta) + ["optimizer_step", "rng_state", "surprise"])
    op = rng.random()
    desc.append(f"metadata {key}")
    if key in meta and op < 0.08:
        del meta[key]
        desc.append("deleted")
    elif key in meta and op < 0.8 and meta[key][:1] in "[{":
        meta[key] = dumps(mutate_json(json.loads(meta[key]), rng, desc))
    else:
        meta[key] = rng.choice(META_STRINGS + [str(rng.randrange(10 ** 6))])
        desc.append(f"= {meta[key][:20]!r}")
    sign(header, data, rng, desc, [45, 45, 10])
    return join(json.dumps(header), data)


# --- running a mutant --------------------------------------------------------------------------


def sample_text_for(tok) -> str:
    """A text the vocabulary can encode: its first few ordinary tokens, decoded."""
    ids = [i for i in range(min(tok.vocab_size, 12)) if i != tok.bos][:4]
    return tok.decode(ids) or "a"


def use(ckpt: Checkpoint, scratch: Path) -> None:
    """What a loaded model must survive: sampling, scoring, saving and loading back."""
    docs = ckpt.trainer.get("mode", "docs") == "docs"
    out = generate_text(ckpt.params, ckpt.config, ckpt.tokenizer, "", docs, max_new_tokens=3,
                        rng=random.Random(0), temperature=0.9, top_p=0.95)
    assert isinstance(out, str)
    text = sample_text_for(ckpt.tokenizer)
    if not docs and len(ckpt.tokenizer.encode(text)) < 2:
        text = text * 4
    logprob, n = score_text(ckpt.params, ckpt.config, ckpt.tokenizer, text, docs)
    assert math.isfinite(logprob) and logprob <= 1e-9 and n >= 1, (logprob, n)
    save_checkpoint(scratch / "again.safetensors", ckpt)
    back = load_checkpoint(scratch / "again.safetensors")
    assert back.params == ckpt.params and back.config == ckpt.config


def peak_rss() -> float:
    """The process's peak resident memory so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports kilobytes


class Fuzz:
    """Runs mutants, records outcomes, and collects failures with what reproduces them."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.failures, self.loaded, self.refusals = tmp_path, [], 0, set()
        self.worst_time, self.baseline = 0.0, peak_rss()
        (tmp_path / "scratch").mkdir()

    def run(self, i: int, desc: list, target: Path, load, keep) -> None:
        model._sinusoidal.cache_clear()  # a mutant's big position table must not stay cached
        problem = None
        start = time.perf_counter()
        try:
            ckpt = load()
        except CheckpointError as e:
            msg = str(e)
            if not msg.startswith(str(target)):
                problem = f"the message does not name {target}: {msg[:300]}"
            elif len(msg) > MAX_MESSAGE:
                problem = f"a message of {len(msg)} characters: {msg[:300]}"
            else:  # its kind: the message without the path and numbers
                self.refusals.add(re.sub(r"\d+", "#", msg[len(str(target)):])[:50])
        except BaseException as e:  # noqa: BLE001 - every other exception is the finding
            if isinstance(e, KeyboardInterrupt):
                raise
            problem = "".join(traceback.format_exception_only(type(e), e)).strip()[:500] + \
                "\n" + "".join(traceback.format_tb(e.__traceback__)[-3:])
        else:
            try:
                use(ckpt, self.tmp / "scratch")
                self.loaded += 1
            except BaseException as e:  # noqa: BLE001
                if isinstance(e, KeyboardInterrupt):
                    raise
                problem = "loaded, then failed: " + "".join(traceback.format_exception(e))[-1500:]
        elapsed = time.perf_counter() - start
        grown = peak_rss() - self.baseline
        self.worst_time = max(self.worst_time, elapsed)
        if problem is None and elapsed > MAX_SECONDS:
            problem = f"took {elapsed:.2f} s"
        if problem is None and grown > MAX_BYTES:
            problem = f"the process's peak memory grew to {grown / 1e6:.0f} MB above its start"
            self.baseline += grown  # report each mutant that raises it further, not all after
        if problem is not None:
            kept = self.tmp / "failures" / str(i)
            keep(kept)
            self.failures.append(f"mutant {i} ({'; '.join(desc)}), kept in {kept}:\n{problem}")

    def check(self, n: int) -> None:
        assert not self.failures, f"{len(self.failures)} of {n} mutants failed:\n\n" + \
            "\n\n".join(self.failures[:6])
        # the fuzzer explores: both outcomes are common, and the refusals are of many kinds
        assert self.loaded >= 0.02 * n, (self.loaded, n)
        assert n - self.loaded >= 0.3 * n, (self.loaded, n)
        assert len(self.refusals) >= min(15, n // 20), sorted(self.refusals)
        assert self.worst_time < MAX_SECONDS and peak_rss() - self.baseline <= MAX_BYTES


@pytest.fixture
def no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)


# --- checkpoints -------------------------------------------------------------------------------


def _perturbed(config: GPTConfig, seed: int) -> dict:
    rng = random.Random(seed)
    params = model.init_params(config, rng)
    for name, t in params.items():
        if not isinstance(t[0], list):
            params[name] = [(1.0 if name.endswith("_g") else 0.0) + rng.gauss(0, 0.2) for _ in t]
    return params


def _bpe() -> BPETokenizer:
    text = "the cat sat on the mat, and the dog sat on the log. " * 8 + "Zoë naïve café"
    return BPETokenizer.train(text, 280)


def base_checkpoint(kind: str) -> Checkpoint:
    if kind == "char-train":  # a training run's checkpoint: everything a resume needs
        tok = CharTokenizer("abcdefg")
        cfg = GPTConfig(vocab_size=8, block_size=8, n_layer=2, n_embd=8, n_head=2,
                        norm="layernorm", norm_affine=True, bias=True, final_norm=True,
                        activation="gelu")
        params = _perturbed(cfg, 1)
        opt = optim.new_state(params)
        rng = random.Random(5)
        opt["step"] = 9
        for moment in ("m", "v"):
            for flat in opt[moment].values():
                flat[:] = [abs(rng.gauss(0, 1e-3)) for _ in flat]
        state = random.Random(3)
        state.gauss(0, 1)
        return Checkpoint(cfg, tok, params, 9, TrainConfig(steps=20, batch_size=2), opt,
                          state.getstate(), {"data": "/d/names.txt", "sha256": "cd" * 32,
                                             "mode": "docs", "best_val": 2.5})
    tok = _bpe()
    if kind == "bpe-stream":  # weights only, sinusoidal positions, tied, a stream model
        cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_embd=8,
                        n_head=2, pos="sinusoidal", tie_embeddings=True)
        return Checkpoint(cfg, tok, _perturbed(cfg, 2), 40, trainer={"mode": "stream"})
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=6, n_layer=1, n_embd=4,  # post-norm
                    n_head=1, pos="none", norm_position="post", norm_affine=True)
    params = _perturbed(cfg, 3)
    return Checkpoint(cfg, tok, params, 0, optimizer={**optim.new_state(params), "step": 0},
                      trainer={"mode": "docs", "imported_from": "/x"})


@pytest.mark.parametrize("kind", ["char-train", "bpe-stream", "bpe-post"])
def test_checkpoint_mutants_load_cleanly_or_raise_checkpoint_error(kind, tmp_path, no_fsync):
    base = tmp_path / "base.safetensors"
    save_checkpoint(base, base_checkpoint(kind))
    use(load_checkpoint(base), tmp_path)  # the base itself passes
    raw = base.read_bytes()
    fuzz = Fuzz(tmp_path)
    target = tmp_path / "mutant.safetensors"
    rng = random.Random(f"{SEED}-{kind}")
    for i in range(N):
        desc = []
        blob = raw
        for _ in range(2 if rng.random() < 0.15 else 1):  # sometimes two mutations stacked
            try:
                blob = (mutate_metadata(blob, rng, desc) if rng.random() < 0.38 else
                        mutate_layout(blob, rng, desc, signed=True))
            except (ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError,
                    struct.error):
                break  # the first mutation left nothing the second can parse: keep it as is
        target.write_bytes(blob)
        fuzz.run(i, desc, target, lambda: load_checkpoint(target),
                 lambda kept: (kept.mkdir(parents=True), shutil.copy(target, kept)))
    fuzz.check(N)


# --- Hugging Face directories ------------------------------------------------------------------


def base_hf(kind: str, out: Path) -> dict[str, bytes]:
    """The files of an exported GPT-2 directory: a character vocabulary (tokenizer.json, F32),
    a BPE as vocab.json + merges.txt (F64, untied), or the same BPE as tokenizer.json alone."""
    gpt2 = preset("gpt2")["model"]
    tok = CharTokenizer("abcdefg") if kind == "char" else _bpe()
    cfg = GPTConfig(**{**gpt2, "vocab_size": tok.vocab_size, "n_layer": 1, "n_embd": 8,
                       "n_head": 2, "block_size": 8, "tie_embeddings": kind == "char"})
    export_hf(Checkpoint(cfg, tok, _perturbed(cfg, 4), trainer={"mode": "docs"}), out,
              dtype="F32" if kind == "char" else "F64")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    if kind == "bpe-json":
        del files["vocab.json"], files["merges.txt"]
    return files


def mutate_hf(files: dict[str, bytes], rng: random.Random, desc: list) -> dict:
    files = dict(files)
    name = rng.choices(sorted(files), [35 if n == "model.safetensors" else 20 if n ==
                                       "config.json" else 10 for n in sorted(files)])[0]
    desc.append(name)
    raw = files[name]
    r = rng.random()
    if r < 0.08:  # the file itself: gone, empty, a directory, a device
        files[name] = rng.choice([None, b"", "dir", "/dev/zero"])
        desc.append(f"-> {files[name]!r}")
    elif name == "model.safetensors":
        files[name] = mutate_layout(raw, rng, desc, signed=False)
    elif r < 0.2:
        files[name] = flip_bits(raw, rng, desc) if rng.random() < 0.7 else \
            raw[:rng.randrange(len(raw))]
    elif name == "merges.txt":
        lines = raw.decode("utf-8").split("\n")
        i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
        op = rng.choice(["delete", "duplicate", "swap", "junk"])
        desc.append(f"{op} line {i}")
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(j, lines[i])
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        else:
            lines[i] = rng.choice(["", "a", "a b c", "\u0120 \u0120", "x" * 100_000, "#version",
                                   "e e", "\u0120t he"])
        files[name] = "\n".join(lines).encode("utf-8")
    else:
        files[name] = dumps(mutate_json(json.loads(raw), rng, desc)).encode("utf-8")
    return files


def write_dir(files: dict, directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir()
    for name, content in files.items():
        if content == "dir":
            (directory / name).mkdir()
        elif content == "/dev/zero":
            os.symlink("/dev/zero", directory / name)
        elif content is not None:
            (directory / name).write_bytes(content)


@pytest.mark.parametrize("kind", ["char", "bpe-files", "bpe-json"])
def test_hf_directory_mutants_import_cleanly_or_raise_checkpoint_error(kind, tmp_path,
                                                                       no_fsync):
    files = base_hf(kind, tmp_path / "base")
    target = tmp_path / "mutant"
    write_dir(files, target)
    use(import_hf(target), tmp_path)
    fuzz = Fuzz(tmp_path)
    rng = random.Random(f"{SEED}-hf-{kind}")
    for i in range(N):
        desc = []
        write_dir(mutate_hf(files, rng, desc), target)
        fuzz.run(i, desc, target, lambda: import_hf(target),
                 lambda kept: shutil.copytree(target, kept, symlinks=True))
    fuzz.check(N)
