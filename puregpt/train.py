"""The training loop, its run directory, and exact resume.

    for step in range(start, steps):          Run.loop, one screen: read it first
        batch -> forward/backward -> clip -> AdamW update -> log -> evaluate -> checkpoint

Everything around the loop is a named step of its own: resume checks (`_resume_point`), the
data (`_load_data`), the weights to start from (`_starting_point`), the run directory and its
lock (`RunDir`), worker processes (`_start_parallel`), signals (`_catch_signals`).

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

import dataclasses
import glob
import json
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field

from . import model, ops, optim
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import RESUMABLE_CHANGES, GPTConfig, TrainConfig
from .data import Corpus, DataError, get_batch, load_corpus
from .fsutil import atomic_write
from .plot import read_metrics, render_loss_svg
from .sample import generate_text


LONG_RUN_SECONDS = 180  # a run estimated to take longer says so before it starts
EXPLODING_EVALS = 4  # a validation loss growing at this many evaluations in a row: a warning


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


class Words:
    """How messages name what they suggest: the command line's flags and commands (CLI), or
    the Python API's arguments and calls (API)."""

    def __init__(self, api: bool):
        self.api = api

    def flag(self, name: str, value=None) -> str:
        """--grad-clip 1.0 (CLI) or grad_clip=1.0 (API)."""
        if self.api:
            return name if value is None else f"{name}={value!r}"
        flag = "--" + name.replace("_", "-")
        return flag if value is None else f"{flag} {value}"

    def resume(self, out: str) -> str:
        return (f"puregpt.train(out={out!r}, resume=True)" if self.api else
                f"puregpt train --resume {shlex.quote(out)}")


CLI, API = Words(api=False), Words(api=True)


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
    with ops.collector_paused():
        for (inputs, targets), n in zip(micro_batches, counts):
            # d(mean over all)/d(mean over this micro-batch) = n / total
            if workers is not None:
                micro_loss = workers.loss_and_grads(params, inputs, targets, grads, n / total)
            else:
                micro_loss = model.loss_and_grads(params, config, inputs, targets, grads,
                                                  n / total)[0]
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
            with ops.collector_paused():
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


def fit_fields(fields: list[tuple[int, str, str]], width: int) -> str:
    """Join (priority, text, short text) fields with " | " into at most `width` characters, as
    tqdm does: the lowest-priority fields are shortened first, then dropped (priority 0: never
    dropped), and what still does not fit is cut. The fields keep their order."""
    texts = [text for _, text, _ in fields]
    line = " | ".join(t for t in texts if t)
    for prio in sorted({p for p, _, _ in fields if p > 0}, reverse=True):
        if len(line) <= width:
            break
        for i, (p, text, short) in enumerate(fields):
            if p == prio:
                texts[i] = short
        line = " | ".join(t for t in texts if t)
        if len(line) > width:
            for i, (p, _, _) in enumerate(fields):
                if p == prio:
                    texts[i] = ""
            line = " | ".join(t for t in texts if t)
    return line[:width]


def terminal_width(stream, default: int = 80) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or default
    except (AttributeError, OSError, ValueError):
        return default


