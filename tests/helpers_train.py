"""Helpers shared by the training, checkpoint, data and CLI tests: where the repository and the
shared corpora are, running the CLI in a subprocess from this checkout, tiny run settings,
bit-exact comparison of tensors, and snapshots of a run directory (to prove nothing changed)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # ../shared/data: names.txt, tinyshakespeare.txt
BUNDLED_NAMES = REPO / "puregpt" / "data" / "names.txt"

needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} is absent")

# A model and a run small enough that a CLI training run takes well under a second.
TINY_MODEL = ["--n-embd", "8", "--n-head", "2", "--block-size", "8"]
TINY_RUN = TINY_MODEL + ["--batch-size", "1", "--schedule", "linear", "--warmup", "0",
                        "--workers", "1", "--samples", "0", "--eval-tokens", "64"]


def cli_env() -> dict:
    """The environment of a CLI subprocess: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in
                                                       [env.get("PYTHONPATH")] if p])
    return env


def run_cli(*args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """`python -m puregpt ARGS` from this checkout; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, "-m", "puregpt", *map(str, args)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def run_python(script: str, *args, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """A Python driver script (source text) in a subprocess, with this checkout importable."""
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def names_file(tmp_path: Path, n: int = 200, name: str = "names.txt") -> Path:
    """The first n names of the bundled corpus (always present) as a data file."""
    lines = BUNDLED_NAMES.read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stream_text(n_chars: int = 4000) -> str:
    """A few KB of continuous text: tinyshakespeare when the shared data is there, otherwise a
    generated text with the same character (blank lines between paragraphs)."""
    if (SHARED / "tinyshakespeare.txt").is_file():
        return (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")[:n_chars]
    import random
    rng = random.Random(0)
    words = "the king shall not speak of love and war to my lord but thou art here".split()
    out = []
    while sum(map(len, out)) < n_chars:
        out.append(" ".join(rng.choice(words) for _ in range(rng.randrange(4, 12))).capitalize()
                   + (".\n\n" if rng.random() < 0.3 else ",\n"))
    return "".join(out)[:n_chars]


def float_bits(values) -> bytes:
    """The exact bits of a tensor (matrix or vector) or of a list of tensors: comparing these
    compares floats bit for bit (-0.0 differs from 0.0, a NaN equals itself)."""
    flat = []

    def walk(x):
        if isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        else:
            flat.append(x)
    walk(values)
    return struct.pack(f"<{len(flat)}d", *flat)


def params_bits(params: dict) -> dict:
    return {name: float_bits(t) for name, t in params.items()}


def snapshot(directory: Path) -> dict:
    """Every file of a directory (recursively) with its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def metrics_rows(run_dir: Path) -> list[dict]:
    import json
    text = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# The per-step numbers of metrics.jsonl that a resumed run must reproduce exactly (time and
# throughput are wall-clock measurements and differ).
EXACT_KEYS = ("step", "loss", "lr", "tokens", "val_loss", "novel_frac")


def exact_rows(run_dir: Path) -> list[tuple]:
    return [tuple(row.get(k) for k in EXACT_KEYS) for row in metrics_rows(run_dir)]

