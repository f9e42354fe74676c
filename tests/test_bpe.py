"""puregpt.bpe against the references: the `regex` module running GPT-2's pattern, HF
`tokenizers` (ByteLevel BPE) and `transformers`' GPT2Tokenizer, all on the same files."""

import json
import time
import unicodedata
from pathlib import Path

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer
from tokenizers.pre_tokenizers import ByteLevel
from transformers import GPT2Tokenizer, GPT2TokenizerFast

from puregpt.bpe import _CLASSES, BPETokenizer, bytes_to_unicode, pretokenize

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NAMES = Path(__file__).resolve().parents[1] / "puregpt" / "data" / "names.txt"
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
BYTE = bytes_to_unicode()

VARIED = (
    "Hello, world! It's 3.14159 -- isn't it? I'LL say: 'S 'T 're 'Ve they'd we'll you've I'm.\n"
    "First Citizen:\tBefore we proceed any further,   hear me speak.  \n\n\n"
    "  leading spaces, trailing spaces   \n\t\ttabs\t \t mixed\r\nCRLF line\rCR only\x0b\x0c\n"
    "naïve café Ωμέγα Ярослав Łódź straße İstanbul ǅemal — “quotes” «guillemets» ¿qué?\n"
    "中文字符 日本語のテキスト 한국어 텍스트 ไทย العربية עברית हिन्दी\n"
    "emoji 😀👍🏽👩‍👩‍👧‍👦 🏳️‍🌈 family:👨‍👩‍👧 flags 🇫🇷🇯🇵 keycap 1️⃣\n"
    "combining: e\u0301 a\u0308\u0304 Z\u0336\u0337 ñ vs n\u0303; numbers: ٣٤٥ ⅫⅣ ½ ² ⑦ 𝟙 १२३ 0x1F 1,000,000\n"
    "odd spaces:\xa0nbsp\xa0\xa0x \u2028ls\u2029ps \x85nel \x1funit\x1c\x1d\x1e sep \u180emvs "
    "\u200bzwsp \u3000ideo\u2003em \ufeffbom \u202fnnbsp\n"
    "symbols: @#$%^&*()_+={}[]|\\:;\"'<>,.?/~` ... !!! ?? -- ''' \"\" ''s\n"
    "code: def f(x): return x**2  # comment\n    if x != 0:\n        pass    \n"
    "trailing whitespace at the very end  \t \n  "
)


def hf_train(text: str, vocab_size: int) -> ByteLevelBPETokenizer:
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator([text], vocab_size=vocab_size, min_frequency=2,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    return tok


def pieces_in_byte_alphabet(text: str) -> list[str]:
    return ["".join(BYTE[b] for b in p.encode("utf-8")) for p in pretokenize(text)]


def hf_pieces(text: str) -> list[str]:
    return [p for p, _ in ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str(text)]


# ------------------------------------------------------------------------ byte table / classes

def test_bytes_to_unicode_is_gpt2s_table():
    assert len(BYTE) == 256 and len(set(BYTE.values())) == 256
    assert BYTE[ord(" ")] == "Ġ" and BYTE[ord("\n")] == "Ċ" and BYTE[ord("\t")] == "ĉ"
    assert BYTE[ord("a")] == "a" and BYTE[0xA0] == "ł" and BYTE[0xAD] == "Ń" and BYTE[0] == "Ā"
    assert set(BYTE.values()) == set(ByteLevel.alphabet())
    # Every byte that can occur in UTF-8 (all but C0, C1, F5..FF) mapped as tokenizers does.
    text = "".join(map(chr, range(0x800))) + "\u0800\u4e2d\uffff\U00010000\U0010ffff\U000c0000"
    mapped = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]
    assert mapped == "".join(BYTE[b] for b in text.encode("utf-8"))


