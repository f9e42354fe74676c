"""Byte-level BPE tokenizer, compatible with GPT-2 (and HF `tokenizers`' ByteLevel BPE).

Text becomes ids in three steps, as in GPT-2:

1. Pre-tokenization splits text into pieces with GPT-2's pattern
   `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`.
   Python's `re` has no `\\p{L}`, so `pretokenize` is a hand-written scanner that reproduces it.
2. Each piece's UTF-8 bytes become characters of a 256-symbol alphabet (`bytes_to_unicode`),
   so any text is representable and vocab.json/merges.txt stay printable.
3. Merges are applied by rank, lowest first, until no adjacent pair has a rank.

Character classes (they follow the Unicode version of the running Python's `unicodedata`, so
characters assigned in later Unicode versions than Python knows count as "other"):
  letter = general category L*, number = N*, whitespace = Unicode White_Space, which is what
  `regex`'s and Oniguruma's `\\s` match. `str.isspace()` is NOT used: it is also true for
  U+001C..U+001F (the ASCII file/group/record/unit separators, bidi class B/S), which are not
  White_Space. Both agree on U+0085, U+00A0, U+2028/9 (spaces) and on U+180E, U+200B, U+FEFF
  (not spaces).

Speed (CPython 3.11.7 on this machine; 3.10.13 gives the same merges and ids), measured from the
repository root with
python3 -c "import time, puregpt.bpe as b; t = open('../shared/data/tinyshakespeare.txt').read(); s = time.perf_counter(); b.BPETokenizer.train(t, 2000); print(time.perf_counter() - s)"
training on the 1.1 MB tinyshakespeare to vocab 1000 or 2000 takes 0.9-1.4 s (0.15 s of it
pre-tokenization); encoding the whole file with the result takes 0.5 s.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import unicodedata
from collections import Counter
from typing import Iterable, Sequence

from .fsutil import InputError, brief, parse_json, read_limited

# Unicode's White_Space property: exactly what `\s` matches in `regex` and Oniguruma (see above).
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006"
                         "\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe; case-sensitive
_CACHE_LIMIT = 100_000  # encode's per-piece cache is cleared when it grows past this
MAX_TOKENIZER_FILE = 64 * 1024 * 1024  # vocab.json / merges.txt (GPT-2's: 1 MB and 0.5 MB)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table.

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (controls, space, DEL, NBSP, soft hyphen), in increasing order,
    take the characters U+0100, U+0101, ... so e.g. space -> 'Ġ' and newline -> 'Ċ'.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    spare = (chr(0x100 + k) for k in range(256))
    for b in range(256):
        if b not in table:
            table[b] = next(spare)
    return dict(sorted(table.items()))


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


class _CharClasses(dict):
    """code point -> 'L' letter, 'N' number, 'W' whitespace, 'O' other; filled lazily, for
    str.translate, which turns a text into a same-length string of class letters."""

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        cat = unicodedata.category(ch)
        k = "W" if ch in _WHITE_SPACE else "L" if cat[0] == "L" else "N" if cat[0] == "N" else "O"
        self[cp] = k
        return k


_CLASSES = _CharClasses()  # grows to the number of distinct characters ever seen
_RUN = {k: re.compile(k + "+") for k in "LNWO"}  # end of a run of one class, at C speed


def pretokenize(text: str) -> list[str]:
    """Split `text` exactly as GPT-2's regex does (the pieces concatenate back to `text`).

    The regex tries its alternatives in order at each position, so we do too:
    a contraction, then ` ?` + a run of letters / numbers / other (other = not letter, number
    or whitespace, so apostrophes not starting a contraction land here), then whitespace.
    """
    classes = text.translate(_CLASSES)
    pieces = []
    i, n = 0, len(text)
    while i < n:
        end = 0
        if text[i] == "'":
            for suffix in _CONTRACTIONS:
                if text.startswith(suffix, i + 1):
                    end = i + 1 + len(suffix)
                    break
        if not end:
            # The optional leading space is only the ASCII space, and only joins a following
            # non-whitespace run; otherwise ` ?` backtracks and the space is whitespace.
            start = i + 1 if text[i] == " " and i + 1 < n and classes[i + 1] != "W" else i
            k = classes[start]
            end = _RUN[k].match(classes, start).end()
            if k == "W" and end < n and end - i > 1:
                # `\s+(?!\S)`: a whitespace run followed by non-space gives back its last
                # character, which then starts the next piece (" word" keeps its space). A
                # single whitespace char before non-space fails that and is taken by `\s+`.
                end -= 1
        pieces.append(text[i:end])
        i = end
    return pieces


def _merge(word: list, a, b, new) -> list:
    """Replace each non-overlapping (a, b) in `word`, scanning left to right, by `new`."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i + 1 < n and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _check_merge(encoder: dict[str, int], merge, where: str) -> tuple[str, str]:
    if not (isinstance(merge, (list, tuple)) and len(merge) == 2
            and all(isinstance(t, str) and t for t in merge)):
        raise ValueError(f"{where}: a merge is a pair of non-empty strings, got {brief(merge)}")
    for tok in (merge[0], merge[1], merge[0] + merge[1]):
        if tok not in encoder:
            raise ValueError(f"{where}: merge {brief(merge[0])} + {brief(merge[1])} uses token "
                             f"{brief(tok)}, which is not in the vocabulary")
    return merge[0], merge[1]


