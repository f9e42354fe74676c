"""The progress display: a live line on a terminal, plain lines in logs, nothing with --quiet."""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from helpers_train import REPO, TINY_RUN, cli_env, names_file

ARGS = ["train", *TINY_RUN, "--steps", "40", "--eval-every", "20"]


def run_with_stderr_on_a_terminal(args, columns: int = 200):
    """Run the CLI with stderr on a pseudo-terminal `columns` wide; return (exit code, what the
    terminal got)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "puregpt", *map(str, args)], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    proc.stdout.read()
    return proc.wait(timeout=60), b"".join(chunks).decode()


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_a_terminal_gets_one_live_line(tmp_path):
    data = names_file(tmp_path, 200)
    code, screen = run_with_stderr_on_a_terminal([*ARGS, "--data", data, "--out", tmp_path / "r"])
    assert code == 0, screen
    # the line is redrawn in place: carriage return, the line, clear to the end of the line
    redraws = re.findall(r"\r(step +\d+ / +40 \| loss \d\.\d{4}[^\r\n]*?)\x1b\[K", screen)
    assert redraws, screen
    last = redraws[-1]
    for field in ("tok/s", "elapsed", "ETA", "lr "):
        assert field in last, last
    # evaluations and the last step end their line, so the history of evaluations stays visible
    kept = [ln for ln in screen.replace("\r\n", "\n").split("\n")
            if "| val " in ln and re.search(r"step +\d+ / +40 \|", ln)]
    assert any("step   20 /   40" in ln for ln in kept)
    assert "step   40 /   40" in kept[-1]
    assert "novel " in kept[-1]  # share of sampled names not in the training set
    assert "trained to step 40" in screen


def test_a_log_gets_plain_lines(tmp_path):
    data = names_file(tmp_path, 200)
    proc = subprocess.run([sys.executable, "-m", "puregpt", *ARGS, "--data", str(data),
                           "--out", str(tmp_path / "r"), "--log-every", "10"], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    steps = re.findall(r"^step +(\d+) / +40 \| loss \d\.\d{4}", proc.stderr, re.M)
    assert steps == ["10", "20", "30", "40"]


def test_quiet_prints_nothing(tmp_path):
    data = names_file(tmp_path, 200)
    proc = subprocess.run([sys.executable, "-m", "puregpt", *ARGS, "--data", str(data),
                           "--out", str(tmp_path / "r"), "--quiet"], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""


def drawn_lines(screen: str) -> list[str]:
    """Every line the terminal shows, in turn: each redraw after a carriage return, and each line
    ended by a newline, with the clear-to-end-of-line codes removed."""
    return [piece for line in screen.replace("\r\n", "\n").split("\n")
            for piece in line.replace("\x1b[K", "").split("\r") if piece]


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
@pytest.mark.parametrize("columns", [40, 80, 200])
def test_the_live_line_never_exceeds_the_terminal_width(tmp_path, columns):
    data = names_file(tmp_path, 200)
    code, screen = run_with_stderr_on_a_terminal(
        [*ARGS, "--data", data, "--out", tmp_path / "r"], columns)
    assert code == 0, screen
    progress = [ln for ln in drawn_lines(screen) if re.match(r"step +\d+ / +40 \|", ln)]
    assert progress, screen
    assert all(len(ln) < columns for ln in progress), max(progress, key=len)
    final = progress[-1]
    assert re.match(r"step   40 /   40 \| loss \d\.\d{4}", final)  # never dropped
    if columns == 80:  # the most useful fields stay, the rest goes
        assert "val " in final and "ETA " in final
    if columns == 200:
        for field in ("tok/s", "elapsed", "ETA", "lr ", "(best "):
            assert field in final, final


def test_fit_fields_shortens_then_drops_the_lowest_priority_first():
    from puregpt.train import fit_fields
    fields = [(0, "step 1", ""), (2, "val 1.0 (best 0.9)", "val 1.0"), (3, "ETA 0:01", ""),
              (1, "loss 2", "")]
    assert fit_fields(fields, 100) == "step 1 | val 1.0 (best 0.9) | ETA 0:01 | loss 2"
    assert fit_fields(fields, 36) == "step 1 | val 1.0 (best 0.9) | loss 2"
    assert fit_fields(fields, 26) == "step 1 | val 1.0 | loss 2"
    assert fit_fields(fields, 16) == "step 1 | loss 2"
    assert fit_fields(fields, 4) == "step"


def test_plain_lines_show_a_validation_loss_only_when_it_is_new(tmp_path):
    data = names_file(tmp_path, 200)
    proc = subprocess.run([sys.executable, "-m", "puregpt", *ARGS, "--data", str(data),
                           "--out", str(tmp_path / "r"), "--log-every", "5"], cwd=REPO,
                          env=cli_env(), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("step")]
    with_val = [int(re.match(r"step +(\d+)", ln).group(1)) for ln in lines if "| val " in ln]
    assert with_val == [20, 40]  # the evaluation steps, and no stale repeats in between


def test_eta_counts_the_evaluations_to_come():
    from puregpt.config import TrainConfig
    from puregpt.train import Progress
    p = Progress(TrainConfig(steps=100, eval_every=30), 0, quiet=False, evaluates=True)
    assert [p.evals_left(s) for s in (0, 29, 30, 89, 90, 99, 100)] == [4, 4, 3, 2, 1, 1, 0]
    p = Progress(TrainConfig(steps=90, eval_every=30), 0, quiet=False, evaluates=True)
    assert [p.evals_left(s) for s in (0, 30, 90)] == [3, 2, 0]
    assert Progress(TrainConfig(steps=90), 0, False, evaluates=False).evals_left(0) == 0
    p = Progress(TrainConfig(steps=100, eval_every=50), 0, quiet=False, evaluates=True)
    p.t0 -= 10.0  # 10 s ago; 2 s of it was the first evaluation, at step 50
    p.evaluated(49, 2.0, 2.0, None, seconds=2.0)
    line = p.line(50, 2.0, 0.01, p.t0 + 10.0)
    # 8 s of training for 50 steps: 8 s for the other 50, plus one more evaluation of 2 s
    assert "ETA 0:00:10" in line
