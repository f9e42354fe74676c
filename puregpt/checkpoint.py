"""Checkpoints: one self-describing file in the safetensors layout, read and written with struct,
json and array. Loading a file never runs code (no pickle).

    8 bytes       little-endian u64: N, the length of the JSON header
    N bytes       JSON: {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}
    the rest      raw little-endian tensor data; data_offsets are [begin, end) within it

A puregpt checkpoint's metadata holds the format name and version, a checksum, the model config,
the vocabulary, the step, and (for training) the train config, optimizer step, RNG state and
trainer state. Weights are F64 (Python floats, bit for bit); Adam's moments are stored as tensors
named "optim.m.<param>" and "optim.v.<param>".

Loading trusts nothing in the file: every problem is a CheckpointError naming the file. Sizes are
checked against the file's size and puregpt's limits before anything is allocated (a 40 KB file
cannot make it build a million layers), the JSON is parsed within bounds (fsutil.parse_json), the
checksum is verified before the metadata is interpreted, every metadata entry is validated, and
weights must be finite and below MAX_WEIGHT in magnitude, so a model that loads also samples.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import random
import re
import struct
import sys
from array import array
from dataclasses import dataclass, field, fields
from itertools import chain

from .config import ADDED_MODEL_FIELDS, ADDED_TRAIN_FIELDS, ConfigError, GPTConfig, TrainConfig
from .fsutil import InputError, atomic_write, brief, brief_names, open_regular, parse_json
from .tokenizer import tokenizer_from_dict

FORMAT = "puregpt"
FORMAT_VERSION = 1
# The header (tensor index + metadata) at most: a 256k-token BPE vocabulary needs ~16 MB of it.
# (The safetensors library allows 100 MB; a longer header is refused before it is read.)
MAX_HEADER = 64 * 1024 * 1024

# dtype -> (bytes per element, array typecode or None when array cannot hold it directly)
DTYPES = {"F64": (8, "d"), "F32": (4, "f"), "F16": (2, None), "BF16": (2, None)}

# A weight must be smaller than this in magnitude (and finite). Trained weights are below ~100;
# with weights below 2**65 every activation stays below ~1e150 even at the largest sizes
# config.MODEL_LIMITS allows (65,536 wide, 1,024 layers), so sampling and scoring never overflow.
# A bigger value is damage (one flipped exponent bit turns 0.05 into 1e+153).
MAX_WEIGHT = 2.0 ** 65

CHECKSUM = "checksum"  # the metadata entry; see content_checksum
_CHECKSUM_PLACEHOLDER = "sha256:" + "0" * 64  # written first, replaced once the data is hashed


class CheckpointError(ValueError):
    """A checkpoint or safetensors file that cannot be read; the message says why."""


# --- the safetensors layout --------------------------------------------------------------------


ROW_TYPES = (list, tuple, array)  # a matrix is a list of rows of any of these (ROWS below)


def _is_matrix(t) -> bool:
    return bool(t) and isinstance(t[0], ROW_TYPES)


def _shape(t) -> list[int]:
    return [len(t), len(t[0])] if _is_matrix(t) else [len(t)]


def _to_bytes(values, typecode: str) -> bytes:
    a = array(typecode, values)
    if sys.byteorder == "big":  # the format is little-endian whatever the machine
        a.byteswap()
    return a.tobytes()


def _dtype(t) -> str:
    """F32 for a matrix of array('f') rows (imported float32 weights, stored as they came:
    exactly, in half the bytes), else F64."""
    return "F32" if _is_matrix(t) and all(isinstance(r, array) and r.typecode == "f"
                                          for r in t) else "F64"


def _tensor_bytes(t) -> bytes:
    """A tensor's little-endian bytes in its _dtype. Rows that are already arrays are copied as
    bytes (no float objects: what makes saving an imported GPT-2 fast)."""
    if _dtype(t) == "F32":
        return b"".join([_to_bytes(r, "f") if sys.byteorder == "big" else r.tobytes()
                         for r in t])
    if sys.byteorder == "little" and _is_matrix(t) and all(
            isinstance(r, array) and r.typecode == "d" for r in t):
        return b"".join([r.tobytes() for r in t])
    if _is_matrix(t):
        return b"".join([_to_bytes(r, "d") for r in t])  # row by row: no flat list of it all
    return _to_bytes(t, "d")


def _header_blob(tensors: dict, metadata: dict[str, str]) -> bytes:
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        dtype = _dtype(t)
        n = math.prod(_shape(t)) * DTYPES[dtype][0]
        header[name] = {"dtype": dtype, "shape": _shape(t), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return blob + b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned (spec allows)


def _data_chunks(tensors: dict, hashes: dict | None = None):
    """Each tensor's F64 bytes; with `hashes`, records name -> [dtype, shape, sha256 hex] of each
    as it streams past (no second copy of the data is kept)."""
    for name, t in tensors.items():
        data = _tensor_bytes(t)
        if hashes is not None:
            hashes[name] = [_dtype(t), _shape(t), hashlib.sha256(data).hexdigest()]
        yield data


def safetensors_chunks(tensors: dict, metadata: dict[str, str]):
    """Byte chunks of a safetensors file holding `tensors` (name -> matrix or vector) as F64."""
    blob = _header_blob(tensors, metadata)
    yield struct.pack("<Q", len(blob))
    yield blob
    yield from _data_chunks(tensors)


def content_checksum(metadata: dict[str, str], tensors: dict[str, list]) -> str:
    """The "checksum" metadata entry: "sha256:" + the SHA-256 (hex) of the compact, key-sorted
    JSON {"metadata": every other metadata entry, "tensors": {name: [dtype, shape, SHA-256 hex of
    the tensor's bytes]}}. It covers what every byte means, not the file's layout: a tool that
    reorders the tensors (as the safetensors library does) keeps it valid."""
    summary = {"metadata": {k: v for k, v in metadata.items() if k != CHECKSUM},
               "tensors": tensors}
    text = json.dumps(summary, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_header(f, path: str, file_size: int) -> tuple[dict, int]:
    """Parse and validate the header; returns (header, offset where tensor data starts). Every
    size it declares is checked against the file's size before anything of that size exists."""
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated file ({file_size} bytes): no header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > file_size:
        limit = (f" (and puregpt reads headers of at most {MAX_HEADER:,})"
                 if n > MAX_HEADER else "")
        raise CheckpointError(f"{path}: header claims {n} bytes but the file has only "
                              f"{file_size - 8} after the length field{limit} (truncated or not "
                              f"a safetensors file)")
    first = f.read(1)
    if first != b"{":  # as the safetensors library requires; a sparse file's zeros stop here
        raise CheckpointError(f"{path}: bad header: not valid JSON or not a JSON object "
                              f"(expected a JSON object, starting with '{{'; found "
                              f"{brief(first)})")
    try:
        header = parse_json(first + f.read(n - 1))
    except InputError as e:
        raise CheckpointError(f"{path}: bad header: it {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: bad header: expected a JSON object")
    data_size = file_size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{path}: bad header: __metadata__ must map str to str")
            continue
        what = f"{path}: tensor {brief(name)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: bad header entry for tensor {brief(name)}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
            raise CheckpointError(f"{what} has dtype {brief(info['dtype'])}; "
                                  f"supported: {', '.join(DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{what} has a bad shape {brief(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise CheckpointError(f"{what} has bad data_offsets {brief(offsets)} "
                                  f"(expected [begin, end])")
        begin, end = offsets
        if end > data_size:
            raise CheckpointError(f"{what} ends at byte {end} of the data but "
                                  f"the file holds only {data_size} (truncated file)")
        elements = _elements(shape, data_size)
        if elements is None or end - begin != elements * DTYPES[info["dtype"]][0]:
            raise CheckpointError(f"{what}: offsets {begin}..{end} do not "
                                  f"match shape {brief(shape)} of {info['dtype']}")
        spans.append((begin, end, name))
    # as the format requires (and the safetensors library checks): the tensors tile the data
    # exactly, without gaps or overlaps, and nothing follows the last one
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise CheckpointError(f"{path}: tensor {brief(name)} starts at byte {begin} of the "
                                  f"data, expected {at} (tensors overlap or leave a gap)")
        at = end
    if at != data_size:
        raise CheckpointError(f"{path}: {data_size - at} bytes after the last tensor's data "
                              f"(not a valid safetensors file)")
    return header, 8 + n


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _elements(shape: list[int], data_size: int) -> int | None:
    """The number of elements of a shape, or None once it exceeds what data_size bytes could
    hold (so a shape of many huge dimensions costs no big-number arithmetic)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > data_size:
            return None
    return n


def _decode(raw, dtype: str) -> array:
    """A tensor's little-endian bytes as an array of C doubles or floats (F32/F16/BF16 exactly):
    one bulk conversion, no Python float per element until rows are built (_rows)."""
    if dtype == "F16":
        return array("d", struct.unpack(f"<{len(raw) // 2}e", raw))
    if dtype == "BF16":  # bfloat16 is the top half of a float32: shift it back into place
        halves = array("H")
        halves.frombytes(raw)
        if sys.byteorder == "big":
            halves.byteswap()
        vals = array("f")
        vals.frombytes(array("I", [h << 16 for h in halves]).tobytes())
        return vals
    vals = array(DTYPES[dtype][1])
    vals.frombytes(raw)
    if sys.byteorder == "big":
        vals.byteswap()
    return vals


def _read_exactly(f, offset: int, n: int, path: str) -> bytearray:
    """The n bytes at offset, read straight into one buffer (no chunks joined: one copy less)."""
    f.seek(offset)
    buf = bytearray(n)
    view, at = memoryview(buf), 0
    while at < n:
        got = f.readinto(view[at:])
        if not got:
            raise CheckpointError(f"{path}: the file ended early (changed while being read?)")
        at += got
    view.release()
    return buf


def _top_bytes_table(flag) -> bytes:
    return bytes(int(bool(flag(b))) for b in range(256))


# kind -> (flags over each float64's top byte, sign + 7 exponent bits: a cheap superset of the bad
# values, scanned at C speed; the exact test; what a bad finite value is, and why)
VALUE_RULES = {
    "weight": (_top_bytes_table(lambda b: (b & 0x7F) >= 0x44),  # exponent >= 1088: |x| >= 2**65
               lambda x: abs(x) < MAX_WEIGHT, "too large for a weight",
               "; puregpt accepts magnitudes below 2**65, about 3.7e19: beyond, the forward pass "
               "can overflow"),
    "moment": (_top_bytes_table(lambda b: (b & 0x7F) == 0x7F), math.isfinite, "", ""),
    "second moment": (_top_bytes_table(lambda b: b >= 0x80 or (b & 0x7F) == 0x7F),
                      lambda x: 0.0 <= x < math.inf, "negative",
                      "; Adam's second moment is a mean of squares"),
}


# float32 weights: exponent >= 192 (|x| >= 2**65, or not finite) is the top byte's low 7 bits >= 96
_WEIGHT_FLAGS_F32 = _top_bytes_table(lambda b: (b & 0x7F) >= 0x60)


def bad_value(values: list[float], kind: str, raw_f64: bytes | None = None,
              raw_f32: bytes | None = None) -> str | None:
    """None when every value suits `kind` (see VALUE_RULES), else which is the first bad one and
    why. raw_f64 / raw_f32: the values' little-endian float64 / float32 bytes, when at hand
    (saves converting; float32 weights are screened on their own top bytes)."""
    flags, ok, what, why = VALUE_RULES[kind]
    if raw_f32 is not None and kind == "weight":
        if 1 not in raw_f32[3::4].translate(_WEIGHT_FLAGS_F32):  # exact for float32
            return None
    else:
        if raw_f64 is None:
            raw_f64 = _to_bytes(values, "d")
        if 1 not in raw_f64[7::8].translate(flags):  # the fast path: nothing even suspicious
            return None
    for i, x in enumerate(values):
        if not ok(x):
            if not math.isfinite(x):
                return f"a value that is not finite ({x!r} at index {i})"
            return f"a value that is {what} ({x!r} at index {i}{why})"
    return None


def read_tensor_array(f, info: dict, data_start: int, path: str, name: str,
                      kind: str = "weight", raw_out: list | None = None) -> array:
    """One tensor's values as a flat array ('d', or 'f' for F32/BF16 data), checked
    (bad_value): a bad value is a CheckpointError naming the tensor. raw_out: a list that
    receives the tensor's raw bytes (for its checksum)."""
    begin, end = info["data_offsets"]
    raw = _read_exactly(f, data_start + begin, end - begin, path)
    if raw_out is not None:
        raw_out.append(raw)
    values = _decode(raw, info["dtype"])
    problem = bad_value(values, kind, raw if info["dtype"] == "F64" else None,
                        raw if info["dtype"] == "F32" and sys.byteorder == "little" else None)
    if problem:
        raise CheckpointError(f"{path}: tensor {name} holds {problem}")
    return values


def read_tensor(f, info: dict, data_start: int, path: str, name: str,
                kind: str = "weight") -> list[float]:
    """One tensor's values as a flat list of Python floats, checked as read_tensor_array."""
    return read_tensor_array(f, info, data_start, path, name, kind).tolist()


# How load_checkpoint builds a matrix's rows: "list" (lists of floats, what training uses),
# "tuple" (tuples of floats: what math.dist reads fastest, for decoding), "array" (array rows,
# 'd', or 'f' for float32 data: 8 or 4 bytes a value instead of 32: the compact layout).
# Vectors are lists in every case.
ROWS = ("list", "tuple", "array")


def _rows(values: array, shape: list[int], rows: str = "list"):
    """A flat array in the tensor's shape: a vector as a list, a matrix as rows of `rows` kind,
    each built from its own slice (no flat list of the whole tensor is ever made)."""
    if len(shape) == 1:
        return values.tolist()
    if len(shape) != 2:
        raise CheckpointError(f"puregpt tensors are 1-D or 2-D, got shape {brief(shape)}")
    n, cols = shape
    spans = range(0, n * cols, cols)
    if rows == "array":  # float32 data stays float32: 4 bytes a value, and exact
        return [values[i:i + cols] for i in spans]
    if rows == "tuple":
        return [tuple(values[i:i + cols]) for i in spans]
    return [values[i:i + cols].tolist() for i in spans]


def unflatten(values: list, shape: list[int]):
    if len(shape) == 1:
        return values
    if len(shape) != 2:
        raise CheckpointError(f"puregpt tensors are 1-D or 2-D, got shape {brief(shape)}")
    rows, cols = shape
    return [values[r * cols:(r + 1) * cols] for r in range(rows)]


# --- puregpt checkpoints -----------------------------------------------------------------------


@dataclass
class Checkpoint:
    config: GPTConfig
    tokenizer: object
    params: dict
    step: int = 0
    train_config: TrainConfig | None = None
    optimizer: dict | None = None  # {"step", "m", "v"} as optim.new_state: flat lists per name
    rng_state: tuple | None = None
    trainer: dict = field(default_factory=dict)  # trainer bookkeeping (data position, best loss)


# The metadata entries a puregpt checkpoint may hold (any other is refused), and the trainer
# state's keys with what each must be.
METADATA_KEYS = (CHECKSUM, "format", "format_version", "config", "tokenizer", "step", "trainer",
                 "train_config", "rng_state", "optimizer_step")
TRAINER_FIELDS = {
    "data": (lambda v: isinstance(v, str), "a string (the corpus's path)"),
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None,
               "the corpus's SHA-256 as 64 hex digits"),
    "mode": (lambda v: isinstance(v, str) and v in ("docs", "stream"), "docs or stream"),
    "best_val": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                         and math.isfinite(v)), "a finite number or null"),
    "imported_from": (lambda v: isinstance(v, str), "a string (the directory imported)"),
}