class Progress:
    """A live line on a terminal (fitted to its width, redrawn in place); plain lines every
    log_every steps otherwise; or microgpt's exact per-step lines on stdout.

    Throughput counts training time only (evaluations are timed apart), and the ETA adds the
    evaluations still to come (measured once one has run; estimated before)."""

    def __init__(self, tc: TrainConfig, start_step: int, quiet: bool, stream=None, out=None,
                 evaluates: bool = True):
        self.tc, self.quiet = tc, quiet
        self.stream, self.out = stream or sys.stderr, out or sys.stdout
        self.live = not quiet and tc.log_format == "full" and self.stream.isatty()
        self.every = tc.log_every or max(1, tc.steps // 20)
        self.t0, self.start_step, self.last_draw = time.perf_counter(), start_step, 0.0
        self.tokens, self.evaluates = 0, evaluates
        self.val = self.best = self.novel = self.val_step = None
        self.eval_seconds, self.evals = 0.0, 0

    def evaluated(self, step: int, val: float, best: float, novel, seconds: float) -> None:
        self.val, self.best, self.novel, self.val_step = val, best, novel, step + 1
        self.eval_seconds += seconds
        self.evals += 1

    def evals_left(self, s: int) -> int:
        """Evaluations after step s (1-based): every eval_every steps, and at the last step."""
        if not self.evaluates:
            return 0
        n, every = self.tc.steps, self.tc.eval_every
        left = (n // every - s // every) if every else 0
        return left + (0 if s >= n or (every and n % every == 0) else 1)

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
        if self.live and not (evaluated or s == n or now - self.last_draw > 0.1):
            return
        if not self.live and not (evaluated or s % self.every == 0 or s == n):
            return
        line = self.line(s, loss, lr, now)
        if self.live:
            end = "\n" if evaluated or s == n else ""
            self.stream.write("\r" + line + "\x1b[K" + end)
            self.stream.flush()
            self.last_draw = now
        else:
            print(line, file=self.stream, flush=True)

    def line(self, s: int, loss: float, lr: float, now: float) -> str:
        n = self.tc.steps
        elapsed = now - self.t0
        training = max(elapsed - self.eval_seconds, 1e-9)
        done = s - self.start_step
        per_eval = self.eval_seconds / self.evals if self.evals else 0.0
        eta = training / done * (n - s) + per_eval * self.evals_left(s) if done else 0.0
        fields = [(0, f"step {s:4d} / {n:4d}", ""), (0, f"loss {loss:.4f}", "")]
        fresh = self.val_step == s
        if self.val is not None and (fresh or self.live):  # a plain line: only when new
            age = "" if fresh else f" @{self.val_step}"  # an older evaluation says its step
            fields.append((2, f"val {self.val:.4f} (best {self.best:.4f}){age}",
                           f"val {self.val:.4f}{age}"))
            if self.novel is not None:  # share of sampled documents not copied from training
                fields.append((7, f"novel {self.novel:.0%}", ""))
        fields += [(6, f"lr {lr:.2e}", ""), (4, f"{self.tokens / training:,.0f} tok/s", ""),
                   (5, f"{_clock(elapsed)} elapsed", ""),
                   (3, f"ETA {_clock(eta)}", "")]
        if not self.live:
            return " | ".join(text for _, text, _ in fields)
        # one column short of the width: a line that fills it wraps on some terminals
        return fit_fields(fields, terminal_width(self.stream) - 1)

    def message(self, text: str) -> None:
        if not self.quiet:
            if self.live:
                self.stream.write("\r\x1b[K")
            print(text, file=self.stream, flush=True)


# --- the run -----------------------------------------------------------------------------------


def train(model_config: GPTConfig | None = None, train_config: TrainConfig | None = None,
          data: str | None = None, out: str | None = None, resume: bool = False,
          overrides: dict | None = None, init_from: str | None = None, force: bool = False,
          quiet: bool = False, samples: int = 0, callback=None, stream=None,
          stdout=None, words: Words = CLI) -> TrainResult:
    """Train a model; see the module docstring and `puregpt train --help`.

    model_config: the model's shape (vocab_size is set from the data). train_config: the recipe.
    out: run directory (None: keep nothing on disk). resume: continue the run in `out`, with
    `overrides` (TrainConfig field -> value) applied where allowed. init_from: start from a
    checkpoint's weights and vocabulary with a fresh optimizer (fine-tuning). callback(info) is
    called after every step with a dict (step, loss, lr, tokens, val_loss); returning False
    stops training after that step (a checkpoint is saved when out is set). words: how
    messages name the settings they suggest (CLI flags, or API arguments).
    """
    if resume and not out:
        raise TrainingError("resume needs the run directory (" + (
            "out=DIR" if words.api else "--resume DIR") + ")")
    run_dir = RunDir(out, create=not resume, words=words) if out else None
    try:  # the directory is locked before anything in it is read: see RunDir
        run = Run(run_dir, model_config, train_config, data, resume, overrides, init_from,
                  force, quiet, callback, stream, stdout, words)
        try:
            run.loop()
        finally:
            run.close()
    finally:
        if run_dir is not None:
            run_dir.close()
    run.finish(samples)
    return run.result


class Run:
    """One training run: its state (weights, optimizer, data, RNG), the loop, and the
    bookkeeping around it. The constructor is the setup; `loop` is the algorithm."""

    def __init__(self, run_dir, model_config, train_config, data, resume, overrides, init_from,
                 force, quiet, callback, stream, stdout, words):
        self.dir, self.quiet, self.callback, self.words = run_dir, quiet, callback, words
        self.stdout, self.stderr = stdout or sys.stdout, stream or sys.stderr
        out = run_dir.path if run_dir else None
        ckpt, changes = None, []
        if resume:
            ckpt, tc, changes = _resume_point(run_dir, model_config, overrides or {}, words)
            data = data or ckpt.trainer.get("data")
        else:
            tc = train_config or TrainConfig()
            if run_dir is not None and not force:
                run_dir.refuse_to_replace()
        self.tc, self.rng = tc, random.Random(tc.seed)
        if model_config is not None and not resume:  # too big a model fails before the data
            model.check_size(dataclasses.replace(model_config, vocab_size=max(
                model_config.vocab_size, tc.vocab_size if tc.tokenizer == "bpe" else 2)))
        seed_ckpt = ckpt or (load_checkpoint(init_from) if init_from else None)
        self.corpus = _load_data(data, tc, self.rng, seed_ckpt, model_config)
        (self.config, self.params, self.opt_state, self.start,
         self.best_val) = _starting_point(ckpt, seed_ckpt, model_config, self.corpus, self.rng,
                                          words)
        if ckpt is not None and ckpt.trainer.get("sha256") not in (None, self.corpus.sha256):
            print(f"warning: {self.corpus.path} changed since the checkpoint was written; "
                  f"training continues on the new text, so it will not match the original run",
                  file=self.stderr)
        self.grads = model.zeros_like(self.params)
        self.result = TrainResult(self.params, self.config, self.corpus.tokenizer, tc,
                                  self.corpus, self.start, best_val=self.best_val)
        self.progress = Progress(tc, self.start, quiet, stream, stdout,
                                 bool(self.corpus.val_examples))
        self.workers = self.split = None
        self.stop_signal, self._handlers = None, {}
        self.first_loss, self.vals, self.warned = None, [], False  # watch_loss's memory
        if run_dir is not None:
            run_dir.begin(self._run_info(), resume, self.start, self.snapshot)
            # before the workers start: a signal meanwhile waits for them (parallel.signals_held)
            # and then stops the run after its first step, saved, like one at any later step
            self._handlers = _catch_signals(self._on_signal)
        try:
            self.workers, self.split = _start_parallel(self.config, tc, self.params,
                                                       self.opt_state)
            self._describe(resume, out, changes)
        except BaseException:
            self.close()  # (the handlers go back: train() gets no Run to close)
            raise

    # --- the loop: what happens in one training step ---

    def loop(self) -> None:
        tc = self.tc
        self.t_start = time.perf_counter()
        for step in range(self.start, tc.steps):
            t0 = time.perf_counter()
            lr = optim.lr_at(step, tc)
            batch = [get_batch(self.corpus, step, j, tc, self.config.block_size, self.rng)
                     for j in range(tc.grad_accum)]  # grad_accum micro-batches
            loss, n_tokens = self.forward_backward(batch, lr)
            self.check_finite(loss, step)
            if tc.grad_clip > 0:
                optim.clip_grads(self.grads, tc.grad_clip)
            self.update(lr)
            row = self.record(step, loss, lr, n_tokens, t0)
            evaluated = self.evaluation_due(step)
            if evaluated or self.wants_params(step):
                self.sync()
            if evaluated:
                self.evaluate(step, row)
            self.log(step, row, evaluated)
            if evaluated or step + 1 == tc.steps:
                self.save(step + 1)
            if self.should_stop(step, row):
                break

    # --- the steps of the loop ---

    def forward_backward(self, batch, lr) -> tuple[float, int]:
        """The gradient of the mean loss over the batch, into self.grads; (loss, positions). The
        split step (one sequence on two processes) also updates the weights, as it goes."""
        if self.split is not None:  # updates the weights too, unless the loss is not finite
            return self.split.step(self.params, self.grads, *batch[0], lr, self.opt_state)
        optim.zero_grads(self.grads)
        return batch_grads(self.params, self.config, batch, self.grads, self.workers)

    def check_finite(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss} at step {step + 1}; stopped without updating the "
                f"weights" + (f" (the last good checkpoint, {self.dir.paths['last']}, is kept)"
                              if self.dir else "") + f"; try a lower {self.words.flag('lr')} or "
                f"{self.words.flag('grad_clip', 1.0)}")

    def update(self, lr: float) -> None:
        if self.split is None:  # (the split step has updated the weights already)
            tc = self.tc
            optim.adamw_step(self.params, self.grads, self.opt_state, lr, tc.beta1, tc.beta2,
                             tc.eps, tc.weight_decay)

    def record(self, step, loss, lr, n_tokens, t0) -> dict:
        """The step's metrics row (and the result's bookkeeping)."""
        self.result.step = step + 1
        self.result.losses.append(loss)
        self.watch_loss(step, loss)
        now = time.perf_counter()
        return {"step": step + 1, "loss": loss, "lr": lr, "tokens": n_tokens,
                "tokens_per_s": n_tokens / max(now - t0, 1e-9), "time": now - self.t_start}

    def evaluation_due(self, step: int) -> bool:
        every, s = self.tc.eval_every, step + 1
        return bool(self.corpus.val_examples) and (s == self.tc.steps or
                                                   bool(every and s % every == 0))

    def wants_params(self, step: int) -> bool:
        """Whether this step's end needs every weight in place (a save, a callback)."""
        return step + 1 == self.tc.steps or self.stop_signal is not None or \
            self.callback is not None

    def sync(self) -> None:
        if self.split is not None:  # the helper's last updates, otherwise picked up next step
            self.split.sync()

    def evaluate(self, step: int, row: dict) -> None:
        """Validation loss (and, for documents, novelty) into the row; keeps the best."""
        t0 = time.perf_counter()
        val = evaluate(self.params, self.config, self.corpus.val_examples, self.workers)
        row["val_loss"] = self.result.last_val = val
        if self.corpus.mode == "docs":
            row["novel_frac"] = novelty(self.params, self.config, self.corpus,
                                        self.tc.seed + step)
        self.watch_loss(step, row["loss"], val)
        if self.best_val is None or val < self.best_val:
            self.best_val = self.result.best_val = val
            if self.dir:
                self.dir.save_best(self.snapshot(step + 1))
        self.progress.evaluated(step, val, self.best_val, row.get("novel_frac"),
                                time.perf_counter() - t0)

    def log(self, step: int, row: dict, evaluated: bool) -> None:
        if self.dir:
            self.dir.append_metrics(row)
        self.progress.step(step, row["loss"], row["lr"], row["tokens"], evaluated)

    def save(self, step: int) -> None:
        """The resumable checkpoint and the loss plot (when the run has a directory)."""
        if self.dir:
            self.dir.save_last(self.snapshot(step))

    def should_stop(self, step: int, row: dict) -> bool:
        """After a signal or a callback returning False: save, then stop (a signal raises
        Interrupted, naming the command that resumes)."""
        wants_stop = self.callback is not None and self.callback(
            {"step": step + 1, "loss": row["loss"], "lr": row["lr"], "tokens": row["tokens"],
             "val_loss": row.get("val_loss")}) is False
        if not (self.stop_signal is not None or wants_stop) or step + 1 == self.tc.steps:
            return False
        self.save(step + 1)
        if self.stop_signal is not None:
            raise Interrupted(
                f"interrupted at step {step + 1} of {self.tc.steps}; saved "
                f"{self.dir.paths['last']}. Resume with: {self.words.resume(self.dir.path)}",
                self.stop_signal)
        return True

    # --- bookkeeping ---

    def snapshot(self, step: int) -> Checkpoint:
        """Everything a resume needs, as a checkpoint."""
        if self.split is not None:  # the helper process holds part of the Adam moments
            self.split.pull_optimizer_state(self.opt_state)
        corpus = self.corpus
        return Checkpoint(self.config, corpus.tokenizer, self.params, step, self.tc,
                          self.opt_state, self.rng.getstate(),
                          {"data": corpus.path, "sha256": corpus.sha256, "mode": corpus.mode,
                           "best_val": self.best_val})

    def _run_info(self) -> dict:
        corpus = self.corpus
        return {"model": self.config.to_dict(), "train": self.tc.to_dict(), "data": corpus.path,
                "sha256": corpus.sha256, "mode": corpus.mode,
                "tokenizer": corpus.tokenizer.to_dict()}

    def _describe(self, resume: bool, out, changes: list[str]) -> None:
        if self.quiet or self.tc.log_format != "full":
            return
        message = self.progress.message
        message(self.corpus.describe())
        message(f"model: {model.num_params(self.params):,} parameters | "
                + ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())
                + (f" | {self.workers.n} worker processes" if self.workers else "")
                + (" | 2 processes (backward split)" if self.split else ""))
        if resume:
            message(f"resuming {out} at step {self.start}"
                    + (": changed " + "; ".join(changes) if changes else ""))
        tc, w = self.tc, self.words
        if tc.warmup > tc.steps:
            message(f"warning: {w.flag('warmup', tc.warmup)} exceeds {w.flag('steps', tc.steps)}"
                    f": the learning rate never reaches {w.flag('lr', tc.lr)} (it ends at "
                    f"{optim.lr_at(tc.steps - 1, tc):.3g})")
        seconds, step_seconds = self.estimate_seconds()
        if seconds > LONG_RUN_SECONDS:
            message(f"this run will take about {_clock(seconds)} ({tc.steps - self.start:,} "
                    f"steps of {step_seconds:.2f} s, measured, with evaluations); fewer "
                    f"{w.flag('steps')} or a smaller model are faster, and Ctrl-C stops it "
                    f"with a checkpoint that resumes")

    def estimate_seconds(self) -> tuple[float, float]:
        """(the run's remaining time, one step's), estimated. Only a run that may be long is
        measured: one forward/backward pass of the first batch into throwaway gradients (the
        real RNG, weights and gradients untouched)."""
        tc, config = self.tc, self.config
        tokens = tc.batch_size * tc.grad_accum * config.block_size
        steps = tc.steps - self.start
        # ~6 multiply-adds per parameter and token (forward 2, backward 4), at ~50 M/s
        if steps <= 0 or 6 * model.num_params(self.params) * tokens * steps < \
                LONG_RUN_SECONDS * 50e6 / 4:
            return 0.0, 0.0
        rng = random.Random()
        rng.setstate(self.rng.getstate())
        batch = [get_batch(self.corpus, self.start, j, tc, config.block_size, rng)
                 for j in range(tc.grad_accum)]
        t0 = time.perf_counter()
        batch_grads(self.params, config, batch, model.zeros_like(self.params), self.workers)
        step_seconds = time.perf_counter() - t0
        evals = Progress(tc, self.start, True, evaluates=bool(self.corpus.val_examples))
        per_eval = step_seconds / 3 * min(tc.eval_tokens or 10**9, sum(
            len(t) for _, t in self.corpus.val_examples)) / tokens  # forward only
        return step_seconds * steps + per_eval * evals.evals_left(self.start), step_seconds

    def watch_loss(self, step: int, loss: float, val: float | None = None) -> None:
        """One warning when the loss explodes: 10x the first step's, or a validation loss that
        grew at EXPLODING_EVALS evaluations in a row."""
        if self.warned:
            return
        if self.first_loss is None:
            self.first_loss = loss
        if val is not None:
            self.vals.append(val)
        grew = len(self.vals) > EXPLODING_EVALS and all(
            a < b for a, b in zip(self.vals[-EXPLODING_EVALS - 1:], self.vals[-EXPLODING_EVALS:]))
        if loss > 10 * self.first_loss or grew:
            what = (f"the training loss ({loss:.4g}) is over 10x the first step's "
                    f"({self.first_loss:.4g})" if not grew else
                    f"the validation loss grew at {EXPLODING_EVALS} evaluations in a row")
            self.warned = True
            if not self.quiet:
                w = self.words
                self.progress.message(
                    f"warning: at step {step + 1} {what}: {w.flag('lr', self.tc.lr)} may be too "
                    f"high (try {w.flag('lr', self.tc.lr / 10)}, or {w.flag('grad_clip', 1.0)})")

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now (checkpoints stay intact)
            raise KeyboardInterrupt
        self.stop_signal = signum

    def close(self) -> None:
        """Give back what the setup took: signal handlers, worker processes."""
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        for pool in (self.workers, self.split):
            if pool is not None:
                pool.close()

    def finish(self, samples: int) -> None:
        """The summary (where the model is, what to try next), then `samples` documents (or
        passages of continuous text) from the trained model, under a header."""
        tc, result, stdout = self.tc, self.result, self.stdout
        full = tc.log_format == "full"
        if not self.quiet and full:
            summary = f"trained to step {result.step}"
            if self.best_val is not None:
                summary += f" | val loss {result.last_val:.4f} (best {self.best_val:.4f})"
            self.progress.message(summary)
            if self.dir:
                run = shlex.quote(self.dir.path)
                kept = "best.safetensors (the lowest validation loss), last.safetensors" \
                    if os.path.exists(self.dir.paths["best"]) else "last.safetensors"
                nxt = (f"model = puregpt.load({self.dir.path!r}); puregpt.generate(model)"
                       if self.words.api else
                       f"puregpt sample {run}   (or: puregpt info {run}; puregpt train "
                       f"--resume {run} --steps {tc.steps * 2} to train on)")
                self.progress.message(f"saved in {self.dir.path}/: {kept}, metrics.jsonl, "
                                      f"loss.svg\nnext: {nxt}")
        if samples:
            docs = self.corpus.mode == "docs"
            if not full:
                print("--- inference (new, hallucinated names) ---", file=stdout)
            elif docs:
                print(f"--- {samples} samples from the trained model (temperature 0.5) ---",
                      file=stdout)
            sample_rng = self.rng if not full else random.Random(tc.seed)
            for i in range(samples):
                if full and not docs:  # passages of text need a line of their own between
                    print(f"--- sample {i + 1} of {samples} (temperature 0.5) ---", file=stdout)
                text = generate_text(self.params, self.config, self.corpus.tokenizer,
                                     docs_mode=docs, rng=sample_rng, temperature=0.5)
                print(f"sample {i + 1:2d}: {text}" if not full else text, file=stdout)


