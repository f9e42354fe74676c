"""File-system helpers that know nothing of models: atomic replacement of a file, durable renames.

Every file puregpt writes (checkpoints, metrics, plots, configs, tokenizer files, exports) goes
through `atomic_write`, so a crash at any moment leaves either the old file or the complete new
one, never a half-written file.
"""

from __future__ import annotations

import os


def atomic_write(path: str, chunks) -> None:
    """Write `chunks` (bytes objects) to path so that a crash at any moment leaves either the old
    file or the complete new one: write a temporary file beside it, flush and fsync it, then
    rename it over the target (atomic on POSIX) and fsync the directory so the rename survives."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable (POSIX; a no-op where directories cannot be opened)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
