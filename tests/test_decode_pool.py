"""decode.py: decoding with prepared weights equals model.forward (within 1e-9: the products
round differently, ~1e-16 relative), and several processes equal one exactly: the same logits
bit for bit (so within any tolerance, 1e-12 stated), the same tokens. The mixed and compact
layouts equal the tuple layout exactly (tuples and flat arrays hold the same values), and
spawned workers equal forked ones; a worker that dies is an error naming it, not a hang. Also
the checkpoint loader's row layouts against an independent reader (struct, one value at a time,
and the safetensors library)."""

from __future__ import annotations

import math
import os
import random
import signal
import struct
import subprocess
import sys
import time
from array import array

import pytest

from conftest import COMBOS, combo_id, perturbed_params, tiny_config
from puregpt import api, decode, model
from puregpt.bpe import BPETokenizer
from puregpt.checkpoint import Checkpoint, load_checkpoint, read_header, save_checkpoint
from puregpt.config import GPTConfig
from puregpt.decode import (LAYOUTS, PIECE, TUPLE_SHARE, TUPLES_UP_TO, Decoder, Matrix,
                            default_layout, flatten, prepare_matrix)
from puregpt.parallel import WorkerError
from puregpt.sample import generate, stream_text
from puregpt.tokenizer import CharTokenizer

TOL_FORWARD = 1e-9  # prepared products vs model.forward's: different rounding, ~1e-16 relative
TOL_PROCESSES = 1e-12  # several processes vs one (in fact bit-identical: asserted too)


def logits_by_step(decoder, tokens):
    kv = decoder.new_cache()
    return [decoder.step(t, kv) for t in tokens]


def max_diff(A, B) -> float:
    return max(abs(a - b) for ra, rb in zip(A, B) for a, b in zip(ra, rb))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_process_equals_forward_every_combination(combo, layout):
    """Every architecture switch: the decoder's logits at each position equal model.forward's
    over the whole sequence (no cache) and, position by position, over the KV cache."""
    cfg = tiny_config(combo)
    params = perturbed_params(cfg)
    tokens = [random.Random(1).randrange(cfg.vocab_size) for _ in range(cfg.block_size)]
    with Decoder(params, cfg, layout) as d:
        got = logits_by_step(d, tokens)
    full, _ = model.forward(params, cfg, [tokens])
    assert max_diff(got, full) < TOL_FORWARD
    kv = model.new_kv_cache(cfg)
    cached = [model.forward(params, cfg, [[t]], kv=kv, start_pos=i)[0][0]
              for i, t in enumerate(tokens)]
    assert max_diff(got, cached) < TOL_FORWARD


# a few configurations for the multi-process tests (each starts worker processes)
POOL_COMBOS = [c for c in COMBOS if (c["bias"], c["tie_embeddings"], c["norm"]) in {
    (True, True, "layernorm"), (False, False, "rmsnorm"), (True, False, "rmsnorm"),
    (False, True, "layernorm")} and c["activation"] != "relu"][::6] + COMBOS[144::9]  # + modern


