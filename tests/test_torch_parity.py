"""puregpt against an independent PyTorch implementation (tests/torch_reference.py), in float64.

Logits, loss and every parameter gradient must agree to TOL = 1e-9 (absolute), for every
architecture combination, for the microgpt and gpt2 configs at several batch shapes, and over
20 optimizer steps against torch.optim.Adam / AdamW. Both sides compute the same real numbers in
a different order, so they differ by float64 rounding only (~1e-15 here); 1e-9 leaves room for
that to grow through 20 training steps while any error in the math would show at ~1e-3.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import COMBOS, perturbed_params, random_batch, tiny_config
from torch_reference import DTYPE, build, max_abs_diff, sinusoidal_table

from puregpt import model, optim
from puregpt.config import PRESETS, GPTConfig, TrainConfig

TOL = 1e-9


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tensors here are tiny: on a small, busy machine torch's worker threads only add
    overhead (~6x this module's runtime). Restored afterwards for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_parity(cfg, params, inputs, targets):
    """Forward and backward on both sides; compare logits, loss and every gradient."""
    logits, _ = model.forward(params, cfg, inputs)
    loss, grads, count = model.loss_and_grads(params, cfg, inputs, targets)
    ref = build(cfg, params)
    ref_logits = ref(inputs)
    ref_loss = F.cross_entropy(ref_logits, torch.tensor([y for s in targets for y in s]),
                               ignore_index=-1)
    ref_loss.backward()
    assert max_abs_diff(logits, ref_logits.detach()) < TOL
    assert abs(loss - ref_loss.item()) < TOL
    assert count == sum(y >= 0 for s in targets for y in s)
    ref_grads = ref.grads()
    assert set(grads) == set(ref_grads)
    for name in grads:
        assert max_abs_diff(grads[name], ref_grads[name]) < TOL, name


@pytest.mark.parametrize("norm_affine", [True, False])
def test_every_combination(combo, norm_affine):
    cfg = tiny_config(combo, norm_affine=norm_affine)
    seed = COMBOS.index(combo)
    params = perturbed_params(cfg, seed)
    # four sequences of different lengths, one of them the full block
    inputs, targets = random_batch(cfg, random.Random(seed), [5, 1, cfg.block_size, 3])
    assert_parity(cfg, params, inputs, targets)


def batch_shape(T, B, rng):
    """B sequences, the first of length T and the others of random lengths up to T."""
    return [T] + [rng.randint(1, T) for _ in range(B - 1)]


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("T", [1, 5, 16])
def test_microgpt_default(T, B):
    cfg = GPTConfig()  # the microgpt architecture; T = 16 is its block_size
    assert T <= cfg.block_size
    params = model.init_params(cfg, random.Random(T * 10 + B))
    rng = random.Random(T * 10 + B)
    inputs, targets = random_batch(cfg, rng, batch_shape(T, B, rng))
    assert_parity(cfg, params, inputs, targets)


@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("T", [1, 5, 32])
def test_gpt2_preset(T, B):
    cfg = GPTConfig(**PRESETS["gpt2"]["model"])  # T = 32 is its block_size
    assert T <= cfg.block_size
    params = perturbed_params(cfg, T * 10 + B)
    rng = random.Random(T * 10 + B)
    inputs, targets = random_batch(cfg, rng, batch_shape(T, B, rng))
    assert_parity(cfg, params, inputs, targets)


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("T", [1, 5, 32])
def test_llama_preset(T, B):
    cfg = GPTConfig(**PRESETS["llama"]["model"])  # T = 32 is its block_size
    assert (cfg.kv_heads, cfg.hidden, cfg.pos, cfg.mlp) == (2, 96, "rope", "swiglu")
    params = perturbed_params(cfg, T * 10 + B)
    rng = random.Random(T * 10 + B)
    inputs, targets = random_batch(cfg, rng, batch_shape(T, B, rng))
    assert_parity(cfg, params, inputs, targets)


@pytest.mark.parametrize("n_kv_head", [None, 4, 2, 1])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_grouped_heads_at_every_ratio(n_kv_head, qk_norm):
    """4 query heads on 4, 2 or 1 K/V heads (multi-head, grouped, multi-query), with and without
    QK-norm, and a non-default RoPE base and MLP width."""
    cfg = tiny_config(dict(pos="rope", mlp="swiglu", activation="silu"), n_embd=16, n_head=4,
                      n_kv_head=n_kv_head, qk_norm=qk_norm, rope_theta=31.0, mlp_hidden=24,
                      bias=True)
    params = perturbed_params(cfg, 11)
    inputs, targets = random_batch(cfg, random.Random(11), [8, 3, 6])
    assert_parity(cfg, params, inputs, targets)


@pytest.mark.oracle
def test_reference_rope_and_gqa_are_transformers_conventions():
    """The reference's RoPE is transformers' Llama one (apply_rotary_pos_emb with the cos / sin
    of LlamaRotaryEmbedding), and SDPA's enable_gqa pairs K/V head j with query heads
    j*g..(j+1)*g-1 as transformers' repeat_kv does."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb, repeat_kv)
    from torch_reference import apply_rope, rope_cos_sin
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4, 7, 8, dtype=DTYPE, generator=gen) for _ in range(2))
    emb = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4,
                                           rope_theta=500.0, max_position_embeddings=16))
    cos, sin = emb(q, torch.arange(7)[None])
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = rope_cos_sin(7, 8, 500.0)
    # transformers computes the angles in float32: agreement to float32 rounding
    assert (apply_rope(q, ours_cos, ours_sin) - hf_q).abs().max() < 1e-5
    assert (apply_rope(k, ours_cos, ours_sin) - hf_k).abs().max() < 1e-5
    kv = torch.randn(1, 2, 7, 8, dtype=DTYPE, generator=gen)
    grouped = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    repeated = F.scaled_dot_product_attention(q, repeat_kv(kv, 2), repeat_kv(kv, 2),
                                              is_causal=True)
    assert (grouped - repeated).abs().max() < 1e-14


