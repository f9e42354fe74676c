"""examples/continue_in_pytorch.py against puregpt: the same loss on the same batch, the same
train/validation split, 2 torchrun processes taking the same steps as 1, an exact resume, the
exported AdamW state continuing puregpt's optimizer, and the trained model coming back through
import-hf with PyTorch's logits. Oracles: torch, transformers (imported directly: they fail,
never skip, when missing)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers_train import BUNDLED_NAMES, REPO, cli_env
from puregpt import model, optim
from puregpt.checkpoint import load_checkpoint
from puregpt.config import GPTConfig, TrainConfig, preset
from puregpt.hf import export_hf, export_optimizer, import_hf
from puregpt.train import train
from test_hf_llama import float64_llama  # noqa: F401 (a fixture: Llama norms, RoPE in float64)

pytestmark = pytest.mark.oracle

SCRIPT = REPO / "examples" / "continue_in_pytorch.py"
TINY = {**preset("gpt2")["model"], "n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16}
TINY_LLAMA = {**preset("llama")["model"], "n_layer": 1, "n_embd": 16, "n_head": 4,
              "n_kv_head": 2, "block_size": 16}  # grouped-query, untied, SwiGLU width 64


def _load_script():
    spec = importlib.util.spec_from_file_location("continue_in_pytorch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = _load_script()


def _export(tmp, data, mode, dtype="F64", shape=TINY, **train_options):
    """Train a tiny GPT-2-shaped (or `shape`d) model in puregpt (a run directory, so the
    checkpoint has its recipe and Adam moments), export it; returns (puregpt's TrainResult,
    checkpoint, hf dir)."""
    tc = TrainConfig(steps=4, batch_size=4, lr=0.01, schedule="constant", workers=1,
                     eval_every=0, eval_tokens=200, mode=mode, **train_options)
    res = train(GPTConfig(**shape), tc, str(data), str(tmp / "run"), quiet=True)
    ckpt = load_checkpoint(str(tmp / "run" / "last.safetensors"))
    hf = tmp / f"hf-{dtype}"
    export_hf(ckpt, hf, dtype)
    export_optimizer(ckpt, hf, dtype)
    return res, ckpt, hf


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("names")
    data = tmp / "names.txt"
    data.write_text("\n".join(BUNDLED_NAMES.read_text().split()[:300]) + "\n")
    return (tmp, data, *_export(tmp, data, "docs"))  # the shuffle: random.Random(seed)


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prose")
    data = tmp / "prose.txt"
    words = BUNDLED_NAMES.read_text().split()[:400]
    data.write_text("\n\n".join(" ".join(words[i:i + 20]) for i in range(0, 400, 20)) + "\n")
    return (tmp, data, *_export(tmp, data, "stream"))


def _corpus(hf):
    corpus, _, _ = script.load_data(str(hf), None, TINY["block_size"], rank0=False)
    return corpus


def test_the_script_reads_puregpts_split(names, prose):
    for _, _, res, _, hf in (names, prose):
        mine, theirs = _corpus(hf), res.corpus
        assert mine.mode == theirs.mode
        assert mine.train_docs == theirs.train_docs and mine.val_docs == theirs.val_docs
        assert mine.train_ids == theirs.train_ids and mine.val_ids == theirs.val_ids
        assert mine.train_examples == theirs.train_examples
        assert mine.val_examples == theirs.val_examples
    assert len(_corpus(names[4]).val_docs) == 30 and len(_corpus(prose[4]).val_ids) > 100


@pytest.mark.parametrize("dtype,tol", [("F64", 1e-9), ("F32", 1e-5)])
def test_the_loss_of_a_batch_equals_puregpts(dtype, tol, names, prose, llama, request):
    if dtype == "F64":  # (see the llama section below)
        request.getfixturevalue("float64_llama")
    for tmp, data, res, ckpt, _ in (names, prose, llama):
        hf = tmp / f"loss-{dtype}"
        if not hf.exists():
            export_hf(ckpt, hf, dtype)
        m = AutoModelForCausalLM.from_pretrained(hf, dtype="auto")
        assert type(m).__name__ == ("LlamaForCausalLM" if tmp == llama[0] else
                                    "GPT2LMHeadModel")
        assert m.dtype == (torch.float64 if dtype == "F64" else torch.float32)
        corpus = _corpus(hf)
        for step in (0, 3):
            pairs = script.global_batch(corpus, step, 8, TINY["block_size"], seed=1)
            want, n = model.evaluate_loss(ckpt.params, ckpt.config, [x for x, _ in pairs],
                                          [y for _, y in pairs])
            assert n == script.n_targets(pairs)
            assert abs(script.batch_loss(m, pairs) - want) < tol, (dtype, corpus.mode, step)


def _run(hf, out, *extra):
    """One process, in this one (no torchrun)."""
    argv = [str(hf), str(out), "--batch-size", "6", "--eval-every", "2", *map(str, extra)]
    assert script.main(argv) == 0


def _weights(d):
    return load_file(str(d / "hf" / "model.safetensors"))


def test_two_torchrun_processes_take_the_same_steps_as_one(names, tmp_path):
    tmp, _, _, _, hf = names
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), str(hf), str(tmp_path / "two"), "--batch-size", "6", "--steps", "3",
         "--eval-every", "2"], env={**cli_env(), "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and "step     3 / 3" in proc.stdout
    _run(hf, tmp_path / "one", "--steps", "3")
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    start = load_file(str(hf / "model.safetensors"))
    assert one.keys() == two.keys()
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4  # it trained
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-6


def _straight_and_resumed(hf, tmp_path):
    """The weights of 4 steps in one run, and of 2 steps then a resume to 4 (saved every step)."""
    _run(hf, tmp_path / "straight", "--steps", "4")
    _run(hf, tmp_path / "resumed", "--steps", "2", "--save-every", "1")
    _run(hf, tmp_path / "resumed", "--steps", "4", "--save-every", "1")
    return _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")


def test_a_resumed_run_continues_exactly_and_comes_back_to_puregpt(prose, tmp_path):
    _, _, _, _, hf = prose
    a, b = _straight_and_resumed(hf, tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3, 4]

    # round trip: import-hf's pure-Python model gives PyTorch's logits
    out = tmp_path / "straight" / "hf"
    back = import_hf(out)
    m = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    ids = back.tokenizer.encode("emma olivia ava\n\nsophia")[:TINY["block_size"]]
    with torch.no_grad():
        want = m(input_ids=torch.tensor([ids])).logits[0]
    got, _ = model.forward(back.params, back.config, [ids])
    assert max(abs(g - w) for gr, wr in zip(got, want.tolist()) for g, w in zip(gr, wr)) < 1e-5
    assert back.trainer["mode"] == "stream" and back.tokenizer == prose[3].tokenizer


def test_the_exported_optimizer_continues_puregpts_adamw(names, tmp_path):
    """One torch step from optimizer.safetensors equals puregpt's next AdamW step (float64)."""
    _, _, _, ckpt, hf = names
    _run(hf, tmp_path / "t", "--steps", "1", "--lr", "0.01", "--grad-clip", "0",
         "--weight-decay", "0.1")
    pairs = script.global_batch(_corpus(hf), 0, 6, TINY["block_size"], seed=0)
    params = {k: [list(r) for r in v] if isinstance(v[0], list) else list(v)
              for k, v in ckpt.params.items()}
    state = {"step": ckpt.optimizer["step"], "m": {k: list(v) for k, v in
                                                     ckpt.optimizer["m"].items()},
             "v": {k: list(v) for k, v in ckpt.optimizer["v"].items()}}
    _, grads, _ = model.loss_and_grads(params, ckpt.config, [x for x, _ in pairs],
                                       [y for _, y in pairs])
    tc = ckpt.train_config
    optim.adamw_step(params, grads, state, 0.01, tc.beta1, tc.beta2, tc.eps, 0.1)
    step = import_hf(tmp_path / "t" / "hf").params
    fresh = tmp_path / "fresh-hf"
    shutil.copytree(hf, fresh)
    (fresh / "optimizer.safetensors").unlink()
    _run(fresh, tmp_path / "f", "--steps", "1", "--lr", "0.01", "--grad-clip", "0",
         "--weight-decay", "0.1")
    no_state = import_hf(tmp_path / "f" / "hf").params

    def diff(a, b):
        flat = (lambda t: [x for r in t for x in r] if isinstance(t[0], list) else t)
        return max(abs(x - y) for k in a for x, y in zip(flat(a[k]), flat(b[k])))
    assert diff(step, params) < 1e-9
    assert diff(no_state, params) > 1e-4  # a fresh AdamW takes another step: the state matters