@pytest.mark.parametrize("combo", POOL_COMBOS, ids=combo_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_processes_equal_one_process(combo, layout):
    """2 and 3 processes: the same logits bit for bit, position by position over the KV cache
    and through a sliding window (past block_size the cache is rebuilt), hence the same tokens,
    greedy and sampled."""
    cfg = tiny_config(combo, vocab_size=11, n_embd=12, n_head=3)
    params = perturbed_params(cfg, seed=3)
    tokens = [random.Random(2).randrange(cfg.vocab_size) for _ in range(cfg.block_size)]
    with Decoder(params, cfg, layout) as one:
        ref = logits_by_step(one, tokens)
        ref_tokens = [list(one.generate([1, 2], 20, random.Random(s), greedy=(s == 0)))
                      for s in range(3)]
    for n in (2, 3):
        with Decoder(params, cfg, layout, workers=n) as many:
            assert len(many.procs) == n - 1
            got = logits_by_step(many, tokens)
            assert max_diff(got, ref) <= TOL_PROCESSES
            assert got == ref  # bit-identical
            assert [list(many.generate([1, 2], 20, random.Random(s), greedy=(s == 0)))
                    for s in range(3)] == ref_tokens


def test_mixed_and_compact_layouts_equal_tuple_layout():
    """Mixed rows and array rows (the compact layout) give exactly the tuple layout's logits
    and tokens: every row goes through the same function whatever its storage."""
    cfg = GPTConfig(**{**tiny_config(COMBOS[-1]).to_dict(), "n_embd": 16, "vocab_size": 30})
    params = perturbed_params(cfg, seed=5)
    tokens = list(range(cfg.block_size))
    with Decoder(params, cfg, "tuple") as fast:
        ref = logits_by_step(fast, tokens)
        ref_tokens = list(fast.generate([0], 30, random.Random(4)))
    for layout in ("mixed", "array"):
        with Decoder(params, cfg, layout) as other:
            assert logits_by_step(other, tokens) == ref
            assert list(other.generate([0], 30, random.Random(4))) == ref_tokens


@pytest.mark.parametrize("cols", [8, 2 * PIECE + 5])  # 2 PIECE + 5: 3 padded pieces before 3.12
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_store_the_rows_own_values(layout, cols):
    """The first TUPLE_SHARE of a matrix's rows are tuples, the rest one flat array, float32
    when the rows are (imported weights stay 4 bytes a value); either way every piece holds
    the rows' own values, in order, zero-padded to k pieces of `width`."""
    rng = random.Random(0)
    rows = [array("f", [rng.gauss(0, 1) for _ in range(cols)]) for _ in range(11)]
    m = Matrix(flatten(rows), cols, layout)
    n_tuples = round(11 * TUPLE_SHARE[layout])
    assert (m.k, m.k * m.width >= cols) == ((1, True) if hasattr(math, "sumprod")
                                           else (-(-cols // PIECE), True))
    assert len(m.tuples) == n_tuples * m.k and all(type(p) is tuple for p in m.tuples)
    assert m.flat.typecode == "f" and len(m.flat) == (11 - n_tuples) * m.k * m.width
    pad = [0.0] * (m.k * m.width - cols)
    assert [v for p in m.pieces() for v in p] == [v for r in rows for v in list(r) + pad]
    assert Matrix(flatten([list(r) for r in rows]), cols, layout).flat.typecode == "d"
    assert TUPLE_SHARE == {"tuple": 1.0, "mixed": 0.3, "array": 0.0}


def test_spawned_workers_through_shared_memory_equal_forked_ones(monkeypatch):
    """Where fork does not exist (macOS's and Windows' default is spawn) the workers get their
    rows through a shared-memory block instead of a forked copy of the caller's memory: the
    same logits bit for bit, float32 rows included, and the block is freed once they are
    ready."""
    cfg = tiny_config(COMBOS[3], vocab_size=13, n_embd=12, n_head=3)
    params = perturbed_params(cfg, seed=4)
    for name, t in params.items():  # float32 rows, as imported weights are
        if t and isinstance(t[0], list):
            params[name] = [array("f", r) for r in t]
    tokens = [i % cfg.vocab_size for i in range(cfg.block_size)]
    with Decoder(params, cfg, "mixed", workers=2) as forked:
        assert forked.mem is None
        ref = logits_by_step(forked, tokens)
    monkeypatch.setattr(decode.mp, "get_all_start_methods", lambda: ["spawn"])
    with Decoder(params, cfg, "mixed", workers=2) as spawned:
        assert spawned.procs[0]._start_method == "spawn" and spawned.mem is None
        assert logits_by_step(spawned, tokens) == ref


@pytest.mark.parametrize("workers", [1, 2])
def test_consume_takes_the_matrices_and_changes_no_number(workers):
    """consume=True (what `puregpt sample` uses, to free each matrix once prepared) gives the
    same logits; params keeps its vectors and wte (token lookups) and loses the matrices."""
    for tie in (True, False):
        cfg = tiny_config(COMBOS[5], tie_embeddings=tie)
        params = perturbed_params(cfg)
        tokens = [i % cfg.vocab_size for i in range(cfg.block_size)]
        with Decoder(params, cfg, "mixed") as d:
            ref = logits_by_step(d, tokens)
        mine = dict(params)
        with Decoder(mine, cfg, "mixed", workers=workers, consume=True) as d:
            assert logits_by_step(d, tokens) == ref
        assert "wte" in mine and "layer0.attn_wq" not in mine and "layer0.mlp_fc1" not in mine
        assert "lm_head" not in mine and set(mine) < set(params)
        assert all(mine[k] is params[k] for k in mine)


def test_default_layout_is_tuples_for_small_models_then_mixed_on_several_processes():
    assert default_layout(1000) == default_layout(1000, 2) == "tuple"
    assert default_layout(TUPLES_UP_TO) == default_layout(TUPLES_UP_TO, 3) == "tuple"
    assert default_layout(TUPLES_UP_TO + 1) == "array"
    assert default_layout(124_439_808) == "array"  # GPT-2 124M, one process
    assert default_layout(124_439_808, 2) == default_layout(TUPLES_UP_TO + 1, 4) == "mixed"
    cfg = tiny_config(COMBOS[0])
    with Decoder(perturbed_params(cfg), cfg) as d:
        assert d.layout == "tuple"


def test_decoder_tokens_equal_sample_generate():
    """Greedy tokens through a sliding window equal sample.generate's (the model.forward path)."""
    cfg = tiny_config(COMBOS[7], vocab_size=20, n_embd=16)
    params = perturbed_params(cfg, seed=9)
    ref = list(generate(params, cfg, [3, 4], 25, random.Random(0), greedy=True))
    with Decoder(params, cfg) as d:
        assert list(d.generate([3, 4], 25, random.Random(0), greedy=True)) == ref


def test_generation_computes_no_logits_after_the_last_token(monkeypatch):
    """n new tokens after a context of c: c + n - 1 positions through the model, not c + n (the
    logits after the last token would be thrown away), in the decoder and in sample.generate,
    with the same tokens as before (a full run, then its prefix)."""
    cfg = tiny_config(COMBOS[0], vocab_size=20, n_embd=16)
    params = perturbed_params(cfg, seed=3)
    positions = []
    real_forward = model.forward

    def counting_forward(params, config, tokens, *args, **kwargs):
        positions.append(len(tokens[0]))
        return real_forward(params, config, tokens, *args, **kwargs)
    monkeypatch.setattr(model, "forward", counting_forward)
    tokens = list(generate(params, cfg, [3, 4], 5, random.Random(0), greedy=True))
    assert sum(positions) == 2 + 5 - 1
    assert list(generate(params, cfg, [3, 4], 3, random.Random(0), greedy=True)) == tokens[:3]
    steps = []
    with Decoder(params, cfg) as d:
        real_step = d.step
        monkeypatch.setattr(d, "step", lambda t, kv: steps.append(t) or real_step(t, kv))
        assert list(d.generate([3, 4], 5, random.Random(0), greedy=True)) == tokens
    assert steps == [3, 4] + tokens[:4]


@pytest.mark.parametrize("cols", [40, 250])  # 250: rows of three pieces before Python 3.12
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_matvec_rows_of_unequal_lengths(scale, cols):
    """Rows within a factor 4 of each other take the rho rescaling; wider spreads unit rows;
    either way each product is within 1e-15 |x||b| of the exact (fsum) dot product, and every
    layout gives the same numbers."""
    rng = random.Random(0)
    rows = [[rng.gauss(0, 1) * (scale if i % 2 else 1.0) for _ in range(cols)] for i in range(9)]
    x = [rng.gauss(0, 3) for _ in range(cols)]
    outs = []
    for layout in LAYOUTS:
        m = prepare_matrix(rows, layout)
        assert (m.rho is None) == (scale != 1.0) or hasattr(math, "sumprod")
        assert len(list(m.pieces())) == 9 * (1 if hasattr(math, "sumprod") else -(-cols // PIECE))
        outs.append(m.matvec(x))
        for got, r in zip(outs[-1], rows):
            exact = math.fsum(a * b for a, b in zip(r, x))
            assert abs(got - exact) <= 1e-15 * math.hypot(*r) * math.hypot(*x) * 4
    assert outs[0] == outs[1] == outs[2]
    assert prepare_matrix(rows).matvec([0.0] * cols) == [0.0] * 9


def test_bpe_model_text_equal_across_processes():
    """A BPE tokenizer's text through stream_text, one process vs two."""
    tok = BPETokenizer.train("the theme of the thing then " * 20, 265)
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_embd=16, n_head=2, block_size=12,
                    norm="layernorm", norm_affine=True, bias=True, tie_embeddings=True,
                    activation="gelu_tanh", init_std=0.3)
    params = model.init_params(cfg, random.Random(1))
    texts = []
    for n in (1, 2):
        with Decoder(params, cfg, workers=n) as d:
            texts.append("".join(stream_text(params, cfg, tok, "the", docs_mode=False,
                                             max_new_tokens=30, rng=random.Random(7),
                                             tokens_from=d.generator())))
    assert texts[0] == texts[1] and texts[0]


def test_api_stream_workers_layouts_and_compact_give_the_same_text():
    cfg = tiny_config(COMBOS[3], vocab_size=9)
    params = perturbed_params(cfg)
    ckpt = Checkpoint(cfg, CharTokenizer(list("abcdefgh")), params,
                      trainer={"mode": "stream"})
    kws = ({"workers": 1, "compact": True}, {"workers": 2}, {"workers": 2, "compact": True},
           {"layout": "mixed"}, {"layout": "array", "compact": True},
           {"workers": 2, "layout": "tuple"})
    outs = [api.generate(ckpt, "ab", max_new_tokens=12, seed=3, **kw) for kw in kws]
    with Decoder(params, cfg) as d:
        ref = "ab" + "".join(stream_text(params, cfg, ckpt.tokenizer, "ab", docs_mode=False,
                                         max_new_tokens=12, rng=random.Random(3),
                                         temperature=0.5, tokens_from=d.generator()))
    assert outs == [ref] * len(kws)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        api.generate(ckpt, "a", workers=-1)
    with pytest.raises(TypeError, match="compact"):
        api.generate(ckpt, "a", compact=1)
    with pytest.raises(TypeError, match="layout"):
        api.generate(ckpt, "a", layout=3)
    with pytest.raises(ValueError, match="layout must be one of tuple, mixed, array"):
        api.generate(ckpt, "a", layout="list")
    with pytest.raises(ValueError, match="contradicts layout='tuple'"):
        api.generate(ckpt, "a", layout="tuple", compact=True)


def test_a_worker_that_dies_is_an_error_not_a_hang():
    cfg = tiny_config(COMBOS[0])
    params = perturbed_params(cfg)
    d = Decoder(params, cfg, workers=2)
    try:
        kv = d.new_cache()
        d.step(1, kv)
        os.kill(d.procs[0].pid, signal.SIGKILL)
        d.procs[0].join(5)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"worker process 1 \(pid \d+\) died"):
            for t in range(2, 6):
                d.step(t, kv)
        assert time.monotonic() - t0 < 10
    finally:
        d.close()
    d.close()  # twice is fine
    assert not d.procs


def test_bad_arguments():
    cfg = tiny_config(COMBOS[0])
    params = perturbed_params(cfg)
    with pytest.raises(ValueError, match="layout"):
        Decoder(params, cfg, "list")
    with pytest.raises(ValueError, match="workers"):
        Decoder(params, cfg, workers=-2)
    with Decoder(params, cfg) as d:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            d.step(cfg.vocab_size, d.new_cache())
        with pytest.raises(ValueError, match="at least one token"):
            list(d.generate([], 3, random.Random(0)))


# --- loading: every row layout holds the file's values, bit for bit ------------------------


def reference_read(path):
    """An independent reader: the header's offsets, then struct, one value at a time."""
    with open(path, "rb") as f:
        header, start = read_header(f, str(path), os.path.getsize(path))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        code = {"F64": "<d", "F32": "<f"}[info["dtype"]]
        size = struct.calcsize(code)
        out[name] = [struct.unpack_from(code, data, a + i)[0] for i in range(0, b - a, size)]
    return out


def as_bits(values):
    return array("d", values).tobytes()


@pytest.mark.parametrize("rows", ["list", "tuple", "array"])
def test_loading_is_bit_identical_in_every_row_layout(tmp_path, rows):
    cfg = tiny_config(COMBOS[5])
    params = perturbed_params(cfg)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, Checkpoint(cfg, CharTokenizer(list("abcdef")), params))
    ref = reference_read(path)
    back = load_checkpoint(path, rows=rows).params
    kind = {"list": list, "tuple": tuple, "array": array}[rows]
    for name, t in back.items():
        flat = [x for r in t for x in r] if isinstance(t[0], (list, tuple, array)) else t
        if isinstance(t[0], (list, tuple, array)):
            assert all(type(r) is kind for r in t)
        assert as_bits(flat) == as_bits(ref[name]), name
        assert as_bits(flat) == as_bits([x for r in params[name] for x in r]
                                        if isinstance(params[name][0], list) else params[name])
    with pytest.raises(ValueError, match="rows must be one of"):
        load_checkpoint(path, rows="dict")


@pytest.mark.oracle
def test_float32_rows_save_as_f32_and_load_exactly(tmp_path):
    """array('f') rows (what import-hf keeps) are saved as F32; the safetensors library reads
    the same values, and every row layout loads them exactly."""
    from safetensors.numpy import load_file
    cfg = tiny_config(COMBOS[9])
    params = perturbed_params(cfg)
    f32 = {name: [array("f", r) for r in t] if isinstance(t[0], list) else t
           for name, t in params.items()}
    path = tmp_path / "f.safetensors"
    save_checkpoint(path, Checkpoint(cfg, CharTokenizer(list("abcdef")), f32))
    lib = load_file(str(path))
    for rows in ("list", "tuple", "array"):
        back = load_checkpoint(path, rows=rows).params
        for name, t in f32.items():
            if isinstance(t[0], array):
                assert str(lib[name].dtype) == "float32"
                assert [list(r) for r in back[name]] == [list(r) for r in t]
                assert lib[name].tolist() == [list(r) for r in t]
            else:
                assert back[name] == t


def test_release_free_memory_hands_freed_rows_pages_back():
    """Freed rows leave free blocks in the C heap that glibc keeps resident (pinned by the
    small objects allocated between them); release_free_memory (malloc_trim) hands them back:
    in a fresh process, 80 MB of 3 KB arrays freed, then trimmed, lowers the resident size by
    at least half of that, where freeing alone lowers it by under a quarter."""
    if decode._malloc_trim is None:  # not glibc: nothing to trim, and a no-op
        assert decode.release_free_memory() is None
        return
    script = """
from array import array
from puregpt.decode import release_free_memory
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
rows, pins = [], []
for i in range(80 * 1024 * 1024 // 3072):
    rows.append(array("d", bytes(3072)))
    pins.append(array("d", bytes(600)))  # a small block after each row: the heap cannot shrink
full = rss()
del rows
freed = rss()
release_free_memory()
print(full - freed, full - rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True).stdout.split()
    by_freeing, by_trimming = int(out[0]), int(out[1])
    assert by_freeing < 20e6 and by_trimming > 40e6, (by_freeing, by_trimming)
