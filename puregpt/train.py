"""The training loop, its run directory, and exact resume.

A run directory (--out) holds:
    last.safetensors   the latest checkpoint: weights, Adam moments, step, RNG state, configs
    best.safetensors   the checkpoint with the lowest validation loss so far
    metrics.jsonl      one JSON object per step: step, loss, lr, tokens, tokens_per_s, time,
                       and val_loss (+ novel_frac for documents) at evaluations
    config.json        the model and training configs and the data it trains on
    loss.svg           the loss curves, redrawn at each evaluation

Every file is replaced atomically (written beside, fsynced, renamed), so a crash at any moment
leaves the previous version intact. A resumed run restores weights, Adam moments, step, RNG state
and (through the step) the data position, so that it is bit-identical to a run that never stopped.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field

from . import model, optim
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import RESUMABLE_CHANGES, GPTConfig, TrainConfig
from .data import Corpus, DataError, get_batch, load_corpus
from .fsutil import atomic_write
from .plot import read_metrics, render_loss_svg
from .sample import generate_text


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why."""


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after saving a resumable checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum  # the shell's convention: exit with 128 + signum


@dataclass
class TrainResult:
    params: dict
    config: GPTConfig
    tokenizer: object
    train_config: TrainConfig
    corpus: Corpus
    step: int
    losses: list = field(default_factory=list)  # training loss of each step run in this call
    best_val: float | None = None
    last_val: float | None = None


def run_paths(out: str) -> dict[str, str]:
    return {name: os.path.join(out, file) for name, file in (
        ("last", "last.safetensors"), ("best", "best.safetensors"), ("metrics", "metrics.jsonl"),
        ("config", "config.json"), ("plot", "loss.svg"))}


# --- gradients of one optimizer step -----------------------------------------------------------


def batch_grads(params, config, micro_batches, grads, workers=None) -> tuple[float, int]:
    """Accumulate into grads the gradient of the mean loss over every target position of every
    micro-batch; return (that mean loss, number of positions). With a worker pool, each
    micro-batch's sequences are split across processes."""
    counts = [sum(1 for seq in targets for y in seq if y >= 0) for _, targets in micro_batches]
    total = sum(counts)
    loss = 0.0
    for (inputs, targets), n in zip(micro_batches, counts):
        # d(mean over all)/d(mean over this micro-batch) = n / total
        if workers is not None:
            micro_loss = workers.loss_and_grads(params, inputs, targets, grads, n / total)
        else:
            micro_loss = model.loss_and_grads(params, config, inputs, targets, grads, n / total)[0]
        loss += micro_loss * n / total
    return loss, total


def evaluate(params, config, examples, workers=None, chunk=64) -> float | None:
    """Mean loss over a fixed list of (inputs, targets) examples, in chunks to bound memory."""
    total, count = 0.0, 0
    for i in range(0, len(examples), chunk):
        part = examples[i:i + chunk]
        inputs, targets = [x for x, _ in part], [y for _, y in part]
        if workers is not None:
            loss, n = workers.evaluate(params, inputs, targets)
        else:
            loss, n = model.evaluate_loss(params, config, inputs, targets)
        total += loss * n
        count += n
    return total / count if count else None


def novelty(params, config, corpus: Corpus, seed: int, n: int = 50) -> float:
    """Share of n sampled documents (temperature 1) that are not in the training set: a model
    that only memorizes scores 0 (makemore's check)."""
    rng = random.Random(seed)
    seen = set(corpus.train_docs)
    samples = [generate_text(params, config, corpus.tokenizer, rng=rng) for _ in range(n)]
    return sum(1 for s in samples if s and s not in seen) / n


