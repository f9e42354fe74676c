"""Continue training a puregpt model in PyTorch, on several processes or machines, and bring it
back.

    puregpt export RUN HF_DIR --dtype f32 [--with-optimizer]       # in pure Python
    torchrun --standalone --nproc_per_node=2 examples/continue_in_pytorch.py HF_DIR OUT \\
        --steps 200 --batch-size 16
    puregpt import-hf OUT/hf back.safetensors                     # pure Python again

HF_DIR is a directory written by `puregpt export`: a GPT2LMHeadModel, or a LlamaForCausalLM for
a llama-shaped model (--preset llama); AutoModelForCausalLM loads either, and the optimizer state
is named after the model's own tensors. The script reads the same text with the same
tokenizer and the same train/validation split as puregpt: it calls puregpt's own data.load_corpus
with the data recipe the export recorded (puregpt_data.json: the data file and its SHA-256, the
mode, the seeds, val_fraction, long_docs), so there is one definition of the split, not two that
could drift apart (puregpt is pure Python: importing it costs no dependency).

Training: AdamW (weight decay on 2-D matmul weights only, as puregpt), under
torch.nn.parallel.DistributedDataParallel. --batch-size is the GLOBAL number of sequences per
step; rank r of W takes sequences r, r + W, ... of it. Each rank's loss is its sum of token losses
divided by the global number of target tokens, times W (DDP averages gradients over ranks), so the
gradient is that of the global batch's mean loss whatever the world size: W processes take the
same steps as one. Step s's batch is a function of s alone (docs mode: training examples
s*B ... s*B + B - 1 in puregpt's order, cycling; stream mode: windows drawn by an RNG seeded with
(--seed, s)), so a resumed run continues exactly.

Launching:
    python examples/continue_in_pytorch.py HF_DIR OUT ...       one process, no torchrun needed
    torchrun --standalone --nproc_per_node=N examples/continue_in_pytorch.py HF_DIR OUT ...
        N processes on this machine: gloo on CPU, nccl (one GPU per process) when CUDA is present
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-id=job1 \\
        --rdzv-endpoint=HOST0:29500 examples/continue_in_pytorch.py HF_DIR OUT ...
        run the same command on every machine (HOST0 is one of them, reachable from all);
        HF_DIR, the data file and OUT must be at the same paths on each (a shared file system
        for OUT, since rank 0 writes the checkpoints and the others read them on resume)

Outputs in OUT: checkpoint.safetensors (weights, AdamW moments, step; written atomically every
--save-every steps and at the end; rerunning the same command resumes from it), metrics.jsonl
(step, loss, lr, val_loss), and hf/ (a Hugging Face directory with the tokenizer files and the
data recipe, which `puregpt import-hf` reads, and which this script can continue from again).

What carries over: the weights, the tokenizer, the split. The optimizer state carries over only
if the export has optimizer.safetensors (`puregpt export --with-optimizer`); otherwise AdamW
starts fresh (zero moments, step 0). The learning rate schedule does not carry over: this script
numbers its own steps 0 .. --steps - 1, with --warmup steps of linear warmup, then a constant
--lr (default: the recipe's lr).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
import safetensors.torch
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

try:
    import puregpt  # noqa: F401 (installed, or run from a checkout: the parent directory)
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from puregpt.checkpoint import CheckpointError
from puregpt.config import ConfigError, TrainConfig
from puregpt.data import DataError, detect_mode, load_corpus, read_text
from puregpt.fsutil import atomic_write, fsync_dir
from puregpt.hf import DATA_RECIPE_FILE, OPTIMIZER_FILE, read_data_recipe, read_tokenizer

CHECKPOINT = "checkpoint.safetensors"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json", DATA_RECIPE_FILE)


class ScriptError(Exception):
    """Bad input: printed as one line, exit status 2."""


# --- the model directory and the data ----------------------------------------------------------


def check_model_dir(hf_dir: str) -> None:
    """An exported model: config.json, model.safetensors, tokenizer files."""
    if not os.path.isdir(hf_dir):
        raise ScriptError(f"{hf_dir} is not a directory: expected a model written by "
                          f"`puregpt export RUN DIR`")
    missing = [n for n in ("config.json", "model.safetensors")
               if not os.path.isfile(os.path.join(hf_dir, n))]
    if not any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "vocab.json")):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if missing:
        raise ScriptError(f"{hf_dir} is not an exported model: missing {', '.join(missing)} "
                          f"(write one with `puregpt export RUN DIR`)")


def check_characters(path: str, text: str, tokenizer, docs_mode: bool) -> None:
    """A character vocabulary cannot encode what it has not seen: name the first such character
    and where it is (a byte-level BPE encodes any text)."""
    if tokenizer.kind != "char":
        return
    known = set(tokenizer.chars)
    for n, line in enumerate(text.split("\n"), 1):
        body = line.strip() if docs_mode else line
        offset = line.find(body) if docs_mode else 0
        for col, ch in enumerate(body, offset + 1):
            if ch not in known:
                raise ScriptError(f"{path}, line {n}, column {col}: character {ch!r} "
                                  f"(U+{ord(ch):04X}) is not in the model's vocabulary of "
                                  f"{len(known)} characters")
    if not docs_mode and "\n" in text and "\n" not in known:
        raise ScriptError(f"{path}: the text has line breaks but the vocabulary has no '\\n'")


def load_data(hf_dir: str, data: str | None, block_size: int, rank0: bool):
    """puregpt's Corpus of the text: the same tokenizer, the same split (data.load_corpus with the
    recorded recipe, and the same first draw of random.Random(seed) for the docs shuffle)."""
    recipe = read_data_recipe(hf_dir)
    tc_dict = dict(recipe.get("train_config") or {})
    path = data or recipe.get("data")
    if not path:
        raise ScriptError(f"{hf_dir} does not record its data file: pass --data FILE")
    if recipe.get("mode") in ("docs", "stream"):
        tc_dict["mode"] = recipe["mode"]  # auto resolved as puregpt resolved it
    try:
        tc = TrainConfig.from_dict(tc_dict)
        tokenizer = read_tokenizer(hf_dir)
        text = read_text(path)
    except (ConfigError, CheckpointError, DataError) as e:
        raise ScriptError(str(e)) from None
    mode = tc.mode if tc.mode != "auto" else detect_mode(text)[0]  # as load_corpus decides
    check_characters(path, text, tokenizer, mode == "docs")  # before: its error has no line
    try:
        corpus = load_corpus(path, tc, block_size, random.Random(tc.seed), tokenizer=tokenizer)
    except DataError as e:
        raise ScriptError(str(e)) from None
    if rank0 and recipe.get("sha256") not in (None, corpus.sha256):
        print(f"warning: {path} is not the text the model was trained on (its SHA-256 differs "
              f"from {DATA_RECIPE_FILE}'s): the split will not be puregpt's", file=sys.stderr)
    return corpus, tc, recipe


def global_batch(corpus, step: int, batch_size: int, block_size: int, seed: int) -> list:
    """The (inputs, targets) pairs of optimizer step `step`: a function of the step alone."""
    if corpus.mode == "docs":
        n = len(corpus.train_examples)
        return [corpus.train_examples[(step * batch_size + i) % n] for i in range(batch_size)]
    ids, rng = corpus.train_ids, random.Random(f"{seed}:{step}")
    starts = [rng.randrange(len(ids) - block_size) for _ in range(batch_size)]
    return [(ids[s:s + block_size], ids[s + 1:s + block_size + 1]) for s in starts]


def to_tensors(pairs: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs padded with 0 and targets padded with -1 (ignored). Padding goes at the
    end, where causal attention keeps it from changing the real positions."""
    T = max(len(x) for x, _ in pairs)
    x = torch.tensor([xs + [0] * (T - len(xs)) for xs, _ in pairs], dtype=torch.long)
    y = torch.tensor([ys + [-1] * (T - len(ys)) for _, ys in pairs], dtype=torch.long)
    return x.to(device), y.to(device)


