"""Training runs that stop and continue: a resumed run is bit-identical to one that never stopped
(weights, optimizer, RNG, logged losses), in both data modes and with worker processes; SIGKILL
in the middle of writing a checkpoint leaves the previous one loadable and resumable; SIGINT
saves, exits with 130 and says how to resume; resuming reports the changes it allows and refuses
the others without touching the run directory."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_train import (REPO, TINY_RUN, cli_env, exact_rows, metrics_rows, names_file,
                           params_bits, run_cli, run_python, snapshot, stream_text)
from puregpt.checkpoint import load_checkpoint
from puregpt.config import GPTConfig, TrainConfig
from puregpt.train import TrainingError, train

MODEL = GPTConfig(n_embd=8, n_head=2, block_size=8)
# Everything that could break exactness at once: several sequences per micro-batch, gradient
# accumulation, weight decay, warmup and cosine decay, evaluations before and after the stop.
RECIPE = dict(steps=10, batch_size=3, grad_accum=2, weight_decay=0.1, schedule="cosine", warmup=3,
              min_lr_frac=0.1, eval_every=4, eval_tokens=64, seed=5)


def data_file(tmp_path: Path, mode: str) -> Path:
    if mode == "docs":
        return names_file(tmp_path, 200)  # block_size 8: the longer names are split in windows
    path = tmp_path / "stream.txt"
    path.write_text(stream_text(4000), encoding="utf-8")
    return path


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same training: checkpoints and logged numbers."""
    ca, cb = load_checkpoint(a / "last.safetensors"), load_checkpoint(b / "last.safetensors")
    assert ca.step == cb.step
    assert params_bits(ca.params) == params_bits(cb.params)
    assert ca.optimizer["step"] == cb.optimizer["step"]
    for moment in ("m", "v"):
        assert params_bits(ca.optimizer[moment]) == params_bits(cb.optimizer[moment])
    assert ca.rng_state == cb.rng_state
    assert ca.trainer == cb.trainer
    assert exact_rows(a) == exact_rows(b)
    assert (a / "best.safetensors").exists() == (b / "best.safetensors").exists()
    if (a / "best.safetensors").exists():
        ba, bb = load_checkpoint(a / "best.safetensors"), load_checkpoint(b / "best.safetensors")
        assert ba.step == bb.step and params_bits(ba.params) == params_bits(bb.params)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("mode", ["docs", "stream"])
def test_resume_is_bit_exact(tmp_path, mode, workers):
    data = data_file(tmp_path, mode)
    tc = TrainConfig(**RECIPE, workers=workers, mode=mode)
    straight = train(MODEL, tc, str(data), str(tmp_path / "straight"), quiet=True)
    assert straight.step == 10

    # the same run (same steps, so the same schedule), stopped after step 6 of 10
    first = train(MODEL, tc, str(data), str(tmp_path / "resumed"), quiet=True,
                  callback=lambda info: info["step"] < 6)
    assert first.step == 6 and load_checkpoint(tmp_path / "resumed" / "last.safetensors").step == 6
    assert first.losses == straight.losses[:6]
    rest = train(resume=True, out=str(tmp_path / "resumed"), quiet=True)
    assert rest.step == 10 and rest.losses == straight.losses[6:]

    assert params_bits(rest.params) == params_bits(straight.params)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")
    rows = metrics_rows(tmp_path / "resumed")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 10]  # before and after the stop
    assert all(r["loss"] == loss for r, loss in zip(rows, straight.losses))
    if mode == "docs":
        assert all("novel_frac" in r for r in rows if "val_loss" in r)


def test_resume_with_the_split_backward_is_bit_exact(tmp_path):
    """One sequence per step on two processes (the helper holds part of the Adam moments),
    stopped and resumed, ends bit-identical to a straight single-process run."""
    data = data_file(tmp_path, "docs")
    recipe = {**RECIPE, "batch_size": 1, "grad_accum": 1}
    train(MODEL, TrainConfig(**recipe, workers=1), str(data), str(tmp_path / "straight"),
          quiet=True)
    tc = TrainConfig(**recipe, workers=2)
    train(MODEL, tc, str(data), str(tmp_path / "resumed"), quiet=True,
          callback=lambda info: info["step"] < 6)
    train(resume=True, out=str(tmp_path / "resumed"), quiet=True)
    assert_same_run(tmp_path / "straight", tmp_path / "resumed")


