"""puregpt.hf's Llama side against transformers: random LlamaForCausalLM models (several shapes,
multi-head, grouped-query and multi-query attention, tied embeddings, attention and MLP biases)
imported with `puregpt import-hf` give transformers' logits and greedy continuations; a puregpt
llama trained a few steps and exported with `puregpt export --format hf` loads with
LlamaForCausalLM.from_pretrained (and AutoTokenizer) and gives puregpt's logits; export ->
import gives back the same parameters and config; what Llama or puregpt cannot express is
refused by name.

Precision: transformers' Llama computes its RMSNorm and its RoPE angles in float32 even in a
float64 model, which caps agreement near 1e-7. The float32 comparisons (< 1e-5, the issue's
criterion) use transformers as it is; the float64 ones (< 1e-9) use `float64_llama`, which
replaces those two forwards with the same formulas computed at the model's precision (written
here from transformers' code), so that any mapping mistake shows far above rounding.
Oracles: torch, transformers, tokenizers (imported directly: they fail, never skip, when
missing)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from helpers_train import REPO, cli_env, names_file, run_cli, stream_text
from puregpt.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from puregpt.config import ConfigError, GPTConfig, preset
from puregpt.hf import export_hf, import_hf, llama_incompatibilities
from test_hf import (EOT, _train_gpt2, f32, hf_greedy, hf_logits, perturbed_puregpt,
                     pg_greedy, pg_logits, rel_err, safetensors_header)

pytestmark = pytest.mark.oracle

LLAMA_MODEL = preset("llama")["model"]  # n_layer 2, n_embd 32, n_head 4, n_kv_head 2, block 32


# --- transformers' Llama at float64 throughout ------------------------------------------------


def _rmsnorm_at_model_precision(self, x):
    """LlamaRMSNorm.forward without its float32 round trip: w * x / sqrt(mean(x^2) + eps)."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                          + self.variance_epsilon))


def _rope_at_model_precision(self, x, position_ids):
    """LlamaRotaryEmbedding.forward (default rope type) with the frequencies and angles in
    float64: inv_freq_i = theta^(-2i/hd), angle = position * inv_freq, cos/sin of [f, f]."""
    theta, dim = self.config.rope_parameters["rope_theta"], 2 * self.inv_freq.numel()
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = position_ids[..., None].double() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@pytest.fixture
def float64_llama(monkeypatch):
    """Within a test: every Llama (also one the continue script builds) computes its norms and
    RoPE at the model's own precision."""
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rmsnorm_at_model_precision)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", _rope_at_model_precision)


def test_float64_llama_changes_only_rounding(float64_llama):
    """The patched forwards are the same math: they move a float64 model's logits by float32
    rounding, no more (and the patch is in effect: they move at all)."""
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).double().eval()
    ids = torch.tensor([list(range(1, 31))])
    with torch.no_grad():
        patched = m(ids).logits
    original = _stock_logits(m, ids)
    assert 0 < (patched - original).abs().max().item() < 1e-5


def _stock_logits(m, ids):
    """Logits with transformers' own RMSNorm and RoPE forwards (the fixture's undone here)."""
    saved = modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaRotaryEmbedding.forward
    modeling_llama.LlamaRMSNorm.forward = _STOCK_RMSNORM
    modeling_llama.LlamaRotaryEmbedding.forward = _STOCK_ROPE
    try:
        with torch.no_grad():
            return m(ids).logits
    finally:
        modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaRotaryEmbedding.forward = saved


_STOCK_RMSNORM = modeling_llama.LlamaRMSNorm.forward
_STOCK_ROPE = modeling_llama.LlamaRotaryEmbedding.forward


# --- random transformers Llamas, imported ------------------------------------------------------


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """A byte-level BPE (300 tokens, <|endoftext|> special) trained with `tokenizers`, saved as
    vocab.json + merges.txt, and the text it was trained on."""
    tmp = tmp_path_factory.mktemp("llama_tok")
    text = stream_text(6000)
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator([text], vocab_size=300, min_frequency=2, special_tokens=[EOT],
                            show_progress=False)
    tok.save_model(str(tmp))
    return tmp, tok.token_to_id(EOT), text