def loss_sum(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The sum of the cross-entropies of every target position (targets -1 ignored)."""
    logits = model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")


def n_targets(pairs: list) -> int:
    return sum(1 for _, ys in pairs for t in ys if t != -1)


@torch.no_grad()
def batch_loss(model, pairs: list, device="cpu") -> float:
    """Mean cross-entropy over the target positions of `pairs`: puregpt's loss of a batch."""
    return (loss_sum(model, *to_tensors(pairs, device)) / n_targets(pairs)).item()


# --- processes ---------------------------------------------------------------------------------


def start_processes():
    """(rank, world size, device): torchrun's environment, or one process without it."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def all_sum(values: list[float], device) -> list[float]:
    """Element-wise sums over the processes (the values themselves with one process)."""
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- the optimizer and checkpoints -------------------------------------------------------------


def make_optimizer(model, lr, tc: TrainConfig, weight_decay: float):
    """AdamW decaying the 2-D matmul weights only (not embeddings, norms, biases: puregpt's
    optim.decays)."""
    decay, other = [], []
    for name, p in model.named_parameters():
        is_embedding = name.endswith(("wte.weight", "wpe.weight", "embed_tokens.weight"))
        (decay if p.dim() == 2 and not is_embedding else other).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=lr,
                             betas=(tc.beta1, tc.beta2), eps=tc.eps)


def set_adam_state(model, optimizer, moments: dict, step: int) -> None:
    """Put AdamW moments (exp_avg.NAME, exp_avg_sq.NAME) and the step count into its state."""
    for name, p in model.named_parameters():
        missing = [k for k in (f"exp_avg.{name}", f"exp_avg_sq.{name}") if k not in moments]
        if missing:
            raise ScriptError(f"the optimizer state lacks {', '.join(missing)}")
        optimizer.state[p] = {
            "step": torch.tensor(float(step)),
            "exp_avg": moments[f"exp_avg.{name}"].to(p.device, p.dtype).reshape(p.shape).clone(),
            "exp_avg_sq": moments[f"exp_avg_sq.{name}"].to(p.device, p.dtype)
            .reshape(p.shape).clone()}


def read_safetensors(path: str) -> tuple[dict, dict]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def save_checkpoint(path: str, model, optimizer, step: int) -> None:
    """Weights (model.NAME), AdamW moments (exp_avg.NAME, exp_avg_sq.NAME), this run's step and
    Adam's step count (they differ when the moments came from optimizer.safetensors), as one
    safetensors file written beside the target and renamed over it (fsutil.atomic_write): a
    crash leaves the old file or the new one."""
    tensors, adam_step = {}, 0
    for n, p in model.named_parameters():
        tensors[f"model.{n}"] = p.detach().cpu().contiguous()
        if p in optimizer.state:
            state = optimizer.state[p]
            adam_step = int(state["step"])
            tensors[f"exp_avg.{n}"] = state["exp_avg"].detach().cpu().contiguous()
            tensors[f"exp_avg_sq.{n}"] = state["exp_avg_sq"].detach().cpu().contiguous()
    meta = {"step": str(step), "adam_step": str(adam_step)}
    atomic_write(path, [safetensors.torch.save(tensors, metadata=meta)])


def load_checkpoint(path: str, model, optimizer) -> int:
    """Restore save_checkpoint's file; returns the step to continue from."""
    try:
        tensors, meta = read_safetensors(path)
        step = int(meta["step"])
    except Exception as e:
        raise ScriptError(f"{path} is not a checkpoint of this script ({e}); remove it or "
                          f"pass --fresh") from None
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f"model.{n}" not in tensors:
                raise ScriptError(f"{path} lacks model.{n}: not a checkpoint of this model "
                                  f"(pass --fresh to start again from HF_DIR)")
            p.copy_(tensors[f"model.{n}"])
    if any(k.startswith("exp_avg.") for k in tensors):
        set_adam_state(model, optimizer, tensors, int(meta.get("adam_step", step)))
    return step


def write_hf(model, hf_dir: str, out: str) -> None:
    """OUT/hf: save_pretrained's config.json and model.safetensors, plus the tokenizer files and
    the data recipe of the input directory; built beside its place and renamed in."""
    final = os.path.join(out, "hf")
    tmp, old = final + ".partial", final + ".old"
    for d in (tmp, old):
        shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)) and \
                not os.path.exists(os.path.join(tmp, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, name))
    if os.path.exists(final):
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out)


