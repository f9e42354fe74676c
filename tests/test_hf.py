"""puregpt.hf against transformers: a puregpt GPT-2 exported with `puregpt export` is loaded by
GPT2LMHeadModel and AutoTokenizer and computes the same logits, greedy continuations and token
ids; a GPT2LMHeadModel saved by transformers (F32, F16, BF16) and imported with
`puregpt import-hf` does too, and sample, score and train --init-from accept it; malformed
directories and models GPT-2 cannot express are refused with messages naming the problem."""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
from pathlib import Path

import pytest
import safetensors.torch
import tokenizers
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from helpers_train import names_file, run_cli, stream_text
from puregpt import model
from puregpt.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from puregpt.config import ConfigError, GPTConfig, TrainConfig, preset
from puregpt.hf import export_hf, gpt2_incompatibilities, import_hf
from puregpt.sample import generate
from puregpt.tokenizer import CharTokenizer
from puregpt.train import train

GPT2_MODEL = preset("gpt2")["model"]  # n_layer 2, n_embd 32, n_head 4, block_size 32
EOT = "<|endoftext|>"


# --- helpers -----------------------------------------------------------------------------------


def pg_logits(ckpt: Checkpoint, ids: list[int]) -> list[list[float]]:
    return model.forward(ckpt.params, ckpt.config, [ids])[0]


def hf_logits(m: GPT2LMHeadModel, ids: list[int]) -> list[list[float]]:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].double().tolist()


def rel_err(got, want) -> float:
    """max |got - want| over max |want|, over every logit of every position."""
    diff = max(abs(a - b) for ra, rb in zip(got, want, strict=True)
               for a, b in zip(ra, rb, strict=True))
    return diff / max(abs(b) for rb in want for b in rb)


def pg_greedy(ckpt: Checkpoint, ids: list[int], n: int) -> list[int]:
    return list(generate(ckpt.params, ckpt.config, ids, n, random.Random(0), greedy=True,
                         stop_token=ckpt.tokenizer.bos))


def hf_greedy(m: GPT2LMHeadModel, ids: list[int], n: int, eos: int) -> list[int]:
    """transformers' own greedy search; the EOS it stops at is dropped (puregpt yields none)."""
    with torch.no_grad():
        out = m.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                         eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
    return out[:-1] if out and out[-1] == eos else out