# (name, LlamaConfig changes): multi-head, grouped-query + tied, multi-query + biases + a width
# off Llama's rule, and a deeper one with other rope_theta and rms_norm_eps
SHAPES = {
    "mha": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                num_hidden_layers=2, intermediate_size=96),
    "gqa-tied": dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                     num_hidden_layers=1, intermediate_size=64, tie_word_embeddings=True),
    "mqa-bias": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=1,
                     num_hidden_layers=2, intermediate_size=80, attention_bias=True,
                     mlp_bias=True),
    "deep-theta": dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                       num_hidden_layers=3, intermediate_size=48, rope_theta=500.0,
                       rms_norm_eps=1e-5),
}


def perturb_llama(m: LlamaForCausalLM, seed: int) -> None:
    """Weights and biases ~ N(0, 0.1), RMSNorm gains in [0.5, 1.5]: at the initial values (unit
    gains, zero biases) a gain put in the wrong norm or a dropped bias could hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def save_llama(bpe_files, out: Path, seed: int = 0, dtype=torch.float32, **changes):
    """A perturbed random LlamaForCausalLM saved by save_pretrained in dtype, with the tokenizer
    files beside it; returns the model as saved, in float64, eval mode."""
    tok_dir, eot, _ = bpe_files
    cfg = LlamaConfig(**{"vocab_size": 300, "max_position_embeddings": 32, "bos_token_id": eot,
                         "eos_token_id": eot, **changes})
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    perturb_llama(m, seed)
    m.to(dtype).save_pretrained(out)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / name, out / name)
    # which tokenizer class reads the files (a Llama's default is sentencepiece's)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": EOT,
         "eos_token": EOT, "unk_token": EOT}))
    return m.to(torch.float64).eval()


@pytest.mark.parametrize("shape", list(SHAPES))
def test_import_matches_transformers(shape, bpe_files, float64_llama, tmp_path):
    changes = SHAPES[shape]
    m = save_llama(bpe_files, tmp_path / "hf", seed=len(shape), **changes)
    header = safetensors_header(tmp_path / "hf" / "model.safetensors")
    assert ("lm_head.weight" in header) == (not changes.get("tie_word_embeddings", False))
    assert ("model.layers.0.self_attn.k_proj.bias" in header) == ("bias" in shape)
    proc = run_cli("import-hf", tmp_path / "hf", tmp_path / "model.safetensors")
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(tmp_path / "model.safetensors")
    c = ckpt.config
    assert (c.pos, c.norm, c.norm_affine, c.mlp, c.activation, c.emb_norm, c.final_norm) == \
        ("rope", "rmsnorm", True, "swiglu", "silu", False, True)
    assert (c.n_embd, c.n_head, c.kv_heads, c.n_layer, c.hidden) == tuple(
        changes[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                             "num_hidden_layers", "intermediate_size"))
    assert c.bias == changes.get("attention_bias", False)
    assert c.tie_embeddings == changes.get("tie_word_embeddings", False)
    assert c.rope_theta == changes.get("rope_theta", 10000.0)
    assert c.norm_eps == changes.get("rms_norm_eps", 1e-6)
    assert llama_incompatibilities(c) == []

    tok, text = ckpt.tokenizer, bpe_files[2]
    assert tok.encode(text[:500]) == AutoTokenizer.from_pretrained(tmp_path / "hf")(
        text[:500]).input_ids
    ids = tok.encode(text[:400])
    for prompt in ([tok.bos], ids[:5], ids[10:40], [tok.bos] + ids[100:110]):
        # the model as stored, float64 on both sides
        assert rel_err(pg_logits(ckpt, prompt), hf_logits(m, prompt)) < 1e-9, prompt
        n = 32 - len(prompt)
        want = hf_greedy(m, prompt, n, tok.bos)
        assert pg_greedy(ckpt, prompt, n) == want and want, prompt
    # the criterion: transformers as it is, computing in float32
    m32 = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert m32.dtype == torch.float32
    got32 = _stock_logits(m32, torch.tensor([ids[:32]]))[0].double().tolist()
    assert rel_err(got32, pg_logits(ckpt, ids[:32])) < 1e-5


def test_import_bf16_ignores_saved_rope_buffers_and_names_a_missing_tensor(
        bpe_files, float64_llama, tmp_path):
    m = save_llama(bpe_files, tmp_path / "hf", seed=3, dtype=torch.bfloat16, **SHAPES["mha"])
    ckpt = import_hf(tmp_path / "hf")  # BF16 values widen exactly to float64
    ids = ckpt.tokenizer.encode(bpe_files[2][:200])[:20]
    with torch.no_grad():
        want = m(torch.tensor([ids])).logits[0].tolist()  # float64 from the same bf16 values
    assert rel_err(pg_logits(ckpt, ids), want) < 1e-9

    weights = tmp_path / "hf" / "model.safetensors"
    ts = safetensors.torch.load_file(weights)
    for l in range(2):  # transformers < 4.31 saved these
        ts[f"model.layers.{l}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save = lambda: safetensors.torch.save_file(ts, weights, metadata={"format": "pt"})  # noqa
    save()
    assert import_hf(tmp_path / "hf").params == ckpt.params
    del ts["model.layers.1.mlp.gate_proj.weight"]
    ts["score.weight"] = torch.zeros(2, 32)
    save()
    with pytest.raises(CheckpointError, match=r"missing tensors: "
                                              r"model\.layers\.1\.mlp\.gate_proj\.weight$"):
        import_hf(tmp_path / "hf")
    ts["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(96, 32)
    save()
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(not part of a "
                                              r"LlamaForCausalLM\): score\.weight"):
        import_hf(tmp_path / "hf")


# --- malformed or inexpressible Llama configs ---------------------------------------------------


REFUSED = {
    "rope_scaling": ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                     r"rope_scaling has rope_type 'linear': puregpt's RoPE has no scaling"),
    "llama3 rope": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5,
                                         "factor": 8.0}},
                    r"rope_parameters has rope_type 'llama3'"),
    "old rope_scaling": ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},
                         r"rope_scaling has rope_type 'dynamic'"),
    "two thetas": ({"rope_theta": 500.0}, r"rope_parameters\.rope_theta \(10000\.0\) differs "
                                          r"from rope_theta \(500\.0\)"),
    "partial rotary": ({"partial_rotary_factor": 0.5},
                       r"partial_rotary_factor=0\.5: puregpt rotates every channel"),
    "head_dim": ({"head_dim": 16}, r"head_dim=16 differs from hidden_size / "
                                   r"num_attention_heads = 8"),
    "pretraining_tp": ({"pretraining_tp": 2}, r"pretraining_tp=2 is not supported"),
    "sliding window": ({"sliding_window": 8}, r"sliding_window=8 is not supported"),
    "quantized": ({"quantization_config": {"quant_method": "bitsandbytes"}},
                  r"quantization_config=.* is not supported"),
    "activation": ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported: puregpt's "
                                           r"SwiGLU gates with silu"),
    "half biases": ({"attention_bias": True, "mlp_bias": False},
                    r"attention_bias=True with mlp_bias=False: puregpt's --bias puts biases "
                    r"in both"),
    "kv heads": ({"num_key_value_heads": 3}, r"num_key_value_heads=3 must divide "
                                             r"num_attention_heads \(4\)"),
    "missing size": ({"intermediate_size": None}, r"missing key\(s\): intermediate_size"),
    "too long": ({"max_position_embeddings": 2 ** 20},
                 r"max_position_embeddings=1048576 is above puregpt's limit"),
    "eps": ({"rms_norm_eps": -1}, r"rms_norm_eps must be a positive number, got -1"),
}


@pytest.fixture(scope="module")
def llama_dir(bpe_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama_dir") / "hf"
    save_llama(bpe_files, out, **SHAPES["mha"])
    return out


@pytest.mark.parametrize("case", list(REFUSED))
def test_import_refuses_what_puregpt_cannot_express_by_name(case, llama_dir, tmp_path):
    changes, message = REFUSED[case]
    shutil.copytree(llama_dir, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    path.write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as e:
        import_hf(tmp_path / "hf")
    assert "cannot import this config" in str(e.value)
    assert re.search(message, str(e.value)), str(e.value)


def test_import_lists_every_llama_problem_at_once(llama_dir, tmp_path):
    shutil.copytree(llama_dir, tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    d = json.loads(path.read_text())
    d.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}, pretraining_tp=4,
             hidden_act="relu")
    path.write_text(json.dumps(d))
    proc = run_cli("import-hf", tmp_path / "hf", tmp_path / "out.safetensors")
    assert proc.returncode == 1
    for part in ("rope_type 'yarn'", "pretraining_tp=4", "hidden_act 'relu'"):
        assert part in proc.stderr, proc.stderr
    assert not (tmp_path / "out.safetensors").exists()


# --- puregpt llamas, exported ------------------------------------------------------------------


def _train_llama(data: Path, **train_options) -> Checkpoint:
    return _train_gpt2(data.parent, data, shape=LLAMA_MODEL, **train_options)


@pytest.fixture(scope="module")
def char_llama(tmp_path_factory):
    return _train_llama(names_file(tmp_path_factory.mktemp("llama_names"), 300), mode="docs")


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_text") / "text.txt"
    path.write_text(stream_text(6000), encoding="utf-8")
    ckpt = _train_llama(path, mode="stream", tokenizer="bpe", vocab_size=300)
    return ckpt, path.read_text(encoding="utf-8")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_exported_llama_loads_in_transformers_with_the_same_logits_and_ids(
        kind, char_llama, bpe_llama, float64_llama, tmp_path):
    """The issue's done-when: `puregpt train --preset llama`, `export --format hf`, and
    LlamaForCausalLM.from_pretrained gives equal logits."""
    ckpt = char_llama if kind == "char" else bpe_llama[0]
    tok, bos = ckpt.tokenizer, ckpt.tokenizer.bos
    save_checkpoint(tmp_path / "model.safetensors", ckpt)
    out = tmp_path / "llama-hf"
    proc = run_cli("export", tmp_path / "model.safetensors", "--format", "hf", out)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_key_value_heads"], config["intermediate_size"],
            config["tie_word_embeddings"], config["rms_norm_eps"]) == (2, 96, False, 1e-5)

    m, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert m.dtype == torch.float32 and m.config.num_key_value_heads == 2
    assert m.config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert type(AutoModelForCausalLM.from_pretrained(out)) is LlamaForCausalLM
    m.eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    if kind == "char":
        texts = ["emma", "olivia", "avamia"]
        prompts = [[bos], [bos] + tok.encode("e"), [bos] + tok.encode("ma")]
    else:
        text = bpe_llama[1]
        texts = [text[:400], text[1000:1300]]
        ids = tok.encode(text)
        prompts = [ids[:1], ids[:8], ids[50:66], ids[300:328]]
    for t in texts:
        assert hf_tok(t).input_ids == tok.encode(t), t
    assert hf_tok.bos_token_id == hf_tok.eos_token_id == bos
    for ids in prompts:
        got = _stock_logits(m, torch.tensor([ids]))[0].double().tolist()
        assert rel_err(got, pg_logits(ckpt, ids)) < 1e-5  # transformers as it is, float32
    # float64 export: the same numbers to 1e-9, and the same greedy continuations
    export_hf(ckpt, tmp_path / "f64", dtype="F64")
    m64 = LlamaForCausalLM.from_pretrained(tmp_path / "f64", dtype="auto").eval()
    assert m64.dtype == torch.float64
    continued = 0
    for ids in prompts:
        assert rel_err(hf_logits(m64, ids), pg_logits(ckpt, ids)) < 1e-9
        n = ckpt.config.block_size - len(ids)
        want = pg_greedy(ckpt, ids, n)
        assert hf_greedy(m64, ids, n, bos) == want, ids
        continued += len(want)
    assert continued > 0


@pytest.mark.parametrize("changes", [
    dict(tie_embeddings=True, bias=True, n_kv_head=1, rope_theta=500.0, norm_eps=1e-3,
         mlp_hidden=40),
    dict(n_kv_head=4, init_std=0.05, scaled_init=True, mlp_multiple_of=64),
    dict(n_kv_head=None, n_layer=1, n_embd=24, n_head=3),
], ids=["tied-bias-mqa", "explicit-kv", "odd-width"])
def test_export_f64_round_trips_exactly_and_matches_transformers(changes, char_llama,
                                                                 float64_llama, tmp_path):
    tok = char_llama.tokenizer
    config = GPTConfig(**{**LLAMA_MODEL, "vocab_size": tok.vocab_size, "block_size": 12,
                          **changes})
    ckpt = perturbed_puregpt(config, tok)
    export_hf(ckpt, tmp_path / "f64", dtype="F64")
    m, info = LlamaForCausalLM.from_pretrained(tmp_path / "f64", output_loading_info=True,
                                               dtype="auto")
    assert not any(info.values()), info
    m.eval()
    assert m.dtype == torch.float64 and m.config.attention_bias == m.config.mlp_bias == \
        config.bias
    assert (m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()) == \
        config.tie_embeddings
    ids = [tok.bos] + tok.encode("emma") + [tok.bos] + tok.encode("jo")
    assert rel_err(hf_logits(m, ids), pg_logits(ckpt, ids)) < 1e-9
    assert hf_greedy(m, ids[:3], 9, tok.bos) == pg_greedy(ckpt, ids[:3], 9)

    back = import_hf(tmp_path / "f64")  # F64: bit for bit, and puregpt's own config
    assert back.config == config and back.params == ckpt.params and back.tokenizer == tok
    assert back.trainer["mode"] == "docs"
    # without the puregpt section (a Llama that transformers saved): the same model, what
    # Llama does not record normalized (n_kv_head = n_head is automatic, no scaled init)
    path = tmp_path / "f64" / "config.json"
    d = json.loads(path.read_text())
    del d["puregpt"]
    path.write_text(json.dumps(d))
    plain = import_hf(tmp_path / "f64")
    assert plain.params == ckpt.params
    c = plain.config
    assert (c.kv_heads, c.hidden, c.bias, c.tie_embeddings, c.rope_theta, c.norm_eps) == (
        config.kv_heads, config.hidden, config.bias, config.tie_embeddings, config.rope_theta,
        config.norm_eps)
    assert c.n_kv_head == (None if config.kv_heads == config.n_head else config.kv_heads)
    assert plain.trainer["mode"] == "stream"

    export_hf(ckpt, tmp_path / "f32")  # F32: every value rounded to the nearest float32
    back = import_hf(tmp_path / "f32")
    for name, t in ckpt.params.items():
        rows = t if isinstance(t[0], list) else [t]
        got = back.params[name] if isinstance(t[0], list) else [back.params[name]]
        assert got == [[f32(x) for x in r] for r in rows], name


def test_export_refuses_what_llama_cannot_express_by_name(char_llama, tmp_path):
    tok = char_llama.tokenizer
    base = {**LLAMA_MODEL, "vocab_size": tok.vocab_size}
    qk = perturbed_puregpt(GPTConfig(**base, qk_norm=True), tok)
    assert [p.split("=")[0] for p in llama_incompatibilities(qk.config)] == ["qk_norm"]
    with pytest.raises(ConfigError) as e:
        export_hf(qk, tmp_path / "out")
    msg = str(e.value)
    for part in ("cannot export to Hugging Face Llama", "qk_norm=True: Llama has no norm on q "
                 "and k", "--preset llama, or with the flags: --no-qk-norm\n",
                 "Nor as a GPT-2", "--preset gpt2"):
        assert part in msg, (part, msg)
    assert not (tmp_path / "out").exists()

    odd = perturbed_puregpt(GPTConfig(**{**base, "pos": "learned", "emb_norm": True}), tok)
    with pytest.raises(ConfigError) as e:
        export_hf(odd, tmp_path / "out")
    msg = str(e.value).split("Nor as a GPT-2")[0]  # the Llama part: what Llama lacks
    for part in ("cannot export to Hugging Face Llama", "pos='learned': Llama rotates q and k",
                 "emb_norm=True", "with the flags: --pos rope --no-emb-norm\n"):
        assert part in msg, (part, msg)
    assert "mlp=" not in msg and "bias" not in msg and not (tmp_path / "out").exists()

    save_checkpoint(tmp_path / "qk.safetensors", qk)  # the CLI: exit 2, no directory
    proc = run_cli("export", tmp_path / "qk.safetensors", tmp_path / "out")
    assert proc.returncode == 2 and "qk_norm=True" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_readmes_llama_commands_and_snippet_run(tmp_path, monkeypatch, capsys):
    """README's "A Llama": its commands (train shortened to a few steps) in a fresh directory,
    then its Python snippet, whose printed logit difference is float32 rounding."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### A Llama", 1)[1]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip()
    snippet = re.search(r"```py\n(.*?)```", section, re.S).group(1)
    assert command == "puregpt train --preset llama && puregpt export run --format hf llama-hf"
    for part in command.split(" && "):
        argv = part.split()[1:]
        if argv[0] == "train":
            argv += ["--steps", "3", "--eval-every", "0", "--eval-tokens", "100", "--samples",
                     "0", "--quiet"]
        proc = subprocess.run([sys.executable, "-m", "puregpt", *argv], cwd=tmp_path,
                              env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(snippet, "README.md llama snippet", "exec"), {"__name__": "readme"})
    assert 0 <= float(capsys.readouterr().out.strip()) < 1e-5