def save_checkpoint(path, ckpt: Checkpoint) -> None:
    """Write ckpt atomically (see atomic_write), with its checksum (see content_checksum),
    computed as the data streams to the file and then written over a placeholder."""
    meta = {
        CHECKSUM: _CHECKSUM_PLACEHOLDER,  # first: nothing before it in the header can match it
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(ckpt.config.to_dict()),
        "tokenizer": json.dumps(ckpt.tokenizer.to_dict()),
        "step": str(ckpt.step),
        "trainer": json.dumps(ckpt.trainer),
    }
    tensors = dict(ckpt.params)
    if ckpt.train_config is not None:
        meta["train_config"] = json.dumps(ckpt.train_config.to_dict())
    if ckpt.rng_state is not None:
        version, internal, gauss_next = ckpt.rng_state
        meta["rng_state"] = json.dumps([version, list(internal), gauss_next])
    if ckpt.optimizer is not None:
        meta["optimizer_step"] = str(ckpt.optimizer["step"])
        for moment in ("m", "v"):
            for name, flat in ckpt.optimizer[moment].items():  # flat, stored in its param's shape
                tensors[f"optim.{moment}.{name}"] = unflatten(flat, _shape(ckpt.params[name]))
    blob = _header_blob(tensors, meta)
    at = 8 + blob.index(_CHECKSUM_PLACEHOLDER.encode())
    hashes = {}
    chunks = chain([struct.pack("<Q", len(blob)), blob], _data_chunks(tensors, hashes))
    atomic_write(path, chunks, rewrite=lambda: [(at, content_checksum(meta, hashes).encode())])