# --- the run's setup, step by step -------------------------------------------------------------


def _resume_point(run_dir, model_config, overrides: dict, words: Words = CLI):
    """The checkpoint to resume, the training config with the overrides applied, and the
    changes made (allowed ones; any other is refused)."""
    out, last = run_dir.path, run_dir.paths["last"]
    if not os.path.exists(last):
        raise TrainingError(f"nothing to resume in {out}: no last.safetensors there")
    ckpt = load_checkpoint(last)
    if ckpt.train_config is None or ckpt.optimizer is None or ckpt.rng_state is None:
        raise TrainingError(f"{last} has no training state (optimizer, RNG); it can seed a new "
                            f"run with {words.flag('init_from')}, not be resumed")
    if model_config is not None and model_config != ckpt.config:
        diff = [f"{k} {getattr(ckpt.config, k)!r} -> {getattr(model_config, k)!r}"
                for k in ckpt.config.to_dict()
                if getattr(ckpt.config, k) != getattr(model_config, k)]
        raise TrainingError("cannot resume with a different model: " + "; ".join(diff))
    changes = _check_resume_changes(ckpt.train_config, overrides, words)
    tc = TrainConfig.from_dict({**ckpt.train_config.to_dict(), **overrides})
    if ckpt.step >= tc.steps:
        raise TrainingError(f"the run in {out} is already at step {ckpt.step} of {tc.steps}; "
                            f"raise {words.flag('steps')} to train further")
    return ckpt, tc, changes


