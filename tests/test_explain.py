"""puregpt explain: the x-ray's numbers are the engine's. Attention equals model.forward's caches
and PyTorch's causal softmax(q k^T / sqrt(hd)) for the same weights; probabilities and rows sum
to 1; per-token losses sum to `score`'s; gradient norms equal model.backward's and the update is
AdamW's; the PCA axes are orthonormal eigenvectors in order of variance (torch.linalg.eigh);
the JSON, the API and the page hold the same numbers; bad input is refused before any file is
written; long texts use their last block."""

from __future__ import annotations

import ast
import importlib
import json
import math
import random
import re
import subprocess
import sys

import pytest

from conftest import COMBOS, combo_id, perturbed_params, tiny_config
from helpers_train import REPO, cli_env, run_cli
import puregpt
from puregpt import model, ops, optim, sample
from puregpt.bpe import BPETokenizer
from puregpt.checkpoint import Checkpoint, save_checkpoint
from puregpt.config import GPTConfig, TrainConfig
from puregpt.tokenizer import CharTokenizer

explain_mod = importlib.import_module("puregpt.explain")  # (puregpt.explain is the API function)

TOK = CharTokenizer("abcdef")  # 6 characters + BOS: the conftest TINY vocabulary of 7
SOME = COMBOS[::9]  # 16 of the 144 combinations, every axis value among them


def norm(t) -> float:
    rows = t if isinstance(t[0], list) else [t]
    return math.sqrt(sum(x * x for r in rows for x in r))


def tiny(combo, **overrides):
    cfg = tiny_config(combo, **overrides)
    return cfg, perturbed_params(cfg)


@pytest.mark.oracle
@pytest.mark.parametrize("combo", SOME, ids=combo_id)
def test_attention_is_the_forwards_and_torchs(combo):
    import torch
    cfg, params = tiny(combo)
    data = explain_mod.explain(params, cfg, TOK, "badcafe")  # 8 inputs: BOS + 7 = block_size
    inputs = data["inputs"]
    T, hd = len(inputs), cfg.head_dim
    _, cache = model.forward(params, cfg, [inputs])
    for l in range(cfg.n_layer):
        engine = model.attention_weights(cache, l)[0]  # (n_head, T, T), zeros past the mask
        shown = data["attention"][l]
        assert len(shown) == cfg.n_head
        for h in range(cfg.n_head):
            assert [len(row) for row in shown[h]] == list(range(1, T + 1))  # the triangle only
            assert all(engine[h][i][:i + 1] == shown[h][i] for i in range(T))  # the cache's own
            assert all(w == 0.0 for i in range(T) for w in engine[h][i][i + 1:])
            assert all(abs(sum(row) - 1) < 1e-12 for row in shown[h])
        # PyTorch, from the attention's input and the same Q and K weights (and biases); with
        # QK-norm or rope, from q and k as the attention reads them (the engine's, rotated)
        X = torch.tensor(cache[f"layer{l}"]["attn"][0][0], dtype=torch.float64)  # (T, C)
        p = f"layer{l}."

        def proj(name):
            W = torch.tensor(params[p + name], dtype=torch.float64)
            b = params.get(p + name + "_b")
            return X @ W.T + (torch.tensor(b, dtype=torch.float64) if b else 0.0)

        q, k = proj("attn_wq"), proj("attn_wk")
        if cfg.qk_norm or cfg.pos == "rope":
            heads = cache[f"layer{l}"]["attn"][1][0]
            q, k = (torch.tensor(heads[i], dtype=torch.float64) for i in (0, 1))
        group = cfg.n_head // cfg.kv_heads  # query heads per K head
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        for h in range(cfg.n_head):
            j = h // group
            s = q[:, h * hd:(h + 1) * hd] @ k[:, j * hd:(j + 1) * hd].T / math.sqrt(hd)
            a = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
            for i in range(T):
                assert max(abs(x - y) for x, y in zip(shown[h][i], a[i, :i + 1].tolist())) < 1e-9


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_every_architecture_gives_consistent_numbers(combo):
    cfg, params = tiny(combo)
    data = explain_mod.explain(params, cfg, TOK, "face")
    logits, _ = model.forward(params, cfg, [data["inputs"]])
    assert data["logits"] == logits
    for z, top in zip(logits, data["top"]):
        probs = ops.softmax(z)
        assert abs(sum(probs) - 1) < 1e-12
        assert [i for i, _ in top] == sorted(range(len(z)), key=lambda i: -probs[i])[:10]
        assert [p for _, p in top] == [probs[i] for i, _ in top]
    assert len(data["residual"]["stages"]) == len(data["residual"]["norms"])
    assert data["residual"]["stages"][-1] == ("final_norm" if cfg.final_norm else
                                              f"layer{cfg.n_layer - 1}.mlp")
    names = {t["name"] for t in data["train_step"]["tensors"]}
    assert names == set(params)
    assert json.loads(explain_mod.to_json(data)) == data  # JSON-able, and exactly so