def load_checkpoint(path, rows: str = "list") -> Checkpoint:
    """Read a checkpoint written by save_checkpoint; every problem is a CheckpointError naming
    the file (a missing, unreadable or non-regular file too). rows: how matrices are built, one
    of ROWS ("list" for training; "tuple" or "array" for decoding, see decode.py)."""
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {', '.join(ROWS)}, got {rows!r}")
    path = os.fspath(path)
    try:
        f, size = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except InputError as e:
        raise CheckpointError(f"{path}: not a checkpoint file: it {e}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint: {e.strerror or e}") from None
    enabled = gc.isenabled()
    gc.disable()  # millions of new rows would trigger full collections that find no garbage
    try:
        with f:
            return _load(f, path, size, rows)
    except OSError as e:  # an I/O error while reading
        raise CheckpointError(f"{path}: cannot read the checkpoint: {e.strerror or e}") from None
    finally:
        if enabled:
            gc.enable()


class _Hashes:
    """The tensors' SHA-256s for the checksum, computed in one pass with the loading: each
    tensor's bytes are hashed on a thread while the next one is converted (hashlib releases the
    GIL on large buffers, so the hashing costs no wall time on a second core), instead of a
    separate reading pass before loading."""

    def __init__(self, f, path, tensors: dict, data_start: int):
        self.f, self.path, self.tensors, self.data_start = f, path, tensors, data_start
        from concurrent.futures import ThreadPoolExecutor  # (here: ~4 ms of every start)
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending, self.hashes = [], {}

    def add(self, name: str, raw) -> None:
        if len(self.pending) >= 2:  # at most two tensors' bytes wait: memory stays bounded
            self._collect(self.pending.pop(0))
        self.pending.append((name, self.pool.submit(lambda: hashlib.sha256(raw).hexdigest())))

    def _collect(self, item) -> None:
        name, future = item
        info = self.tensors[name]
        self.hashes[name] = [info["dtype"], info["shape"], future.result()]

    def check(self, meta: dict) -> None:
        """Hash what loading has not read (everything, after an early error), then compare:
        a mismatch is reported as damage, before any other problem the damage caused."""
        try:
            for name, info in self.tensors.items():
                if name not in self.hashes and all(n != name for n, _ in self.pending):
                    begin, end = info["data_offsets"]
                    self.add(name, _read_exactly(self.f, self.data_start + begin, end - begin,
                                                 self.path))
            while self.pending:
                self._collect(self.pending.pop(0))
        finally:
            self.pool.shutdown()
        if content_checksum(meta, self.hashes) != meta[CHECKSUM]:
            raise CheckpointError(f"{self.path}: checksum mismatch: the file's contents are not "
                                  f"what was saved (a changed byte, or tensors swapped or "
                                  f"renamed): the file is damaged. (A file converted on purpose "
                                  f"by another tool loads once its \"{CHECKSUM}\" metadata "
                                  f"entry is removed.)")


