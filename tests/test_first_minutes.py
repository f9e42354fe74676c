"""What a newcomer touches first (issue 12, part A, and the CLI/API side of part B): help that
shows the real defaults, one-line argument errors with hints, consistent ways to name a model,
the prompt in the output of both sample and generate, the end of training, warnings for a
warmup longer than the run and for an exploding loss, an estimate for a long run, and argument
checks (negative counts, wrong types, a too-small temperature)."""

from __future__ import annotations

import importlib
import io
import math
import random

import pytest

import puregpt
from helpers_train import TINY_RUN, names_file, run_cli
from puregpt import sample
from puregpt.cli import build_parser
from puregpt.config import ConfigError, GPTConfig, TrainConfig, preset

train_module = importlib.import_module("puregpt.train")  # (puregpt.train is the function)


# --- help and version ---


def train_help(*preset_args) -> str:
    proc = run_cli("train", *preset_args, "--help")
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())  # argparse wraps lines: compare as one line


@pytest.mark.parametrize("name", ["default", "gpt2", "microgpt"])
def test_train_help_shows_the_active_presets_defaults(name):
    text = train_help(*(["--preset", name] if name != "default" else []))
    chosen = preset(name)
    model = {**GPTConfig().to_dict(), **chosen["model"]}
    recipe = {**TrainConfig().to_dict(), **chosen["train"]}
    for flag, value in (("--n-embd N_EMBD", model["n_embd"]), ("--steps STEPS", recipe["steps"]),
                        ("--batch-size BATCH_SIZE", recipe["batch_size"]),
                        ("--block-size BLOCK_SIZE", model["block_size"])):
        # (the flag's help, not the usage line: its last occurrence)
        assert f"{flag} " in text and f"(default: {value})" in text.rsplit(flag + " ", 1)[1][:200]
    assert f"(default: {recipe['lr']:g})" in text.rsplit("--lr LR", 1)[1][:120]
    assert "(default 16)" not in text  # the old, wrong claim for --n-embd
    assert f"preset {name!r}" in text


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"puregpt {puregpt.__version__}\n"


# --- argument mistakes: one line each, with a hint ---

MISTAKES = [
    (["train", "names.txt"], "did you mean --data names.txt?"),
    (["train", "--stepz", "3"], "did you mean --steps?"),
    (["train", "--steps"], "argument --steps: expected one argument"),
    (["sample", "--temperature"], "argument --temperature: expected one argument"),
    (["train", "--n-embd", "x"], "argument --n-embd: invalid int value: 'x'"),
]


