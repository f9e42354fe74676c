"""Checkpoints: one self-describing file in the safetensors layout, read and written with struct,
json and array. Loading a file never runs code (no pickle).

    8 bytes       little-endian u64: N, the length of the JSON header
    N bytes       JSON: {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}
    the rest      raw little-endian tensor data; data_offsets are [begin, end) within it

A puregpt checkpoint's metadata holds the format name and version, the model config, the
vocabulary, the step, and (for training) the train config, optimizer step, RNG state and trainer
state. Weights are F64 (Python floats, bit for bit); Adam's moments are stored as tensors named
"optim.m.<param>" and "optim.v.<param>".
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import sys
from array import array
from dataclasses import dataclass, field

from .config import GPTConfig, TrainConfig
from .fsutil import atomic_write
from .tokenizer import tokenizer_from_dict

FORMAT = "puregpt"
FORMAT_VERSION = 1
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

# dtype -> (bytes per element, array typecode or None when array cannot hold it directly)
DTYPES = {"F64": (8, "d"), "F32": (4, "f"), "F16": (2, None), "BF16": (2, None)}


class CheckpointError(ValueError):
    """A checkpoint or safetensors file that cannot be read; the message says why."""


# --- the safetensors layout --------------------------------------------------------------------


def _flatten(t) -> list:
    return [x for row in t for x in row] if t and isinstance(t[0], list) else list(t)


def _shape(t) -> list[int]:
    return [len(t), len(t[0])] if t and isinstance(t[0], list) else [len(t)]


def _to_bytes(values, typecode: str) -> bytes:
    a = array(typecode, values)
    if sys.byteorder == "big":  # the format is little-endian whatever the machine
        a.byteswap()
    return a.tobytes()


def safetensors_chunks(tensors: dict, metadata: dict[str, str]):
    """Byte chunks of a safetensors file holding `tensors` (name -> matrix or vector) as F64."""
    header, offset = {"__metadata__": metadata}, 0
    for name, t in tensors.items():
        n = len(t) * (len(t[0]) if t and isinstance(t[0], list) else 1)
        header[name] = {"dtype": "F64", "shape": _shape(t), "data_offsets": [offset, offset + 8 * n]}
        offset += 8 * n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned, as the spec allows
    yield struct.pack("<Q", len(blob))
    yield blob
    for t in tensors.values():
        yield _to_bytes(_flatten(t), "d")


def read_header(f, path: str, file_size: int) -> tuple[dict, int]:
    """Parse and validate the header; returns (header, offset where tensor data starts)."""
    raw = f.read(8)
    if len(raw) < 8:
        raise CheckpointError(f"{path}: truncated file ({file_size} bytes): no header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER or 8 + n > file_size:
        raise CheckpointError(f"{path}: header claims {n} bytes but the file has only "
                              f"{file_size - 8} after the length field (truncated or not "
                              f"a safetensors file)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: bad header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: bad header: expected a JSON object")
    data_size = file_size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{path}: bad header: __metadata__ must map str to str")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: bad header entry for tensor {name!r}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}; "
                                  f"supported: {', '.join(DTYPES)}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise CheckpointError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r} "
                                  f"(expected [begin, end])")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPES[info["dtype"]][0] or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: offsets {begin}..{end} do not "
                                  f"match shape {shape} of {info['dtype']}")
        if end > data_size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {end} of the data but "
                                  f"the file holds only {data_size} (truncated file)")
        spans.append((begin, end, name))
    # as the format requires (and the safetensors library checks): the tensors tile the data
    # exactly, without gaps or overlaps, and nothing follows the last one
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise CheckpointError(f"{path}: tensor {name!r} starts at byte {begin} of the data, "
                                  f"expected {at} (tensors overlap or leave a gap)")
        at = end
    if at != data_size:
        raise CheckpointError(f"{path}: {data_size - at} bytes after the last tensor's data "
                              f"(not a valid safetensors file)")
    return header, 8 + n


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_values(f, info: dict, data_start: int) -> list[float]:
    """One tensor's values as a flat list of Python floats, converting F32/F16/BF16 exactly."""
    begin, end = info["data_offsets"]
    f.seek(data_start + begin)
    raw = f.read(end - begin)
    dtype = info["dtype"]
    if dtype == "F16":
        return list(struct.unpack(f"<{len(raw) // 2}e", raw))
    if dtype == "BF16":  # bfloat16 is the top half of a float32: shift it back into place
        halves = array("H")
        halves.frombytes(raw)
        if sys.byteorder == "big":
            halves.byteswap()
        raw = array("I", [h << 16 for h in halves]).tobytes()
        dtype = "F32"
        vals = array("f")
        vals.frombytes(raw)
        return vals.tolist()
    vals = array(DTYPES[dtype][1])
    vals.frombytes(raw)
    if sys.byteorder == "big":
        vals.byteswap()
    return vals.tolist()