def _load(f, path: str, size: int, rows: str = "list") -> Checkpoint:
    header, data_start = read_header(f, path, size)
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a puregpt checkpoint (metadata format is "
                              f"{brief(meta.get('format'))}); to use a Hugging Face GPT-2 "
                              f"directory, run `puregpt import-hf`")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: unknown checkpoint format version "
                              f"{brief(meta.get('format_version'))}; this puregpt reads version "
                              f"{FORMAT_VERSION}")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    hashes = None
    if CHECKSUM in meta:
        if re.fullmatch("sha256:[0-9a-f]{64}", meta[CHECKSUM]) is None:
            raise CheckpointError(f"{path}: bad metadata: checksum {brief(meta[CHECKSUM])} is "
                                  f"not \"sha256:\" and 64 hex digits")
        hashes = _Hashes(f, path, tensors, data_start)
    try:
        ckpt = _interpret(f, path, meta, tensors, data_start, rows, hashes)
    except CheckpointError:
        if hashes is not None:  # damage is reported as damage, whatever it broke first
            hashes.check(meta)
        raise
    finally:
        if hashes is not None:
            hashes.pool.shutdown(wait=False)  # (check has joined it, unless I/O failed)
    if hashes is not None:
        hashes.check(meta)
    return ckpt


def _interpret(f, path: str, meta: dict, tensors: dict, data_start: int, rows: str,
               hashes: _Hashes | None) -> Checkpoint:
    """The checkpoint the header and data describe (the checksum is _load's business)."""

    def read(name, info, kind="weight"):
        raw = [] if hashes is not None else None
        try:
            return read_tensor_array(f, info, data_start, path, name, kind, raw)
        finally:
            if raw:
                hashes.add(name, raw[0])

    unknown = [k for k in meta if k not in METADATA_KEYS]
    if unknown:
        raise CheckpointError(f"{path}: bad metadata: unknown entries {brief_names(unknown)} "
                              f"(known: {', '.join(METADATA_KEYS)})")
    try:
        config = _stored_config(GPTConfig, _entry(meta, "config"), ADDED_MODEL_FIELDS, "config")
        tokenizer = tokenizer_from_dict(_entry(meta, "tokenizer"))
        train_config = (_stored_config(TrainConfig, _entry(meta, "train_config"),
                                       ADDED_TRAIN_FIELDS, "train_config")
                        if "train_config" in meta else None)
        step = _count(meta, "step", 0)
        opt_step = _count(meta, "optimizer_step", None)
        trainer = _trainer_state(_entry(meta, "trainer", "{}"))
        rng_state = _rng_state(_entry(meta, "rng_state")) if "rng_state" in meta else None
    except KeyError as e:
        raise CheckpointError(f"{path}: bad metadata: no {e} entry") from None
    except (ValueError, TypeError) as e:  # ConfigError and InputError are ValueErrors
        raise CheckpointError(f"{path}: bad metadata: {e}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{path}: vocabulary has {tokenizer.vocab_size} tokens but "
                              f"the config says vocab_size={config.vocab_size}")
    from .model import check_size, num_params_of, param_shapes
    # the config's size against the file's, by arithmetic alone (model.num_params_of)
    need = num_params_of(config)
    held = sum(math.prod(info["shape"]) for name, info in tensors.items()
               if not name.startswith("optim."))
    try:
        check_size(config)
        # the dict has at most ~20 entries per layer, and MODEL_LIMITS bounds the layers: it is
        # affordable even when the config is too big for the file (to name what is missing)
        shapes = param_shapes(config)
    except ConfigError as e:
        raise CheckpointError(f"{path}: bad metadata: {e}") from None
    missing = [n for n in shapes if n not in tensors]
    if need > held:
        raise CheckpointError(f"{path}: the config describes a model of {need:,} parameters "
                              f"(n_layer={config.n_layer}, n_embd={config.n_embd}, vocab_size="
                              f"{config.vocab_size}, block_size={config.block_size}) but the "
                              f"file's tensors hold only {held:,} values"
                              + (f": missing tensors: {brief_names(missing)}" if missing else ""))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {brief_names(missing)}")
    expected = set(shapes)
    if opt_step is not None:
        expected |= {f"optim.{m}.{name}" for m in ("m", "v") for name in shapes}
    params, optimizer = {}, None
    for name, shape in shapes.items():
        if tuple(tensors[name]["shape"]) != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape "
                                  f"{brief(tensors[name]['shape'])}, the config needs "
                                  f"{list(shape)}")
        params[name] = _rows(read(name, tensors[name]), list(shape), rows)
    if opt_step is not None:
        optimizer = {"step": opt_step, "m": {}, "v": {}}
        for moment, kind in (("m", "moment"), ("v", "second moment")):
            for name, shape in shapes.items():
                key = f"optim.{moment}.{name}"
                if key not in tensors or tuple(tensors[key]["shape"]) != shape:
                    raise CheckpointError(f"{path}: optimizer tensor {key} missing or "
                                          f"misshapen")
                optimizer[moment][name] = read(key, tensors[key], kind).tolist()
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        why = (" (optimizer moments without an optimizer_step)" if opt_step is None and
               all(n.startswith("optim.") for n in unexpected) else "")
        raise CheckpointError(f"{path}: unexpected tensors: {brief_names(unexpected)}{why}")
    return Checkpoint(config, tokenizer, params, step, train_config, optimizer, rng_state, trainer)