def test_resume_from_step_zero_and_twice(tmp_path):
    """Stopping after the first step, then again mid-way, still ends where a straight run does."""
    data = data_file(tmp_path, "docs")
    tc = TrainConfig(**RECIPE, workers=1)
    train(MODEL, tc, str(data), str(tmp_path / "a"), quiet=True)
    train(MODEL, tc, str(data), str(tmp_path / "b"), quiet=True, callback=lambda i: False)
    assert load_checkpoint(tmp_path / "b" / "last.safetensors").step == 1
    train(resume=True, out=str(tmp_path / "b"), quiet=True, callback=lambda i: i["step"] < 8)
    train(resume=True, out=str(tmp_path / "b"), quiet=True)
    assert_same_run(tmp_path / "a", tmp_path / "b")


# --- SIGKILL while a checkpoint is being written -----------------------------------------------

# Runs the CLI; on the Nth write of last.safetensors it writes half of the file into the
# temporary file, then kills its own process with SIGKILL, as a power cut or the OOM killer would.
KILL_DRIVER = r"""
import os, signal, sys
import puregpt.checkpoint as checkpoint
from puregpt.cli import main

KILL_AT = int(sys.argv[1])
real_atomic_write = checkpoint.atomic_write
saves = 0

def atomic_write(path, chunks, **options):  # options: rewrite (the checksum)
    global saves
    if os.path.basename(path) == "last.safetensors":
        saves += 1
        if saves == KILL_AT:
            data = b"".join(chunks)
            def dying():
                yield data[:len(data) // 2]  # > the 8 KB write buffer: it reaches the file
                os.kill(os.getpid(), signal.SIGKILL)
                yield data[len(data) // 2:]
            chunks = dying()
    return real_atomic_write(path, chunks, **options)

checkpoint.atomic_write = atomic_write  # save_checkpoint looks it up at call time
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    data = names_file(tmp_path, 200)
    args = ["train", "--data", data, *TINY_RUN, "--steps", "10", "--eval-every", "3",
            "--batch-size", "2", "--quiet"]
    # last.safetensors is written at steps 0, 3, 6, 9 and 10: the third write (step 6) dies
    proc = run_python(KILL_DRIVER, "3", *args, "--out", tmp_path / "killed")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "killed"
    temps = [p for p in os.listdir(run) if p.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].startswith(".last.safetensors.")
    ckpt = load_checkpoint(run / "last.safetensors")  # the previous checkpoint, intact
    assert ckpt.step == 3
    assert 0 < (run / temps[0]).stat().st_size < (run / "last.safetensors").stat().st_size
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, 7))

    resumed = run_cli("train", "--resume", run, "--quiet", "--samples", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]  # the leftover is cleaned up
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, 11))  # 4..6 redone once
    straight = run_cli(*args, "--out", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    assert_same_run(tmp_path / "straight", run)


# --- SIGINT (Ctrl-C) ---------------------------------------------------------------------------


def interrupt_when_logged(args, run: Path, rows: int, group: bool = False,
                          signum: int = signal.SIGINT):
    """Start a CLI training run, send SIGINT once metrics.jsonl holds `rows` rows (to the whole
    process group, as a terminal's Ctrl-C does, when group is set); return the finished process
    with its output."""
    proc = subprocess.Popen([sys.executable, "-m", "puregpt", *map(str, args)], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text().count("\n") >= rows):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        if group:
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


@pytest.mark.parametrize("group,batch", [(False, 1), (True, 4), (True, 1)],
                         ids=["process", "process-group-with-workers", "process-group-with-helper"])
def test_sigint_saves_a_resumable_checkpoint(tmp_path, group, batch):
    data = names_file(tmp_path, 200)
    run = tmp_path / "run"
    steps = 600  # long enough that the signal always lands mid-run
    args = ["train", "--data", data, "--out", run, *TINY_RUN, "--steps", steps,
            "--eval-every", 50, "--log-every", 1]
    if group:  # the workers get the Ctrl-C too, and must leave the stopping to the trainer
        args += ["--batch-size", batch, "--workers", 2]
    code, out, err = interrupt_when_logged(args, run, rows=5, group=group)
    assert code == 130, err
    ckpt = load_checkpoint(run / "last.safetensors")
    assert 5 <= ckpt.step < steps, "the run stopped early, at a step boundary"
    assert err.rstrip().endswith(f"interrupted at step {ckpt.step} of {steps}; saved "
                                 f"{run}/last.safetensors. Resume with: puregpt train "
                                 f"--resume {run}")
    assert "Traceback" not in err
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, ckpt.step + 1))
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]

    resumed = run_cli("train", "--resume", run, "--samples", 0)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} at step {ckpt.step}\n" in resumed.stderr
    assert f"trained to step {steps}" in resumed.stderr
    assert load_checkpoint(run / "last.safetensors").step == steps
    assert [r["step"] for r in metrics_rows(run)] == list(range(1, steps + 1))
    if not group:  # and the run is the one that never stopped
        straight = tmp_path / "straight"
        args[args.index(run)] = straight
        assert run_cli(*args, "--quiet").returncode == 0
        assert_same_run(straight, run)


def test_sigterm_saves_and_exits_with_143(tmp_path):
    data = names_file(tmp_path, 200)
    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, *TINY_RUN, "--steps", 600, "--log-every", 1]
    code, out, err = interrupt_when_logged(args, run, rows=3, signum=signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "Resume with: puregpt train --resume" in err
    assert load_checkpoint(run / "last.safetensors").step >= 3


def test_a_second_trainer_in_the_same_directory_is_refused(tmp_path):
    data = names_file(tmp_path, 200)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "puregpt", "train", "--data", str(data),
                             "--out", str(run), *map(str, TINY_RUN), "--steps", "600",
                             "--log-every", "1"], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        before = (run / "last.safetensors").read_bytes()
        second = run_cli("train", "--resume", run, "--quiet")
        assert second.returncode == 1
        assert f"another puregpt process is training in {run}" in second.stderr
        assert (run / "last.safetensors").read_bytes() == before or proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def worker_pids(pid: int) -> list[int]:
    """The worker processes of a training process: its children running the same command line
    (forked), as opposed to multiprocessing's resource tracker."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == cmdline]


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs Linux's /proc/PID/task/PID/children")
@pytest.mark.parametrize("batch,who", [(4, "worker process 1"), (1, "the helper process")])
def test_a_dead_worker_stops_the_run_with_a_clear_error(tmp_path, batch, who):
    data = names_file(tmp_path, 200)
    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, *TINY_RUN, "--steps", 600, "--eval-every", 5,
            "--batch-size", batch, "--workers", 2, "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "puregpt", *map(str, args)], cwd=REPO,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text().count("\n") >= 7):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        (worker,) = worker_pids(proc.pid)
        os.kill(worker, signal.SIGKILL)  # as the out-of-memory killer would
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert err == f"puregpt: error: {who} (pid {worker}) died (exit code -9); " \
                  f"training stopped\n"
    step = load_checkpoint(run / "last.safetensors").step
    assert step >= 5 and step % 5 == 0
    resumed = run_cli("train", "--resume", run, "--steps", step + 5, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run / "last.safetensors").step == step + 5


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
                    reason="needs Linux's /proc/PID/task/PID/children")