@pytest.fixture(scope="module")
def regex_classes():
    """code point -> class letter as the `regex` module sees it, for every non-surrogate."""
    cps = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]
    text = "".join(map(chr, cps))
    names = {1: "W", 2: "L", 3: "N"}
    classes = regex.sub(r"(\s)|(\p{L})|(\p{N})|.", lambda m: names.get(m.lastindex, "O"), text,
                        flags=regex.DOTALL)
    return dict(zip(cps, classes))


def test_whitespace_is_unicode_white_space_not_isspace(regex_classes):
    ours = {cp for cp in regex_classes if _CLASSES[cp] == "W"}
    assert ours == {cp for cp, k in regex_classes.items() if k == "W"}
    isspace = {cp for cp in regex_classes if chr(cp).isspace()}
    assert isspace - ours == {0x1C, 0x1D, 0x1E, 0x1F}  # the documented difference
    assert ours - isspace == set()
    assert {0x85, 0xA0, 0x2028, 0x2029} <= ours and not {0x180E, 0x200B, 0xFEFF} & ours


def test_letter_and_number_classes_match_regex(regex_classes):
    # Only characters this Python's unicodedata does not know yet (category Cn) may differ:
    # `regex` ships a newer Unicode version; we follow the interpreter's.
    differ = [cp for cp, k in regex_classes.items() if _CLASSES[cp] != k]
    assert all(unicodedata.category(chr(cp)) == "Cn" for cp in differ)


# --------------------------------------------------------------------------- pre-tokenization

@pytest.mark.parametrize("text, pieces", [
    ("Hello world", ["Hello", " world"]),
    ("it's It'S 'S", ["it", "'s", " It", "'", "S", " '", "S"]),
    ("we'll they're", ["we", "'ll", " they", "'re"]),
    ("a  b", ["a", " ", " b"]),
    ("a \n b", ["a", " \n", " b"]),
    ("a\tb", ["a", "\t", "b"]),
    ("end   ", ["end", "   "]),
    ("x1234 5", ["x", "1234", " 5"]),
    ("!!? ...", ["!!?", " ..."]),
    ("''s", ["''", "s"]),
    ("café", ["café"]),
    ("cafe\u0301", ["cafe", "\u0301"]),
    ("", []),
])
def test_pretokenize_examples(text, pieces):
    assert pretokenize(text) == pieces == GPT2_PATTERN.findall(text)


def test_pretokenize_on_every_assigned_code_point():
    """Each character in contexts that reveal its class, compared with `regex` and HF."""
    categories = [(cp, unicodedata.category(chr(cp))) for cp in range(0x110000)]
    for exclude, compare in [(("Cs", "Cn"), GPT2_PATTERN.findall), (("Cs", "Cn", "Co"), hf_pieces)]:
        # (HF is slow here; private-use characters are all "other", one check is enough.)
        cps = [cp for cp, cat in categories if cat not in exclude]
        for start in range(0, len(cps), 20000):
            text = "".join(f"a{c}a1{c}1!{c}! {c}'{c}" for c in map(chr, cps[start:start + 20000]))
            ours = pretokenize(text) if compare is not hf_pieces else pieces_in_byte_alphabet(text)
            assert ours == compare(text)


def test_pretokenize_varied_text():
    assert pretokenize(VARIED) == GPT2_PATTERN.findall(VARIED)
    assert pieces_in_byte_alphabet(VARIED) == hf_pieces(VARIED)


# ------------------------------------------------------- parity with tokenizers / transformers