def _entry(meta: dict, key: str, default: str | None = None):
    """A metadata entry's JSON value, parsed within bounds (fsutil.parse_json)."""
    try:
        return parse_json(meta[key] if default is None else meta.get(key, default))
    except InputError as e:
        raise InputError(f"{key} {e}") from None


def _stored_config(cls, d, added: dict, what: str):
    """A config stored in a checkpoint: every field must be there, except the ones added to the
    format later (config.ADDED_MODEL_FIELDS / ADDED_TRAIN_FIELDS), which get the value that
    reproduces older checkpoints."""
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a JSON object, got {brief(d)}")
    absent = [f.name for f in fields(cls) if f.name not in d]
    lacking = [name for name in absent if name not in added]
    if lacking:
        raise ConfigError(f"the stored {what} lacks {brief_names(lacking)}: a checkpoint states "
                          f"every field (only fields added to the format later may be absent: "
                          f"{', '.join(added) or 'none yet'})")
    return cls.from_dict({**{name: added[name] for name in absent}, **d})


def _count(meta: dict, key: str, default):
    """A non-negative integer entry (at most 18 digits), or default when absent."""
    if key not in meta:
        return default
    if re.fullmatch("[0-9]{1,18}", meta[key]) is None:
        raise ValueError(f"{key} must be a non-negative integer, got {brief(meta[key])}")
    return int(meta[key])