@pytest.mark.parametrize("batch", [4, 1], ids=["workers", "helper"])
def test_helpers_do_not_outlive_a_killed_trainer(tmp_path, batch):
    """SIGKILL leaves no cleanup to the trainer: its worker processes notice and exit."""
    data = names_file(tmp_path, 200)
    run = tmp_path / "run"
    args = ["train", "--data", data, "--out", run, *TINY_RUN, "--steps", 100000,
            "--batch-size", batch, "--workers", 2, "--quiet"]
    # output to a file: a pipe would stay open as long as a surviving worker holds it
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "puregpt", *map(str, args)], cwd=REPO,
                                env=cli_env(), stdout=log, stderr=log)
    try:
        metrics, deadline = run / "metrics.jsonl", time.monotonic() + 60
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "log").read_text()
            time.sleep(0.01)
        (worker,) = worker_pids(proc.pid)
    finally:
        proc.kill()
        proc.wait()

    def running(pid):  # an exited process may linger as a zombie until someone reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    try:
        deadline = time.monotonic() + 15
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(worker), "a worker outlived its trainer"
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)


# --- what a resume may change ------------------------------------------------------------------


def test_resume_reports_allowed_changes(run_copy):
    run, _ = run_copy
    proc = run_cli("train", "--resume", run, "--steps", 9, "--lr", 0.02, "--eval-every", 3,
                   "--samples", 0)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming {run} at step 6: changed steps 6 -> 9; lr 0.01 -> 0.02\n" in proc.stderr
    ckpt = load_checkpoint(run / "last.safetensors")
    assert ckpt.step == 9 and ckpt.train_config.steps == 9 and ckpt.train_config.lr == 0.02
    rows = metrics_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 10))
    assert rows[6]["lr"] == pytest.approx(0.02 * (1 - 6 / 9))  # the new schedule from step 7


