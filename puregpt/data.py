"""Corpora: reading text, the two data modes, the train/validation split, and batches.

docs mode (names, words, titles: one document per line). Each stripped non-empty line is a
document, encoded [BOS] + tokens + [BOS]; a training example is its first block_size inputs and
their next tokens. A document with more than block_size predictions is either split into windows
that advance by block_size // 2 (long_docs="split": each window but the first masks the targets
the previous one already predicted, so every token is predicted once, always with at least half a
block of context) or truncated to its first window (long_docs="truncate", microgpt). The documents
are shuffled by the seeded RNG (or, with data_seed, by an RNG of their own, so that runs of
different seeds share one split and one order); the last val_fraction of them is the validation set. Step s uses
examples s*B*A ... (s+1)*B*A - 1 (B batch size, A grad_accum), cycling through the training set
in that fixed order, so the data position is a function of the step.

stream mode (continuous text such as Shakespeare). The text, newlines included, is one token
stream; its last val_fraction (a contiguous tail, so no window straddles the split) is
validation. A training example is a window of block_size + 1 tokens at a random offset drawn
from the trainer's RNG, whose state every checkpoint carries.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

from .config import TrainConfig
from .fsutil import InputError, read_limited
from .ops import collector_paused
from .tokenizer import CharTokenizer


class DataError(ValueError):
    """A corpus that cannot be trained on; the message says why and where."""


def bundled_names_path() -> str:
    """The names corpus shipped inside the package (see data/PROVENANCE.md)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "names.txt")


# The largest corpus read_text accepts: 256 MiB (enwik8's 100 MB fits). As token ids a character
# costs a Python list slot (8 bytes), so this is ~2 GB of ids: beyond, pure Python is no place.
MAX_TEXT_BYTES = 256 * 1024 * 1024