def test_gpt2_reference_is_built_from_torch_modules():
    """The gpt2 block in the reference is torch's own LayerNorm (and tanh-GELU and SDPA in code)."""
    ref = build(GPTConfig(**PRESETS["gpt2"]["model"]),
                perturbed_params(GPTConfig(**PRESETS["gpt2"]["model"])))
    norms = [ref.final_norm] + [n for b in ref.blocks for n in (b.attn_norm, b.mlp_norm)]
    assert all(type(n) is torch.nn.LayerNorm for n in norms)


def test_ignored_targets_match_ignore_index():
    """-1 targets are skipped exactly as by F.cross_entropy(ignore_index=-1): the mean is over the
    remaining positions, and a sequence with no target at all still feeds the others' context."""
    cfg = tiny_config(COMBOS[-1])
    params = perturbed_params(cfg, 7)
    rng = random.Random(7)
    inputs, targets = random_batch(cfg, rng, [6, 4, 8], ignore_frac=0.4)
    targets[1] = [-1] * 4
    assert_parity(cfg, params, inputs, targets)


def test_rms_norm_eps_semantics():
    """torch's rms_norm is x / sqrt(mean(x^2) + eps), the formula puregpt documents."""
    x = torch.randn(3, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.3)
    assert (F.rms_norm(x, (8,), eps=0.3) - expected).abs().max() < 1e-15


def test_sinusoidal_table_formula():
    pe = sinusoidal_table(5, 6)
    assert math.isclose(pe[3, 2].item(), math.sin(3 / 10000 ** (2 / 6)), rel_tol=1e-15)
    assert math.isclose(pe[3, 3].item(), math.cos(3 / 10000 ** (2 / 6)), rel_tol=1e-15)
    assert pe[0, 0] == 0.0 and pe[0, 1] == 1.0


# --- training: 20 optimizer steps on both sides ---------------------------------------------------