class BPETokenizer:
    kind = "bpe"

    def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]],
                 bos_token: str = "<|endoftext|>"):
        if not isinstance(encoder, dict) or not encoder:
            raise ValueError("the encoder must be a non-empty dict of token string -> id")
        for tok, i in encoder.items():
            if not isinstance(tok, str) or not tok or type(i) is not int:
                raise ValueError(f"encoder entries are non-empty str -> int, got {brief(tok)}: "
                                 f"{brief(i)}")
        ids = sorted(encoder.values())
        if ids != list(range(len(ids))):
            dup = sorted(i for i, c in Counter(ids).items() if c > 1)
            missing = sorted(set(range(len(ids))) - set(ids))
            outside = [i for i in ids if not 0 <= i < len(ids)]
            raise ValueError(f"token ids must be 0..n-1, each used once (duplicated: "
                             f"{brief(dup[:10])}, missing: {brief(missing[:10])}, out of range: "
                             f"{brief(outside[:10])})")
        if bos_token not in encoder:
            raise ValueError(f"the BOS token {brief(bos_token)} is not in the vocabulary")
        absent = [c for c in _BYTE_TO_CHAR.values() if c not in encoder]
        if absent:
            raise ValueError(f"a byte-level vocabulary needs all 256 byte tokens; missing {absent}")
        self.encoder = dict(encoder)
        self.merges = [_check_merge(encoder, m, f"merge #{r}") for r, m in enumerate(merges)]
        if len(set(self.merges)) != len(self.merges):
            dup = next(m for m, c in Counter(self.merges).items() if c > 1)
            raise ValueError(f"merge {brief(dup[0])} + {brief(dup[1])} is listed more than once")
        if bos_token in _CHAR_TO_BYTE or any(a + b == bos_token for a, b in self.merges):
            raise ValueError(f"the BOS token {brief(bos_token)} must not be one BPE can produce")
        self.bos_token = bos_token
        self.bos = encoder[bos_token]
        self.vocab_size = len(encoder)
        # Encoding works on ids: (left id, right id) -> (rank, merged id); bytes -> ids.
        self._ranks = {(encoder[a], encoder[b]): (r, encoder[a + b])
                       for r, (a, b) in enumerate(self.merges)}
        self._byte_ids = [encoder[_BYTE_TO_CHAR[b]] for b in range(256)]
        # Tokens spelled in the byte alphabet decode to those bytes; any other (special) token
        # decodes to its own text, as HF does for added tokens.
        self._bytes = [b""] * self.vocab_size
        for tok, i in encoder.items():
            in_alphabet = all(c in _CHAR_TO_BYTE for c in tok)
            self._bytes[i] = bytes(map(_CHAR_TO_BYTE.get, tok)) if in_alphabet else tok.encode()
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------- encoding

    def _bpe(self, piece: str) -> list[int]:
        """GPT-2's merge loop: merge every occurrence of the lowest-ranked adjacent pair,
        repeat until no adjacent pair is a merge."""
        word = [self._byte_ids[b] for b in piece.encode("utf-8")]
        ranks, none = self._ranks, (float("inf"), -1)
        while len(word) > 1:
            pair = min(zip(word, word[1:]), key=lambda p: ranks.get(p, none))
            if pair not in ranks:
                break
            word = _merge(word, pair[0], pair[1], ranks[pair][1])
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS; special-token strings in the text are plain text)."""
        out, cache = [], self._cache
        for piece in pretokenize(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece)
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    def encode_doc(self, text: str) -> list[int]:
        return [self.bos] + self.encode(text) + [self.bos]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`: their bytes decoded as UTF-8 (bad sequences -> U+FFFD); BOS dropped."""
        parts = []
        for i in ids:
            if i == self.bos:
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            parts.append(self._bytes[i])
        return b"".join(parts).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        return self.bos_token if i == self.bos else self._bytes[i].decode("utf-8", "replace")

    def __eq__(self, other) -> bool:
        return (isinstance(other, BPETokenizer) and other.encoder == self.encoder
                and other.merges == self.merges and other.bos_token == self.bos_token)

    # -------------------------------------------------------------------------- persistence

    def to_dict(self) -> dict:
        return {"kind": "bpe", "encoder": dict(self.encoder),
                "merges": [[a, b] for a, b in self.merges], "bos_token": self.bos_token}

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        keys = {"kind", "encoder", "merges", "bos_token"}
        if not isinstance(d, dict) or set(d) != keys:
            got = brief(sorted(d)) if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"a BPE tokenizer is stored as a dict with keys {sorted(keys)}, got {got}")
        if d["kind"] != "bpe":
            raise ValueError(f"expected kind 'bpe', got {brief(d['kind'])}")
        if not isinstance(d["merges"], list) or not isinstance(d["bos_token"], str):
            raise ValueError("'merges' must be a list of [a, b] pairs and 'bos_token' a string")
        return cls(d["encoder"], d["merges"], d["bos_token"])

    @classmethod
    def from_files(cls, vocab_json_path: str | os.PathLike, merges_txt_path: str | os.PathLike,
                   bos_token: str = "<|endoftext|>") -> "BPETokenizer":
        """Load GPT-2 style vocab.json (token -> id) and merges.txt (one "a b" per line)."""
        texts = []
        for path in (vocab_json_path, merges_txt_path):
            try:
                texts.append(read_limited(path, MAX_TOKENIZER_FILE))
            except FileNotFoundError:
                raise FileNotFoundError(f"tokenizer file not found: {path}") from None
            except InputError as e:  # a FIFO, a device, a directory, a huge file
                raise ValueError(f"{path} {e}") from None
        try:
            encoder = parse_json(texts[0])
            merges_text = texts[1].decode("utf-8")
        except InputError as e:
            raise ValueError(f"{vocab_json_path} {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{merges_txt_path} is not UTF-8 ({e.reason} at byte "
                             f"{e.start})") from None
        if not isinstance(encoder, dict):
            raise ValueError(f"{vocab_json_path} must hold a JSON object of token -> id")
        merges = []
        for lineno, line in enumerate(merges_text.split("\n"), start=1):
            line = line.rstrip("\r")
            if not line or (lineno == 1 and line.startswith("#version")):
                continue
            where = f"{merges_txt_path} line {lineno}"
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{where}: expected two tokens separated by one space, got "
                                 f"{brief(line)}")
            merges.append(_check_merge(encoder, parts, where))
        try:
            return cls(encoder, merges, bos_token)
        except ValueError as e:
            raise ValueError(f"{vocab_json_path}: {e}") from None

    def save(self, directory: str | os.PathLike) -> tuple[str, str]:
        """Write vocab.json and merges.txt (the format HF tokenizers/transformers read)."""
        os.makedirs(directory, exist_ok=True)
        vocab_path = os.path.join(directory, "vocab.json")
        merges_path = os.path.join(directory, "merges.txt")
        from .fsutil import atomic_write  # each file complete or not there at all
        by_id = dict(sorted(self.encoder.items(), key=lambda kv: kv[1]))
        atomic_write(vocab_path, [json.dumps(by_id, ensure_ascii=False).encode("utf-8")])
        # transformers' old GPT2Tokenizer drops the first line unconditionally: keep a header.
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        atomic_write(merges_path, [merges.encode("utf-8")])
        return vocab_path, merges_path

    # ----------------------------------------------------------------------------- training

    @classmethod
    def train(cls, text: str, vocab_size: int, bos_token: str = "<|endoftext|>") -> "BPETokenizer":
        """Learn vocab_size - 257 new tokens from `text`; ids: 256 bytes, merged tokens, BOS.

        Each step merges the adjacent pair with the highest count over all pre-tokens (each
        distinct pre-token counted once, weighted by its frequency); ties go to the
        lexicographically smallest (left, right) pair of token strings in the byte alphabet.
        Only the words containing the merged pair are touched, and their pair counts updated
        by difference; a heap with stale entries (skipped when their count is outdated) finds
        the best pair without rescanning all pairs.
        """
        if vocab_size < 257:
            raise ValueError(f"vocab_size must be at least 257 (256 bytes + BOS), got {vocab_size}")
        tokens = [_BYTE_TO_CHAR[b] for b in range(256)]  # id -> string; byte b has id b
        token_id = {t: i for i, t in enumerate(tokens)}
        freq = Counter(pretokenize(text))
        words = [list(piece.encode("utf-8")) for piece in freq]
        counts = list(freq.values())
        pair_count: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = {}  # pair -> words that (may) contain it
        for w, word in enumerate(words):
            for p in zip(word, word[1:]):
                pair_count[p] += counts[w]
                where.setdefault(p, set()).add(w)
        heap = [(-c, tokens[a], tokens[b], a, b) for (a, b), c in pair_count.items()]
        heapq.heapify(heap)
        merges, merge_set = [], set()
        while len(tokens) < vocab_size - 1:
            while heap and pair_count.get(heap[0][3:]) != -heap[0][0]:
                heapq.heappop(heap)  # stale: that pair's count has changed since
            if not heap:
                raise ValueError(f"the corpus only supports a vocabulary of {len(tokens) + 1} "
                                 f"tokens, not {vocab_size}")
            _, sa, sb, a, b = heapq.heappop(heap)
            if (sa, sb) not in merge_set:  # it can recur only via a reused id (below): rank kept
                merges.append((sa, sb))
                merge_set.add((sa, sb))
            # Different merge orders can spell the same string ("a"+"bc", "ab"+"c"): one token.
            new = token_id.setdefault(sa + sb, len(tokens))
            if new == len(tokens):
                tokens.append(sa + sb)
            changed = set()
            for w in where.pop((a, b)):
                old = words[w]
                for p in zip(old, old[1:]):
                    pair_count[p] -= counts[w]
                    changed.add(p)
                words[w] = word = _merge(old, a, b, new)
                for p in zip(word, word[1:]):
                    pair_count[p] += counts[w]
                    where.setdefault(p, set()).add(w)
                    changed.add(p)
            for p in changed:
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], tokens[p[0]], tokens[p[1]], *p))
                else:  # no word contains p any more
                    del pair_count[p]
                    where.pop(p, None)
        if bos_token in token_id:
            raise ValueError(f"the BOS token {bos_token!r} was learned as an ordinary token")
        encoder = {t: i for i, t in enumerate(tokens)}
        encoder[bos_token] = len(tokens)
        return cls(encoder, merges, bos_token)