# --- progress display --------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A live line on a terminal; plain lines every log_every steps otherwise; or microgpt's exact
    per-step lines on stdout."""

    def __init__(self, tc: TrainConfig, start_step: int, quiet: bool, stream=None, out=None):
        self.tc, self.quiet = tc, quiet
        self.stream, self.out = stream or sys.stderr, out or sys.stdout
        self.live = not quiet and tc.log_format == "full" and self.stream.isatty()
        self.every = tc.log_every or max(1, tc.steps // 20)
        self.t0, self.start_step, self.last_draw = time.perf_counter(), start_step, 0.0
        self.tokens, self.val, self.best, self.novel = 0, None, None, None

    def step(self, step: int, loss: float, lr: float, tokens: int, evaluated: bool) -> None:
        self.tokens += tokens
        s, n = step + 1, self.tc.steps
        if self.tc.log_format == "microgpt":
            if not self.quiet and s % self.every == 0:
                print(f"step {s:4d} / {n:4d} | loss {loss:.4f}", file=self.out, flush=True)
            return
        if self.quiet:
            return
        now = time.perf_counter()
        elapsed = now - self.t0
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        done = s - self.start_step
        eta = elapsed / done * (n - s) if done else 0.0
        val = "" if self.val is None else f" | val {self.val:.4f} (best {self.best:.4f})"
        if self.novel is not None:  # share of sampled documents that are not training copies
            val += f" | novel {self.novel:.0%}"
        line = (f"step {s:4d} / {n:4d} | loss {loss:.4f}{val} | lr {lr:.2e} | {rate:,.0f} tok/s"
                f" | {_clock(elapsed)} elapsed | ETA {_clock(eta)}")
        if self.live:
            if evaluated or s == n or now - self.last_draw > 0.1:
                end = "\n" if evaluated or s == n else ""
                self.stream.write("\r" + line + "\x1b[K" + end)
                self.stream.flush()
                self.last_draw = now
        elif evaluated or s % self.every == 0 or s == n:
            print(line, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if not self.quiet:
            if self.live:
                self.stream.write("\r\x1b[K")
            print(text, file=self.stream, flush=True)


# --- the run -----------------------------------------------------------------------------------


def _check_resume_changes(saved: TrainConfig, overrides: dict) -> list[str]:
    """Changes of training settings on resume: the allowed ones are returned for reporting; any
    other is refused, since it would silently change the data order or the split."""
    changes, refused = [], []
    for key, value in overrides.items():
        old = getattr(saved, key)
        if value == old:
            continue
        (changes if key in RESUMABLE_CHANGES else refused).append(f"{key} {old!r} -> {value!r}")
    if refused:
        raise TrainingError(
            "cannot resume with changed " + "; ".join(refused) + ": these decide the data order, "
            "the batches or the validation split, so the run would not continue itself. Start a "
            "new run (optionally from these weights with --init-from DIR/last.safetensors).")
    return changes


def train(model_config: GPTConfig | None = None, train_config: TrainConfig | None = None,
          data: str | None = None, out: str | None = None, resume: bool = False,
          overrides: dict | None = None, init_from: str | None = None, force: bool = False,
          quiet: bool = False, samples: int = 0, callback=None, stream=None,
          stdout=None) -> TrainResult:
    """Train a model; see the module docstring and `puregpt train --help`.

    model_config: the model's shape (vocab_size is set from the data). train_config: the recipe.
    out: run directory (None: keep nothing on disk). resume: continue the run in `out`, with
    `overrides` (TrainConfig field -> value) applied where allowed. init_from: start from a
    checkpoint's weights and vocabulary with a fresh optimizer (fine-tuning). callback(info) is
    called after every step with a dict (step, loss, lr, tokens, val_loss); returning False
    stops training after that step (a checkpoint is saved when out is set).
    """
    stdout = stdout or sys.stdout
    paths = run_paths(out) if out else None
    ckpt = None
    if resume:
        if not out:
            raise TrainingError("resume needs the run directory (--resume DIR)")
        if not os.path.exists(paths["last"]):
            raise TrainingError(f"nothing to resume in {out}: no last.safetensors there")
        ckpt = load_checkpoint(paths["last"])
        if ckpt.train_config is None or ckpt.optimizer is None or ckpt.rng_state is None:
            raise TrainingError(f"{paths['last']} has no training state (optimizer, RNG); it "
                                f"can seed a new run with --init-from, not be resumed")
        if model_config is not None and model_config != ckpt.config:
            diff = [f"{k} {getattr(ckpt.config, k)!r} -> {getattr(model_config, k)!r}"
                    for k in ckpt.config.to_dict() if getattr(ckpt.config, k)
                    != getattr(model_config, k)]
            raise TrainingError("cannot resume with a different model: " + "; ".join(diff))
        changes = _check_resume_changes(ckpt.train_config, overrides or {})
        tc = TrainConfig.from_dict({**ckpt.train_config.to_dict(), **(overrides or {})})
        config = ckpt.config
        data = data or ckpt.trainer.get("data")
    else:
        changes = []
        tc = train_config or TrainConfig()
        if out and os.path.exists(paths["last"]) and not force:
            step = load_checkpoint(paths["last"]).step
            raise TrainingError(f"{out} already holds a run (at step {step}): continue it with "
                                f"--resume {out}, or choose another --out (or --force to "
                                f"replace it)")
    if resume and ckpt.step >= tc.steps:
        raise TrainingError(f"the run in {out} is already at step {ckpt.step} of {tc.steps}; "
                            f"raise --steps to train further")

    rng = random.Random(tc.seed)
    seed_ckpt = ckpt or (load_checkpoint(init_from) if init_from else None)
    block_size = (seed_ckpt.config if seed_ckpt else model_config or GPTConfig()).block_size
    try:
        corpus = load_corpus(data, tc, block_size, rng,
                             tokenizer=seed_ckpt.tokenizer if seed_ckpt else None,
                             make_tokenizer=_bpe_maker(tc) if tc.tokenizer == "bpe" else None)
    except DataError as e:
        if seed_ckpt and "not in the vocabulary" in str(e):
            raise TrainingError(f"the data does not fit the checkpoint's vocabulary: {e}") from None
        raise

    if resume:
        params, opt_state, start = ckpt.params, ckpt.optimizer, ckpt.step
        rng.setstate(ckpt.rng_state)
        best_val = ckpt.trainer.get("best_val")
        if ckpt.trainer.get("sha256") not in (None, corpus.sha256):
            print(f"warning: {corpus.path} changed since the checkpoint was written; training "
                  f"continues on the new text, so it will not match the original run",
                  file=stream or sys.stderr)
    else:
        if seed_ckpt:
            config = seed_ckpt.config
            if model_config is not None and model_config != config:
                raise TrainingError("--init-from takes the model's shape from the checkpoint; "
                                    "do not pass model flags with it")
            params = seed_ckpt.params
        else:
            config = GPTConfig.from_dict({**(model_config or GPTConfig()).to_dict(),
                                          "vocab_size": corpus.tokenizer.vocab_size})
            params = model.init_params(config, rng)
        opt_state, start, best_val = optim.new_state(params), 0, None

    def snapshot(step):
        if split is not None:  # the helper process holds part of the Adam moments
            split.pull_optimizer_state(opt_state)
        return Checkpoint(config, corpus.tokenizer, params, step, tc, opt_state, rng.getstate(),
                          {"data": corpus.path, "sha256": corpus.sha256, "mode": corpus.mode,
                           "best_val": best_val})

    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C: stop now (checkpoints stay intact)
            raise KeyboardInterrupt
        stop["signal"] = signum

    lock, metrics_file, workers, split, handlers = None, None, None, None, {}
    progress = Progress(tc, start, quiet, stream, stdout)
    grads = model.zeros_like(params)
    result = TrainResult(params, config, corpus.tokenizer, tc, corpus, start, best_val=best_val)
    try:  # everything taken from here on (lock, files, processes, handlers) is given back below
        if out:
            os.makedirs(out, exist_ok=True)
            lock = _lock_run(out)
            for path in paths.values():  # temporary files of a write a crash cut short
                folder, name = os.path.split(path)
                for leftover in glob.glob(os.path.join(glob.escape(folder), f".{name}.*.tmp")):
                    os.unlink(leftover)
            run_info = {"model": config.to_dict(), "train": tc.to_dict(), "data": corpus.path,
                        "sha256": corpus.sha256, "mode": corpus.mode,
                        "tokenizer": corpus.tokenizer.to_dict()}
            atomic_write(paths["config"], [json.dumps(run_info, indent=2).encode() + b"\n"])
            # rows logged after the checkpoint we resume from belong to a future that never was
            keep = [r for r in read_metrics(paths["metrics"]) if r["step"] <= start] \
                if resume and os.path.exists(paths["metrics"]) else []
            atomic_write(paths["metrics"], [json.dumps(r).encode() + b"\n" for r in keep])
            metrics_file = open(paths["metrics"], "a", encoding="utf-8")
            if not resume:
                # a run replaced with --force must not leave its best checkpoint behind:
                # `sample` and `info` prefer best.safetensors, and this run may never write one
                if os.path.exists(paths["best"]):
                    os.unlink(paths["best"])
                save_checkpoint(paths["last"], snapshot(0))

        from .parallel import available_cpus
        n_workers = tc.workers or available_cpus()
        if n_workers > 1 and tc.batch_size > 1:
            from .parallel import WorkerPool
            workers = _start_workers(lambda: WorkerPool(config, min(n_workers, tc.batch_size)))
        elif n_workers > 1 and tc.grad_accum == 1 and tc.grad_clip == 0:
            # one sequence per step: split its backward pass and update across two processes
            # (clipping would need every gradient before any update)
            from .parallel import SplitStep
            split = _start_workers(lambda: SplitStep(config, tc, params, opt_state))

        if not quiet and tc.log_format == "full":
            progress.message(corpus.describe())
            progress.message(f"model: {model.num_params(params):,} parameters | "
                             + ", ".join(f"{k}={v}" for k, v in config.to_dict().items())
                             + (f" | {workers.n} worker processes" if workers else "")
                             + (" | 2 processes (backward split)" if split else ""))
            if resume:
                progress.message(f"resuming {out} at step {start}"
                                 + (": changed " + "; ".join(changes) if changes else ""))

        if out and _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, on_signal)

        t_start = time.perf_counter()
        for step in range(start, tc.steps):
            t0 = time.perf_counter()
            lr = optim.lr_at(step, tc)
            micro = [get_batch(corpus, step, j, tc, config.block_size, rng)
                     for j in range(tc.grad_accum)]
            if split is not None:  # updates the weights too, unless the loss is not finite
                loss, n_tokens = split.step(params, grads, *micro[0], lr, opt_state)
            else:
                optim.zero_grads(grads)
                loss, n_tokens = batch_grads(params, config, micro, grads, workers)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss} at step {step + 1}; stopped without updating the "
                    f"weights" + (f" (the last good checkpoint, {paths['last']}, is kept)"
                                  if out else "") + "; try a lower --lr or --grad-clip 1.0")
            if tc.grad_clip > 0:
                optim.clip_grads(grads, tc.grad_clip)
            if split is None:
                optim.adamw_step(params, grads, opt_state, lr, tc.beta1, tc.beta2, tc.eps,
                                 tc.weight_decay)
            result.step = step + 1
            result.losses.append(loss)
            row = {"step": step + 1, "loss": loss, "lr": lr, "tokens": n_tokens,
                   "tokens_per_s": n_tokens / max(time.perf_counter() - t0, 1e-9),
                   "time": time.perf_counter() - t_start}
            final = step + 1 == tc.steps
            evaluated = bool(corpus.val_examples) and (
                final or (tc.eval_every and (step + 1) % tc.eval_every == 0))
            wants_params = final or evaluated or stop["signal"] is not None or callback
            if split is not None and wants_params:
                split.sync()  # the helper's last updates, otherwise picked up by the next step
            if evaluated:
                val = evaluate(params, config, corpus.val_examples, workers)
                row["val_loss"] = result.last_val = val
                if corpus.mode == "docs":
                    row["novel_frac"] = novelty(params, config, corpus, tc.seed + step)
                if best_val is None or val < best_val:
                    best_val = result.best_val = val
                    if out:
                        save_checkpoint(paths["best"], snapshot(step + 1))
                progress.val, progress.best = val, best_val
                progress.novel = row.get("novel_frac")
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            progress.step(step, loss, lr, n_tokens, evaluated)
            if out and (evaluated or final):
                save_checkpoint(paths["last"], snapshot(step + 1))
                atomic_write(paths["plot"], [render_loss_svg(read_metrics(paths["metrics"]))
                                             .encode()])
            wants_stop = callback is not None and callback(
                {"step": step + 1, "loss": loss, "lr": lr, "tokens": n_tokens,
                 "val_loss": row.get("val_loss")}) is False
            if (stop["signal"] is not None or wants_stop) and not final:
                if out:
                    save_checkpoint(paths["last"], snapshot(step + 1))
                    atomic_write(paths["plot"], [render_loss_svg(read_metrics(paths["metrics"]))
                                                 .encode()])
                if stop["signal"] is not None:
                    raise Interrupted(
                        f"interrupted at step {step + 1} of {tc.steps}; saved {paths['last']}. "
                        f"Resume with: puregpt train --resume {out}", stop["signal"])
                break
    finally:
        if metrics_file:
            metrics_file.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for pool in (workers, split):
            if pool is not None:
                pool.close()
        if lock is not None:
            os.close(lock)  # releases the run directory's lock

    if not quiet and tc.log_format == "full":
        summary = f"trained to step {result.step}"
        if best_val is not None:
            summary += f" | val loss {result.last_val:.4f} (best {best_val:.4f})"
        if out:
            summary += f" | saved in {out}/"
        progress.message(summary)
    if samples:
        if tc.log_format == "microgpt":
            print("--- inference (new, hallucinated names) ---", file=stdout)
        sample_rng = rng if tc.log_format == "microgpt" else random.Random(tc.seed)
        for i in range(samples):
            text = generate_text(params, config, corpus.tokenizer, docs_mode=corpus.mode == "docs",
                                 rng=sample_rng, temperature=0.5)
            print(f"sample {i + 1:2d}: {text}" if tc.log_format == "microgpt" else text,
                  file=stdout)
    return result


def _lock_run(out: str) -> int | None:
    """Refuse to train into a directory another puregpt process is training in: their writes
    would interleave. The lock is an flock on DIR/.lock, held through the returned descriptor
    until training ends (closing it releases the lock, as does the process's end, however it
    ends). Where flock does not exist (Windows), there is no check and None is returned."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TrainingError(f"another puregpt process is training in {out}; wait for it to "
                            f"finish or stop it (its checkpoint then resumes with --resume)")
    # forked worker processes share this descriptor; they end before the lock is released,
    # and if this process dies their pipes break and they exit, so the lock never outlives it
    return fd


def _bpe_maker(tc: TrainConfig):
    """Learn a byte-level BPE vocabulary from the training text (never the validation text)."""
    def make(text):
        from .bpe import BPETokenizer
        return BPETokenizer.train(text, tc.vocab_size)
    return make


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _start_workers(start):
    """Start the worker pool with SIGINT and SIGTERM ignored, a disposition the workers inherit
    (through fork, and through exec with spawn): Ctrl-C on a terminal signals the whole process
    group, and a worker killed by it would fail the step instead of letting the main process
    finish it and save a resumable checkpoint. The workers stop when the main process closes
    the pool, or notice that it died (they watch their parent process)."""
    if not _main_thread():
        return start()
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return start()
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