def _check_resume_changes(saved: TrainConfig, overrides: dict, words: Words = CLI) -> list[str]:
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
            f"new run (optionally from these weights with {words.flag('init_from')} "
            f"DIR/last.safetensors).")
    return changes


def _load_data(data, tc: TrainConfig, rng, seed_ckpt, model_config) -> Corpus:
    """The corpus, encoded with the checkpoint's vocabulary when there is one (resume,
    fine-tuning), else with a new one learned from the training text."""
    block_size = (seed_ckpt.config if seed_ckpt else model_config or GPTConfig()).block_size
    try:
        return load_corpus(data, tc, block_size, rng,
                           tokenizer=seed_ckpt.tokenizer if seed_ckpt else None,
                           make_tokenizer=_bpe_maker(tc) if tc.tokenizer == "bpe" else None)
    except DataError as e:
        if seed_ckpt and "not in the vocabulary" in str(e):
            raise TrainingError(f"the data does not fit the checkpoint's vocabulary: {e}") from None
        raise


def _starting_point(ckpt, seed_ckpt, model_config, corpus: Corpus, rng, words: Words = CLI):
    """(config, params, optimizer state, first step, best validation loss so far): the resumed
    run's, a fine-tuned checkpoint's weights with a fresh optimizer, or new weights."""
    if ckpt is not None:  # resume
        rng.setstate(ckpt.rng_state)
        return (ckpt.config, ckpt.params, ckpt.optimizer, ckpt.step,
                ckpt.trainer.get("best_val"))
    if seed_ckpt is not None:  # --init-from
        if model_config is not None and model_config != seed_ckpt.config:
            raise TrainingError(f"{words.flag('init_from')} takes the model's shape from the "
                                f"checkpoint; do not pass model settings with it")
        config, params = seed_ckpt.config, seed_ckpt.params
    else:
        config = GPTConfig.from_dict({**(model_config or GPTConfig()).to_dict(),
                                      "vocab_size": corpus.tokenizer.vocab_size})
        params = model.init_params(config, rng)
    return config, params, optim.new_state(params), 0, None