def test_resume_of_a_finished_run_asks_for_more_steps(run_copy):
    run, _ = run_copy
    before = snapshot(run)
    proc = run_cli("train", "--resume", run, "--quiet")
    assert proc.returncode == 1
    assert f"the run in {run} is already at step 6 of 6; raise --steps" in proc.stderr
    assert snapshot(run) == before


CONFLICTS = [
    (["--batch-size", "2"], 1, "cannot resume with changed batch_size 1 -> 2: these decide the "
                               "data order, the batches or the validation split"),
    (["--seed", "7"], 1, "cannot resume with changed seed 42 -> 7"),
    (["--val-fraction", "0.2"], 1, "cannot resume with changed val_fraction 0.1 -> 0.2"),
    (["--grad-accum", "2", "--mode", "stream"], 1,
     "cannot resume with changed grad_accum 1 -> 2; mode 'auto' -> 'stream'"),
    (["--n-embd", "16"], 2, "cannot change the model of a run being resumed (got --n-embd)"),
    (["--no-emb-norm", "--n-layer", "2"], 2, "(got --n-layer, --emb-norm)"),
    (["--preset", "gpt2"], 2, "--preset applies to new runs"),
]


@pytest.mark.parametrize("flags, code, message", CONFLICTS, ids=[c[0][0] for c in CONFLICTS])
def test_resume_refuses_conflicting_changes(run_copy, flags, code, message):
    run, _ = run_copy
    before = snapshot(run)
    proc = run_cli("train", "--resume", run, "--steps", 12, *flags)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run) == before


def test_resume_refuses_data_outside_the_vocabulary(run_copy, tmp_path):
    run, data = run_copy
    other = tmp_path / "other.txt"
    other.write_text(data.read_text() + "Zoë\n", encoding="utf-8")
    before = snapshot(run)
    proc = run_cli("train", "--resume", run, "--steps", 12, "--data", other)
    assert proc.returncode == 1
    assert ("the data does not fit the checkpoint's vocabulary: " in proc.stderr
            and "2 character(s) not in the vocabulary: 'Z', 'ë'" in proc.stderr)
    assert snapshot(run) == before


def test_api_refuses_resume_without_state(tmp_path):
    with pytest.raises(TrainingError, match="resume needs the run directory"):
        train(resume=True)
    with pytest.raises(TrainingError, match="nothing to resume in .*: no last.safetensors"):
        train(resume=True, out=str(tmp_path))
    assert os.listdir(tmp_path) == []


# --- the garbage collector paused during a step (ops.collector_paused) ------------------------


@pytest.mark.parametrize("arch", [
    {},
    {"norm": "layernorm", "norm_affine": True, "bias": True, "activation": "silu", "pos": "rope",
     "mlp": "swiglu", "n_kv_head": 1, "qk_norm": True, "tie_embeddings": True},
])
def test_a_training_step_leaves_no_cyclic_garbage(arch):
    """The pause is safe only because a step's lists never form reference cycles: everything a
    forward + backward + AdamW step allocates is freed by reference counting, so a collection
    run right after finds nothing (gc.collect() returns the unreachable objects it found)."""
    import gc
    import random

    from puregpt import model, optim
    from puregpt.train import batch_grads
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_embd=16, n_head=4, **arch)
    rng = random.Random(0)
    params = model.init_params(cfg, rng)
    grads, state = model.zeros_like(params), optim.new_state(params)
    batch = [([[rng.randrange(11) for _ in range(8)] for _ in range(3)],
              [[rng.randrange(11) for _ in range(8)] for _ in range(3)])]
    gc.collect()
    assert gc.isenabled()
    for _ in range(2):
        batch_grads(params, cfg, batch, grads)
        optim.adamw_step(params, grads, state, 1e-3, 0.9, 0.95, 1e-8, 0.1)
        assert gc.isenabled()  # on again after the step
        assert gc.collect() == 0


