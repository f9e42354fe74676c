"""The `puregpt` command end to end, in subprocesses from this checkout: microgpt's exact numbers,
a model that memorizes, a model that learns Shakespeare, the loss plot of a run, help for every
option, `info`, and clear refusals of bad inputs that leave an existing run untouched."""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers_train import (REPO, SHARED, TINY_RUN, cli_env, metrics_rows, names_file,
                           needs_shared, run_cli, run_python, snapshot)
from puregpt import model
from puregpt.checkpoint import load_checkpoint
from puregpt.cli import build_parser
from puregpt.sample import generate_text

SVG = "{http://www.w3.org/2000/svg}"


# --- microgpt, number for number ---------------------------------------------------------------


@needs_shared
def test_microgpt_preset_golden_values(tmp_path):
    proc = run_cli("train", "--preset", "microgpt", "--seed", 42, "--steps", 1000,
                   "--data", "../shared/data/names.txt", "--out", tmp_path / "tmp", timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["step    1 / 1000 | loss 3.3660", "step    2 / 1000 | loss 3.4243",
                         "step    3 / 1000 | loss 3.1778"]
    assert lines[999] == "step 1000 / 1000 | loss 2.6497"
    assert all(re.fullmatch(rf"step {s:4d} / 1000 \| loss \d\.\d{{4}}", line)
               for s, line in zip(range(1, 1001), lines))
    assert lines[1000] == "--- inference (new, hallucinated names) ---"
    assert [line[:11] for line in lines[1001:]] == [f"sample {i:2d}: " for i in range(1, 21)]
    assert load_checkpoint(tmp_path / "tmp" / "last.safetensors").step == 1000


# --- learning ----------------------------------------------------------------------------------

DOCS = ["emma", "olivia", "ava", "isabella", "sophia", "charlotte"]


def test_small_model_memorizes_a_handful_of_documents(tmp_path):
    data = tmp_path / "six.txt"
    data.write_text("\n".join(DOCS) + "\n")
    run = tmp_path / "run"
    proc = run_cli("train", "--data", data, "--out", run, "--n-embd", 32, "--n-layer", 2,
                   "--n-head", 4, "--batch-size", 6, "--steps", 60, "--val-fraction", 0,
                   "--workers", 1, "--seed", 1, "--samples", 0, "--quiet")
    assert proc.returncode == 0, proc.stderr
    losses = [r["loss"] for r in metrics_rows(run)]
    # Memorized, the model still cannot know which of the six names comes next: the first
    # letter costs log 6 per document, all other tokens ~0. That floor, per token, is
    floor = math.log(len(DOCS)) * len(DOCS) / sum(len(d) + 1 for d in DOCS)  # 0.2560
    vocab = len(set("".join(DOCS))) + 1
    assert losses[0] == pytest.approx(math.log(vocab), abs=0.3)  # a guess among 17 tokens
    # measured: floor + 0.0006 at step 40, floor + 0.0002 at step 60
    assert losses[-1] < floor + 0.005
    # greedy decoding reproduces a training document, and each one from its first letter
    proc = run_cli("sample", run, "--greedy", "-n", 2)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.split("\n")[:2]
    assert first in DOCS and second == first
    ckpt = load_checkpoint(run / "last.safetensors")
    for doc in DOCS:
        assert doc[0] + generate_text(ckpt.params, ckpt.config, ckpt.tokenizer, doc[0],
                                      greedy=True) == doc


@pytest.fixture(scope="module")
def shakespeare_run(tmp_path_factory):
    if not (SHARED / "tinyshakespeare.txt").is_file():
        pytest.skip(f"{SHARED} is absent")
    run = tmp_path_factory.mktemp("shakespeare") / "run"
    proc = run_cli("train", "--data", SHARED / "tinyshakespeare.txt", "--out", run,
                   "--steps", 200, "--batch-size", 4, "--eval-every", 50, "--eval-tokens", 2000,
                   "--workers", 1, "--seed", 1, "--samples", 0, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return run, proc


def test_stream_mode_learns_shakespeare(shakespeare_run):
    run, proc = shakespeare_run
    assert re.search(r"\| mode stream \(\d+% of lines are blank: continuous text with "
                     r"paragraphs\) \|", proc.stderr)  # chosen automatically, and why
    text = (SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8")
    counts = collections.Counter(text)
    entropy = -sum(c / len(text) * math.log(c / len(text)) for c in counts.values())  # 3.31
    vals = [r["val_loss"] for r in metrics_rows(run) if "val_loss" in r]
    assert len(vals) == 4
    # measured: 2.58 after 200 steps (entropy - 0.73); a model that had learned only the
    # character frequencies would sit at the entropy
    assert vals[-1] < entropy - 0.5
    assert vals[-1] < vals[0]


# --- the loss plot -----------------------------------------------------------------------------


def curve_points(path) -> int:
    return len(re.findall(r"[ML]", path.get("d")))


def test_run_directory_has_a_loss_plot(shakespeare_run):
    run, _ = shakespeare_run
    root = ET.parse(run / "loss.svg").getroot()
    assert root.tag == SVG + "svg"
    paths = root.findall(f".//{SVG}path")
    assert sorted(p.get("class") for p in paths) == ["curve train", "curve validation"]
    by_class = {p.get("class"): p for p in paths}
    assert curve_points(by_class["curve train"]) == 200  # one point per step
    assert curve_points(by_class["curve validation"]) == 4  # one per evaluation
    texts = ["".join(t.itertext()) for t in root.iter(SVG + "text")]
    assert "step" in texts and "loss (nats/token)" in texts
    assert {"train", "validation"} <= set(texts)


def test_plot_command_with_log_scale(shakespeare_run, tmp_path):
    run, _ = shakespeare_run
    before = (run / "loss.svg").read_bytes()
    out = tmp_path / "log.svg"
    proc = run_cli("plot", run, "--log-scale", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out}\n"
    root = ET.parse(out).getroot()
    assert len(root.findall(f".//{SVG}path")) == 2
    texts = ["".join(t.itertext()) for t in root.iter(SVG + "text")]
    assert "loss (nats/token, log scale)" in texts and "step" in texts
    assert (run / "loss.svg").read_bytes() == before  # -o leaves the run's own plot alone


def test_plot_of_a_directory_without_metrics(tmp_path):
    proc = run_cli("plot", tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == f"puregpt: error: {tmp_path} has no metrics.jsonl (is it a run " \
                          f"directory?)\n"


# --- help, info, python -m ---------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_has_help_and_every_option_help_text(capsys):
    subs = subcommands()
    assert {"train", "sample", "score", "info", "plot"} <= set(subs)  # and any added since
    for name, sub in subs.items():
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([name, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: puregpt {name}")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help.strip()) > 5, (name, action.dest)
            for flag in action.option_strings:  # and every flag is listed in --help
                assert flag in text, (name, flag)
    train_flags = {f for a in subs["train"]._actions for f in a.option_strings}
    assert {"--n-embd", "--no-bias", "--lr", "--weight-decay", "--resume", "--force"} <= train_flags


def test_python_dash_m_works_from_a_checkout():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "puregpt", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: puregpt")
    for command in ("train", "sample", "score", "info", "plot"):
        assert command in proc.stdout
    where = subprocess.run([sys.executable, "-c", "import puregpt; print(puregpt.__file__)"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert Path(where.stdout.strip()).resolve() == REPO / "puregpt" / "__init__.py"
    proc = run_cli("train", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


def test_info_describes_a_run(finished_run, tmp_path):
    run, data = finished_run
    proc = subprocess.run([sys.executable, "-m", "puregpt", "info", run], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(run / "best.safetensors")
    cfg = ckpt.config
    C, V = cfg.n_embd, cfg.vocab_size
    n_params = 2 * V * C + cfg.block_size * C + cfg.n_layer * (4 * C * C + 8 * C * C)
    assert model.num_params(ckpt.params) == n_params
    chars = "".join(sorted(set(data.read_text()) - {"\n"}))
    lines = proc.stdout.splitlines()
    assert lines[0] == f"checkpoint: {run}/best.safetensors"
    assert lines[1] == "step: 6 of 6"
    assert lines[2] == f"parameters: {n_params:,}"
    assert lines[3].startswith(f"model: vocab_size={V}, block_size=8, n_layer=1, n_embd=8, "
                               f"n_head=2, pos=learned")
    assert lines[4].startswith("training: steps=6, batch_size=1, ")
    assert lines[5] == f"data: {data} (docs mode)"
    assert lines[6] == f"best validation loss: {ckpt.trainer['best_val']:.4f}"
    assert lines[7] == f"vocabulary: {V} tokens: {chars!r} + BOS (id {V - 1})"
    proc = run_cli("info", run / "last.safetensors")
    assert proc.returncode == 0 and f"checkpoint: {run}/last.safetensors" in proc.stdout


# --- bad inputs --------------------------------------------------------------------------------

BAD_DATA = [
    ("missing", None, "data file not found: {path}"),
    ("empty", b"", "{path} is empty: there is nothing to train on"),
    ("whitespace", b" \n\t\n  \n", "{path} holds only whitespace: there is nothing to train on"),
    ("binary", b"anna\nbob\xff\xfeby\n",
     "{path} is not UTF-8 text: byte 0xff at line 2, column 4 (byte offset 8) cannot be decoded"),
    ("latin-1", "zoë\n".encode("latin-1"), "{path} is not UTF-8 text: byte 0xeb at line 1, column 3 (byte offset 2)"),
    ("nul", b"anna\nb\x00b\n", "{path} contains NUL characters: it looks like a binary file"),
    ("one-character", b"aaa\naa\naaaa\n", "{path} uses a single distinct character ('a'): "
                                          "there is nothing to learn"),
]


@pytest.mark.parametrize("kind, content, message", BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_is_refused_and_the_run_kept(run_copy, tmp_path, kind, content, message):
    run, _ = run_copy
    path = tmp_path / f"{kind}.txt"
    if content is not None:
        path.write_bytes(content)
    before = snapshot(run)
    # even --force, which would replace the run, must not touch it before the data is good
    proc = run_cli("train", "--data", path, "--out", run, "--force", *TINY_RUN, "--steps", 3)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"puregpt: error: {message.format(path=path)}")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert snapshot(run) == before


def test_prompt_outside_the_vocabulary(run_copy):
    run, _ = run_copy
    before = snapshot(run)
    proc = run_cli("sample", run, "--prompt", "Xy1")
    assert proc.returncode == 1 and proc.stdout == ""
    assert "2 character(s) not in the vocabulary: '1', 'X'" in proc.stderr
    assert snapshot(run) == before


def test_sample_layouts_and_workers_print_the_same_text(run_copy):
    """--layout and --workers change how the weights are held and shared, never the text; a
    contradiction (--compact is --layout array) is refused before any output."""
    run, _ = run_copy
    args = ("sample", run, "-n", 2, "--seed", 3, "--prompt", "a", "--max-new-tokens", 12)
    ref = run_cli(*args)  # a tiny model: model.forward's path
    assert ref.returncode == 0 and ref.stdout.startswith("a"), ref.stderr
    for extra in (("--layout", "tuple"), ("--layout", "mixed"), ("--compact",),
                  ("--layout", "array", "--compact"), ("--layout", "mixed", "--workers", 2)):
        proc = run_cli(*args, *extra)
        assert (proc.returncode, proc.stdout) == (0, ref.stdout), (extra, proc.stderr)
    proc = run_cli(*args, "--layout", "tuple", "--compact")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--compact is --layout array: it contradicts --layout tuple" in proc.stderr
    proc = run_cli(*args, "--layout", "list")
    assert proc.returncode == 2 and "invalid choice: 'list'" in proc.stderr


def test_sample_uses_every_core_for_large_models_unless_told():
    from puregpt.cli import DECODER_FROM, sample_workers
    assert sample_workers(None, DECODER_FROM) == 0  # 0: one process per core
    assert sample_workers(None, DECODER_FROM - 1) == 1
    assert sample_workers(1, 10 ** 8) == 1 and sample_workers(3, 10) == 3


def test_sample_of_a_large_model_on_every_core_prints_one_process_text(tmp_path):
    """A model past DECODER_FROM parameters: the default (every core) prints what --workers 1
    prints."""
    from puregpt.checkpoint import Checkpoint, save_checkpoint
    from puregpt.config import GPTConfig
    from puregpt.tokenizer import CharTokenizer
    import random as _random
    cfg = GPTConfig(vocab_size=27, n_embd=128, n_head=4, n_layer=6, block_size=16)
    assert model.num_params_of(cfg) >= 1_000_000
    ckpt = Checkpoint(cfg, CharTokenizer(list("abcdefghijklmnopqrstuvwxyz")),
                      model.init_params(cfg, _random.Random(0)), trainer={"mode": "docs"})
    save_checkpoint(tmp_path / "big.safetensors", ckpt)
    args = ("sample", tmp_path / "big.safetensors", "-n", 2, "--seed", 5)
    default, one = run_cli(*args, timeout=300), run_cli(*args, "--workers", 1, timeout=300)
    assert default.returncode == one.returncode == 0, default.stderr + one.stderr
    assert default.stdout == one.stdout and default.stdout.strip()


def test_resume_of_a_directory_without_a_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for target in (empty, tmp_path / "absent"):
        proc = run_cli("train", "--resume", target)
        assert proc.returncode == 1
        assert proc.stderr == f"puregpt: error: nothing to resume in {target}: no " \
                              f"last.safetensors there\n"
    assert os.listdir(empty) == [] and not (tmp_path / "absent").exists()


def test_out_already_holding_a_run(run_copy):
    run, data = run_copy
    before = snapshot(run)
    proc = run_cli("train", "--data", data, "--out", run, *TINY_RUN, "--steps", 3)
    assert proc.returncode == 1
    assert proc.stderr == (f"puregpt: error: {run} already holds a run (at step 6): continue it "
                           f"with --resume {run}, or choose another --out (or --force to replace "
                           f"it)\n")
    assert snapshot(run) == before


def test_force_replaces_a_run_completely(run_copy):
    run, data = run_copy
    proc = run_cli("train", "--data", data, "--out", run, *TINY_RUN, "--steps", 2,
                   "--val-fraction", 0, "--force", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(run / "last.safetensors").step == 2
    # the old run's best checkpoint is gone: `sample` and `info` would otherwise use it
    assert not (run / "best.safetensors").exists()
    assert [r["step"] for r in metrics_rows(run)] == [1, 2]
    proc = run_cli("info", run)
    assert proc.stdout.splitlines()[:2] == [f"checkpoint: {run}/last.safetensors", "step: 2 of 2"]


# Makes the training loss NaN at the 5th training forward pass (step 5: one micro-batch of one
# sequence per step, one process), as an overflow would.
NAN_DRIVER = r"""
import math, sys
import puregpt.model as model
from puregpt.cli import main

real_loss_and_grads = model.loss_and_grads
calls = 0

def loss_and_grads(*args, **kwargs):
    global calls
    calls += 1
    loss, grads, n = real_loss_and_grads(*args, **kwargs)
    return (math.nan if calls == 5 else loss), grads, n

model.loss_and_grads = loss_and_grads
sys.exit(main(sys.argv[1:]))
"""


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = names_file(tmp_path, 200)
    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, *TINY_RUN, "--steps", 10, "--eval-every", 2]
    proc = run_python(NAN_DRIVER, *args)
    assert proc.returncode == 1
    assert (f"puregpt: error: the loss became nan at step 5; stopped without updating the "
            f"weights (the last good checkpoint, {run}/last.safetensors, is kept)") in proc.stderr
    assert "--lr" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.step == 4
    assert all(math.isfinite(x) for t in ckpt.params.values()
               for row in (t if isinstance(t[0], list) else [t]) for x in row)
    assert [r["step"] for r in metrics_rows(run)] == [1, 2, 3, 4]
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]
    # the checkpoint is good: the run continues from it
    proc = run_cli("train", "--resume", run, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(run / "last.safetensors").step == 10
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 10


# --- the modern block's flags (issue 15) -------------------------------------------------------


def test_modern_block_flags_reach_the_checkpoint(tmp_path):
    data = names_file(tmp_path, 60)
    proc = run_cli("train", "--data", data, "--out", tmp_path / "run", "--preset", "llama",
                   "--n-layer", 1, "--n-embd", 16, "--block-size", 8, "--n-kv-head", 1,
                   "--qk-norm", "--mlp-hidden", 24, "--rope-theta", 500, "--steps", 2,
                   "--eval-every", 0, "--quiet")
    assert proc.returncode == 0, proc.stderr
    cfg = load_checkpoint(tmp_path / "run" / "last.safetensors").config
    assert (cfg.pos, cfg.mlp, cfg.activation, cfg.n_kv_head, cfg.qk_norm, cfg.mlp_hidden,
            cfg.rope_theta, cfg.norm_affine, cfg.final_norm, cfg.emb_norm, cfg.tie_embeddings) \
        == ("rope", "swiglu", "silu", 1, True, 24, 500.0, True, True, False, False)


@pytest.mark.parametrize("flags, message", [
    (["--mlp", "swiglu"], "GPTConfig.mlp='swiglu' gates with SiLU: it needs activation='silu', "
                          "got 'relu' (add --activation silu, or use --mlp plain)"),
    (["--n-kv-head", "3"], "GPTConfig.n_head (4) must be divisible by n_kv_head (3): each K/V "
                           "head serves a group of query heads (--n-kv-head)"),
    (["--n-kv-head", "0"], "GPTConfig.n_kv_head must be >= 1 (or null: automatic), got 0 "
                           "(--n-kv-head)"),
    (["--pos", "rope", "--n-embd", "12"], "GPTConfig.pos='rope' turns pairs of channels, so "
                                          "the head dimension must be even; n_embd / n_head = 3"),
    (["--rope-theta", "0"], "GPTConfig.rope_theta must be > 0, got 0.0 (--rope-theta)"),
    (["--mlp-multiple-of", "0"], "GPTConfig.mlp_multiple_of must be >= 1, got 0"),
    (["--mlp-hidden", "0"], "GPTConfig.mlp_hidden must be >= 1 (or null: automatic), got 0"),
])
def test_modern_block_nonsense_is_refused_naming_the_flag(tmp_path, flags, message):
    proc = run_cli("train", "--data", names_file(tmp_path, 20), "--out", tmp_path / "run",
                   *flags)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_llama_preset_help_shows_its_defaults():
    proc = run_cli("train", "--preset", "llama", "--help")
    text = " ".join(proc.stdout.split())
    for part in ("--pos {learned,sinusoidal,none,rope}", "(default: rope)",
                 "--mlp {plain,swiglu}", "(default: swiglu)", "n_head); must divide n_head "
                 "(default: 2)", "--mlp-hidden MLP_HIDDEN", "(default: auto)",
                 "--rope-theta ROPE_THETA", "(default: 10000)", "(default: silu)",
                 "--qk-norm, --no-qk-norm"):
        assert part in text, part


def test_swiglu_hidden_width_is_llamas_rule():
    """H = int(2 * 4C / 3) rounded up to a multiple of mlp_multiple_of (Llama's reference code);
    4C for the plain MLP; mlp_hidden when set."""
    from puregpt.config import GPTConfig
    swiglu = dict(mlp="swiglu", activation="silu")
    assert GPTConfig(n_embd=32, **swiglu).hidden == 96  # 85 -> 96
    assert GPTConfig(n_embd=32, mlp_multiple_of=1, **swiglu).hidden == 85
    assert GPTConfig(n_embd=4096, n_head=32, mlp_multiple_of=256, **swiglu).hidden == 11008
    assert GPTConfig(n_embd=32).hidden == 128 and GPTConfig(mlp_hidden=7).hidden == 7
    assert GPTConfig(n_head=4).kv_heads == 4 and GPTConfig(n_head=4, n_kv_head=2).kv_heads == 2
