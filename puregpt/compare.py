"""`puregpt compare`: a grid of configs, each trained with several seeds on a pool of processes,
and a report that says what each change is worth (puregpt/report.py draws it).

    grid = build_grid(base_model, base_train, ["norm_position=pre,post"], seeds=3)
    compare(grid, out="cmp", jobs=2)        -> cmp/compare.json, cmp/<config>/seed-<s>/, report

Every config x seed is an ordinary run directory, trained by `train.train` (so `puregpt sample`,
`info`, `explain` work on each), one process per run (workers=1) and `jobs` runs at once. All
configs share the data split and order (data_seed is fixed to the base seed unless given) and the
token budget (--steps, or --tokens turned into steps per config). The grid is recorded in
DIR/compare.json: the same command again skips finished runs and resumes interrupted ones from
their checkpoints (bit-exact: train's resume is), and a DIR that holds another grid is refused.

Ctrl-C: the runs live in process groups of their own (so a terminal's Ctrl-C reaches only this
process); it forwards one SIGTERM to each, which train answers by finishing the step, saving a
resumable checkpoint and stopping, waits for them all, redraws the report, and stops.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, fields

from .config import CHOICES, ConfigError, GPTConfig, TrainConfig
from .fsutil import atomic_write, brief
from .parallel import signals_held, unblock_signals
from .train import Interrupted, TrainingError, _clock, _main_thread, terminal_width

MANIFEST = "compare.json"
FORMAT = 1
# Training settings a grid may not vary: the seeds are the grid's own axis (--seeds), each run
# uses one process, and logging does not change a run.
NOT_VARIED = {"seed": "use --seeds N", "data_seed": "every config shares the data split",
              "workers": "each run uses one process (--jobs sets how many run at once)",
              "log_every": "it changes no result", "log_format": "it changes no result"}
# What tells two runs apart besides their seed without changing what they learn (grouping
# existing runs, `puregpt compare RUN...`)
IGNORED = ("seed", "workers", "log_every", "log_format", "eval_tokens", "eval_every")


@dataclass
class Config:
    label: str  # the varied fields, "norm-position=post, pos=none" ("base" without --vary)
    name: str  # its directory under DIR
    model: dict  # GPTConfig fields (vocab_size comes from the data)
    train: dict  # TrainConfig fields, seed excluded (the grid's seeds give it)
    dirs: list | None = None  # [(seed, run directory)] of existing runs (compare RUN...)


@dataclass
class Grid:
    configs: list  # [Config]; configs[0] is the baseline unless `baseline` names another
    seeds: list  # [int]
    data: str | None  # the text file (None: the bundled names)
    vary: list  # [(field, [values])], as given
    baseline: str  # the baseline config's label
    tokens: int | None = None  # the token budget, if given instead of steps

    def to_dict(self) -> dict:
        return {"format": FORMAT, "data": self.data, "seeds": self.seeds, "tokens": self.tokens,
                "vary": [[f, v] for f, v in self.vary], "baseline": self.baseline,
                "configs": [{"label": c.label, "name": c.name, "model": c.model,
                             "train": c.train} for c in self.configs]}

    def runs(self, out: str) -> list[tuple[Config, int, str]]:
        """(config, seed, run directory) of every run, seed by seed: the first seed of every
        config comes first, so an early report already shows every config."""
        return [(c, s, os.path.join(out, c.name, f"seed-{s}"))
                for s in self.seeds for c in self.configs]


# --- the grid ----------------------------------------------------------------------------------


def _field(name: str):
    """(part, dataclass field) of a --vary name ("norm-position" or "norm_position")."""
    key = name.strip().replace("-", "_")
    if key in NOT_VARIED:
        raise ConfigError(f"--vary {name}: cannot be varied ({NOT_VARIED[key]})")
    for part, cls in (("model", GPTConfig), ("train", TrainConfig)):
        for f in fields(cls):
            if f.name == key and not (cls is GPTConfig and key == "vocab_size"):
                return part, f
    known = sorted({f.name.replace("_", "-") for cls in (GPTConfig, TrainConfig)
                    for f in fields(cls)} - {k.replace("_", "-") for k in NOT_VARIED})
    raise ConfigError(f"--vary {name}: unknown field {brief(name)} (fields: {', '.join(known)})")


def _value(f, text: str, spec: str):
    """One --vary value, typed as its field."""
    text = text.strip()
    try:
        if f.type == "bool":
            low = text.lower()
            if low in ("on", "true", "yes", "1"):
                return True
            if low in ("off", "false", "no", "0"):
                return False
            raise ValueError
        if f.type == "int | None" and text.lower() == "auto":  # n_kv_head, mlp_hidden: unset
            return None
        return {"int": int, "float": float, "str": str, "int | None": int}[f.type](text)
    except ValueError:
        kind = "on or off" if f.type == "bool" else "an int or auto" if f.type == "int | None" \
            else f"an {f.type}" if f.type == "int" else f"a {f.type}"
        raise ConfigError(f"--vary {spec}: {brief(text)} is not {kind}") from None


def parse_vary(specs: list[str]) -> list[tuple[str, str, object, list]]:
    """[(flag name, part, field, values)] of --vary FIELD=V1,V2,... options. Each value is
    checked on its own against the field's type and choices here; combinations are checked
    by build_grid."""
    out, seen = [], set()
    for spec in specs:
        name, eq, values = spec.partition("=")
        if not eq or not name.strip() or not values.strip():
            raise ConfigError(f"--vary {spec}: expected FIELD=VALUE1,VALUE2 (e.g. --vary "
                              f"norm-position=pre,post)")
        part, f = _field(name)
        if f.name in seen:
            raise ConfigError(f"--vary {spec}: {f.name} is varied twice; give its values once")
        seen.add(f.name)
        vals = [_value(f, v, spec) for v in values.split(",")]
        if len(set(vals)) != len(vals):
            raise ConfigError(f"--vary {spec}: a value is repeated")
        choices = CHOICES.get(f.name)
        for v in vals:
            if choices and v not in choices:
                raise ConfigError(f"--vary {spec}: {f.name} must be one of "
                                  f"{', '.join(choices)}; got {brief(v)}")
        out.append((f.name.replace("_", "-"), part, f.name, vals))
    return out


def _show(v) -> str:
    return ("on" if v else "off") if isinstance(v, bool) else f"{v:g}" if isinstance(v, float) \
        else str(v)


def dir_name(label: str) -> str:
    """A directory name for a config label: "norm-position=post, pos=none" ->
    "norm-position-post_pos-none"."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "-", label.replace(", ", "_").replace("=", "-"))
    return name.strip("-") or "base"