def test_collector_paused_restores_the_state_it_found():
    import gc

    from puregpt import ops
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with ops.collector_paused():
            assert not gc.isenabled()
            raise KeyError("x")
    assert gc.isenabled()  # on again, even after an error
    gc.disable()
    try:
        with ops.collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # a caller's own pause is not ended by ours
    finally:
        gc.enable()


def test_zero_grads_zeroes_every_row_in_place_and_keeps_them_apart():
    """The training step's zeroing: the same row objects, all 0.0, none sharing its storage."""
    from puregpt import optim
    grads = {"w": [[1.0, 2.0], [3.0, 4.0]], "b": [5.0, 6.0, 7.0], "v": [[8.0] * 3]}
    rows = [grads["w"][0], grads["w"][1], grads["b"], grads["v"][0]]
    optim.zero_grads(grads)
    assert [grads["w"][0], grads["w"][1], grads["b"], grads["v"][0]] == \
        [[0.0, 0.0], [0.0, 0.0], [0.0] * 3, [0.0] * 3]
    assert all(a is b for a, b in zip(rows, [grads["w"][0], grads["w"][1], grads["b"],
                                              grads["v"][0]]))
    grads["w"][0][0] = 1.0
    optim.zero_grads(grads)
    grads["w"][1][0] = 9.0  # rows of one length were zeroed from one list of zeros: still apart
    assert grads["w"][0] == [0.0, 0.0] and grads["b"] == [0.0] * 3


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_update_is_the_formula_element_by_element(weight_decay):
    """Both of adamw_update's loops (with decay, and the no-decay one without its multiply) give
    the module docstring's formula, written out one scalar at a time, to 1e-15 relative."""
    import math
    import random

    from puregpt import optim
    rng = random.Random(3)
    n, lr, b1, b2, eps, t = 50, 0.01, 0.85, 0.99, 1e-8, 7
    p, g = [rng.gauss(0, 1) for _ in range(n)], [rng.gauss(0, 1) for _ in range(n)]
    m, v = [rng.gauss(0, 0.1) for _ in range(n)], [rng.random() * 0.01 for _ in range(n)]
    new_p, new_m, new_v = optim.adamw_update(iter(p), g, m, v, t, lr, b1, b2, eps, weight_decay)
    for i in range(n):
        mi = b1 * m[i] + (1 - b1) * g[i]
        vi = b2 * v[i] + (1 - b2) * g[i] ** 2
        pi = p[i] - lr * weight_decay * p[i]
        pi -= lr * (mi / (1 - b1 ** t)) / (math.sqrt(vi / (1 - b2 ** t)) + eps)
        assert new_m[i] == pytest.approx(mi, rel=1e-15, abs=1e-300)
        assert new_v[i] == pytest.approx(vi, rel=1e-15, abs=1e-300)
        assert new_p[i] == pytest.approx(pi, rel=1e-15, abs=1e-15)


def test_a_one_process_run_never_imports_multiprocessing_and_errors_still_read_as_one_line(
        tmp_path):
    """--workers 1 trains without importing puregpt.parallel (multiprocessing, shared memory):
    ~10 ms of every start. A bad flag of such a run is still one line of error, and once the
    module is loaded cli.main reports its WorkerError as one line too."""
    data = names_file(tmp_path, 50)
    script = (
        "import sys\n"
        "from puregpt import cli\n"
        "rc = cli.main(['train', '--data', sys.argv[1], '--out', sys.argv[2], *sys.argv[3:]])\n"
        "print(rc, 'puregpt.parallel' in sys.modules, 'multiprocessing' in sys.modules)\n"
        "from puregpt.parallel import WorkerError\n"
        "assert WorkerError in cli._reported_errors()\n")
    args = [data, tmp_path / "run", *TINY_RUN, "--steps", 3, "--quiet"]
    done = run_python(script, *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 False False"
    bad = run_python(script, data, tmp_path / "run2", *TINY_RUN, "--steps", 3, "--lr", -1)
    assert bad.returncode == 0, bad.stderr  # main returned (the script printed and went on)
    assert bad.stdout.splitlines()[-1] == "2 False False"
    assert bad.stderr.startswith("puregpt: error: ") and "lr" in bad.stderr
