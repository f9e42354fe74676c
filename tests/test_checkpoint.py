"""Checkpoints: a bit-exact round trip of everything a run needs, interoperability with the real
safetensors library (both directions), clear errors for every kind of damaged file, and atomic
writes that never leave a temporary file behind."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import tempfile

import numpy as np
import pytest
import safetensors  # the oracle: a missing library fails this module, it does not skip it
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from helpers_train import float_bits, params_bits, run_cli
from puregpt import model, optim
from puregpt.checkpoint import (MAX_WEIGHT, Checkpoint, CheckpointError, load_checkpoint,
                                safetensors_chunks, save_checkpoint)
from puregpt.config import GPTConfig, TrainConfig, preset
from puregpt.fsutil import atomic_write
from puregpt.tokenizer import CharTokenizer

assert safetensors.__version__

# Every kind of parameter: vectors (norm gains and biases, layernorm) as well as matrices.
CONFIG = GPTConfig(vocab_size=6, block_size=5, n_layer=2, n_embd=8, n_head=2, norm="layernorm",
                   norm_affine=True, bias=True, final_norm=True, activation="gelu")
TOKENIZER = CharTokenizer("abcde")
# Values whose bits a lossy format would change: signed zero, the smallest subnormal, the largest
# magnitudes a weight may have (below MAX_WEIGHT; infinities and NaN are refused at load, see
# test_fuzz.py), and values that need all 17 significant digits.
SPECIAL_AT = "layer0.mlp_fc2"
SPECIAL = [-0.0, 5e-324, math.nextafter(MAX_WEIGHT, 0), -math.nextafter(MAX_WEIGHT, 0), 2.0 ** 64,
           -1e-310, 0.1, 1 / 3, -2.2250738585072014e-308]


def make_checkpoint(seed: int = 0) -> Checkpoint:
    rng = random.Random(seed)
    params = model.init_params(CONFIG, rng)
    for name, t in params.items():  # vectors off their init values, specials in the matrices
        if not isinstance(t[0], list):
            params[name] = [rng.gauss(0, 1) for _ in t]
    params[SPECIAL_AT][0][:len(SPECIAL)] = SPECIAL  # a 32-wide row: room for them all
    opt = optim.new_state(params)
    opt["step"] = 17
    for moment in ("m", "v"):
        for flat in opt[moment].values():  # one flat list per tensor
            flat[:] = [abs(rng.gauss(0, 1e-3)) for _ in flat]
    opt["m"]["wte"][1:4] = [-0.0, 5e-324, 1e-300]
    state_rng = random.Random(123)
    state_rng.random()
    state_rng.gauss(0, 1)  # leaves gauss_next set: the third part of the state is not None
    assert state_rng.getstate()[2] is not None
    tc = TrainConfig(steps=500, batch_size=3, grad_accum=2, lr=0.003, weight_decay=0.1,
                     schedule="cosine", warmup=10, seed=7, mode="stream", eval_every=50)
    trainer = {"data": "/some/where/input.txt", "sha256": "ab" * 32, "mode": "stream",
               "best_val": 1.2345678901234567}
    return Checkpoint(CONFIG, TOKENIZER, params, 123, tc, opt, state_rng.getstate(), trainer)


@pytest.fixture
def ckpt_file(tmp_path):
    ckpt = make_checkpoint()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, ckpt)
    return ckpt, path


def header_of(raw: bytes) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), n


def with_header(raw: bytes, header: dict) -> bytes:
    """The file with its header replaced (the tensor data kept as it is)."""
    _, n = header_of(raw)
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + raw[8 + n:]


# --- round trip --------------------------------------------------------------------------------


def test_round_trip_is_bit_exact(ckpt_file, tmp_path):
    ckpt, path = ckpt_file
    back = load_checkpoint(path)
    assert back.config == CONFIG and back.config.to_dict() == CONFIG.to_dict()
    assert back.tokenizer == TOKENIZER and back.tokenizer.to_dict() == TOKENIZER.to_dict()
    assert back.step == 123
    assert back.train_config == ckpt.train_config
    assert back.trainer == ckpt.trainer
    assert list(back.params) == list(ckpt.params)
    assert params_bits(back.params) == params_bits(ckpt.params)
    assert float_bits(back.params[SPECIAL_AT][0][:len(SPECIAL)]) == float_bits(SPECIAL)
    assert back.optimizer["step"] == 17
    for moment in ("m", "v"):
        assert params_bits(back.optimizer[moment]) == params_bits(ckpt.optimizer[moment])
        # vectors' moments keep the optimizer's one-row layout
        assert back.optimizer[moment]["emb_norm_g"] == ckpt.optimizer[moment]["emb_norm_g"]
    assert back.rng_state == ckpt.rng_state
    a, b = random.Random(), random.Random()
    a.setstate(ckpt.rng_state)
    b.setstate(back.rng_state)
    assert [a.gauss(0, 1) for _ in range(5)] == [b.gauss(0, 1) for _ in range(5)]
    # and the file is a fixed point: saving what was loaded gives the same bytes
    again = tmp_path / "again.safetensors"
    save_checkpoint(again, back)
    assert again.read_bytes() == path.read_bytes()


def test_round_trip_of_a_weights_only_checkpoint(tmp_path):
    ckpt = make_checkpoint()
    bare = Checkpoint(ckpt.config, ckpt.tokenizer, ckpt.params, 5)
    save_checkpoint(tmp_path / "w.safetensors", bare)
    back = load_checkpoint(tmp_path / "w.safetensors")
    assert (back.step, back.train_config, back.optimizer, back.rng_state, back.trainer) == \
        (5, None, None, None, {})
    assert params_bits(back.params) == params_bits(ckpt.params)


def test_round_trip_of_a_llama_model(tmp_path):
    """Every field of the modern block survives, and so do its tensors (the gate, K and V of
    n_kv_head heads, the QK-norm gains); the loaded model computes the same logits."""
    config = GPTConfig(**{**preset("llama")["model"], "vocab_size": 6, "qk_norm": True,
                          "rope_theta": 500.0, "mlp_hidden": 40, "n_kv_head": 1})
    params = model.init_params(config, random.Random(0))
    assert len(params["layer0.attn_wk"]) == config.head_dim and len(params["layer0.mlp_gate"]) == 40
    save_checkpoint(tmp_path / "llama.safetensors", Checkpoint(config, TOKENIZER, params, 3))
    back = load_checkpoint(tmp_path / "llama.safetensors")
    assert back.config == config and back.config.to_dict() == config.to_dict()
    assert list(back.params) == list(params) and params_bits(back.params) == params_bits(params)
    ids = [[5, 0, 1, 2, 3, 4, 0]]
    assert model.forward(back.params, back.config, ids)[0] == model.forward(params, config, ids)[0]


def test_a_checkpoint_from_before_the_modern_block_loads_as_it_was(ckpt_file, tmp_path):
    """A stored config without the fields of issue 15 (rope_theta, mlp, mlp_hidden,
    mlp_multiple_of, n_kv_head, qk_norm) gets the values that reproduce it; an unknown key is
    still refused."""
    ckpt, path = ckpt_file
    header, _ = header_of(path.read_bytes())
    meta = header["__metadata__"]
    meta.pop("checksum", None)  # older files have none
    stored = json.loads(meta["config"])
    added = ["rope_theta", "mlp", "mlp_hidden", "mlp_multiple_of", "n_kv_head", "qk_norm"]
    for key in added:
        del stored[key]
    meta["config"] = json.dumps(stored)
    old = tmp_path / "old.safetensors"
    old.write_bytes(with_header(path.read_bytes(), header))
    back = load_checkpoint(old)
    assert back.config == CONFIG
    assert [getattr(back.config, k) for k in added] == [10000.0, "plain", None, 32, None, False]
    assert params_bits(back.params) == params_bits(ckpt.params)
    stored["rotary"] = True
    meta["config"] = json.dumps(stored)
    old.write_bytes(with_header(path.read_bytes(), header))
    with pytest.raises(CheckpointError, match="unknown GPTConfig key"):
        load_checkpoint(old)


# --- the real safetensors library --------------------------------------------------------------


def test_safetensors_library_loads_the_same_numbers(ckpt_file):
    ckpt, path = ckpt_file
    arrays = load_file(str(path))
    expected = {**ckpt.params,
                **{f"optim.{m}.{n}": ckpt.optimizer[m][n] for m in ("m", "v")
                   for n in ckpt.params}}  # flat lists: compared against the flattened arrays
    assert set(arrays) == set(expected)
    for name, values in expected.items():
        arr = arrays[name]
        assert arr.dtype == np.float64, name
        # Adam's moments are stored in the shape of their parameter
        like = ckpt.params[name.split(".", 2)[2]] if name.startswith("optim.") else values
        shape = (len(like), len(like[0])) if isinstance(like[0], list) else (len(like),)
        assert arr.shape == shape, name
        assert arr.astype("<f8").tobytes() == float_bits(values), name  # bit for bit
        assert (arr.ravel() == np.array(values).ravel()).all(), name
    assert arrays[SPECIAL_AT][0][2] == math.nextafter(MAX_WEIGHT, 0)
    assert math.copysign(1, arrays[SPECIAL_AT][0][0]) == -1

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(expected)
    assert meta["format"] == "puregpt" and meta["format_version"] == "1"
    assert json.loads(meta["config"]) == CONFIG.to_dict()
    assert json.loads(meta["tokenizer"]) == {"kind": "char", "chars": "abcde"}
    assert json.loads(meta["train_config"]) == ckpt.train_config.to_dict()
    assert meta["step"] == "123" and meta["optimizer_step"] == "17"
    assert json.loads(meta["trainer"]) == ckpt.trainer


def test_file_rewritten_by_safetensors_library_loads_identically(ckpt_file, tmp_path):
    """The library orders tensors and pads the header its own way; we must read that too."""
    ckpt, path = ckpt_file
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    rewritten = tmp_path / "rewritten.safetensors"
    save_file(load_file(str(path)), str(rewritten), metadata=meta)
    assert rewritten.read_bytes() != path.read_bytes()
    back = load_checkpoint(rewritten)
    assert params_bits(back.params) == params_bits(ckpt.params)
    for moment in ("m", "v"):
        assert params_bits(back.optimizer[moment]) == params_bits(ckpt.optimizer[moment])
    assert (back.config, back.step, back.rng_state) == (CONFIG, 123, ckpt.rng_state)


def test_lower_precision_tensors_are_read_exactly(ckpt_file, tmp_path):
    """F32 and F16 tensors (as other tools write them) convert to exactly the same floats."""
    ckpt, path = ckpt_file
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    arrays = {k: v for k, v in load_file(str(path)).items() if not k.startswith("optim.")}
    finite = {k: np.clip(v, -6e4, 6e4) for k, v in arrays.items()}  # representable in float16
    meta = {k: v for k, v in meta.items() if k in ("format", "format_version", "config",
                                                   "tokenizer", "step")}
    for dtype in (np.float32, np.float16):
        low = {k: v.astype(dtype) for k, v in finite.items()}
        file = tmp_path / f"{np.dtype(dtype).name}.safetensors"
        save_file(low, str(file), metadata=meta)
        back = load_checkpoint(file)
        for name, arr in low.items():
            assert float_bits(back.params[name]) == arr.astype("<f8").tobytes(), (dtype, name)


def test_non_puregpt_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"weight": np.zeros((2, 3), np.float32)}, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not a puregpt checkpoint \(metadata format is "
                                              r"'pt'\)"):
        load_checkpoint(path)
    save_file({"weight": np.zeros((2, 3), np.float32)}, str(path))  # no metadata at all
    with pytest.raises(CheckpointError, match="not a puregpt checkpoint"):
        load_checkpoint(path)


# --- damaged files -----------------------------------------------------------------------------


def corruptions(raw: bytes):
    """(label, damaged bytes or a function making them, expected message fragment)."""
    header, n = header_of(raw)
    size = len(raw)

    def edit(fn):  # these files have no checksum (as older ones): what is tested is validation
        h = json.loads(json.dumps(header))
        del h["__metadata__"]["checksum"]
        fn(h)
        return with_header(raw, h)

    def meta(key, value):
        return edit(lambda h: h["__metadata__"].__setitem__(key, value) if value is not None
                    else h["__metadata__"].pop(key))

    def entry(name, key, value):
        return edit(lambda h: h[name].__setitem__(key, value))

    yield "zero bytes", b"", "truncated file (0 bytes): no header length"
    for cut in (1, 4, 7):
        yield f"cut in length field at {cut}", raw[:cut], f"truncated file ({cut} bytes)"
    for cut in (8, 9, 8 + n // 2, 8 + n - 1):
        yield (f"cut in header at {cut}", raw[:cut],
               f"header claims {n} bytes but the file has only {cut - 8} after the length field")
    for cut in (8 + n, 8 + n + 100, size - 8, size - 1):
        yield f"cut in data at {cut}", raw[:cut], f"the file holds only {cut - 8 - n} (truncated"
    yield ("header length beyond the file", struct.pack("<Q", size) + raw[8:],
           f"header claims {size} bytes but the file has only {size - 8}")
    yield ("absurd header length", struct.pack("<Q", 2 ** 63) + raw[8:],
           f"header claims {2 ** 63} bytes")
    yield ("header not JSON", struct.pack("<Q", 6) + b"{oops}", "bad header: it is not valid JSON")
    yield ("header not UTF-8", struct.pack("<Q", 4) + b"\xff\xfe{}", "bad header: not valid JSON")
    yield ("header not UTF-8 inside", struct.pack("<Q", 3) + b"{\xff}",
           "bad header: it is not UTF-8")
    yield ("header a JSON list", struct.pack("<Q", 2) + b"[]",
           "bad header: not valid JSON or not a JSON object (expected a JSON object")
    yield ("header a JSON string", struct.pack("<Q", 4) + b'"hi"',
           "bad header: not valid JSON or not a JSON object (expected a JSON object")
    yield "unknown dtype", entry("wte", "dtype", "I8"), "tensor 'wte' has dtype 'I8'; supported"
    yield "dtype not a string", entry("wte", "dtype", ["F64"]), "tensor 'wte' has dtype ['F64']"
    yield ("offsets not matching shape", entry("wte", "shape", [6, 7]),
           "tensor 'wte': offsets 0..384 do not match shape [6, 7] of F64")
    yield ("offsets not matching dtype", entry("wte", "dtype", "F32"),
           "do not match shape [6, 8] of F32")
    yield ("offsets not numbers", entry("wte", "data_offsets", ["0", "384"]),
           "tensor 'wte' has bad data_offsets ['0', '384'] (expected [begin, end])")
    yield ("three offsets", entry("wte", "data_offsets", [0, 384, 768]), "bad data_offsets")
    yield "shape not a list", entry("wte", "shape", 48), "tensor 'wte' has a bad shape 48"
    yield ("negative dimension", entry("wte", "shape", [-6, -8]),
           "tensor 'wte' has a bad shape [-6, -8]")
    yield ("overlapping tensors", entry("wpe", "data_offsets", [0, 5 * 8 * 8]),
           "(tensors overlap or leave a gap)")
    yield ("trailing bytes", raw + b"\0" * 16,
           "16 bytes after the last tensor's data (not a valid safetensors file)")
    yield ("bad header entry", edit(lambda h: h.__setitem__("wte", [1, 2])),
           "bad header entry for tensor 'wte'")
    yield ("metadata not str to str", edit(lambda h: h.__setitem__("__metadata__", {"a": 1})),
           "__metadata__ must map str to str")
    yield ("unknown format_version", meta("format_version", "2"),
           "unknown checkpoint format version '2'; this puregpt reads version 1")
    yield "no format_version", meta("format_version", None), "unknown checkpoint format version"
    yield "other format", meta("format", "gguf"), "not a puregpt checkpoint"
    yield "config missing", meta("config", None), "bad metadata: no 'config' entry"
    yield ("config unknown key", meta("config", json.dumps({**CONFIG.to_dict(), "n_hidden": 3})),
           "unknown GPTConfig key(s): n_hidden")
    yield ("config bad value", meta("config", json.dumps({**CONFIG.to_dict(), "n_head": 3})),
           "n_embd (8) must be divisible by n_head (3)")
    yield ("step not a number", meta("step", "many"),
           "bad metadata: step must be a non-negative integer, got 'many'")
    yield ("optimizer step not a number", meta("optimizer_step", "x"),
           "bad metadata: optimizer_step must be a non-negative integer, got 'x'")
    yield "trainer not an object", meta("trainer", "[1]"), "trainer state must be a JSON object"
    yield "rng state damaged", meta("rng_state", "[3, [1, 2], null]"), "bad metadata"
    yield ("vocabulary mismatch", meta("tokenizer", json.dumps({"kind": "char", "chars": "abc"})),
           "vocabulary has 4 tokens but the config says vocab_size=6")


def _raw_checkpoint() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ck.safetensors")
        save_checkpoint(path, make_checkpoint())
        with open(path, "rb") as f:
            return f.read()


CASES = list(corruptions(_raw_checkpoint()))


def test_corruption_cases_are_distinct():
    assert len({label for label, _, _ in CASES}) == len(CASES) >= 40
    assert len({blob for _, blob, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("label, blob, message", CASES, ids=[c[0] for c in CASES])
def test_damaged_file_gets_a_clear_error(tmp_path, label, blob, message):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(blob)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert message in str(err.value), str(err.value)
    assert str(err.value).startswith(str(bad)), "the message names the file"


def tensor_file(path, params: dict, meta: dict) -> None:
    atomic_write(path, safetensors_chunks(params, meta))


def test_missing_and_misshapen_tensors(ckpt_file, tmp_path):
    ckpt, path = ckpt_file
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    weights_meta = {k: meta[k] for k in ("format", "format_version", "config", "tokenizer")}

    missing = {k: v for k, v in ckpt.params.items() if k not in ("wte", "layer1.mlp_fc2")}
    tensor_file(tmp_path / "a", missing, weights_meta)
    with pytest.raises(CheckpointError, match=r"missing tensors: wte, layer1\.mlp_fc2$"):
        load_checkpoint(tmp_path / "a")

    transposed = dict(ckpt.params, lm_head=[list(col) for col in zip(*ckpt.params["lm_head"])])
    tensor_file(tmp_path / "b", transposed, weights_meta)
    with pytest.raises(CheckpointError, match=r"tensor lm_head has shape \[8, 6\], the config "
                                              r"needs \[6, 8\]"):
        load_checkpoint(tmp_path / "b")

    extra = dict(ckpt.params, surprise=[1.0, 2.0])
    tensor_file(tmp_path / "c", extra, weights_meta)
    with pytest.raises(CheckpointError, match="unexpected tensors: surprise"):
        load_checkpoint(tmp_path / "c")

    no_moment = dict(ckpt.params, **{f"optim.m.{k}": v for k, v in ckpt.params.items()})
    tensor_file(tmp_path / "d", no_moment, {**weights_meta, "optimizer_step": "3"})
    with pytest.raises(CheckpointError, match=r"optimizer tensor optim\.v\.wte missing"):
        load_checkpoint(tmp_path / "d")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a checkpoint file: it is a directory"):
        load_checkpoint(tmp_path)


def test_cli_reports_a_damaged_checkpoint_without_a_traceback(ckpt_file, tmp_path):
    _, path = ckpt_file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:1000])
    for command in (["info", bad], ["sample", bad], ["train", "--init-from", bad,
                                                     "--out", tmp_path / "run"]):
        proc = run_cli(*command)
        assert proc.returncode == 1, command
        assert proc.stderr.startswith("puregpt: error: ") and "Traceback" not in proc.stderr
        assert "header claims" in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "run").exists()


# --- atomic writes -----------------------------------------------------------------------------


def leftovers(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if p.endswith(".tmp"))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt, OSError])
def test_atomic_write_failing_midway_keeps_the_old_file(tmp_path, exc):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old contents")

    def chunks():
        yield b"x" * 100_000
        raise exc("disk on fire")
    with pytest.raises(exc, match="disk on fire"):
        atomic_write(target, chunks())
    assert target.read_bytes() == b"old contents"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_atomic_write_failing_at_fsync_or_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", broken_fsync)
        with pytest.raises(OSError, match="No space left"):
            atomic_write(target, [b"new"])
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []

    (tmp_path / "a_directory").mkdir()  # os.replace of a file over a directory fails
    with pytest.raises(OSError):
        atomic_write(tmp_path / "a_directory", [b"new"])
    assert leftovers(tmp_path) == [] and (tmp_path / "a_directory").is_dir()


def test_atomic_write_succeeds_without_leftovers(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write(target, (bytes([i]) * 3 for i in range(4)))
    assert target.read_bytes() == b"\0\0\0\1\1\1\2\2\2\3\3\3"
    atomic_write(str(target), [b"replaced"])
    assert target.read_bytes() == b"replaced" and leftovers(tmp_path) == []


def test_failed_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    first = make_checkpoint(0)
    save_checkpoint(path, first)
    before = path.read_bytes()
    second = make_checkpoint(1)
    second.params["wte"][0][0] = object()  # not a float: array() fails mid-stream
    with pytest.raises(TypeError):
        save_checkpoint(path, second)
    assert path.read_bytes() == before and leftovers(tmp_path) == []
    assert params_bits(load_checkpoint(path).params) == params_bits(first.params)
