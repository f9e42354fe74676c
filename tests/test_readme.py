"""The README's code runs: its Python blocks, in order, as printed; every `puregpt` command in
its shell blocks is one the command line accepts (flags, values, presets); and the first
screen's main job (train, then sample) runs as written."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys

import pytest

from helpers_train import REPO, cli_env
from puregpt import cli

README = REPO / "README.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments dropped,
    split at &&, || , ; and |."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        words, current = shlex.split(line, comments=True), []
        for word in words + [";"]:
            if word in ("&&", "||", ";", "|"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(word)
    return out


def puregpt_commands() -> list[list[str]]:
    return [c[1:] for b in blocks("bash") for c in commands(b) if c[0] == "puregpt"]


def test_the_readme_has_the_commands_it_should():
    found = {c[0] for c in puregpt_commands() if c}
    assert {"train", "sample", "score", "info", "export", "import-hf"} <= found
    assert len(blocks("python")) >= 1


@pytest.mark.parametrize("argv", puregpt_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_puregpt_command_in_the_readme_parses(argv):
    parser = cli.build_parser(cli._preset_in(argv))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = cli.parse(parser, argv)
        except SystemExit as e:
            assert e.code == 0, f"puregpt {' '.join(argv)}: {err.getvalue()}"
            return
    assert callable(args.func)


def test_the_python_blocks_run_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, block in enumerate(blocks("python")):
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("ma")  # the prompt is part of the output
    assert float(lines[-1]) > 0  # the score's loss
    assert namespace["model"].step == 300  # resumed to step 300, then loaded


def test_the_first_screens_main_job_runs(tmp_path):
    """`puregpt train && puregpt sample`, in a fresh directory (the install is the suite's)."""
    first = README.read_text(encoding="utf-8").split("---", 1)[0]
    line = next(ln for ln in blocks("bash")[0].splitlines() if "puregpt train" in ln)
    assert commands(line)[1:] == [["puregpt", "train"], ["puregpt", "sample"]], line
    assert "python -m pytest" in first
    for argv in (["train", "--quiet"], ["sample"]):
        proc = subprocess.run([sys.executable, "-m", "puregpt", *argv], cwd=tmp_path,
                              env=cli_env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr
    samples = proc.stdout.splitlines()
    assert len(samples) == 10 and all(s.strip() for s in samples)


def test_ci_runs_the_readmes_test_command_verbatim():
    """The first screen's test command is the line .ci/run runs (CI calls exactly it)."""
    first = README.read_text(encoding="utf-8").split("---", 1)[0]
    line = next(ln for ln in blocks("bash")[0].splitlines() if "python -m pytest" in ln)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert line in first and line in ci, line

