"""Incremental decoding with the KV cache against the full-sequence forward.

Decoding position p with the cache must give exactly the logits that the full forward gives at
position p: the same row-wise ops on the same rows, with the causal mask replaced by "only the keys
cached so far". Only the order of identical float operations could differ, hence TOL = 1e-12.
"""

from __future__ import annotations

import random

import pytest
from conftest import COMBOS, perturbed_params, tiny_config

from puregpt import model
from puregpt.config import PRESETS, GPTConfig

TOL = 1e-12


def decode(params, cfg, tokens, chunks):
    """Feed `tokens` through a fresh KV cache in consecutive chunks of the given sizes; return
    the logits of every position, one row each."""
    kv, logits, pos = model.new_kv_cache(cfg), [], 0
    for n in chunks:
        out, _ = model.forward(params, cfg, [tokens[pos:pos + n]], kv=kv, start_pos=pos)
        assert len(out) == n  # only the new tokens' logits
        logits += out
        pos += n
    assert pos == len(tokens)
    assert all(len(k) == len(v) == pos for k, v in kv)  # every layer cached every position
    return logits


def max_diff(A, B) -> float:
    return max(abs(a - b) for ra, rb in zip(A, B, strict=True) for a, b in zip(ra, rb, strict=True))


def assert_decoding_matches(cfg, params, tokens):
    full, _ = model.forward(params, cfg, [tokens])
    T = len(tokens)
    schedules = {
        "token by token": [1] * T,
        "prefill 3, then token by token": [3] + [1] * (T - 3),
        "prefill 5, then 2 and 1": [5, 2] + [1] * (T - 7),
    }
    for label, chunks in schedules.items():
        assert max_diff(decode(params, cfg, tokens, chunks), full) < TOL, label


@pytest.mark.parametrize("norm_affine", [True, False])
def test_every_combination(combo, norm_affine):
    cfg = tiny_config(combo, norm_affine=norm_affine)
    seed = COMBOS.index(combo)
    tokens = [random.Random(seed).randrange(cfg.vocab_size) for _ in range(cfg.block_size)]
    assert_decoding_matches(cfg, perturbed_params(cfg, seed), tokens)


@pytest.mark.parametrize("preset", ["microgpt", "gpt2", "llama"])
def test_presets_full_block(preset):
    cfg = GPTConfig(**PRESETS[preset]["model"])
    rng = random.Random(1)
    tokens = [rng.randrange(cfg.vocab_size) for _ in range(cfg.block_size)]
    assert_decoding_matches(cfg, perturbed_params(cfg, 1), tokens)


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_rope_and_grouped_kv_cache(n_kv_head):
    """The cache holds n_kv_head heads per position (not n_head), the keys already rotated by
    their absolute position: decoding from a cache equals the full forward at every position,
    with QK-norm too."""
    cfg = GPTConfig(vocab_size=9, block_size=12, n_layer=2, n_embd=16, n_head=4,
                    n_kv_head=n_kv_head, pos="rope", mlp="swiglu", activation="silu",
                    qk_norm=True, norm_affine=True, init_std=0.4, rope_theta=20.0)
    params = perturbed_params(cfg, 2)
    tokens = [random.Random(2).randrange(cfg.vocab_size) for _ in range(cfg.block_size)]
    assert_decoding_matches(cfg, params, tokens)
    kv = model.new_kv_cache(cfg)
    model.forward(params, cfg, [tokens[:5]], kv=kv)
    assert all(len(row) == n_kv_head * cfg.head_dim for k, v in kv for row in k + v)


def test_decoding_past_block_size_is_refused():
    cfg = tiny_config(COMBOS[0])
    params = perturbed_params(cfg)
    kv = model.new_kv_cache(cfg)
    model.forward(params, cfg, [[1] * cfg.block_size], kv=kv, start_pos=0)
    with pytest.raises(ValueError):
        model.forward(params, cfg, [[1]], kv=kv, start_pos=cfg.block_size)