def reference_lr(step: int, tc: TrainConfig) -> float:
    """The schedules as documented, written out independently of optim.lr_at."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    t, n = step - tc.warmup, tc.steps - tc.warmup
    if tc.schedule == "linear":
        return tc.lr * (1 - t / n)
    if tc.schedule == "cosine":
        lo = tc.lr * tc.min_lr_frac
        return lo + (tc.lr - lo) * (1 + math.cos(math.pi * t / n)) / 2
    return tc.lr


def train_both(cfg, tc: TrainConfig, params, batches):
    """tc.steps steps of puregpt (adamw_step, lr_at, clip_grads) and of torch (Adam, or AdamW
    with decay on the 2-D weights other than wte/wpe; clip_grad_norm_). Returns per-step losses
    of both, the clipping events, and both final weights."""
    ref = build(cfg, params)
    named = ref.named()
    decay = [t for n, t in named.items() if t.dim() == 2 and n not in ("wte", "wpe")]
    no_decay = [t for n, t in named.items() if not (t.dim() == 2 and n not in ("wte", "wpe"))]
    kw = dict(lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    if tc.weight_decay:
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], **kw)
    else:
        opt = torch.optim.Adam(list(named.values()), **kw)
    state = optim.new_state(params)
    losses, ref_losses, clipped = [], [], []
    for step, (inputs, targets) in zip(range(tc.steps), batches):
        loss, grads, _ = model.loss_and_grads(params, cfg, inputs, targets)
        if tc.grad_clip:
            clipped.append(optim.clip_grads(grads, tc.grad_clip) > tc.grad_clip)
        optim.adamw_step(params, grads, state, optim.lr_at(step, tc), tc.beta1, tc.beta2, tc.eps,
                         tc.weight_decay)
        losses.append(loss)

        opt.zero_grad()
        ref_loss = ref.loss(inputs, targets)
        ref_loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), tc.grad_clip)
        for group in opt.param_groups:
            group["lr"] = reference_lr(step, tc)
        opt.step()
        ref_losses.append(ref_loss.item())
    return losses, ref_losses, clipped, params, ref.values()


def assert_training_parity(cfg, tc, seed, lengths):
    rng = random.Random(seed)
    batches = [random_batch(cfg, rng, [rng.randint(1, T) for T in lengths])
               for _ in range(tc.steps)]
    params = model.init_params(cfg, random.Random(seed))
    initial = {name: torch.tensor(t, dtype=DTYPE) for name, t in params.items()}
    losses, ref_losses, clipped, final, ref_final = train_both(cfg, tc, params, batches)
    assert len(losses) == tc.steps == 20
    for step, (a, b) in enumerate(zip(losses, ref_losses)):
        assert abs(a - b) < TOL, (step, a, b)
    for name in final:
        assert max_abs_diff(final[name], ref_final[name]) < TOL, name
    # the steps were not no-ops: every tensor moved (Adam steps are ~lr per entry), except the
    # key biases, whose gradient is zero by symmetry (softmax ignores a shift of all scores)
    # when no rotation comes between (RoPE turns the bias by a different angle per position)
    assert all(max_abs_diff(final[name], initial[name]) > 1e-4
               for name in final if not (name.endswith("attn_wk_b") and cfg.pos != "rope"))
    return clipped


def test_training_microgpt_hyperparameters():
    """microgpt: one document per step, Adam(0.85, 0.99, 1e-8), lr 0.01 decaying linearly to 0."""
    tc = TrainConfig(**{**PRESETS["microgpt"]["train"], "steps": 20})
    assert (tc.lr, tc.beta1, tc.beta2, tc.eps, tc.schedule, tc.weight_decay, tc.grad_clip) == (
        0.01, 0.85, 0.99, 1e-8, "linear", 0.0, 0.0)
    cfg = GPTConfig(**PRESETS["microgpt"]["model"])
    assert_training_parity(cfg, tc, seed=3, lengths=[cfg.block_size])


def test_training_gpt2_hyperparameters():
    """gpt2: AdamW(0.9, 0.95) with weight decay 0.1 on the matmul weights, cosine schedule after
    a linear warmup (shortened to 5 of the 20 steps so both phases run), gradient clipping at 1.0.
    The gpt2 architecture at a reduced width so that 20 steps stay fast."""
    tc = TrainConfig(**{**PRESETS["gpt2"]["train"], "steps": 20, "warmup": 5})
    assert (tc.weight_decay, tc.grad_clip, tc.schedule) == (0.1, 1.0, "cosine")
    cfg = GPTConfig(**{**PRESETS["gpt2"]["model"], "n_embd": 16, "block_size": 8})
    clipped = assert_training_parity(cfg, tc, seed=4, lengths=[8, 8, 8, 8])
    assert any(clipped)  # the clipping really acted (here: at every step)


def test_training_llama_hyperparameters():
    """llama: the gpt2 recipe (AdamW(0.9, 0.95), decay 0.1 on the matmul weights, cosine after
    a warmup shortened to 5 steps, clipping at 1.0) on the llama architecture (RoPE, SwiGLU,
    4 query heads on 2 K/V heads, RMSNorm gains, untied head) at a reduced width."""
    tc = TrainConfig(**{**PRESETS["llama"]["train"], "steps": 20, "warmup": 5})
    assert (tc.weight_decay, tc.grad_clip, tc.schedule) == (0.1, 1.0, "cosine")
    cfg = GPTConfig(**{**PRESETS["llama"]["model"], "n_embd": 16, "block_size": 8})
    assert (cfg.kv_heads, cfg.hidden, cfg.tie_embeddings) == (2, 64, False)
    clipped = assert_training_parity(cfg, tc, seed=5, lengths=[8, 8, 8, 8])
    assert any(clipped)


@pytest.mark.parametrize("ratio", [0.3, 0.999, 1.001, 3.0])
def test_clip_grads_matches_clip_grad_norm(ratio):
    """optim.clip_grads against torch.nn.utils.clip_grad_norm_ with max_norm = ratio * norm,
    on both sides of the threshold. (Within 1e-6 below max_norm torch already scales by
    max_norm / (norm + 1e-6) < 1 and puregpt does not: a relative difference < 1e-6, avoided.)"""
    cfg = tiny_config(COMBOS[-1])
    grads = perturbed_params(cfg, 5)  # any dict of tensors shaped like the parameters will do
    tensors = {n: torch.tensor(g, dtype=DTYPE, requires_grad=True) for n, g in grads.items()}
    for t in tensors.values():
        t.grad = t.detach().clone()
    norm = math.sqrt(sum(float((t.grad ** 2).sum()) for t in tensors.values()))
    ref_norm = torch.nn.utils.clip_grad_norm_(list(tensors.values()), ratio * norm)
    assert abs(optim.clip_grads(grads, ratio * norm) - ref_norm.item()) < 1e-12
    for name, t in tensors.items():
        assert max_abs_diff(grads[name], t.grad) < 1e-15, name
