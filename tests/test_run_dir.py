"""The run directory: locked before anything in it is read, so that of two trainers started at
the same instant on one --out exactly one trains and a finished run is never replaced without
--force; no empty .lock file stays behind; a directory made for a run that never started is
removed again. And the run's setup steps, each tested alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers_train import REPO, TINY_RUN, cli_env, names_file, run_cli, snapshot
from puregpt.checkpoint import load_checkpoint
from puregpt.config import GPTConfig, TrainConfig
from puregpt.train import RunDir, TrainingError, _resume_point, train

# Waits until the file argv[1] exists (the starting gun), then runs the CLI on the rest.
STARTER = r"""
import os, sys, time
from puregpt.cli import main
gun = sys.argv[1]
while not os.path.exists(gun):
    time.sleep(0.0005)
sys.exit(main(sys.argv[2:]))
"""


def race(tmp_path, trial: int, extra=()):
    """Two trainers (seeds 1 and 2) on one --out, released at the same instant; returns
    (process, stdout, stderr) of each, finished, and the run directory."""
    data = names_file(tmp_path, 100)
    run, gun = tmp_path / f"run{trial}", tmp_path / f"gun{trial}"
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(gun), "train", "--data",
                               str(data), "--out", str(run), *map(str, TINY_RUN), "--steps", "3",
                               "--seed", str(seed), "--quiet", *extra], cwd=REPO,
                              env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    time.sleep(0.5)  # both imported and waiting
    gun.touch()
    return [(p, *p.communicate(timeout=60)) for p in procs], run


@pytest.mark.parametrize("trial", range(8))
def test_two_trainers_started_together_exactly_one_trains(tmp_path, trial):
    procs, run = race(tmp_path, trial)
    codes = sorted(p.returncode for p, _, _ in procs)
    assert codes == [0, 1], [err for _, _, err in procs]
    winner = next(i for i, (p, _, _) in enumerate(procs) if p.returncode == 0)
    err = procs[1 - winner][2]
    assert ("another puregpt process is training in" in err or "already holds a run" in err), err
    # the finished run is the winner's (seed 1 or 2), complete, and was not replaced
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.step == 3 and ckpt.train_config.seed == winner + 1
    assert sorted(os.listdir(run)) == ["best.safetensors", "config.json", "last.safetensors",
                                       "loss.svg", "metrics.jsonl"]


def test_a_finished_run_is_replaced_only_with_force(tmp_path):
    data = names_file(tmp_path, 100)
    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, *TINY_RUN, "--steps", 3, "--quiet"]
    assert run_cli(*args).returncode == 0
    before = snapshot(run)
    again = run_cli(*args, "--seed", 9)
    assert again.returncode == 1 and "already holds a run (at step 3)" in again.stderr
    assert snapshot(run) == before
    forced = run_cli(*args, "--seed", 9, "--force")
    assert forced.returncode == 0, forced.stderr
    assert load_checkpoint(run / "last.safetensors").train_config.seed == 9


def test_no_lock_file_stays_behind(tmp_path):
    data = names_file(tmp_path, 100)
    train(GPTConfig(n_embd=8, n_head=2, block_size=8), TrainConfig(steps=2, workers=1),
          str(data), str(tmp_path / "run"), quiet=True)
    assert ".lock" not in os.listdir(tmp_path / "run")
    train(resume=True, out=str(tmp_path / "run"), overrides={"steps": 3}, quiet=True)
    assert ".lock" not in os.listdir(tmp_path / "run")


def test_a_new_directory_of_a_run_that_never_started_is_removed(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_cli("train", "--data", empty, "--out", tmp_path / "new", *TINY_RUN, "--steps", 2)
    assert proc.returncode == 1 and "is empty" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_out_that_is_a_file_or_a_dangling_link(tmp_path):
    data = names_file(tmp_path, 50)
    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for target in ("file", "dangling"):
        proc = run_cli("train", "--data", data, "--out", tmp_path / target, *TINY_RUN,
                       "--steps", 2)
        assert proc.returncode == 1, proc.stderr
        assert f"--out {tmp_path / target} exists and is not a directory" in proc.stderr
    assert (tmp_path / "file").read_text() == "x" and os.path.islink(tmp_path / "dangling")


def test_the_lock_refuses_a_second_holder_and_is_released(tmp_path):
    first = RunDir(str(tmp_path / "run"), create=True)
    with pytest.raises(TrainingError, match="another puregpt process is training in"):
        RunDir(str(tmp_path / "run"), create=True)
    first.close()
    assert not (tmp_path / "run").exists()  # nothing was written: the new directory is gone
    second = RunDir(str(tmp_path / "run"), create=True)
    second.close()


def test_resume_point_refuses_a_run_without_state_and_a_finished_run(tmp_path):
    data = names_file(tmp_path, 100)
    result = train(GPTConfig(n_embd=8, n_head=2, block_size=8), TrainConfig(steps=2, workers=1),
                   str(data), str(tmp_path / "run"), quiet=True)
    run_dir = RunDir(str(tmp_path / "run"), create=False)
    try:
        with pytest.raises(TrainingError, match="already at step 2 of 2"):
            _resume_point(run_dir, None, {})
        ckpt, tc, changes = _resume_point(run_dir, None, {"steps": 5, "lr": 0.02})
        assert ckpt.step == 2 and tc.steps == 5 and changes == ["steps 2 -> 5", "lr 0.01 -> 0.02"]
        with pytest.raises(TrainingError, match="cannot resume with a different model"):
            _resume_point(run_dir, GPTConfig(n_embd=16, n_head=2, block_size=8,
                                             vocab_size=result.config.vocab_size), {"steps": 5})
    finally:
        run_dir.close()