# --- the run -----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir", help="a directory written by `puregpt export`")
    p.add_argument("out", help="where checkpoint.safetensors, metrics.jsonl and hf/ go")
    p.add_argument("--data", help="the text file (default: the one the export records)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of this run")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step, over all "
                   "processes together")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warmup")
    p.add_argument("--weight-decay", type=float, help="default: the recipe's")
    p.add_argument("--grad-clip", type=float, help="global gradient-norm clip; 0 = off "
                   "(default: the recipe's)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between validation "
                   "losses (and at the end)")
    p.add_argument("--log-every", type=int, default=0, help="steps between log lines "
                   "(0: about 20 lines a run; validation steps always print)")
    p.add_argument("--save-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0, help="stream mode: seeds the windows drawn")
    p.add_argument("--fresh", action="store_true", help="ignore OUT/checkpoint.safetensors and "
                   "start again from HF_DIR")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = start_processes()
    try:
        return run(args, rank, world, device)
    except ScriptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, rank: int, world: int, device) -> int:
    rank0 = rank == 0
    hf_logging.disable_progress_bar()  # one log, ours
    check_model_dir(args.hf_dir)
    # dtype="auto": the dtype the export wrote (float64 stays float64)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype="auto").to(device)
    block_size = model.config.max_position_embeddings  # GPT-2: n_positions; Llama the same key
    corpus, tc, recipe = load_data(args.hf_dir, args.data, block_size, rank0)
    if args.batch_size < world:
        raise ScriptError(f"--batch-size {args.batch_size} is smaller than the {world} "
                          f"processes: each needs at least one sequence")
    lr = tc.lr if args.lr is None else args.lr
    wd = tc.weight_decay if args.weight_decay is None else args.weight_decay
    clip = tc.grad_clip if args.grad_clip is None else args.grad_clip
    optimizer = make_optimizer(model, lr, tc, wd)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, CHECKPOINT)
    start, resumed = 0, False
    if os.path.isfile(ckpt_path) and not args.fresh:
        start, resumed = load_checkpoint(ckpt_path, model, optimizer), True
    elif os.path.isfile(os.path.join(args.hf_dir, OPTIMIZER_FILE)):
        moments, meta = read_safetensors(os.path.join(args.hf_dir, OPTIMIZER_FILE))
        set_adam_state(model, optimizer, moments, int(meta.get("step", 0)))
    ddp = DistributedDataParallel(model) if dist.is_initialized() else model
    if rank0:
        n = sum(p.numel() for p in model.parameters())
        opt_from = ("the checkpoint" if resumed else OPTIMIZER_FILE if optimizer.state
                    else "fresh AdamW")
        print(f"{type(model).__name__}: {n:,} parameters, {model.dtype}, {world} process(es) "
              f"on {device.type} | {corpus.describe()} | "
              f"{'resuming at step ' + str(start) if resumed else 'starting'} | optimizer: "
              f"{opt_from}", flush=True)
    metrics = os.path.join(args.out, "metrics.jsonl")
    if rank0:
        keep_metrics(metrics, start)
    t0 = time.time()
    for step in range(start, args.steps):
        step_lr = lr * min(1.0, (step + 1) / args.warmup) if args.warmup else lr
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        pairs = global_batch(corpus, step, args.batch_size, block_size, args.seed)
        count = n_targets(pairs)  # every process knows the global batch: no communication
        x, y = to_tensors(pairs[rank::world], device)
        local = loss_sum(ddp, x, y)
        optimizer.zero_grad(set_to_none=True)
        (local * world / count).backward()  # DDP averages over the world: the global mean
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        loss = all_sum([local.item()], device)[0] / count
        row = {"step": step + 1, "loss": loss, "lr": step_lr}
        last = step + 1 == args.steps
        if args.eval_every and ((step + 1) % args.eval_every == 0 or last):
            row["val_loss"] = validation_loss(model, corpus, rank, world, device)
        log_every = args.log_every or max(1, args.steps // 20)
        if rank0 and ((step + 1) % log_every == 0 or "val_loss" in row or step == start):
            print(f"step {step + 1:5d} / {args.steps} | loss {loss:.4f}"
                  + (f" | val {row['val_loss']:.4f}" if row.get("val_loss") is not None else "")
                  + f" | lr {step_lr:.2e} | {time.time() - t0:.1f}s", flush=True)
        if rank0:
            with open(metrics, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if (args.save_every and (step + 1) % args.save_every == 0) or last:
            if rank0:
                save_checkpoint(ckpt_path, model, optimizer, step + 1)
            barrier()
    if rank0:
        write_hf(model, args.hf_dir, args.out)
        print(f"wrote {os.path.join(args.out, 'hf')} (puregpt import-hf reads it) and "
              f"{ckpt_path}", flush=True)
    barrier()
    return 0


def keep_metrics(path: str, start: int) -> None:
    """metrics.jsonl holds the rows of steps 1 .. start (those the checkpoint has taken)."""
    rows = []
    if start and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= start:
                        rows.append(line)
                except (ValueError, KeyError, TypeError):
                    pass  # a line a crash cut short
    atomic_write(path, [("".join(rows)).encode("utf-8")])


@torch.no_grad()
def validation_loss(model, corpus, rank: int, world: int, device, chunk: int = 32):
    """Mean loss over puregpt's fixed validation sample, shared between the processes."""
    mine = corpus.val_examples[rank::world]
    total = 0.0
    model.eval()
    for i in range(0, len(mine), chunk):
        total += loss_sum(model, *to_tensors(mine[i:i + chunk], device)).item()
    model.train()
    total, count = all_sum([total, float(n_targets(mine))], device)
    return total / count if count else None


if __name__ == "__main__":
    sys.exit(main())