def read_text(path: str) -> str:
    """A file's text as UTF-8 with universal newlines; clear errors for anything else: a missing
    or unreadable file, a directory, a FIFO or device (/dev/zero: refused before reading), a file
    beyond MAX_TEXT_BYTES, bytes that are not UTF-8, NUL characters."""
    try:
        raw = read_limited(path, MAX_TEXT_BYTES)
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except InputError as e:
        if "directory" in str(e):
            raise DataError(f"data path is a directory, not a text file: {path}") from None
        raise DataError(f"{path} {e}: a corpus is a UTF-8 text file of at most "
                        f"{MAX_TEXT_BYTES:,} bytes (data.MAX_TEXT_BYTES)") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line}, "
                        f"column {column} (byte offset {e.start}) cannot be decoded "
                        f"({e.reason}); convert the file to UTF-8") from None
    if "\x00" in text:
        raise DataError(f"{path} contains NUL characters: it looks like a binary file, not text")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def detect_mode(text: str) -> tuple[str, str]:
    """docs or stream, with the reason. Blank lines mean paragraphs, and very long lines mean
    prose; a list of short, unseparated lines is a list of documents."""
    lines = text.split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    filled = [ln for ln in lines if ln.strip()]
    if not filled:
        return "docs", "the file is empty"
    blank = (len(lines) - len(filled)) / len(lines)
    lengths = sorted(len(ln) for ln in filled)
    median = (lengths[(len(lengths) - 1) // 2] + lengths[len(lengths) // 2]) / 2
    if blank > 0.02:
        return "stream", f"{blank:.0%} of lines are blank: continuous text with paragraphs"
    if median > 200:
        return "stream", f"lines are long (median {median:.0f} characters): continuous prose"
    return "docs", f"{len(filled)} short lines (median {median:.0f} characters), no blank lines"


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def doc_examples(ids: list[int], block_size: int, long_docs: str):
    """(inputs, targets) pairs of one encoded document; see the module docstring."""
    n_pred = len(ids) - 1
    if n_pred <= block_size or long_docs == "truncate":
        n = min(block_size, n_pred)
        return [(ids[:n], ids[1:n + 1])]
    stride = max(1, block_size // 2)
    examples, start = [], 0
    while True:
        # the last window may be short: it ends at the last prediction (the final token is a
        # target, never an input), so inputs and targets always have the same length
        inputs = ids[start:min(start + block_size, n_pred)]
        targets = ids[start + 1:start + 1 + len(inputs)]
        if start > 0:  # the first block_size - stride targets were predicted by the last window
            targets = [-1] * (block_size - stride) + targets[block_size - stride:]
        examples.append((inputs, targets))
        if start + block_size >= n_pred:
            return examples
        start += stride


def docs_examples(encoded, block_size: int, long_docs: str) -> list:
    """doc_examples of every encoded document, in order, in one list. A document of at most
    block_size predictions, or a truncated one, is one pair, built inline: names, the common
    case, are all short, and a call per document costs ~30% more."""
    B = block_size
    if long_docs == "truncate":
        return [(ids[:-1], ids[1:]) if len(ids) <= B + 1 else (ids[:B], ids[1:B + 1])
                for ids in encoded]
    examples = []
    for ids in encoded:
        if len(ids) <= B + 1:
            examples.append((ids[:-1], ids[1:]))
        else:
            examples.extend(doc_examples(ids, B, long_docs))
    return examples


@dataclass
class Corpus:
    mode: str  # docs | stream
    reason: str  # why auto picked the mode (or "chosen")
    tokenizer: object
    train_docs: list[str]  # docs mode: the training documents, in training order
    val_docs: list[str]
    train_ids: list[int]  # stream mode: the token streams
    val_ids: list[int]
    train_examples: list  # docs mode: (inputs, targets) pairs in training order
    val_examples: list  # a fixed validation sample (docs and stream modes)
    path: str
    sha256: str

    def describe(self) -> str:
        if self.mode == "docs":
            sizes = (f"{len(self.train_docs):,} training documents ({len(self.train_examples):,} "
                     f"examples), {len(self.val_docs):,} validation")
        else:
            sizes = f"{len(self.train_ids):,} training tokens, {len(self.val_ids):,} validation"
        return (f"data: {self.path} | mode {self.mode} ({self.reason}) | {sizes} | "
                f"vocabulary {self.tokenizer.vocab_size} tokens")


def load_corpus(path: str | None, tc: TrainConfig, block_size: int, rng, tokenizer=None,
                make_tokenizer=None) -> Corpus:
    """Read, split and encode a corpus. The RNG shuffles the documents (docs mode) before anything
    else draws from it, as microgpt does. `tokenizer` (from a checkpoint being resumed or
    fine-tuned) must cover the text; otherwise one is built by `make_tokenizer(training_text)`
    (default: a character vocabulary of the whole corpus)."""
    path = path or bundled_names_path()
    text = read_text(path)
    mode, reason = (tc.mode, "chosen") if tc.mode != "auto" else detect_mode(text)
    if not text.strip():
        what = "is empty" if not text else "holds only whitespace"
        raise DataError(f"{path} {what}: there is nothing to train on")
    if mode == "docs":
        docs = [ln.strip() for ln in text.split("\n") if ln.strip()]
        # with a data_seed, the split and the order stay fixed while seed varies the weights
        (random.Random(tc.data_seed) if tc.data_seed >= 0 else rng).shuffle(docs)
        n_val = round(len(docs) * tc.val_fraction)
        if tc.val_fraction > 0 and n_val == 0 and len(docs) > 1:
            n_val = 1
        if n_val >= len(docs):
            raise DataError(f"{path} has {len(docs)} document(s): too few to hold out "
                            f"{tc.val_fraction:.0%} for validation (lower --val-fraction)")
        train_docs, val_docs = docs[:len(docs) - n_val], docs[len(docs) - n_val:]
        corpus_chars = "".join(docs)
    else:
        n_val = int(len(text) * tc.val_fraction)
        if len(text) - n_val < block_size + 2:
            raise DataError(f"{path} has {len(text)} characters: stream mode needs more than "
                            f"block_size + 1 = {block_size + 1} of training text")
        train_text, val_text = text[:len(text) - n_val], text[len(text) - n_val:]
        corpus_chars = text
    if tokenizer is None:
        chars = sorted(set(corpus_chars))  # docs never hold "\n"; a stream's "\n" is a token
        if len(chars) < 2:
            raise DataError(f"{path} uses a single distinct character ({chars[0]!r}): there is "
                            f"nothing to learn; a vocabulary needs at least two characters")
        if make_tokenizer is not None:
            tokenizer = make_tokenizer("\n".join(train_docs) if mode == "docs" else train_text)
        else:
            tokenizer = CharTokenizer(chars)
    try:
        if mode == "docs":
            with collector_paused():  # ~10^5 new lists, no cycles: half the time without it
                train_examples = docs_examples(map(tokenizer.encode_doc, train_docs),
                                               block_size, tc.long_docs)
                val_examples = docs_examples(map(tokenizer.encode_doc, val_docs), block_size,
                                             tc.long_docs)
            train_ids = val_ids = []
        else:
            train_ids, val_ids = tokenizer.encode(train_text), tokenizer.encode(val_text)
            train_docs = val_docs = train_examples = []
            val_examples = stream_windows(val_ids, block_size)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None
    val_examples = fixed_sample(val_examples, tc.eval_tokens)
    return Corpus(mode, reason, tokenizer, train_docs, val_docs, train_ids, val_ids,
                  train_examples, val_examples, os.path.abspath(path), fingerprint(text))


def stream_windows(ids: list[int], block_size: int) -> list:
    """Consecutive non-overlapping (inputs, targets) windows covering a token stream."""
    # min(..., len(ids) - 1): the last window is short, and its final token is only a target
    return [(ids[s:min(s + block_size, len(ids) - 1)], ids[s + 1:s + 1 + block_size])
            for s in range(0, len(ids) - 1, block_size)]


def fixed_sample(examples: list, max_tokens: int) -> list:
    """At most max_tokens target positions of examples, spread evenly over the list, so that every
    evaluation uses the same positions (0 = all)."""
    total = sum(len(t) for _, t in examples)
    if max_tokens == 0 or total <= max_tokens:
        return examples
    per = total / len(examples)
    keep = max(1, int(max_tokens / per))
    step = len(examples) / keep
    return [examples[int(i * step)] for i in range(keep)]


def get_batch(corpus: Corpus, step: int, micro: int, tc: TrainConfig, block_size: int, rng):
    """The (inputs, targets) sequences of micro-batch `micro` of optimizer step `step`."""
    B = tc.batch_size
    if corpus.mode == "docs":
        first = (step * tc.grad_accum + micro) * B
        n = len(corpus.train_examples)
        pairs = [corpus.train_examples[(first + i) % n] for i in range(B)]
    else:
        ids, pairs = corpus.train_ids, []
        for _ in range(B):
            start = rng.randrange(len(ids) - block_size)
            pairs.append((ids[start:start + block_size], ids[start + 1:start + block_size + 1]))
    return [p[0] for p in pairs], [p[1] for p in pairs]
