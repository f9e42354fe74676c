"""Corpora: the automatic choice of data mode (and its reason), a seeded, disjoint train/validation
split, long documents split into windows that predict every token exactly once (or truncated as
microgpt does), stream windows of block_size + 1 tokens, and clear errors for unusable files."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from helpers_train import SHARED, names_file, needs_shared, stream_text
from puregpt import model
from puregpt.config import GPTConfig, TrainConfig
from puregpt.data import (DataError, detect_mode, doc_examples, docs_examples, get_batch,
                          load_corpus, read_text, stream_windows)
from puregpt.tokenizer import CharTokenizer


def corpus(path, block_size=8, seed=42, **train):
    tc = TrainConfig(**{"workers": 1, **train})
    return load_corpus(str(path), tc, block_size, random.Random(seed))


# --- mode detection ----------------------------------------------------------------------------


@needs_shared
def test_auto_mode_picks_docs_for_names_and_says_why():
    text = (SHARED / "names.txt").read_text(encoding="utf-8")
    mode, reason = detect_mode(text)
    assert mode == "docs"
    assert reason == "32033 short lines (median 6 characters), no blank lines"
    c = corpus(SHARED / "names.txt", eval_tokens=100)
    assert c.mode == "docs" and c.reason == reason
    assert f"mode docs ({reason})" in c.describe()
    assert len(c.train_docs) + len(c.val_docs) == 32033 and c.tokenizer.vocab_size == 27


@needs_shared
def test_auto_mode_picks_stream_for_shakespeare_and_says_why():
    text = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")
    mode, reason = detect_mode(text)
    assert mode == "stream"
    assert reason.endswith("of lines are blank: continuous text with paragraphs")
    share = int(reason.split("%")[0])
    lines = text.rstrip("\n").split("\n")
    assert share == round(100 * sum(1 for ln in lines if not ln.strip()) / len(lines))
    assert share >= 10
    c = corpus(SHARED / "tinyshakespeare.txt", eval_tokens=100)
    assert c.mode == "stream" and f"mode stream ({reason})" in c.describe()
    assert len(c.train_ids) + len(c.val_ids) == len(text)
    assert c.tokenizer.vocab_size == len(set(text)) + 1  # every character, newline too, + BOS


def test_auto_mode_on_long_lines_and_forced_modes(tmp_path):
    prose = " ".join(["word"] * 80)  # 399-character lines, no blank lines
    path = tmp_path / "prose.txt"
    path.write_text("\n".join([prose] * 10) + "\n")
    assert detect_mode(path.read_text()) == (
        "stream", "lines are long (median 399 characters): continuous prose")
    forced = corpus(path, mode="docs", val_fraction=0.2)
    assert forced.mode == "docs" and forced.reason == "chosen"
    assert len(forced.train_docs) == 8 and len(forced.val_docs) == 2


# --- the split ---------------------------------------------------------------------------------


def test_docs_split_is_seeded_deterministic_and_disjoint(tmp_path):
    path = names_file(tmp_path, 500)
    docs = [ln for ln in path.read_text().split("\n") if ln]
    assert len(set(docs)) == len(docs) == 500  # distinct names: disjoint as sets too
    a, b, other = corpus(path, seed=3), corpus(path, seed=3), corpus(path, seed=4)
    assert (a.train_docs, a.val_docs) == (b.train_docs, b.val_docs)
    assert a.train_examples == b.train_examples and a.val_examples == b.val_examples
    assert (a.train_docs, a.val_docs) != (other.train_docs, other.val_docs)
    for c in (a, other):
        assert len(c.val_docs) == 50 and len(c.train_docs) == 450
        assert not set(c.train_docs) & set(c.val_docs)
        assert Counter(c.train_docs) + Counter(c.val_docs) == Counter(docs)
    # the split follows microgpt: random.seed(s); random.shuffle(docs), then the tail is held out
    expected = list(docs)
    random.Random(3).shuffle(expected)
    assert a.train_docs == expected[:450] and a.val_docs == expected[450:]


@needs_shared
def test_docs_split_with_duplicate_documents_is_a_partition():
    """names.txt repeats some names: the split partitions the lines, duplicates and all."""
    c = corpus(SHARED / "names.txt", seed=1, eval_tokens=100)
    docs = [ln.strip() for ln in (SHARED / "names.txt").read_text().split("\n") if ln.strip()]
    assert len(set(docs)) < len(docs)
    assert Counter(c.train_docs) + Counter(c.val_docs) == Counter(docs)
    assert len(c.val_docs) == round(0.1 * len(docs))


def test_stream_split_is_the_contiguous_tail(tmp_path):
    text = stream_text(4000)
    path = tmp_path / "stream.txt"
    path.write_text(text)
    c = corpus(path, mode="stream", val_fraction=0.25)
    ids = c.tokenizer.encode(text)
    assert c.train_ids + c.val_ids == ids
    assert len(c.val_ids) == 1000 and c.val_ids == ids[-1000:]
    assert corpus(path, mode="stream", val_fraction=0.25, seed=9).train_ids == c.train_ids


def test_no_validation_split_when_val_fraction_is_zero(tmp_path):
    c = corpus(names_file(tmp_path, 30), val_fraction=0.0)
    assert len(c.train_docs) == 30 and c.val_docs == [] and c.val_examples == []


# --- documents longer than the block -----------------------------------------------------------


def predicted_positions(ids, examples, block_size):
    """Which positions of ids each example predicts, checking each window against ids."""
    stride = max(1, block_size // 2)
    seen = Counter()
    for j, (inputs, targets) in enumerate(examples):
        start = j * stride
        assert 1 <= len(inputs) == len(targets) <= block_size
        assert inputs == ids[start:start + len(inputs)]
        for i, y in enumerate(targets):
            if y >= 0:
                assert y == ids[start + 1 + i]
                assert i >= min(block_size - stride, start), "a target with too little context"
                seen[start + 1 + i] += 1
    return seen


@pytest.mark.parametrize("block_size", [1, 2, 3, 4, 7, 8, 16])
def test_long_documents_split_into_windows_predicting_each_target_once(block_size):
    rng = random.Random(block_size)
    for length in range(1, 60):
        ids = [9] + [rng.randrange(9) for _ in range(length)] + [9]
        examples = doc_examples(ids, block_size, "split")
        seen = predicted_positions(ids, examples, block_size)
        assert seen == Counter(range(1, len(ids))), (length, examples)
        if len(ids) - 1 <= block_size:
            assert examples == [(ids[:-1], ids[1:])]


@pytest.mark.parametrize("long_docs", ["split", "truncate"])
def test_the_corpus_fast_path_equals_doc_examples_of_each_document(long_docs):
    """docs_examples (short documents inline) is doc_examples, document by document, in order:
    lengths below, at and above block_size + 1 tokens."""
    rng = random.Random(7)
    docs = [[9] + [rng.randrange(9) for _ in range(rng.randint(0, 40))] + [9]
            for _ in range(500)]
    assert {len(d) for d in docs} >= {2, 8, 9, 10, 42}
    expected = [ex for ids in docs for ex in doc_examples(ids, 8, long_docs)]
    assert docs_examples(iter(docs), 8, long_docs) == expected


def test_corpus_of_long_documents_predicts_every_token_once(tmp_path):
    docs = ["a" * n + "b" for n in range(1, 30)] + ["the quick brown fox jumps over it"]
    path = tmp_path / "long.txt"
    path.write_text("\n".join(docs) + "\n")
    c = corpus(path, block_size=8, val_fraction=0.0)
    n_targets = sum(1 for _, t in c.train_examples for y in t if y >= 0)
    assert n_targets == sum(len(d) + 1 for d in docs)
    # rebuild every document from its windows
    rebuilt, pos = [], 0
    for doc in c.train_docs:
        ids = c.tokenizer.encode_doc(doc)
        k = len(doc_examples(ids, 8, "split"))
        window = c.train_examples[pos:pos + k]
        pos += k
        seen = predicted_positions(ids, window, 8)
        assert seen == Counter(range(1, len(ids)))
        rebuilt.append(c.tokenizer.decode([y for _, t in window for y in t if y >= 0]))
    assert pos == len(c.train_examples) and rebuilt == c.train_docs


def test_truncate_reproduces_microgpt():
    chars = sorted("abcdefghijklmnopqrstuvwxyz")
    tok = CharTokenizer(chars)
    for doc in ["a", "emma", "abcdefghijklmno", "abcdefghijklmnop", "abcdefghijklmnopqrstuvwxyz"]:
        # microgpt: tokens = [BOS] + [uchars.index(ch) for ch in doc] + [BOS]
        #           n = min(block_size, len(tokens) - 1); pairs tokens[p], tokens[p + 1]
        tokens = [tok.bos] + [chars.index(ch) for ch in doc] + [tok.bos]
        n = min(16, len(tokens) - 1)
        expected = [([tokens[p] for p in range(n)], [tokens[p + 1] for p in range(n)])]
        assert doc_examples(tok.encode_doc(doc), 16, "truncate") == expected


def test_truncate_mode_in_a_corpus_keeps_one_example_per_document(tmp_path):
    path = names_file(tmp_path, 100)
    c = corpus(path, block_size=4, long_docs="truncate")
    assert len(c.train_examples) == len(c.train_docs) == 90
    for doc, (inputs, targets) in zip(c.train_docs, c.train_examples):
        ids = c.tokenizer.encode_doc(doc)
        n = min(4, len(ids) - 1)
        assert (inputs, targets) == (ids[:n], ids[1:n + 1])


def test_batches_mixing_long_and_short_documents_keep_targets_aligned():
    """A batch's loss is the token-weighted mean of its sequences' losses: every sequence's
    targets line up with its own positions (a window with more inputs than targets would shift
    the targets of every later sequence in the batch)."""
    cfg = GPTConfig(vocab_size=10, block_size=8, n_embd=8, n_head=2)
    params = model.init_params(cfg, random.Random(0))
    rng = random.Random(1)
    examples = []
    for length in (3, 11, 14, 6, 20):
        ids = [9] + [rng.randrange(9) for _ in range(length)] + [9]
        examples += doc_examples(ids, 8, "split")
    examples.reverse()  # the short last windows of long documents now come first
    inputs, targets = [x for x, _ in examples], [y for _, y in examples]
    batch_loss, n = model.evaluate_loss(params, cfg, inputs, targets)
    total = 0.0
    for x, y in examples:
        loss, k = model.evaluate_loss(params, cfg, [x], [y])
        total += loss * k
    assert n == sum(1 for y in targets for t in y if t >= 0)
    assert batch_loss == pytest.approx(total / n, rel=1e-12)


# --- batches -----------------------------------------------------------------------------------


def test_docs_batches_walk_the_examples_in_order(tmp_path):
    c = corpus(names_file(tmp_path, 40), batch_size=3, grad_accum=2)
    tc = TrainConfig(batch_size=3, grad_accum=2)
    n = len(c.train_examples)
    flat = []
    for step in range(20):
        for micro in range(2):
            xs, ys = get_batch(c, step, micro, tc, 8, None)
            flat += list(zip(xs, ys))
    assert flat == [c.train_examples[i % n] for i in range(120)]


def test_stream_windows_are_block_size_plus_one_tokens(tmp_path):
    path = tmp_path / "s.txt"
    text = stream_text(3000)
    path.write_text(text)
    c = corpus(path, mode="stream")
    train_text = c.tokenizer.decode(c.train_ids)
    assert text.startswith(train_text) and len(train_text) == 2700
    tc = TrainConfig(batch_size=4)
    rng = random.Random(5)
    windows = set()
    for step in range(100):
        xs, ys = get_batch(c, step, 0, tc, 8, rng)
        assert len(xs) == len(ys) == 4
        for x, y in zip(xs, ys):
            assert len(x) == len(y) == 8 and x[1:] == y[:-1]
            window = c.tokenizer.decode(x + y[-1:])  # block_size + 1 consecutive tokens
            assert len(window) == 9 and window in train_text
            windows.add(window)
    assert len(windows) > 350  # at random offsets
    # the windows come from the trainer's RNG: the same state gives the same batch
    a, b = random.Random(9), random.Random(9)
    assert get_batch(c, 0, 0, tc, 8, a) == get_batch(c, 0, 0, tc, 8, b)


def test_validation_windows_cover_the_stream_tail(tmp_path):
    ids = list(range(50))
    for block_size in (1, 4, 7, 8, 49, 60):
        windows = stream_windows(ids, block_size)
        assert all(len(x) == len(y) and y == [t + 1 for t in x] for x, y in windows)
        assert [t for _, y in windows for t in y] == ids[1:]


# --- unusable files ----------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"", "is empty: there is nothing to train on"),
    (b"  \n\t\n\n   \n", "holds only whitespace: there is nothing to train on"),
    (b"anna\nbob\xff\xfeby\n", "is not UTF-8 text: byte 0xff at line 2, column 4 (byte offset 8)"),
    (b"\xc3(", "is not UTF-8 text: byte 0xc3 at line 1, column 1 (byte offset 0)"),
    (b"anna\nb\x00b\n", "contains NUL characters: it looks like a binary file"),
    (b"aaa\naa\na\n", "uses a single distinct character ('a'): there is nothing to learn"),
    (b"x", "uses a single distinct character ('x')"),
])
def test_unusable_files_are_refused(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        corpus(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.txt"):
        read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="data path is a directory"):
        read_text(str(tmp_path))


def test_too_little_data(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("anna\n")
    with pytest.raises(DataError, match=r"1 document\(s\): too few to hold out 60% for "
                                        r"validation"):
        corpus(path, val_fraction=0.6)
    path.write_text("abcabc")
    with pytest.raises(DataError, match="stream mode needs more than block_size \\+ 1 = 9"):
        corpus(path, mode="stream")


def test_line_endings_are_normalized(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(b"anna\r\nbob\rcy\n")
    c = corpus(path, val_fraction=0.0)
    assert sorted(c.train_docs) == ["anna", "bob", "cy"]
    assert c.tokenizer.chars == list("abcnoy") and "\r" not in c.tokenizer.chars


def test_data_seed_fixes_the_split_and_order_whatever_the_seed(tmp_path):
    path = names_file(tmp_path, 300)
    a, b = corpus(path, seed=1, data_seed=7), corpus(path, seed=2, data_seed=7)
    assert a.train_docs == b.train_docs and a.val_docs == b.val_docs
    assert corpus(path, seed=1).train_docs != a.train_docs  # -1 (default): the seed decides
    # without data_seed the seed's RNG shuffles: the same as data_seed == seed, except that the
    # weights' initialization then draws from an RNG the shuffle has not advanced
    assert corpus(path, seed=7).train_docs == a.train_docs