def unflatten(values: list, shape: list[int]):
    if len(shape) == 1:
        return values
    if len(shape) != 2:
        raise CheckpointError(f"puregpt tensors are 1-D or 2-D, got shape {shape}")
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


def save_checkpoint(path, ckpt: Checkpoint) -> None:
    """Write ckpt atomically (see atomic_write)."""
    meta = {
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
    atomic_write(path, safetensors_chunks(tensors, meta))


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint; every problem is a CheckpointError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        header, data_start = read_header(f, path, size)
        meta = header.get("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a puregpt checkpoint (metadata format is "
                                  f"{meta.get('format')!r}); to use a Hugging Face GPT-2 "
                                  f"directory, run `puregpt import-hf`")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise CheckpointError(f"{path}: unknown checkpoint format version "
                                  f"{meta.get('format_version')!r}; this puregpt reads version "
                                  f"{FORMAT_VERSION}")
        try:
            config = GPTConfig.from_dict(json.loads(meta["config"]))
            tokenizer = tokenizer_from_dict(json.loads(meta["tokenizer"]))
            train_config = (TrainConfig.from_dict(json.loads(meta["train_config"]))
                            if "train_config" in meta else None)
            step = int(meta.get("step", "0"))
            opt_step = int(meta["optimizer_step"]) if "optimizer_step" in meta else None
            trainer = json.loads(meta.get("trainer", "{}"))
            if not isinstance(trainer, dict):
                raise ValueError(f"trainer state must be a JSON object, got {trainer!r}")
            rng_state = None
            if "rng_state" in meta:
                version, internal, gauss_next = json.loads(meta["rng_state"])
                rng_state = (version, tuple(internal), gauss_next)
                random.Random().setstate(rng_state)  # rejects a malformed state now, not later
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: bad metadata: {e}") from None
        if tokenizer.vocab_size != config.vocab_size:
            raise CheckpointError(f"{path}: vocabulary has {tokenizer.vocab_size} tokens but "
                                  f"the config says vocab_size={config.vocab_size}")
        from .model import param_shapes
        shapes = param_shapes(config)
        tensors = {name: info for name, info in header.items() if name != "__metadata__"}
        missing = [n for n in shapes if n not in tensors]
        if missing:
            raise CheckpointError(f"{path}: missing tensors: {', '.join(missing)}")
        params, optimizer = {}, None
        for name, shape in shapes.items():
            if tuple(tensors[name]["shape"]) != shape:
                raise CheckpointError(f"{path}: tensor {name} has shape {tensors[name]['shape']}"
                                      f", the config needs {list(shape)}")
            params[name] = unflatten(read_values(f, tensors[name], data_start), list(shape))
        if opt_step is not None:
            optimizer = {"step": opt_step, "m": {}, "v": {}}
            for moment in ("m", "v"):
                for name, shape in shapes.items():
                    key = f"optim.{moment}.{name}"
                    if key not in tensors or tuple(tensors[key]["shape"]) != shape:
                        raise CheckpointError(f"{path}: optimizer tensor {key} missing or "
                                              f"misshapen")
                    optimizer[moment][name] = read_values(f, tensors[key], data_start)
        unknown = set(tensors) - set(shapes) - {k for k in tensors if k.startswith("optim.")}
        if unknown:
            raise CheckpointError(f"{path}: unexpected tensors: {', '.join(sorted(unknown))}")
    return Checkpoint(config, tokenizer, params, step, train_config, optimizer, rng_state, trainer)


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
