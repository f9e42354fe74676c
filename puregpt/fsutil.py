"""File helpers that know nothing of models: atomic replacement of a file, durable renames, and
reading untrusted files within limits (regular files only, a size limit, JSON without deep
nesting, huge numbers or millions of values), with short reprs for the error messages.

Every file puregpt writes (checkpoints, metrics, plots, configs, tokenizer files, exports) goes
through `atomic_write`, so a crash at any moment leaves either the old file or the complete new
one, never a half-written file. Every file it reads from a user (checkpoints, corpora, Hugging
Face directories) is read so that a small or hostile file cannot hang it or exhaust memory: a
FIFO or /dev/zero is refused before a byte is read, and a size is checked before it is allocated.
"""

from __future__ import annotations

import json
import os
import reprlib
import stat

# A JSON text may hold at most this many values (counted as its ',', '[' and '{' characters, an
# upper bound, strings included): about 200 MB of Python objects at worst, while a 256k-token
# BPE vocabulary (~1.3M) fits.
MAX_JSON_ITEMS = 2_000_000
# No number a puregpt file holds needs more characters; longer ones are refused before int()
# sees them (str -> int is quadratic in Python 3.10, limited to 4300 digits from 3.11).
MAX_NUMBER_CHARS = 100


class InputError(ValueError):
    """Untrusted input that is malformed or beyond a limit. The message does not name the file:
    callers add its name and raise their own error (CheckpointError, DataError)."""


def atomic_write(path: str, chunks, rewrite=None) -> None:
    """Write `chunks` (bytes objects) to path so that a crash at any moment leaves either the old
    file or the complete new one: write a temporary file beside it, flush and fsync it, then
    rename it over the target (atomic on POSIX) and fsync the directory so the rename survives.

    rewrite: called once every chunk is written, it returns (offset, bytes) pairs written over the
    file before it is synced (a header summing up the data that followed it, e.g. a checksum).
    An operating-system error (disk full, permission denied) is raised as an OSError of the same
    kind naming `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            for offset, data in (rewrite() if rewrite else ()):
                f.seek(offset)
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # a system call failed: say where
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
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


# --- reading untrusted files -------------------------------------------------------------------


def open_regular(path: str):
    """(binary file object, size) of a regular file. A FIFO, a device (/dev/zero), a socket or a
    directory raises InputError without blocking or reading (opened non-blocking, then checked
    with fstat, so no race with a rename in between); a missing or unreadable file raises the
    OSError of open()."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)"
                    if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                    else "not a regular file")
            raise InputError(f"is {kind}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: str, limit: int) -> bytes:
    """A regular file's bytes, at most `limit` of them (else InputError, before reading them)."""
    f, size = open_regular(path)
    with f:
        if size > limit:
            raise InputError(f"is {size:,} bytes, more than the limit of {limit:,}")
        # read(n) allocates n bytes at once: ask for what the file holds, then (a file growing
        # while read, a /proc file of size 0) go on in chunks, no further than the limit
        chunks = [f.read(size + 1)]
        total = len(chunks[0])
        while chunks[-1] and total <= limit:
            chunks.append(f.read(min(1 << 20, limit + 1 - total)))
            total += len(chunks[-1])
    if total > limit:
        raise InputError(f"holds more than the limit of {limit:,} bytes")
    return b"".join(chunks)


def _number(convert):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            raise InputError(f"holds a number of {len(text):,} characters (at most "
                             f"{MAX_NUMBER_CHARS} are accepted)")
        return convert(text)
    return parse


_PARSE_INT, _PARSE_FLOAT = _number(int), _number(float)


def parse_json(data: bytes | str, max_items: int = MAX_JSON_ITEMS):
    """A JSON document from untrusted text (bytes must be UTF-8). Deep nesting, numbers longer than
    MAX_NUMBER_CHARS and more than max_items values raise InputError, in time and memory
    proportional to the text."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"is not UTF-8 ({e.reason} at byte {e.start})") from None
    items = data.count(",") + data.count("[") + data.count("{")
    if items > max_items:
        raise InputError(f"holds about {items:,} JSON values, more than the limit of "
                         f"{max_items:,}")
    try:
        return json.loads(data, parse_int=_PARSE_INT, parse_float=_PARSE_FLOAT)
    except RecursionError:  # the C decoder counts its depth: a clean error, no crash
        raise InputError("is JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise InputError(f"is not valid JSON ({e})") from None


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxdict = _REPR.maxtuple = _REPR.maxset = 6
_REPR.maxlevel = 3


def brief(value) -> str:
    """repr(value) cut to about 60 characters, for error messages quoting untrusted input."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int beyond Python's str() digit limit
        return f"<an integer of about {int(value.bit_length() * 0.30103):,} digits>"


def brief_names(names, limit: int = 8) -> str:
    """Names joined by ", ", at most `limit` of them (each cut to 60 characters)."""
    names = list(names)
    shown = [n if len(n) <= 60 else n[:57] + "..." for n in map(str, names[:limit])]
    more = f" and {len(names) - limit:,} more" if len(names) > limit else ""
    return ", ".join(shown) + more