def perturb_hf(m: GPT2LMHeadModel, seed: int = 0) -> None:
    """Weights ~ N(0, 0.1), LayerNorm gains in [0.5, 1.5], biases ~ N(0, 0.1): at their initial
    values (gain 1, bias 0) a swapped gain and bias or a dropped bias could hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def perturbed_puregpt(config: GPTConfig, tokenizer, seed: int = 0) -> Checkpoint:
    rng = random.Random(seed)
    params = model.init_params(config, rng)
    for name, t in params.items():
        if not isinstance(t[0], list):
            params[name] = [(1.0 if name.endswith("_g") else 0.0) + rng.gauss(0, 0.3) for _ in t]
    return Checkpoint(config, tokenizer, params, trainer={"mode": "docs"})


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


# --- puregpt models of the gpt2 shape, trained a few steps -------------------------------------


def _train_gpt2(tmp: Path, data: Path, **train_options) -> Checkpoint:
    tc = TrainConfig(steps=6, batch_size=4, lr=0.01, schedule="constant", workers=1,
                     eval_every=0, val_fraction=0.0, **train_options)
    res = train(GPTConfig(**GPT2_MODEL), tc, str(data), None, quiet=True)
    assert res.losses[-1] < res.losses[0]
    return Checkpoint(res.config, res.tokenizer, res.params, res.step,
                      trainer={"mode": res.corpus.mode})


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("char")
    ckpt = _train_gpt2(tmp, names_file(tmp, 300), mode="docs")
    assert ckpt.tokenizer.kind == "char"
    return ckpt


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(stream_text(6000), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe_ckpt(shakespeare):
    ckpt = _train_gpt2(shakespeare.parent, shakespeare, mode="stream", tokenizer="bpe",
                       vocab_size=300)
    assert ckpt.tokenizer.kind == "bpe" and ckpt.config.vocab_size == 300
    return ckpt


# --- export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_export_loads_in_transformers_with_the_same_logits_generation_and_ids(
        kind, char_ckpt, bpe_ckpt, shakespeare, tmp_path):
    ckpt = char_ckpt if kind == "char" else bpe_ckpt
    tok, bos = ckpt.tokenizer, ckpt.tokenizer.bos
    out = tmp_path / "hf"
    proc_ckpt = tmp_path / "model.safetensors"
    save_checkpoint(proc_ckpt, ckpt)
    proc = run_cli("export", proc_ckpt, "--format", "hf", out)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "puregpt_data.json",
         "tokenizer.json", "tokenizer_config.json"] + (["merges.txt", "vocab.json"] if kind == "bpe" else []))
    assert {v["dtype"] for k, v in safetensors_header(out / "model.safetensors").items()
            if k != "__metadata__"} == {"F32"}

    m, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert set(info) == {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert m.dtype == torch.float32 and m.config.model_type == "gpt2"
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()  # tied
    m.eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    raw_tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))

    if kind == "char":
        docs = [d for d in Path(names_file(tmp_path, 300)).read_text().split()][::37]
        texts = docs + ["".join(docs)]
        with pytest.raises(Exception, match="Missing"):  # outside the vocabulary, as in puregpt
            hf_tok("a b")
        prompts = [[bos]] + [[bos] + tok.encode(d[:k]) for d in docs[:4] for k in (1, 3)]
    else:
        text = shakespeare.read_text(encoding="utf-8")
        texts = [text[:400], text[1000:1300], "  odd  spacing\n\n and 'quotes' it's 3.14 "]
        ids = tok.encode(text)
        prompts = [ids[s:s + k] for s, k in ((0, 1), (0, 8), (50, 16), (300, 5), (700, 24))]
    for text in texts:
        want = tok.encode(text)
        assert hf_tok(text).input_ids == want, text
        assert raw_tok.encode(text).ids == want, text
        assert hf_tok.decode(want) == text
    assert hf_tok.bos_token_id == hf_tok.eos_token_id == bos
    assert hf_tok.convert_ids_to_tokens(bos) == EOT

    for ids in prompts:
        assert rel_err(hf_logits(m, ids), pg_logits(ckpt, ids)) < 1e-5
        n = ckpt.config.block_size - len(ids)
        want = pg_greedy(ckpt, ids, n)
        assert hf_greedy(m, ids, n, bos) == want, ids
        assert len(want) > 0

    back = import_hf(out)  # and back: the same model, tokenizer and mode
    assert back.config == ckpt.config and back.tokenizer == tok
    assert back.trainer["mode"] == ckpt.trainer["mode"]


def test_character_vocabulary_with_newlines_spaces_and_any_unicode(tmp_path):
    text = "Two lines,\nspaces  and\ttabs; naïve café — 中文 😀 e\u0301 \r\n\u2028 <|x|>"
    tok = CharTokenizer(sorted(set(text)))
    ckpt = perturbed_puregpt(GPTConfig(**{**GPT2_MODEL, "vocab_size": tok.vocab_size}), tok)
    export_hf(ckpt, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for t in (text, text[::-1], "\n\n  ", "😀"):
        assert hf_tok(t).input_ids == tok.encode(t)
        assert hf_tok.decode(tok.encode(t)) == t
    assert hf_tok.decode([tok.bos] + tok.encode("ab"), skip_special_tokens=True) == "ab"
    assert import_hf(tmp_path / "hf").tokenizer == tok


@pytest.mark.parametrize("tie, activation", [(False, "gelu"), (True, "relu"),
                                             (False, "gelu_tanh")])
def test_export_f64_is_exact_for_every_activation_and_an_untied_head(tie, activation, char_ckpt,
                                                                      tmp_path):
    tok = char_ckpt.tokenizer
    config = GPTConfig(**{**GPT2_MODEL, "vocab_size": tok.vocab_size, "tie_embeddings": tie,
                          "activation": activation, "norm_eps": 1e-3, "block_size": 12})
    ckpt = perturbed_puregpt(config, tok)
    export_hf(ckpt, tmp_path / "f64", dtype="F64")
    m, info = GPT2LMHeadModel.from_pretrained(tmp_path / "f64", output_loading_info=True)
    assert not any(info.values())
    assert m.dtype == torch.float64
    assert (m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()) == tie
    hf_act = {"gelu": "gelu", "relu": "relu", "gelu_tanh": "gelu_new"}[activation]
    assert m.config.activation_function == hf_act and m.config.layer_norm_epsilon == 1e-3
    ids = [tok.bos] + tok.encode("emma") + [tok.bos] + tok.encode("jo")
    assert rel_err(hf_logits(m, ids), pg_logits(ckpt, ids)) < 1e-12
    assert hf_greedy(m, ids[:3], 9, tok.bos) == pg_greedy(ckpt, ids[:3], 9)

    back = import_hf(tmp_path / "f64")  # F64: bit for bit
    assert back.config == config and back.tokenizer == tok and back.params == ckpt.params
    assert back.trainer["mode"] == "docs"
    export_hf(ckpt, tmp_path / "f32")  # F32: every value rounded to the nearest float32
    back = import_hf(tmp_path / "f32")
    assert list(back.params) == list(ckpt.params)
    for name, t in ckpt.params.items():
        rows = t if isinstance(t[0], list) else [t]
        got = back.params[name] if isinstance(t[0], list) else [back.params[name]]
        assert got == [[f32(x) for x in r] for r in rows], name


def test_export_round_trips_a_trained_model_and_replaces_only_its_own_files(char_ckpt,
                                                                            tmp_path):
    out = tmp_path / "hf"
    export_hf(char_ckpt, out)
    back = import_hf(out)
    assert back.config == char_ckpt.config and back.tokenizer == char_ckpt.tokenizer
    assert back.trainer["mode"] == "docs"
    export_hf(char_ckpt, out, dtype="f64")  # a re-export replaces the same files
    assert import_hf(out).params == char_ckpt.params
    (out / "vocab.json").write_text("{}")  # a stale file this export would not replace
    with pytest.raises(ConfigError, match=r"already holds files .*vocab\.json"):
        export_hf(char_ckpt, out)
    assert not list(tmp_path.glob(".*tmp"))


def test_export_refuses_a_default_model_listing_every_incompatible_option(tmp_path):
    default = perturbed_puregpt(GPTConfig(), model_tokenizer())
    problems = gpt2_incompatibilities(default.config)
    assert [p.split("=")[0] for p in problems] == ["norm", "norm_affine", "emb_norm",
                                                   "final_norm", "bias"]
    with pytest.raises(ConfigError) as e:
        export_hf(default, tmp_path / "out")
    msg = str(e.value)
    for part in ("norm='rmsnorm'", "norm_affine=False", "emb_norm=True", "final_norm=False",
                 "bias=False", "--preset gpt2",
                 "--norm layernorm --norm-affine --no-emb-norm --final-norm --bias"):
        assert part in msg, (part, msg)
    assert "pos=" not in msg and "activation" not in msg and "tie" not in msg
    assert not (tmp_path / "out").exists()

    odd = GPTConfig(**{**GPT2_MODEL, "pos": "sinusoidal", "norm_position": "post"})
    assert [p.split("=")[0] for p in gpt2_incompatibilities(odd)] == ["pos", "norm_position"]
    assert gpt2_incompatibilities(GPTConfig(**GPT2_MODEL)) == []

    save_checkpoint(tmp_path / "default.safetensors", default)  # the CLI: exit 2, no directory
    proc = run_cli("export", tmp_path / "default.safetensors", tmp_path / "out")
    assert proc.returncode == 2 and "cannot export to Hugging Face GPT-2" in proc.stderr
    assert "--preset gpt2" in proc.stderr and not (tmp_path / "out").exists()


def test_gpt2_export_refuses_the_modern_block_by_name(tmp_path):
    """RoPE, SwiGLU, a set MLP width, grouped K/V heads, QK-norm, SiLU: each is named, with the
    flag that makes the model a GPT-2, and nothing is written."""
    config = GPTConfig(**{**GPT2_MODEL, "pos": "rope", "mlp": "swiglu", "activation": "silu",
                          "mlp_hidden": 40, "n_kv_head": 2, "qk_norm": True})
    problems = gpt2_incompatibilities(config)
    assert [p.split("=")[0] for p in problems] == ["pos", "mlp", "mlp_hidden", "n_kv_head",
                                                   "qk_norm", "activation"]
    with pytest.raises(ConfigError) as e:
        export_hf(perturbed_puregpt(config, model_tokenizer()), tmp_path / "out")
    for part in ("pos='rope'", "mlp='swiglu'", "n_kv_head=2", "qk_norm=True", "--pos learned",
                 "--mlp plain", "no --mlp-hidden", "no --n-kv-head", "--no-qk-norm",
                 "activation='silu'", "--activation gelu_tanh"):
        assert part in str(e.value), (part, str(e.value))
    assert not (tmp_path / "out").exists()


def model_tokenizer():
    return CharTokenizer("abcdefghijklmnopqrstuvwxyz")


# --- import ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_bpe(shakespeare, tmp_path_factory):
    """A ByteLevel BPE trained with `tokenizers` (<|endoftext|> special), saved as vocab.json +
    merges.txt, and a small random GPT2LMHeadModel config using it."""
    tmp = tmp_path_factory.mktemp("hf_tok")
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator([shakespeare.read_text(encoding="utf-8")], vocab_size=300,
                            min_frequency=2, special_tokens=[EOT], show_progress=False)
    tok.save_model(str(tmp))
    eot = tok.token_to_id(EOT)
    cfg = GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=2, n_head=4,
                     n_positions=32, bos_token_id=eot, eos_token_id=eot)
    return tmp, cfg


def save_hf_model(hf_bpe, out: Path, dtype=torch.float32, seed: int = 0, **config_changes):
    """A perturbed random GPT2LMHeadModel saved with save_pretrained (safetensors) in dtype,
    with the tokenizer files beside it; returns the model as saved, in float64."""
    tok_dir, cfg = hf_bpe
    cfg = GPT2Config(**{**cfg.to_dict(), **config_changes})
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(cfg)
    perturb_hf(m, seed)
    m = m.to(dtype)
    m.save_pretrained(out)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tok_dir / name, out / name)
    return m.to(torch.float64).eval()


@pytest.fixture(scope="module")
def imported_f32(hf_bpe, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imported")
    m = save_hf_model(hf_bpe, tmp / "hf")
    proc = run_cli("import-hf", tmp / "hf", tmp / "model.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "300 bpe tokens" in proc.stdout and "stream mode" in proc.stdout
    return tmp, m, load_checkpoint(tmp / "model.safetensors")


@pytest.mark.parametrize("dtype, name", [(torch.float32, "F32"), (torch.float16, "F16"),
                                         (torch.bfloat16, "BF16")])
def test_import_matches_transformers(dtype, name, hf_bpe, shakespeare, tmp_path):
    m = save_hf_model(hf_bpe, tmp_path / "hf", dtype, seed=1)
    header = safetensors_header(tmp_path / "hf" / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {name}
    assert "transformer.h.1.attn.c_attn.weight" in header  # transformers' own layout
    proc = run_cli("import-hf", tmp_path / "hf", tmp_path / "model.safetensors")
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.config == GPTConfig(**{**GPT2_MODEL, "vocab_size": 300})
    assert ckpt.trainer["mode"] == "stream" and all(
        isinstance(x, float) for x in ckpt.params["wte"][0])

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok = ckpt.tokenizer
    assert tok.bos == hf_tok.eos_token_id == hf_bpe[1].eos_token_id
    text = shakespeare.read_text(encoding="utf-8")
    for t in (text[:500], text[2000:2600], "naïve  café, it's 3.14!\n\n  x"):
        assert tok.encode(t) == hf_tok(t).input_ids
    ids = tok.encode(text[:300])
    for prompt in ([tok.bos], ids[:5], ids[10:40], [tok.bos] + ids[100:110]):
        # the model as stored, in float64 on both sides
        assert rel_err(pg_logits(ckpt, prompt), hf_logits(m, prompt)) < 1e-10
        n = 32 - len(prompt)
        assert pg_greedy(ckpt, prompt, n) == hf_greedy(m, prompt, n, tok.bos)
    if dtype == torch.float32:  # the criterion, with transformers computing in float32
        m32 = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        assert rel_err(hf_logits(m32, ids[:32]), pg_logits(ckpt, ids[:32])) < 1e-5


def test_imported_model_works_with_sample_score_and_fine_tuning(imported_f32, hf_bpe, tmp_path):
    tmp, m, ckpt = imported_f32
    path, tok = tmp / "model.safetensors", ckpt.tokenizer
    hf_tok = AutoTokenizer.from_pretrained(tmp / "hf")

    prompt = "First Citizen:"
    want = hf_greedy(m, tok.encode(prompt), 10, tok.bos)
    proc = run_cli("sample", path, "--greedy", "-n", "1", "--prompt", prompt,
                   "--max-new-tokens", 10)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == prompt + tok.decode(want) + "\n"

    text = "Before we proceed any further, hear me."
    ids = hf_tok(text).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(m(torch.tensor([ids])).logits[0], -1)
    hf_logprob = sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
    proc = run_cli("score", "-m", path, text)
    assert proc.returncode == 0, proc.stderr
    logprob, _, n = proc.stdout.splitlines()[1].split()[:3]
    assert abs(float(logprob) - hf_logprob) < 1e-3 and int(n) == len(ids) - 1

    data = tmp_path / "tiny.txt"
    data.write_text("the cat sat on the mat. " * 60 + "\n", encoding="utf-8")
    proc = run_cli("train", "--init-from", path, "--data", data, "--out", tmp_path / "run",
                   "--steps", 12, "--batch-size", 4, "--lr", 0.01, "--schedule", "constant",
                   "--mode", "stream", "--workers", 1, "--eval-every", 0, "--val-fraction", 0,
                   "--samples", 0, "--quiet")
    assert proc.returncode == 0, proc.stderr
    losses = [json.loads(line)["loss"] for line in
              (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses
    tuned = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert tuned.config == ckpt.config and tuned.tokenizer == tok


def _rewrite(src: Path, dst: Path, change) -> None:
    """Copy an HF directory, passing model.safetensors' tensors through change(dict) -> dict."""
    shutil.copytree(src, dst)
    tensors = change(safetensors.torch.load_file(dst / "model.safetensors"))
    safetensors.torch.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_import_reads_bare_names_ignores_buffers_and_checks_a_tied_head(imported_f32, tmp_path):
    tmp, m, ckpt = imported_f32

    def bare_with_buffers(ts):
        ts = {k.removeprefix("transformer."): v for k, v in ts.items()}
        for i in range(2):
            ts[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
            ts[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        ts["lm_head.weight"] = ts["wte.weight"].clone()  # tied: allowed when equal
        return ts

    _rewrite(tmp / "hf", tmp_path / "bare", bare_with_buffers)
    assert "h.0.attn.c_attn.weight" in safetensors_header(tmp_path / "bare" / "model.safetensors")
    assert import_hf(tmp_path / "bare").params == ckpt.params

    def other_head(ts):
        ts["lm_head.weight"] = ts["transformer.wte.weight"] * 2
        return ts

    _rewrite(tmp / "hf", tmp_path / "head", other_head)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs from "
                                              r"transformer\.wte\.weight .*tie_word_embeddings"):
        import_hf(tmp_path / "head")


def test_import_untied_model_and_tokenizer_json(hf_bpe, shakespeare, tmp_path):
    m = save_hf_model(hf_bpe, tmp_path / "hf", tie_word_embeddings=False,
                      activation_function="gelu")
    assert "lm_head.weight" in safetensors_header(tmp_path / "hf" / "model.safetensors")
    # transformers 5 saves a tokenizer as tokenizer.json only: import reads that too
    AutoTokenizer.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "hf")
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "hf" / name).unlink()
    ckpt = import_hf(tmp_path / "hf")
    assert not ckpt.config.tie_embeddings and ckpt.config.activation == "gelu"
    assert ckpt.tokenizer.encoder == json.loads((hf_bpe[0] / "vocab.json").read_text())
    text = shakespeare.read_text(encoding="utf-8")[:400]
    assert ckpt.tokenizer.encode(text) == AutoTokenizer.from_pretrained(
        tmp_path / "hf")(text).input_ids
    ids = ckpt.tokenizer.encode(text)[:32]
    assert rel_err(pg_logits(ckpt, ids), hf_logits(m, ids)) < 1e-10