def test_per_token_losses_sum_to_the_score(tmp_path):
    cfg, params = tiny(COMBOS[5])
    for docs in (True, False):
        data = explain_mod.explain(params, cfg, TOK, "decaf", docs_mode=docs)
        logprob, n = sample.score_text(params, cfg, TOK, "decaf", docs)
        lps = [t["logprob"] for t in data["tokens"][1:]]
        assert data["tokens"][0]["logprob"] is None and len(lps) == n
        assert abs(sum(lps) - logprob) < 1e-12
        assert abs(data["loss"] - (-logprob / n)) < 1e-12
        assert abs(data["logprob"] - logprob) < 1e-12
        assert all(t["surprisal"] == -t["logprob"] for t in data["tokens"][1:])
        # docs mode: BOS-wrapped, as training reads it; stream mode: the text as a prompt
        assert data["inputs"] == (TOK.encode_doc("decaf")[:-1] if docs else TOK.encode("decaf"))
        assert data["targets"][-1] == (TOK.bos if docs else -1)


def test_gradients_are_model_backwards_and_the_update_adamws():
    cfg, params = tiny(COMBOS[40])
    before = json.dumps(params)
    data = explain_mod.explain(params, cfg, TOK, "cabbed", train_config=None)
    assert json.dumps(params) == before  # the model is never changed
    loss, grads, _ = model.loss_and_grads(params, cfg, [data["inputs"]], [data["targets"]])
    step = data["train_step"]
    assert abs(step["loss"] - loss) < 1e-15
    assert step["moments"].startswith("fresh")
    tc = TrainConfig()
    lr = optim.lr_at(0, tc)
    assert step["lr"] == lr
    for t in step["tensors"]:
        g = grads[t["name"]]
        assert abs(t["grad_norm"] - norm(g)) <= 1e-12 * max(1.0, norm(g))
        # Adam's first step from zero moments: m^ = g, v^ = g^2, so the update is
        # lr g / (|g| + eps) elementwise (no weight decay in the defaults)
        flat = [x for r in (g if isinstance(g[0], list) else [g]) for x in r]
        expected = lr * math.sqrt(sum((x / (abs(x) + tc.eps)) ** 2 for x in flat))
        assert abs(t["update_norm"] - expected) < 1e-9 * max(1.0, expected)
        w = norm(params[t["name"]])
        assert t["ratio"] == (t["update_norm"] / w if w else None)
    assert abs(step["global_grad_norm"] - optim.grad_norm(grads)) < 1e-12


def test_saved_moments_clipping_and_the_lr_of_a_finished_run():
    cfg, params = tiny(COMBOS[7])
    tc = TrainConfig(steps=10, schedule="linear", grad_clip=0.5, weight_decay=0.1)
    data0 = explain_mod.explain(params, cfg, TOK, "bead", train_config=tc, step=10)
    state = optim.new_state(params)
    state["step"] = 10
    rng = random.Random(3)
    for name in state["m"]:
        state["m"][name] = [rng.gauss(0, 0.01) for _ in state["m"][name]]
        state["v"][name] = [rng.random() * 1e-4 for _ in state["v"][name]]
    saved = json.dumps(state)
    data = explain_mod.explain(params, cfg, TOK, "bead", train_config=tc, optimizer=state,
                               step=10)
    assert json.dumps(state) == saved  # the moments are copied, not advanced
    s = data["train_step"]
    assert s["lr_step"] == 9 and s["lr"] == optim.lr_at(9, tc) > 0  # not the finished run's 0
    assert "saved" in s["moments"] and data0["train_step"]["moments"].startswith("fresh")
    # the update, redone here: clip a copy of the gradients, one AdamW step on copies
    _, grads, _ = model.loss_and_grads(params, cfg, [data["inputs"]], [data["targets"]])
    assert [t["grad_norm"] for t in s["tensors"]] == [norm(grads[n]) for n in params]
    optim.clip_grads(grads, 0.5)
    new = json.loads(json.dumps(params))
    st = json.loads(saved)
    optim.adamw_step(new, grads, st, s["lr"], tc.beta1, tc.beta2, tc.eps, tc.weight_decay)
    for t in s["tensors"]:
        a, b = params[t["name"]], new[t["name"]]
        rows = zip(a, b) if isinstance(a[0], list) else [(a, b)]
        assert t["update_norm"] == math.sqrt(sum((y - x) ** 2 for ra, rb in rows
                                                 for x, y in zip(ra, rb)))