def _bpe_maker(tc: TrainConfig):
    """Learn a byte-level BPE vocabulary from the training text (never the validation text)."""
    def make(text):
        from .bpe import BPETokenizer
        return BPETokenizer.train(text, tc.vocab_size)
    return make


def _start_parallel(config, tc: TrainConfig, params, opt_state):
    """(worker pool, split step): processes that share each step, or (None, None) on one."""
    if tc.workers == 1:  # one process: multiprocessing is not even imported (~10 ms)
        return None, None
    from .parallel import available_cpus
    n_workers = tc.workers or available_cpus()
    if n_workers > 1 and tc.batch_size > 1:
        from .parallel import WorkerPool
        return WorkerPool(config, min(n_workers, tc.batch_size)), None
    if n_workers > 1 and tc.grad_accum == 1 and tc.grad_clip == 0:
        # one sequence per step: split its backward pass and update across two processes
        # (clipping would need every gradient before any update)
        from .parallel import SplitStep
        return None, SplitStep(config, tc, params, opt_state)
    return None, None


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _catch_signals(handler) -> dict:
    """SIGINT and SIGTERM call handler (which lets the step finish and save) instead of
    killing the run; returns the previous handlers. Only the main thread can set handlers."""
    if not _main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


# --- the run directory -------------------------------------------------------------------------


