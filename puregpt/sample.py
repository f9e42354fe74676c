"""Generating and scoring text.

Generation feeds the context once, then one token at a time through the KV cache, so each new
token costs one position's worth of work. The next token's distribution is shaped, in this
order, by temperature (logits / T: below 1 sharpens, above 1 flattens), top-k (keep the k most
likely tokens) and top-p (keep the smallest set of most likely tokens whose probability reaches
p, the "nucleus"), then renormalized and drawn from; greedy takes the argmax instead.

Sliding context: the model sees at most block_size tokens. When the context outgrows that, the
oldest tokens are dropped and the last block_size tokens are fed afresh at positions
0..block_size-1 (the positions of every kept token change, so the KV cache is rebuilt): from then
on each new token costs a forward pass over a whole block.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

from . import model, ops
from .data import doc_examples


# A prefix whose mass falls short of top_p by less than this counts as reaching it: softmax and
# the running sum round (0.5 + 0.29999999999999993 < 0.8), and p = a cumulative mass must not keep
# one token more than the prefix that, in exact arithmetic, reaches it.
TOP_P_TOLERANCE = 1e-9


def check_shape(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> None:
    """Raise ValueError for settings shape_probs cannot use (callers check before any output)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); use greedy decoding "
                         f"for the temperature -> 0 limit")
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k must be >= 0 and top_p in (0, 1]; got {top_k}, {top_p}")


