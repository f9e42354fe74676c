"""Character-level tokenizer: one token per character, plus one BOS token.

The vocabulary is the sorted set of characters in the corpus; BOS gets the id after them
(id = number of characters). BOS marks both the start and the end of a document, so a document
is encoded as [BOS] + chars + [BOS] and generation stops when the model emits BOS.
"""

from __future__ import annotations

from typing import Iterable

from .fsutil import brief, brief_names


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        for ch in chars:
            if not isinstance(ch, str) or len(ch) != 1:
                raise ValueError(f"a character vocabulary holds single characters, got {brief(ch)}")
        if chars != sorted(set(chars)):
            raise ValueError("a character vocabulary must be sorted and free of duplicates")
        if not chars:
            raise ValueError("a character vocabulary needs at least one character")
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}
        self.bos = len(chars)
        self.vocab_size = len(chars) + 1

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of a corpus: its distinct characters, sorted (line breaks excluded)."""
        chars = sorted(set(text) - {"\n", "\r"})
        if not chars:
            raise ValueError("the corpus has no characters to build a vocabulary from")
        return cls(chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of `text` (no BOS). Unknown characters are named in the error."""
        try:
            return list(map(self.stoi.__getitem__, text))
        except KeyError:
            unknown = sorted(set(text) - set(self.stoi))
            raise ValueError(
                f"text contains {len(unknown)} character(s) not in the vocabulary: "
                f"{brief_names(map(repr, unknown), 20)} "
                f"(the vocabulary has {len(self.chars)}: {brief(''.join(self.chars))})") from None

    def encode_doc(self, text: str) -> list[int]:
        try:  # (encode inlined: a corpus encodes ~10^4 documents)
            return [self.bos, *map(self.stoi.__getitem__, text), self.bos]
        except KeyError:
            self.encode(text)  # raises, naming the unknown characters
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Characters of `ids`; BOS is dropped."""
        out = []
        for i in ids:
            if i == self.bos:
                continue
            if not 0 <= i < len(self.chars):
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.bos})")
            out.append(self.chars[i])
        return "".join(out)

    def token_str(self, i: int) -> str:
        return "<BOS>" if i == self.bos else self.chars[i]

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars


def tokenizer_from_dict(d: dict):
    """Rebuild a tokenizer stored in a checkpoint (character-level or byte-level BPE)."""
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError("tokenizer description must be a JSON object with a 'kind'")
    if d["kind"] == "char":
        if set(d) != {"kind", "chars"} or not isinstance(d["chars"], str):
            raise ValueError("a char tokenizer is stored as {'kind': 'char', 'chars': '...'}")
        return CharTokenizer(d["chars"])
    if d["kind"] == "bpe":
        from .bpe import BPETokenizer
        return BPETokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer kind {brief(d['kind'])} (known: char, bpe)")