class RunDir:
    """A run directory, locked for one trainer from the moment it is opened until close().

    The lock comes first, before anything in the directory is read: two trainers started at
    once on one --out cannot both see "no run here" and both train (the second would silently
    replace the first's finished run). It is an flock on DIR/.lock; close() removes the file
    while still holding the lock, and a trainer whose lock file was removed under it takes the
    new one, so no empty .lock stays behind. A new directory that ends up holding nothing (the
    data was refused, say) is removed again. Where flock does not exist (Windows), there is no
    lock."""

    def __init__(self, out: str, create: bool, words: Words = CLI):
        self.path, self.paths, self.words = out, run_paths(out), words
        self.created, self.metrics = False, None
        if not os.path.isdir(out):
            # (isdir again: another trainer may have made the directory since the first look)
            if os.path.lexists(out) and not os.path.isdir(out):
                raise TrainingError(f"{words.flag('out', out)} exists and is not a directory")
            if not create:
                raise TrainingError(f"nothing to resume in {out}: no last.safetensors there")
            parent = os.path.dirname(os.path.abspath(out))
            os.makedirs(parent, exist_ok=True)
            try:
                os.mkdir(out)
                self.created = True
            except FileExistsError:  # another trainer made it just now: the lock decides
                pass
        self.lock = _lock_run(out, words)

    def refuse_to_replace(self) -> None:
        if os.path.exists(self.paths["last"]):
            step = load_checkpoint(self.paths["last"]).step
            w = self.words
            resume, force = ((w.resume(self.path), "force=True") if w.api else
                             (f"--resume {self.path}", "--force"))
            raise TrainingError(f"{self.path} already holds a run (at step {step}): continue it "
                                f"with {resume}, or choose another {w.flag('out')} (or {force} "
                                f"to replace it)")

    def begin(self, run_info: dict, resume: bool, start: int, snapshot) -> None:
        """Ready the directory for training from step `start`: leftovers of a write a crash cut
        short removed, config.json written, metrics.jsonl cut back to the resumed step (rows
        after it belong to a future that never was), a new run's first checkpoint."""
        for path in self.paths.values():
            folder, name = os.path.split(path)
            for leftover in glob.glob(os.path.join(glob.escape(folder), f".{name}.*.tmp")):
                os.unlink(leftover)
        atomic_write(self.paths["config"], [json.dumps(run_info, indent=2).encode() + b"\n"])
        metrics = self.paths["metrics"]
        keep = [r for r in read_metrics(metrics) if r["step"] <= start] \
            if resume and os.path.exists(metrics) else []
        atomic_write(metrics, [json.dumps(r).encode() + b"\n" for r in keep])
        self.metrics = open(metrics, "a", encoding="utf-8")
        if not resume:
            # a run replaced with --force must not leave its best checkpoint behind: `sample`
            # and `info` prefer best.safetensors, and this run may never write one
            if os.path.exists(self.paths["best"]):
                os.unlink(self.paths["best"])
            save_checkpoint(self.paths["last"], snapshot(0))

    def append_metrics(self, row: dict) -> None:
        try:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        except OSError as e:  # disk full: say which file
            raise OSError(e.errno, f"cannot write {self.paths['metrics']}: {e.strerror}") from e

    def save_best(self, ckpt: Checkpoint) -> None:
        save_checkpoint(self.paths["best"], ckpt)

    def save_last(self, ckpt: Checkpoint) -> None:
        """The resumable checkpoint, and the loss plot redrawn from the metrics so far."""
        save_checkpoint(self.paths["last"], ckpt)
        atomic_write(self.paths["plot"],
                     [render_loss_svg(read_metrics(self.paths["metrics"])).encode()])

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.lock is not None:
            _unlock_run(self.path, self.lock)
            self.lock = None
        if self.created and not os.listdir(self.path):  # nothing was written: leave no trace
            os.rmdir(self.path)


def _lock_run(out: str, words: Words = CLI) -> int | None:
    """Refuse to train into a directory another puregpt process is training in: their writes
    would interleave. The lock is an flock on DIR/.lock, held through the returned descriptor
    until _unlock_run (closing it releases the lock, as does the process's end, however it
    ends). Where flock does not exist (Windows), there is no check and None is returned."""
    try:
        import fcntl
    except ImportError:
        return None
    path = os.path.join(out, ".lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise TrainingError(f"another puregpt process is training in {out}; wait for it to "
                                f"finish or stop it (its checkpoint then resumes with "
                                f"{words.resume(out)})")
        try:  # the file we locked may have been removed by the trainer that held it: retry
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    # forked worker processes share this descriptor; they end before the lock is released,
    # and if this process dies their pipes break and they exit, so the lock never outlives it
    return fd


def _unlock_run(out: str, fd: int) -> None:
    """Remove the lock file while holding the lock, then release it (see RunDir)."""
    try:
        os.unlink(os.path.join(out, ".lock"))
    except FileNotFoundError:
        pass
    os.close(fd)