@pytest.mark.oracle
def test_pca_axes_are_the_top_eigenvectors():
    import torch
    rng = random.Random(1)
    # embeddings with a clear spectrum: scaled random directions
    C, V = 12, 40
    scales = [3.0 / (1 + i) for i in range(C)]
    wte = [[rng.gauss(0, 1) * s for s in scales] for _ in range(V)]
    pca = explain_mod.pca_embeddings(wte, [str(i) for i in range(V)])
    a1, a2 = pca["axes"]
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    assert abs(dot(a1, a1) - 1) < 1e-12 and abs(dot(a2, a2) - 1) < 1e-12
    assert abs(dot(a1, a2)) < 1e-10
    assert pca["variance"][0] >= pca["variance"][1] > 0
    X = torch.tensor(wte, dtype=torch.float64)
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / V
    values, vectors = torch.linalg.eigh(S)  # ascending
    for k in range(2):
        lam = values[-1 - k].item()
        assert abs(pca["variance"][k] - lam) < 1e-9 * lam
        assert abs(abs(dot(pca["axes"][k], vectors[:, -1 - k].tolist())) - 1) < 1e-9
    assert abs(pca["total_variance"] - values.sum().item()) < 1e-9
    points = (Xc @ torch.tensor(pca["axes"], dtype=torch.float64).T).tolist()
    assert max(abs(x - y) for p, q in zip(points, pca["points"]) for x, y in zip(p, q)) < 1e-9


def test_long_text_uses_its_last_block():
    cfg, params = tiny(COMBOS[0])  # block_size 8
    text = "abcdefabcdefab"  # 14 characters: 15 inputs with BOS
    data = explain_mod.explain(params, cfg, TOK, text)
    ids = TOK.encode_doc(text)
    assert data["inputs"] == ids[:-1][-8:] and data["targets"] == ids[-8:]
    assert data["truncated"] == {"total_tokens": 15, "dropped": 7}
    assert any("block_size" in n and "last 8" in n for n in data["notes"])
    logits, _ = model.forward(params, cfg, [data["inputs"]])
    assert data["logits"] == logits
    stream = explain_mod.explain(params, cfg, TOK, text, docs_mode=False)
    assert stream["inputs"] == TOK.encode(text)[-8:] and stream["targets"][-1] == -1
    short = explain_mod.explain(params, cfg, TOK, "abc")
    assert short["truncated"] is None and short["notes"] == []


def test_a_one_token_prompt_has_no_training_step():
    cfg, params = tiny(COMBOS[0])
    data = explain_mod.explain(params, cfg, TOK, "a", docs_mode=False)
    assert data["loss"] is None and "skipped" in data["train_step"]
    assert len(data["top"]) == 1 and all(o["phase"] == "forward" for o in data["ops"])


def test_bad_text_is_refused_clearly():
    cfg, params = tiny(COMBOS[0])
    with pytest.raises(ValueError, match="empty"):
        explain_mod.explain(params, cfg, TOK, "")
    with pytest.raises(ValueError, match="not in the vocabulary.*'z'"):
        explain_mod.explain(params, cfg, TOK, "faze")
    with pytest.raises(TypeError, match="text must be a string"):
        explain_mod.explain(params, cfg, TOK, 42)


def test_walk_the_math_names_real_functions():
    gpt_functions = {n.name for n in ast.parse((REPO / "gpt.py").read_text()).body
                     if isinstance(n, ast.FunctionDef)}
    for combo in COMBOS[::7]:
        cfg, params = tiny(combo)
        data = explain_mod.explain(params, cfg, TOK, "cafe")
        fwd = [o for o in data["ops"] if o["phase"] == "forward"]
        bwd = [o for o in data["ops"] if o["phase"] == "backward"]
        assert data["ops"] == fwd + bwd and len(fwd) == len(bwd)
        assert [o["what"] for o in bwd] == [o["what"] for o in fwd][::-1]  # reverse order
        assert fwd[0]["op"] == bwd[-1]["op"] == "embedding"
        assert fwd[-1]["op"] == bwd[0]["op"] == "cross_entropy"
        # embedding, lm_head, loss; per layer two norms, qkv, attention, wo, add, fc1, act, fc2,
        # add (+ QK-norm, rope, the swiglu gate's linear)
        per_layer = 10 + cfg.qk_norm + (cfg.pos == "rope") + (cfg.mlp == "swiglu")
        assert len(fwd) == 3 + cfg.emb_norm + cfg.final_norm + per_layer * cfg.n_layer
        for o in data["ops"]:
            assert o["ops"]["file"] == "puregpt/ops.py" and hasattr(ops, o["ops"]["function"])
            assert getattr(ops, o["ops"]["function"]).__code__.co_firstlineno == o["ops"]["line"]
            assert o["model"]["file"] == "puregpt/model.py"
            assert hasattr(model, o["model"]["function"])
            assert o["gpt"] is None or o["gpt"] in gpt_functions
        assert fwd[-1]["values"] == [data["loss"]]
        assert fwd[-2]["values"] == data["logits"][-1][:4]  # lm_head: the last position's