@pytest.mark.parametrize("argv, message", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_an_argument_mistake_gets_one_line_with_a_hint(argv, message):
    proc = run_cli(*argv)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"puregpt {argv[0]}: error: ") and "usage:" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", ""], "--data is empty"),
    (["train", "--samples", "-3"], "--samples must be >= 0, got -3"),
    (["train", "--init-from", "x.safetensors", "--n-embd", "16"],
     "--init-from takes the model's shape from the checkpoint; do not pass model flags with it "
     "(got --n-embd)"),
])
def test_train_refuses_bad_values_before_anything_runs(tmp_path, argv, message):
    proc = run_cli(*argv, "--out", tmp_path / "run")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_sample_refuses_negative_counts(finished_run):
    run, _ = finished_run
    for flags, message in ((["-n", "-1"], "-n must be >= 0, got -1"),
                           (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0")):
        proc = run_cli("sample", run, *flags)
        assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""


def test_a_missing_default_model_says_how_to_get_one(tmp_path):
    import subprocess
    import sys
    from helpers_train import REPO, cli_env
    proc = subprocess.run([sys.executable, "-m", "puregpt", "sample"], cwd=tmp_path,
                          env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no model in ./run" in proc.stderr
    assert "puregpt train" in proc.stderr and str(REPO)


# --- one way to name the model ---


def test_every_command_takes_the_model_first_or_as_dash_m(finished_run):
    run, _ = finished_run
    for argv in (["sample", run, "-n", "1", "--seed", "1"], ["sample", "-m", run, "-n", "1",
                                                             "--seed", "1"]):
        proc = run_cli(*argv)
        assert proc.returncode == 0, proc.stderr
    assert run_cli("sample", run, "-n", "1", "--seed", "1").stdout == \
        run_cli("sample", "-m", run, "-n", "1", "--seed", "1").stdout
    scores = [run_cli("score", run, "emma", "anna").stdout,
              run_cli("score", "-m", run, "emma", "anna").stdout,  # the old form
              run_cli("score", "emma", "-m", run, "anna").stdout]  # options anywhere
    assert scores[0] == scores[1] == scores[2] and "emma" in scores[0] and "anna" in scores[0]
    assert run_cli("info", run).stdout == run_cli("info", "-m", run).stdout
    both = run_cli("info", run, "-m", run / "last.safetensors")
    assert both.returncode == 2 and "two models given" in both.stderr


def test_sample_and_generate_agree_that_the_prompt_is_part_of_the_output(finished_run):
    run, _ = finished_run
    proc = run_cli("sample", run, "--prompt", "ma", "-n", "1", "--seed", "3",
                   "--temperature", "0.8")
    model = puregpt.load(str(run))
    text = puregpt.generate(model, "ma", seed=3, temperature=0.8)
    assert text.startswith("ma") and proc.stdout == text + "\n"
    pieces = list(puregpt.stream(model, "ma", seed=3, temperature=0.8))
    assert pieces[0] == "ma" and "".join(pieces) == text


# --- API arguments ---


@pytest.mark.parametrize("call, name", [
    (lambda m: puregpt.generate(m, top_k=2.5), "top_k"),
    (lambda m: puregpt.generate(m, top_k="3"), "top_k"),
    (lambda m: puregpt.generate(m, top_k=True), "top_k"),
    (lambda m: puregpt.generate(m, None), "prompt"),
    (lambda m: puregpt.generate(m, temperature="hot"), "temperature"),
    (lambda m: puregpt.generate(m, seed=1.5), "seed"),
    (lambda m: puregpt.generate(m, max_new_tokens="5"), "max_new_tokens"),
    (lambda m: puregpt.score(m, 123), "text"),
    (lambda m: puregpt.evaluate(m, 42), "path"),
    (lambda m: puregpt.generate("run"), "model"),
    (lambda m: puregpt.score({"params": {}}, "emma"), "model"),
])
def test_api_arguments_of_the_wrong_type_raise_type_error_naming_them(finished_run, call, name):
    model = puregpt.load(str(finished_run[0]))
    with pytest.raises(TypeError, match=f"^{name} must be "):
        call(model)


def test_api_refuses_negative_counts_and_model_settings_with_init_from(finished_run):
    run, data = finished_run
    model = puregpt.load(str(run))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0, got -5"):
        puregpt.generate(model, max_new_tokens=-5)
    with pytest.raises(ConfigError, match="init_from takes the model's shape"):
        puregpt.train(str(data), init_from=str(run / "last.safetensors"), n_embd=16)
    with pytest.raises(ConfigError, match="data is empty"):
        puregpt.train("")


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = [1.0, 3.0, 2.0, 3.0]
    for t in (1e-300, 1e-310, 5e-324):
        probs = sample.shape_probs(logits, temperature=t)
        assert probs == [0.0, 0.5, 0.0, 0.5]  # the tied maxima share the mass
    assert sample.shape_probs([1.0, 3.0, 2.0], 1e-300, top_k=1) == [0.0, 1.0, 0.0]
    # an ordinary temperature is computed as before: logits / T, then the softmax
    z = [0.3, -1.2, 2.5]
    e = [math.exp(x / 0.7 - max(z) / 0.7) for x in z]
    assert sample.shape_probs(z, 0.7) == pytest.approx([x / sum(e) for x in e], abs=1e-15)
    assert sample.pick(logits, random.Random(0), temperature=1e-300) in (1, 3)


# --- the end of training ---


def test_the_end_of_training_says_where_the_model_is_and_what_next(tmp_path):
    data = names_file(tmp_path, 200)
    run = tmp_path / "run"
    proc = run_cli("train", "--data", data, "--out", run, *TINY_RUN[:-6], "--workers", "1",
                   "--steps", 4, "--eval-every", 2, "--eval-tokens", 64, "--samples", 3)
    assert proc.returncode == 0, proc.stderr
    assert f"saved in {run}/: best.safetensors" in proc.stderr
    assert f"next: puregpt sample {run}" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "--- 3 samples from the trained model (temperature 0.5) ---"
    assert len(lines) == 4


def test_stream_samples_are_separated(tmp_path):
    from helpers_train import stream_text
    data = tmp_path / "text.txt"
    data.write_text(stream_text(3000), encoding="utf-8")
    proc = run_cli("train", "--data", data, "--out", tmp_path / "r", *TINY_RUN[:-6],
                   "--workers", "1", "--steps", 3, "--eval-tokens", 64, "--samples", 2)
    assert proc.returncode == 0, proc.stderr
    assert "--- sample 1 of 2 (temperature 0.5) ---\n" in proc.stdout
    assert "\n--- sample 2 of 2 (temperature 0.5) ---\n" in proc.stdout


# --- warnings ---


def quiet_model():
    return GPTConfig(n_embd=8, n_head=2, block_size=8)


def run_and_capture(tmp_path, **recipe) -> str:
    err = io.StringIO()
    train_module.train(quiet_model(), TrainConfig(workers=1, **recipe),
                       str(names_file(tmp_path, 200)), None, stream=err)
    return err.getvalue()


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path):
    text = run_and_capture(tmp_path, steps=5, warmup=20, schedule="cosine")
    assert text.count("warning: --warmup 20 exceeds --steps 5") == 1
    assert "warning" not in run_and_capture(tmp_path, steps=5, warmup=3, schedule="cosine")


def test_an_exploding_loss_prints_one_warning(tmp_path):
    text = run_and_capture(tmp_path, steps=60, lr=0.5, warmup=10, schedule="constant",
                           eval_every=10, eval_tokens=64, batch_size=4)
    assert text.count("warning: ") == 1, text
    assert "over 10x the first step's" in text and "--lr 0.5 may be too high" in text
    calm = run_and_capture(tmp_path, steps=40, lr=0.01, eval_every=5, eval_tokens=64)
    assert "warning" not in calm


def test_a_growing_validation_loss_prints_one_warning(tmp_path):
    run = train_module.Run.__new__(train_module.Run)  # only watch_loss's own state
    out = io.StringIO()
    run.first_loss, run.vals, run.warned, run.quiet = None, [], False, False
    run.tc = TrainConfig(lr=0.5)
    run.progress = train_module.Progress(run.tc, 0, False, stream=out)
    for step, val in enumerate([2.0, 2.1, 2.2, 2.3]):
        run.watch_loss(step, 2.0, val)
    assert out.getvalue() == ""  # three rises: not yet
    run.watch_loss(4, 2.0, 2.4)
    run.watch_loss(5, 2.0, 2.5)
    assert out.getvalue().count("warning: at step 5 the validation loss grew at 4 ") == 1


def test_a_long_run_says_how_long_it_will_take(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "LONG_RUN_SECONDS", 0)  # every run counts as long
    text = run_and_capture(tmp_path, steps=5)
    assert "this run will take about 0:00:00 (5 steps of " in text
    monkeypatch.setattr(train_module, "LONG_RUN_SECONDS", 10**6)
    assert "this run will take" not in run_and_capture(tmp_path, steps=5)


def test_the_gpt2_preset_measures_its_run_before_starting(tmp_path):
    """The gpt2 preset's default run is long: the analytic gate asks for a measurement."""
    chosen = preset("gpt2")
    params = 2 * 12 * 32 * 32  # its two blocks, roughly; the real count is larger
    tokens = chosen["train"]["batch_size"] * chosen["model"]["block_size"]
    assert 6 * params * tokens * 1000 >= train_module.LONG_RUN_SECONDS * 50e6 / 4
    assert build_parser()  # (the parser builds with every preset's defaults)