def build_grid(base_model: dict, base_train: dict, vary: list[str], seeds: int,
               data: str | None = None, tokens: int | None = None,
               baseline: str | None = None) -> Grid:
    """Every combination of the --vary values over the base settings, checked: an impossible
    model or recipe is a ConfigError naming the combination, before anything trains."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if tokens is not None and tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {tokens}")
    axes = parse_vary(vary)
    base_train = {**TrainConfig().to_dict(), **base_train}
    if base_train["workers"] > 1:
        raise ConfigError(f"--workers {base_train['workers']}: each run of a compare uses one "
                          f"process; --jobs sets how many run at once")
    if base_train["log_format"] != "full":
        raise ConfigError("--log-format: a compare shows its own progress, one line per run")
    first = base_train["seed"]
    base_train.update(workers=1, log_every=0, log_format="full")
    if base_train["data_seed"] == -1:  # every config and seed: the same split and order
        base_train["data_seed"] = first
    configs = []
    for values in itertools.product(*(vals for _, _, _, vals in axes)):
        label = ", ".join(f"{flag}={_show(v)}" for (flag, _, _, _), v in zip(axes, values)) \
            or "base"
        model, train = dict(base_model), dict(base_train)
        for (_, part, name, _), v in zip(axes, values):
            (model if part == "model" else train)[name] = v
        try:
            model = GPTConfig.from_dict(model).to_dict()
            train = TrainConfig.from_dict(train).to_dict()
            _check_size(model, train)
        except ConfigError as e:
            raise ConfigError(f"the grid's config {label} is impossible: {e}") from None
        del train["seed"]
        configs.append(Config(label, dir_name(label), model, train))
    grid = Grid(configs, [first + i for i in range(seeds)], data and os.path.abspath(data),
                [(flag, vals) for flag, _, _, vals in axes], configs[0].label, tokens)
    if baseline is not None:
        grid.baseline = find_config(grid.configs, baseline).label
    if tokens is not None:
        _steps_for_tokens(grid, tokens)
    return grid


def _check_size(model: dict, train: dict) -> None:
    from .model import check_size
    vocab = train["vocab_size"] if train["tokenizer"] == "bpe" else model["vocab_size"]
    check_size(GPTConfig.from_dict({**model, "vocab_size": max(vocab, 2)}))


def find_config(configs: list, spec: str):
    """The config a --baseline names: its label, or FIELD=VALUE pairs (comma-separated) that
    match its label's and no other config's."""
    for c in configs:
        if c.label == spec:
            return c
    want = {p.strip().replace("_", "-") for p in spec.split(",") if p.strip()}
    found = [c for c in configs if want <= set(c.label.split(", "))]
    if len(found) == 1:
        return found[0]
    labels = "; ".join(c.label for c in configs)
    raise ConfigError(f"--baseline {spec}: " + ("matches several configs" if found else
                      "matches no config") + f" (the configs: {labels})")


def _steps_for_tokens(grid: Grid, tokens: int) -> None:
    """--tokens N: each config's steps, so that it sees about N training positions: N over the
    positions one step holds (a stream window is block_size; a document, its length on average
    over the training set)."""
    import random

    from .data import load_corpus
    per_example = {}
    for c in grid.configs:
        tc = TrainConfig.from_dict({**c.train, "seed": grid.seeds[0]})
        key = (c.model["block_size"], json.dumps(c.train, sort_keys=True))
        if key not in per_example:
            corpus = load_corpus(grid.data, tc, c.model["block_size"], random.Random(tc.seed))
            ex = corpus.train_examples
            per_example[key] = (sum(sum(1 for y in t if y >= 0) for _, t in ex) / len(ex)
                                if corpus.mode == "docs" else c.model["block_size"])
        per_step = per_example[key] * tc.batch_size * tc.grad_accum
        c.train["steps"] = max(1, round(tokens / per_step))


# --- the directory -----------------------------------------------------------------------------


def _differences(old: dict, new: dict) -> list[str]:
    out = []
    for key in ("data", "tokens", "vary", "baseline"):
        if old.get(key) != new.get(key):
            out.append(f"{key} {brief(old.get(key))} -> {brief(new.get(key))}")
    old_c = {c["label"]: c for c in old.get("configs", [])}
    for c in new["configs"]:
        if c["label"] in old_c and old_c[c["label"]] != c:
            was = old_c[c["label"]]
            for part in ("model", "train"):
                for k, v in c[part].items():
                    if was.get(part, {}).get(k) != v:
                        out.append(f"{c['label']}: {k} {brief(was.get(part, {}).get(k))} -> "
                                   f"{brief(v)}")
    if not out and [c["label"] for c in old.get("configs", [])] != \
            [c["label"] for c in new["configs"]]:
        out.append("the configs")
    return out


def open_dir(out: str, grid: Grid) -> None:
    """Make DIR for this grid, or check that it already holds it: the same grid again resumes
    (more seeds than before add runs); another grid is refused, naming what differs. Written
    before any training."""
    path = os.path.join(out, MANIFEST)
    new = grid.to_dict()
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise TrainingError(f"{path} cannot be read ({e}): is {out} a compare directory?")
        diffs = _differences(old, new) if isinstance(old, dict) else ["not a manifest"]
        old_seeds = old.get("seeds", []) if isinstance(old, dict) else []
        if not diffs and new["seeds"][:len(old_seeds)] != old_seeds:
            diffs.append(f"seeds {old_seeds} -> {new['seeds']} (more seeds are fine; "
                         f"other seeds are not)")
        if diffs:
            raise TrainingError(f"{out} holds a different compare ({'; '.join(diffs)}): choose "
                                f"another --out, or delete {out} to start over")
        if new == old:
            return
    elif os.path.isdir(out) and os.listdir(out):
        raise TrainingError(f"{out} is not empty and holds no {MANIFEST}: choose another --out "
                            f"for this compare")
    os.makedirs(out, exist_ok=True)
    atomic_write(path, [json.dumps(new, indent=2).encode() + b"\n"])


def run_state(run_dir: str, steps: int) -> tuple[str, int]:
    """("done" | "partial" | "new", step reached) of one run directory."""
    from .checkpoint import CheckpointError, load_checkpoint
    last = os.path.join(run_dir, "last.safetensors")
    if not os.path.exists(last):
        return "new", 0
    try:
        step = load_checkpoint(last).step
    except CheckpointError:
        return "new", 0
    return ("done" if step >= steps else "partial"), step


# --- one run, in its own process ---------------------------------------------------------------


def _child(conn, parent: int, model: dict, train_cfg: dict, data, run_dir: str, resume: bool):
    """Train (or resume) one run and report to the parent over `conn`: ("step", step, loss,
    val) now and then, then ("done", step) / ("stopped", step) / ("failed", message)."""
    os.setpgrp()  # out of the terminal's process group: the parent forwards Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (fork copies the parent's handlers) until
    signal.signal(signal.SIGINT, signal.default_int_handler)  # train sets its own
    unblock_signals()  # (blocked by the parent around the fork: parallel.signals_held)
    from .train import train
    last = [0.0]

    def progress(info):
        if os.getppid() != parent:  # the compare process died: save and stop
            return False
        now = time.monotonic()
        if now - last[0] > 0.25 or info["val_loss"] is not None:
            last[0] = now
            conn.send(("step", info["step"], info["loss"], info["val_loss"]))
        return True
    try:
        tc = TrainConfig.from_dict(train_cfg)
        if resume:
            result = train(None, None, data, run_dir, resume=True, quiet=True, callback=progress)
        else:
            result = train(GPTConfig.from_dict(model), tc, data, run_dir, quiet=True,
                           callback=progress)
        conn.send(("done" if result.step >= tc.steps else "stopped", result.step))
    except Interrupted as e:
        conn.send(("stopped", -1, str(e)))
    except KeyboardInterrupt:
        conn.send(("stopped", -1, "stopped at once (a second signal)"))
    except Exception as e:  # noqa: BLE001  (any failure is reported, and the others go on)
        conn.send(("failed", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


# --- the pool ----------------------------------------------------------------------------------


@dataclass
class Job:
    config: Config
    seed: int
    dir: str
    steps: int
    state: str = "waiting"  # waiting | running | done | stopped | failed
    step: int = 0
    start_step: int = 0
    loss: float | None = None
    val: float | None = None
    t0: float = 0.0
    message: str = ""
    proc: object = None
    conn: object = None


def _context():
    import multiprocessing
    methods = multiprocessing.get_all_start_methods()
    # fork: a run starts without re-importing puregpt; spawn where fork does not exist
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class Pool:
    """Runs the jobs, `n` at a time, each in a process of its own; `on_change(jobs)` after
    each job ends; the display redrawn as progress comes in."""

    def __init__(self, jobs: list, n: int, data, display, on_change):
        self.jobs, self.n, self.data = jobs, n, data
        self.display, self.on_change = display, on_change
        self.stopping = None
        self.ctx = _context()

    def _signal(self, signum, frame):
        first = self.stopping is None
        self.stopping = signum
        for job in self.jobs:
            if job.state == "running":
                try:  # train: the first SIGTERM saves and stops; a second stops at once
                    os.kill(job.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if first:
            self.display.note("stopping: every run saves its checkpoint and stops "
                              "(Ctrl-C again: stop at once)")

    def _start(self, job: Job) -> None:
        state, step = run_state(job.dir, job.steps)
        parent, child = self.ctx.Pipe(duplex=False)
        c = job.config
        train_cfg = {**c.train, "seed": job.seed}
        job.proc = self.ctx.Process(target=_child, args=(child, os.getpid(), c.model, train_cfg,
                                                         self.data, job.dir, state == "partial"),
                                    daemon=False)
        # Ctrl-C during the fork would reach the child before it has handlers of its own
        # (it would run the parent's copy and train on): signals wait until both are ready,
        # and until the job is marked running, so that the handler forwards them to it
        with signals_held():
            job.proc.start()
            job.conn, job.state, job.step, job.start_step = parent, "running", step, step
            job.t0 = time.monotonic()
        child.close()

    def _read(self, job: Job) -> None:
        try:
            while job.conn.poll():
                msg = job.conn.recv()
                if msg[0] == "step":
                    job.step, job.loss = msg[1], msg[2]
                    job.val = msg[3] if msg[3] is not None else job.val
                elif msg[0] in ("done", "stopped"):
                    job.state = msg[0]
                    job.message = msg[2] if len(msg) > 2 else ""
                    if msg[1] >= 0:
                        job.step = msg[1]
                else:
                    job.state, job.message = "failed", msg[1]
        except (EOFError, OSError):
            pass

    def run(self) -> None:
        from multiprocessing.connection import wait
        main = _main_thread()
        saved = {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)} \
            if main else {}
        try:
            while True:
                # a job whose process has not been joined yet (it may have said "done" and
                # still be exiting): it holds a slot, and its end redraws the report
                running = [j for j in self.jobs if j.proc is not None and j.conn is not None]
                if self.stopping is None:
                    for job in [j for j in self.jobs if j.state == "waiting"][
                            :self.n - len(running)]:
                        self._start(job)
                        running.append(job)
                if not running:
                    break
                ready = wait([j.conn for j in running] + [j.proc.sentinel for j in running],
                             timeout=0.5)
                ended = False
                for job in running:
                    if job.conn in ready:
                        self._read(job)
                    if job.proc.sentinel in ready or not job.proc.is_alive():
                        job.proc.join()
                        self._read(job)
                        job.conn.close()
                        job.conn = None
                        if job.state == "running":  # died without a word (killed)
                            job.state = "stopped" if self.stopping else "failed"
                            job.message = f"the process ended with code {job.proc.exitcode}"
                        ended = True
                self.display.draw(self.jobs)
                if ended:
                    self.on_change(self.jobs)
        finally:
            for s, h in saved.items():
                signal.signal(s, h)


# --- progress ----------------------------------------------------------------------------------


class Display:
    """One line per run (done / running / waiting) and an overall ETA: redrawn in place on a
    terminal; elsewhere a line when a run starts or ends."""

    def __init__(self, stream=None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.live = not quiet and self.stream.isatty()
        self.drawn, self.last, self.t0 = 0, 0.0, time.monotonic()
        self.seen: dict = {}

    def note(self, text: str) -> None:
        if not self.quiet:
            self._clear()
            print(text, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.live and self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.drawn = 0

    def eta(self, jobs: list) -> str:
        """Steps left over the steps per second this command has trained so far."""
        done = sum(j.step - j.start_step for j in jobs)
        left = sum(j.steps - j.step for j in jobs if j.state in ("waiting", "running"))
        elapsed = time.monotonic() - self.t0
        if not left:
            return "done"
        return f"ETA {_clock(left * elapsed / done)}" if done else "ETA --:--:--"

    def line(self, job: Job) -> str:
        what = f"{job.config.label}  seed {job.seed}"
        if job.state == "running":
            val = f" | val {job.val:.4f}" if job.val is not None else ""
            loss = f" | loss {job.loss:.4f}" if job.loss is not None else ""
            return f"running  {what}: step {job.step}/{job.steps}{loss}{val}"
        if job.state == "done":
            val = f": val {job.val:.4f}" if job.val is not None else ""
            return f"done     {what}{val}"
        if job.state in ("stopped", "failed"):
            return f"{job.state:8s} {what} at step {job.step}/{job.steps}" + (
                f" ({job.message})" if job.state == "failed" else "")
        return f"waiting  {what}"

    def draw(self, jobs: list, force: bool = False) -> None:
        if self.quiet:
            return
        total = sum(j.state == "done" for j in jobs)
        head = f"compare: {total}/{len(jobs)} runs done | {_clock(time.monotonic() - self.t0)}" \
               f" elapsed | {self.eta(jobs)}"
        if self.live:
            now = time.monotonic()
            if not force and now - self.last < 0.2:
                return
            self.last = now
            self._clear()
            lines = [head] + [self.line(j) for j in jobs]
            self.stream.write("\n".join(line[:terminal_width(self.stream) - 1] + "\x1b[K"
                                        for line in lines) + "\n")
            self.stream.flush()
            self.drawn = len(lines)
            return
        for job in jobs:  # plain output: a line per change of state
            if self.seen.get(id(job)) != job.state:
                self.seen[id(job)] = job.state
                if job.state != "waiting":
                    print(self.line(job) + f"   [{head}]", file=self.stream, flush=True)


# --- the command -------------------------------------------------------------------------------


def compare(grid: Grid, out: str, jobs: int = 0, smooth: float = 0.8, quiet: bool = False,
            stream=None) -> dict:
    """Train every run of the grid that is not finished yet, `jobs` at a time (0: one per
    core), redrawing DIR/report.md and DIR/report.html as runs finish; returns the report's
    numbers. Raises Interrupted after Ctrl-C (every run saved), TrainingError if a run failed."""
    from .parallel import available_cpus
    from .report import write_report
    if jobs < 0:
        raise ConfigError(f"--jobs must be >= 0, got {jobs}")
    if grid.data is not None:
        from .data import read_text
        read_text(grid.data)  # a missing or unreadable file fails before anything trains
    open_dir(out, grid)
    todo = []
    for config, seed, run_dir in grid.runs(out):
        job = Job(config, seed, run_dir, config.train["steps"])
        state, job.step = run_state(run_dir, job.steps)
        job.start_step = job.step
        job.state = "done" if state == "done" else "waiting"
        todo.append(job)
    display = Display(stream, quiet)
    n = jobs or available_cpus()
    left = sum(j.state != "done" for j in todo)
    display.note(f"compare: {len(grid.configs)} config(s) x {len(grid.seeds)} seed(s) = "
                 f"{len(todo)} runs in {out}/" + (f"; {len(todo) - left} already done" if
                                                  left < len(todo) else "")
                 + (f"; {min(n, left)} at a time" if left else ""))

    def redraw(_jobs=None):
        return write_report(grid, out, smooth)
    pool = Pool(todo, n, grid.data, display, redraw)
    if left:
        pool.run()
        display.draw(todo, force=True)
    report = redraw()
    stopped = [j for j in todo if j.state == "stopped"]
    failed = [j for j in todo if j.state == "failed"]
    if failed:
        raise TrainingError("runs failed: " + "; ".join(
            f"{j.dir}: {j.message}" for j in failed) + f" (the report of the others is in "
            f"{out}/report.md)")
    if stopped or pool.stopping is not None:
        raise Interrupted(f"interrupted: {len(stopped)} run(s) stopped with their checkpoints "
                          f"saved; the same command again resumes them",
                          pool.stopping or signal.SIGINT)
    return report


def group_runs(run_dirs: list[str]) -> Grid:
    """The grid that existing run directories make (`puregpt compare RUN...`): runs whose
    settings differ only in seed (and in what changes no result) are one config, labelled by
    the settings that tell the configs apart."""
    groups: dict[str, list] = {}
    for d in run_dirs:
        path = os.path.join(d, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
            model, train = dict(info["model"]), dict(info["train"])
        except FileNotFoundError:
            raise TrainingError(f"{d} has no config.json: is it a run directory?") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrainingError(f"{path} cannot be read: {e}") from None
        seed = train["seed"]
        for k in IGNORED:
            train.pop(k, None)
        key = json.dumps([model, train, info.get("data")], sort_keys=True)
        groups.setdefault(key, []).append((d, seed, model, train, info.get("data")))
    members = list(groups.values())
    varying = []
    for part in (2, 3):  # the model fields, then the training fields, in their order
        for k in members[0][0][part]:
            if len({json.dumps(m[0][part].get(k)) for m in members}) > 1:
                varying.append((part, k))
    data_differs = len({m[0][4] for m in members}) > 1
    configs = []
    for m in members:
        label = ", ".join(f"{k.replace('_', '-')}={_show(m[0][part].get(k))}"
                          for part, k in varying)
        if data_differs:
            label = (label + ", " if label else "") + f"data={os.path.basename(m[0][4] or '')}"
        label = label or "base"
        configs.append(Config(label, dir_name(label), m[0][2], m[0][3],
                              [(seed, d) for d, seed, *_ in m]))
    if len({c.label for c in configs}) < len(configs):
        for i, c in enumerate(configs):  # runs that differ in settings compare ignores
            c.label += f" #{i + 1}"
    seeds = sorted({s for c in configs for s, _ in c.dirs})
    return Grid(configs, seeds, members[0][0][4], [(k, []) for _, k in varying],
                configs[0].label)


def report_runs(run_dirs: list[str], out: str, baseline: str | None = None,
                smooth: float = 0.8) -> dict:
    """`puregpt compare RUN...`: the report of existing runs, written to OUT/report.md and
    OUT/report.html."""
    from .report import write_report
    if len(run_dirs) < 1:
        raise ConfigError("compare RUN...: name run directories")
    grid = group_runs(run_dirs)
    if baseline is not None:
        grid.baseline = find_config(grid.configs, baseline).label
    os.makedirs(out, exist_ok=True)
    return write_report(grid, out, smooth)