def test_bpe_tokens_and_gpt2s_shape():
    text = "the cat sat on the mat. the dog sat on the log. " * 4
    tok = BPETokenizer.train(text, 270)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_embd=16, n_head=2,
                    norm="layernorm", norm_affine=True, final_norm=True, emb_norm=False,
                    activation="gelu_tanh", bias=True, tie_embeddings=True)
    params = model.init_params(cfg, random.Random(0))
    data = explain_mod.explain(params, cfg, tok, "the cat sat", docs_mode=False)
    assert "".join(t["text"] for t in data["tokens"]) == "the cat sat"
    assert len(data["vocab"]) == tok.vocab_size == len(data["pca"]["points"])
    assert all(len(z) == tok.vocab_size for z in data["logits"])


def _checkpoint(tmp_path, mode="docs"):
    cfg, params = tiny(COMBOS[3])
    ckpt = Checkpoint(cfg, TOK, params, step=4, train_config=TrainConfig(steps=20),
                      trainer={"mode": mode})
    path = tmp_path / f"{mode}.safetensors"
    save_checkpoint(path, ckpt)
    return path, puregpt.load(str(path))


def test_the_api_json_and_page_hold_the_same_numbers(tmp_path):
    path, ckpt = _checkpoint(tmp_path)
    api = puregpt.explain(ckpt, "fade")
    assert api == explain_mod.explain_checkpoint(path, "fade")
    run_dir = tmp_path / "run"  # a run directory means its best checkpoint
    run_dir.mkdir()
    (run_dir / "best.safetensors").write_bytes(path.read_bytes())
    assert explain_mod.explain_checkpoint(run_dir, "fade") == api
    out, js = tmp_path / "page.html", tmp_path / "page.json"
    proc = run_cli("explain", path, "fade", "-o", out, "--json", js)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(js.read_text()) == api
    page = out.read_text()
    blob = re.search(r'<script type="application/json" id="puregpt-data">(.*?)</script>', page,
                     re.S).group(1)
    assert json.loads(blob) == api
    assert 'data-live="false"' in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", "")
    with pytest.raises(TypeError, match="model must be"):
        puregpt.explain("run", "fade")
    with pytest.raises(TypeError, match="text must be"):
        puregpt.explain(ckpt, None)
    stream_path, stream = _checkpoint(tmp_path, "stream")
    assert puregpt.explain(stream, "fade")["mode"] == "stream"


def test_the_page_survives_hostile_text():
    tok = CharTokenizer(sorted(set("</script>&<!--")))
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_embd=8, n_head=2)
    params = model.init_params(cfg, random.Random(0))
    data = explain_mod.explain(params, cfg, tok, "</script><!--&")
    page = explain_mod.render_page(data)
    start = page.index('id="puregpt-data">') + len('id="puregpt-data">')
    blob = page[start:page.index("</script>", start)]
    assert "<" not in blob and json.loads(blob) == data
    assert explain_mod.render_page(data, live=True).count('data-live="true"') == 1


def test_cli_errors_and_atomic_files(tmp_path):
    path, _ = _checkpoint(tmp_path)
    out = tmp_path / "x.html"
    out.write_text("previous page")
    for args, message in [((path, "zap"), "not in the vocabulary"),
                          ((path,), "give a TEXT"),
                          ((path, "ab", "cd"), "one TEXT"),
                          ((path, ""), "empty"),
                          ((tmp_path / "missing", "ab"), "no such run directory or checkpoint"),
                          (("-m", tmp_path / "missing", "ab"), "no such run directory"),
                          (("ab",), "no model in ./run")]:
        proc = subprocess.run([sys.executable, "-m", "puregpt", "explain", *map(str, args),
                               "-o", str(out), "--json", str(tmp_path / "x.json")],
                              cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert out.read_text() == "previous page" and not (tmp_path / "x.json").exists()
    proc = run_cli("explain", "-m", path, "bad", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("<!doctype html>")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files
    long = run_cli("explain", path, "abcdefabcdefab", "-o", out)
    assert long.returncode == 0 and "block_size" in long.stderr