def test_not_an_exported_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert script.main([str(tmp_path / "empty"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not an exported model: missing config.json, model.safetensors, tokenizer" in err
    assert script.main([str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    assert "nowhere is not a directory" in capsys.readouterr().err


def test_export_with_optimizer_needs_one(names, tmp_path):
    from puregpt.checkpoint import CheckpointError
    from puregpt.hf import check_optimizer
    with pytest.raises(CheckpointError, match="holds no optimizer state.*without "
                                              "--with-optimizer"):
        check_optimizer(import_hf(names[4]))  # an imported model has no AdamW moments


def test_characters_outside_the_vocabulary_are_named_with_their_line(names, tmp_path, capsys):
    _, data, _, _, hf = names
    bad = tmp_path / "bad.txt"
    lines = data.read_text().splitlines()
    lines[2] = "zoë"
    bad.write_text("\n".join(lines) + "\n")
    assert script.main([str(hf), str(tmp_path / "o"), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.txt, line 3, column 3: character 'ë' (U+00EB) is not in the model's " \
           "vocabulary" in err


# --- a llama-shaped model (LlamaForCausalLM) ---------------------------------------------------
# transformers' Llama computes its RMSNorm and RoPE in float32 even in a float64 model: the
# float64 comparisons run with the float64_llama fixture (those two forwards at the model's
# precision, see tests/test_hf_llama.py), the float32 ones with transformers as it is. Its
# batch losses are checked with the GPT-2's above.


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama")
    data = tmp / "names.txt"
    data.write_text("\n".join(BUNDLED_NAMES.read_text().split()[:300]) + "\n")
    return (tmp, data, *_export(tmp, data, "docs", shape=TINY_LLAMA, weight_decay=0.1))


def test_a_llamas_exported_optimizer_continues_puregpts_adamw(llama, float64_llama, tmp_path):
    """optimizer.safetensors under Llama's tensor names: one torch step from it equals
    puregpt's next AdamW step (float64, weight decay on the matmul weights lm_head included)."""
    _, _, _, ckpt, hf = llama
    names = set(load_file(str(hf / "optimizer.safetensors")))
    assert "exp_avg.model.layers.0.mlp.gate_proj.weight" in names
    assert "exp_avg_sq.model.layers.0.self_attn.k_proj.weight" in names
    _run(hf, tmp_path / "t", "--steps", "1", "--lr", "0.01", "--grad-clip", "0",
         "--weight-decay", "0.1")
    pairs = script.global_batch(_corpus(hf), 0, 6, TINY_LLAMA["block_size"], seed=0)
    params = {k: [list(r) for r in v] if isinstance(v[0], list) else list(v)
              for k, v in ckpt.params.items()}
    state = {"step": ckpt.optimizer["step"],
             "m": {k: list(v) for k, v in ckpt.optimizer["m"].items()},
             "v": {k: list(v) for k, v in ckpt.optimizer["v"].items()}}
    _, grads, _ = model.loss_and_grads(params, ckpt.config, [x for x, _ in pairs],
                                       [y for _, y in pairs])
    tc = ckpt.train_config
    optim.adamw_step(params, grads, state, 0.01, tc.beta1, tc.beta2, tc.eps, 0.1)
    back = import_hf(tmp_path / "t" / "hf")
    assert back.config == ckpt.config  # the puregpt config rides along through save_pretrained
    flat = (lambda t: [x for r in t for x in r] if isinstance(t[0], list) else t)
    moved = max(abs(x - y) for k in params for x, y in zip(flat(params[k]),
                                                           flat(ckpt.params[k])))
    assert moved > 1e-4  # the step changed the weights
    assert max(abs(x - y) for k in params
               for x, y in zip(flat(back.params[k]), flat(params[k]))) < 1e-9


def test_a_llama_run_resumes_exactly_and_comes_back_to_puregpt(llama, tmp_path):
    _, _, _, _, hf = llama
    a, b = _straight_and_resumed(hf, tmp_path)
    assert "model.layers.0.mlp.up_proj.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "straight" / "hf"
    back = import_hf(out)  # pure Python again: PyTorch's logits (transformers as it is)
    m = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    ids = back.tokenizer.encode("emma")
    ids = [back.tokenizer.bos] + ids + [back.tokenizer.bos] + ids
    with torch.no_grad():
        want = m(input_ids=torch.tensor([ids])).logits[0].tolist()
    got, _ = model.forward(back.params, back.config, [ids])
    assert max(abs(g - w) for gr, wr in zip(got, want) for g, w in zip(gr, wr)) < 1e-5