# --- malformed inputs --------------------------------------------------------------------------


def _config_edit(key, value):
    def edit(d: Path):
        c = json.loads((d / "config.json").read_text())
        if value is None:
            c.pop(key)
        else:
            c[key] = value
        (d / "config.json").write_text(json.dumps(c))
    return edit


def _tensors_edit(change):
    def edit(d: Path):
        ts = change(safetensors.torch.load_file(d / "model.safetensors"))
        safetensors.torch.save_file(ts, d / "model.safetensors", metadata={"format": "pt"})
    return edit


def _header_claims_more(d: Path):
    p = d / "model.safetensors"
    raw = bytearray(p.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw) + 100)
    p.write_bytes(raw)


def _truncate(d: Path):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])


def _nan(ts):
    ts["transformer.h.0.mlp.c_fc.weight"][3, 4] = float("nan")
    return ts


MALFORMED = {
    "no config.json": (lambda d: (d / "config.json").unlink(), r"missing file\(s\): config\.json"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(),
                   r"missing file\(s\): model\.safetensors"),
    "no merges.txt": (lambda d: (d / "merges.txt").unlink(), r"missing file\(s\): merges\.txt"),
    "no tokenizer": (lambda d: [(d / n).unlink() for n in ("vocab.json", "merges.txt")],
                     r"missing file\(s\): vocab\.json \+ merges\.txt \(or tokenizer\.json\)"),
    "shape": (_config_edit("n_positions", 64),
              r"transformer\.wpe\.weight: expected \[64, 32\], found \[32, 32\]"),
    "dtype": (_tensors_edit(lambda ts: {**ts, "transformer.ln_f.bias":
                                        ts["transformer.ln_f.bias"].to(torch.int32)}),
              r"tensor 'transformer\.ln_f\.bias' has dtype 'I32'; supported: F64, F32, F16, "
              r"BF16"),
    "header too long": (_header_claims_more, r"header claims \d+ bytes but the file has only"),
    "truncated": (_truncate, r"ends at byte \d+ of the data but the file holds only \d+ "
                             r"\(truncated file\)"),
    "missing tensor": (_tensors_edit(lambda ts: {k: v for k, v in ts.items()
                                                 if k != "transformer.h.1.mlp.c_fc.bias"}),
                       r"missing tensors: transformer\.h\.1\.mlp\.c_fc\.bias$"),
    "extra tensor": (_tensors_edit(lambda ts: {**ts, "score.weight": torch.zeros(2, 32)}),
                     r"unexpected tensors .*: score\.weight"),
    "nan": (_tensors_edit(_nan), r"transformer\.h\.0\.mlp\.c_fc\.weight holds a value that is "
                                 r"not finite \(nan at index 388\)"),
    "activation": (_config_edit("activation_function", "silu"),
                   r"activation_function 'silu' is not supported \(supported: gelu_new, "
                   r"gelu_pytorch_tanh, gelu, relu\)"),
    "model type": (_config_edit("model_type", "llama"),
                   r"model_type is 'llama'; only 'gpt2' can be imported"),
    "config key": (_config_edit("n_head", None), r"missing key\(s\): n_head"),
    "n_inner": (_config_edit("n_inner", 100), r"n_inner=100: puregpt's MLP is 4 \* n_embd wide"),
    "vocab": (_config_edit("vocab_size", 301),
              r"the tokenizer has 300 tokens but config\.json says vocab_size=301"),
    "bad json": (lambda d: (d / "config.json").write_text("{nope"),
                 r"config\.json: is not valid JSON"),
    "tiny vocab": (_config_edit("vocab_size", 1), r"config\.json: cannot import this config: "
                                                  r"GPTConfig\.vocab_size must be >= 2"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_import_refuses_malformed_directories(case, imported_f32, tmp_path):
    edit, message = MALFORMED[case]
    src = imported_f32[0] / "hf"
    shutil.copytree(src, tmp_path / "hf")
    edit(tmp_path / "hf")
    with pytest.raises(CheckpointError) as e:
        import_hf(tmp_path / "hf")
    assert re.search(message, str(e.value), re.M), str(e.value)


def test_import_lists_every_config_problem_at_once_and_the_cli_writes_nothing(imported_f32,
                                                                               tmp_path):
    shutil.copytree(imported_f32[0] / "hf", tmp_path / "hf")
    for key, value in (("activation_function", "silu"), ("scale_attn_weights", False),
                       ("n_embd", None)):
        _config_edit(key, value)(tmp_path / "hf")
    proc = run_cli("import-hf", tmp_path / "hf", tmp_path / "out.safetensors")
    assert proc.returncode == 1
    for part in ("cannot import this config", "activation_function 'silu'",
                 "scale_attn_weights=False", "missing key(s): n_embd"):
        assert part in proc.stderr, proc.stderr
    assert not (tmp_path / "out.safetensors").exists()
    proc = run_cli("import-hf", tmp_path / "nowhere", tmp_path / "out.safetensors")
    assert proc.returncode == 1 and "no such directory" in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()

    good, existing = imported_f32[0] / "hf", tmp_path / "existing.safetensors"
    existing.write_bytes(b"precious")
    proc = run_cli("import-hf", good, existing)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert existing.read_bytes() == b"precious"
    proc = run_cli("import-hf", good, existing, "--force")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(existing).params == imported_f32[2].params