@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data folder {DATA} is absent")
def test_tinyshakespeare_vocab_encodes_like_hf(tmp_path):
    corpus = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    hf = hf_train(corpus, 1000)
    hf.save_model(str(tmp_path))
    ours = BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert ours.vocab_size == hf.get_vocab_size() == 1000
    reloaded = ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    fast = GPT2TokenizerFast.from_pretrained(str(tmp_path), split_special_tokens=True)
    slow = GPT2Tokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"),
                         split_special_tokens=True)
    for text in [VARIED, VARIED + " <|endoftext|> " + VARIED, corpus[:20000]]:
        ids = ours.encode(text)
        assert ids == reloaded.encode(text).ids
        assert ids == fast.encode(text) == slow.encode(text)
        if "<|endoftext|>" not in text:  # the trained object matches it as a special token
            assert ids == hf.encode(text).ids
        assert ours.decode(ids) == text == hf.decode(ids)
    # "<|endoftext|>" in text is plain characters; encode_doc adds the real one.
    assert ours.bos not in ours.encode("<|endoftext|>")
    assert ours.encode_doc("hi") == [ours.bos] + ours.encode("hi") + [ours.bos] and ours.bos == 0
    assert ours.decode(ours.encode_doc("hi")) == "hi"

    # Training the same corpus with puregpt: fast, and the result loads in HF.
    start = time.perf_counter()
    trained = BPETokenizer.train(corpus, 1000)
    assert time.perf_counter() - start < 30
    trained.save(tmp_path / "ours")
    hf_ours = ByteLevelBPETokenizer(str(tmp_path / "ours" / "vocab.json"),
                                    str(tmp_path / "ours" / "merges.txt"))
    assert trained.encode(VARIED) == hf_ours.encode(VARIED).ids
    assert trained.encode(corpus[-20000:]) == hf_ours.encode(corpus[-20000:]).ids


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small HF-trained vocabulary (puregpt copy, HF original), built once."""
    corpus = NAMES.read_text(encoding="utf-8").replace("\n", " ") + VARIED * 5
    hf = hf_train(corpus, 500)
    folder = tmp_path_factory.mktemp("small")
    hf.save_model(str(folder))
    return BPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt"), hf


# Any code point but surrogates, plus a bias towards the characters the pattern treats specially.
TRICKY = list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2028\u3000'sStTrRmdlve1٣Ⅻ!é\u0301😀\u200d🏽")
ANY_CHAR = st.characters(exclude_categories=("Cs",))
KNOWN_CHAR = st.characters(exclude_categories=("Cs", "Cn"))  # see test_letter_and_number...


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(st.one_of(ANY_CHAR, st.sampled_from(TRICKY)), max_size=60))
def test_decode_encode_roundtrip(small, text):
    ours, _ = small
    assert ours.decode(ours.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(st.one_of(KNOWN_CHAR, st.sampled_from(TRICKY), st.sampled_from(VARIED)), max_size=80))
def test_encode_matches_hf(small, text):
    ours, hf = small
    assert pretokenize(text) == GPT2_PATTERN.findall(text)
    assert ours.encode(text) == hf.encode(text).ids


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 499), max_size=30))
def test_decode_matches_hf_on_any_ids(small, ids):
    ours, hf = small  # HF replaces invalid UTF-8 like Python's errors="replace"
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def corpus():
    return NAMES.read_text(encoding="utf-8") + VARIED * 3


def test_train_is_deterministic_and_exact(corpus):
    a = BPETokenizer.train(corpus, 700)
    b = BPETokenizer.train(corpus, 700)
    assert a.merges == b.merges and a.encoder == b.encoder and a == b
    assert a.vocab_size == 700 and a.bos == 699 and a.encoder["<|endoftext|>"] == 699
    assert [a.encoder[BYTE[i]] for i in range(256)] == list(range(256))
    assert BPETokenizer.train(corpus, 257).merges == []
    assert BPETokenizer.train(corpus, 258, bos_token="<bos>").encoder["<bos>"] == 257


def test_train_tie_break_rule():
    # "ab" and "cd" both occur twice: the lexicographically smaller pair wins the tie.
    tok = BPETokenizer.train("cd ab cd ab", 258)
    assert tok.merges == [("a", "b")]
    tok = BPETokenizer.train("cd cd cd ab ab", 258)
    assert tok.merges == [("c", "d")]  # a higher count beats a smaller pair


def test_trained_tokenizer_saves_loads_and_matches_hf(corpus, tmp_path):
    ours = BPETokenizer.train(corpus, 600)
    vocab_path, merges_path = ours.save(tmp_path)
    assert Path(merges_path).read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert json.loads(Path(vocab_path).read_text(encoding="utf-8")) == ours.encoder
    assert BPETokenizer.from_files(vocab_path, merges_path) == ours
    assert BPETokenizer.from_dict(json.loads(json.dumps(ours.to_dict()))) == ours
    hf = ByteLevelBPETokenizer(vocab_path, merges_path)
    fast = GPT2TokenizerFast.from_pretrained(str(tmp_path), split_special_tokens=True)
    for text in [VARIED, corpus[:5000], "x <|endoftext|> y"]:
        assert ours.encode(text) == hf.encode(text).ids == fast.encode(text)


# ------------------------------------------------------------------------------------- errors

def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_file_errors(tmp_path, corpus):
    ours = BPETokenizer.train(corpus[:3000], 300)
    vocab, merges = map(Path, ours.save(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        BPETokenizer.from_files(tmp_path / "nope.json", merges)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        BPETokenizer.from_files(vocab, tmp_path / "nope.txt")
    bad_json = write(tmp_path / "bad.json", '{"a": 1,')
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        BPETokenizer.from_files(bad_json, merges)
    lines = merges.read_text(encoding="utf-8").split("\n")
    bad = write(tmp_path / "bad1.txt", "\n".join(lines[:3] + ["Ġ t h"] + lines[3:]))
    with pytest.raises(ValueError, match=r"bad1\.txt line 4: expected two tokens"):
        BPETokenizer.from_files(vocab, bad)
    bad = write(tmp_path / "bad2.txt", "\n".join(lines[:2] + ["Ġ zzzq"] + lines[2:]))
    with pytest.raises(ValueError, match=r"bad2\.txt line 3: .*'zzzq'.* not in the vocabulary"):
        BPETokenizer.from_files(vocab, bad)
    # Blank lines and a missing header are fine.
    ok = write(tmp_path / "ok.txt", "\n\n".join(lines[1:]))
    assert BPETokenizer.from_files(vocab, ok) == ours
    with pytest.raises(ValueError, match=r"BOS token '<\|bos\|>' is not in the vocabulary"):
        BPETokenizer.from_files(vocab, merges, bos_token="<|bos|>")


def test_constructor_and_dict_errors(corpus):
    ours = BPETokenizer.train(corpus[:3000], 300)
    with pytest.raises(ValueError, match="at least 257"):
        BPETokenizer.train(corpus, 256)
    with pytest.raises(ValueError, match="only supports a vocabulary of"):
        BPETokenizer.train("ab", 400)
    gap = dict(ours.encoder, **{"<|endoftext|>": 400})
    with pytest.raises(ValueError, match=r"0\.\.n-1.*missing: \[299\]"):
        BPETokenizer(gap, ours.merges)
    dup = dict(ours.encoder, **{"<|endoftext|>": 5})
    with pytest.raises(ValueError, match=r"duplicated: \[5\]"):
        BPETokenizer(dup, ours.merges)
    with pytest.raises(ValueError, match="'<pad>' is not in the vocabulary"):
        BPETokenizer(ours.encoder, ours.merges, bos_token="<pad>")
    with pytest.raises(ValueError, match="merge #1: .* not in the vocabulary"):
        BPETokenizer(ours.encoder, [ours.merges[0], ("q", "zz")])
    with pytest.raises(ValueError, match="keys"):
        BPETokenizer.from_dict({"kind": "bpe", "encoder": ours.encoder})
    with pytest.raises(ValueError, match="expected kind 'bpe'"):
        BPETokenizer.from_dict(dict(ours.to_dict(), kind="char"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([300])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([-1])