def _trainer_state(trainer) -> dict:
    if not isinstance(trainer, dict):
        raise ValueError(f"trainer state must be a JSON object, got {brief(trainer)}")
    unknown = [k for k in trainer if k not in TRAINER_FIELDS]
    if unknown:
        raise ValueError(f"unknown trainer state key(s) {brief_names(unknown)} (known: "
                         f"{', '.join(TRAINER_FIELDS)})")
    for key, value in trainer.items():
        ok, want = TRAINER_FIELDS[key]
        if not ok(value):
            raise ValueError(f"trainer state {key} must be {want}, got {brief(value)}")
    return trainer


def _rng_state(state) -> tuple:
    """Python's random.Random state as [3, [624 words and a position], gauss_next]."""
    if not (isinstance(state, list) and len(state) == 3):
        raise ValueError(f"rng_state must be [version, [625 integers], gauss_next], got "
                         f"{brief(state)}")
    version, internal, gauss_next = state
    if not (type(version) is int and version == 3):
        raise ValueError(f"rng_state version must be 3 (Python's random), got {brief(version)}")
    if not (isinstance(internal, list) and len(internal) == 625
            and all(type(w) is int and 0 <= w < 2 ** 32 for w in internal[:624])
            and type(internal[624]) is int and 0 <= internal[624] <= 624):
        raise ValueError("rng_state must hold 624 words of 32 bits and a position 0..624")
    if gauss_next is not None:
        if not (type(gauss_next) in (int, float) and math.isfinite(gauss_next)):
            raise ValueError(f"rng_state's gauss_next must be a finite number or null, got "
                             f"{brief(gauss_next)}")
        gauss_next = float(gauss_next)
    state = (3, tuple(internal), gauss_next)
    random.Random().setstate(state)  # what is left to reject, Python's own check rejects now
    return state


def resolve_checkpoint(path: str) -> str:
    """A run directory means its best checkpoint (or its last, without validation)."""
    if os.path.isdir(path):
        for name in ("best.safetensors", "last.safetensors"):
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise CheckpointError(f"{path} holds no checkpoint (best.safetensors or "
                              f"last.safetensors); train one with: puregpt train --out {path}")
    if not os.path.exists(path):
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    return path
