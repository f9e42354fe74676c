"""The progress display: a live line on a terminal, plain lines in logs, nothing with --quiet."""

import os
import pty
import re
import subprocess
import sys

import pytest

from helpers_train import REPO, TINY_RUN, cli_env, names_file

ARGS = ["train", *TINY_RUN, "--steps", "40", "--eval-every", "20"]


def run_with_stderr_on_a_terminal(args):
    """Run the CLI with stderr on a pseudo-terminal; return (exit code, what the terminal got)."""
    master, slave = pty.openpty()
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