def shape_probs(logits: list[float], temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> list[float]:
    """The sampling distribution over the vocabulary after temperature, top-k and top-p."""
    check_shape(temperature, top_k, top_p)
    scaled = [z / temperature for z in logits]
    if not all(map(math.isfinite, scaled)):
        # a temperature so small that z / T overflows (inf - inf would be NaN): subtracting the
        # max first changes nothing mathematically and leaves the likeliest token(s) at 0, the
        # rest at -inf, whose weight is 0: the limit T -> 0, greedy decoding
        top = max(logits)
        scaled = [(z - top) / temperature for z in logits]
    probs = ops.softmax(scaled)
    order = sorted(range(len(probs)), key=lambda i: -probs[i])  # most likely first (stable)
    keep = len(order)
    if top_k:
        keep = min(keep, top_k)
    if top_p < 1.0:
        kept_mass = sum(probs[i] for i in order[:keep])
        mass, n = 0.0, 0
        for i in order[:keep]:  # smallest prefix whose (renormalized) mass reaches p
            mass += probs[i] / kept_mass
            n += 1
            if mass >= top_p - TOP_P_TOLERANCE:  # rounding must not cost an extra token
                break
        keep = n
    if keep < len(order):
        allowed = set(order[:keep])
        probs = [p if i in allowed else 0.0 for i, p in enumerate(probs)]
        total = sum(probs)
        probs = [p / total for p in probs]
    return probs


def pick(logits: list[float], rng: random.Random, temperature: float = 1.0, top_k: int = 0,
         top_p: float = 1.0, greedy: bool = False) -> int:
    """Choose the next token id."""
    if greedy:  # the first largest logit (index() finds the very object max() returned)
        return logits.index(max(logits))
    probs = shape_probs(logits, temperature, top_k, top_p)
    return rng.choices(range(len(probs)), weights=probs)[0]


def generate(params: dict, config, context: list[int], max_new_tokens: int,
             rng: random.Random, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, stop_token: int | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids continuing `context` (at least one token),
    stopping early when stop_token is drawn (it is not yielded)."""
    if not context:
        raise ValueError("generation needs a context of at least one token (e.g. BOS)")
    tokens = list(context)
    window = tokens[-config.block_size:]
    kv = model.new_kv_cache(config)
    logits, _ = model.forward(params, config, [window], kv=kv)
    for n in range(max_new_tokens):
        token = pick(logits[-1], rng, temperature, top_k, top_p, greedy)
        if token == stop_token:
            return
        yield token
        if n + 1 == max_new_tokens:  # the last token: no logits after it are needed
            return
        tokens.append(token)
        if len(kv[0][0]) < config.block_size:  # room left: one more position through the cache
            logits, _ = model.forward(params, config, [[token]], kv=kv,
                                      start_pos=len(kv[0][0]))
        else:  # the window slides: rebuild the cache from the last block_size tokens
            kv = model.new_kv_cache(config)
            logits, _ = model.forward(params, config, [tokens[-config.block_size:]], kv=kv)


def stream_text(params, config, tokenizer, prompt: str = "", docs_mode: bool = True,
                max_new_tokens: int | None = None, stop: str | None = None,
                rng: random.Random | None = None, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0, greedy: bool = False, tokens_from=None) -> Iterator[str]:
    """Generate one document (docs mode: it starts after BOS and ends at BOS) or a continuation
    of text (stream mode), yielding the new text piece by piece as tokens are produced (the
    prompt is not repeated). Stops at BOS, after max_new_tokens (default: block_size in docs
    mode, 256 in stream mode), or just before the first occurrence of `stop`.

    The prompt and the sampling settings are checked here, before anything is generated.
    tokens_from: what produces the tokens, a function with generate's signature (default
    generate; decode.Decoder.generator() decodes with prepared weights, on several processes).
    """
    if not greedy:  # greedy ignores the shaping settings
        check_shape(temperature, top_k, top_p)
    prompt_ids = tokenizer.encode(prompt)  # raises, naming any character outside the vocabulary
    context = prompt_ids if (prompt_ids and not docs_mode) else [tokenizer.bos] + prompt_ids
    if max_new_tokens is None:
        max_new_tokens = config.block_size if docs_mode else 256
    tokens = (tokens_from or generate)(params, config, context, max_new_tokens,
                                       rng or random.Random(), temperature=temperature,
                                       top_k=top_k, top_p=top_p, greedy=greedy,
                                       stop_token=tokenizer.bos)
    return _pieces(tokens, tokenizer, stop)


def _pieces(tokens: Iterator[int], tokenizer, stop: str | None) -> Iterator[str]:
    """Decode a token stream into text pieces, holding back what is not yet certain."""
    new_ids, emitted = [], 0
    for token in tokens:
        new_ids.append(token)
        decoded = tokenizer.decode(new_ids)
        if decoded.endswith("\ufffd"):  # a character split across BPE tokens: await the rest
            continue
        if stop and stop in decoded:
            decoded = decoded[:decoded.index(stop)]
            if len(decoded) > emitted:
                yield decoded[emitted:]
            return
        # hold back a tail that may be the start of the stop string: once streamed, text cannot
        # be taken back if the stop string then completes
        safe = len(decoded) - _stop_prefix_len(decoded, stop)
        if safe > emitted:
            yield decoded[emitted:safe]
            emitted = safe
    text = tokenizer.decode(new_ids)  # flush a trailing incomplete character, if any
    if stop and stop in text:
        text = text[:text.index(stop)]
    if len(text) > emitted:
        yield text[emitted:]


def generate_text(params, config, tokenizer, prompt: str = "", docs_mode: bool = True,
                  max_new_tokens: int | None = None, stop: str | None = None, rng=None,
                  on_text=None, **shape) -> str:
    """stream_text, collected into one string; `on_text(piece)` sees each piece as it comes."""
    pieces = []
    for piece in stream_text(params, config, tokenizer, prompt, docs_mode, max_new_tokens, stop,
                             rng, **shape):
        pieces.append(piece)
        if on_text:
            on_text(piece)
    return "".join(pieces)


def _stop_prefix_len(text: str, stop: str | None) -> int:
    """Length of the longest proper prefix of `stop` that `text` ends with (0 without stop)."""
    if not stop:
        return 0
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def score_ids(params, config, ids: list[int], long_docs: str = "split") -> tuple[float, int]:
    """Total log-probability (natural log) of ids[1:] given what precedes them, and how many
    tokens that is. Longer sequences are scored in half-overlapping windows (see data.py)."""
    examples = doc_examples(ids, config.block_size, long_docs)
    logits, _ = model.forward(params, config, [x for x, _ in examples])
    targets = [y for _, ys in examples for y in ys]
    logprob, n = 0.0, 0
    for z, y in zip(logits, targets):
        if y >= 0:
            m = max(z)
            logprob += z[y] - m - math.log(sum(math.exp(zi - m) for zi in z))
            n += 1
    return logprob, n


def score_text(params, config, tokenizer, text: str, docs_mode: bool = True) -> tuple[float, int]:
    """Log-probability of a document (docs mode: BOS + text + BOS, so the end counts too) or of
    a piece of text (stream mode: each token after the first), and its number of tokens."""
    ids = tokenizer.encode_doc(text) if docs_mode else tokenizer.encode(text)
    if len(ids) < 2:
        raise ValueError(f"{text!r} is too short to score (it needs two tokens)")
    return score_ids(params, config, ids)


def score_corpus(params, config, tokenizer, text: str, docs_mode: bool = True):
    """Total log-probability and token count over a corpus: every document of a docs corpus, or
    a stream in consecutive block_size windows (each token predicted once)."""
    total, count = 0.0, 0
    if docs_mode:
        for line in text.split("\n"):
            if line.strip():
                lp, n = score_ids(params, config, tokenizer.encode_doc(line.strip()))
                total, count = total + lp, count + n
    else:
        ids = tokenizer.encode(text)
        for s in range(0, len(ids) - 1, config.block_size):
            lp, n = score_ids(params, config, ids[s:s + config.block_size + 1], "truncate")
            total, count = total + lp, count + n
    if count == 0:
        raise ValueError("there is nothing to score")
    return total, count
